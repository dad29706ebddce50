"""``provscope spool [status|replay|drop]``: what waits on disk for a store, and what to do.

- ``status`` (default): one line per spool directory: kind, destination (no
  credentials), points or records waiting, bytes, and whether a running process holds it
  (that process replays it itself). ``--json`` for machines.
- ``replay [DIR ...]``: send the spooled data to the configured stores. Without DIR:
  every directory whose destination is a store of the configuration. With DIR (a name
  from ``status`` or a path) and ``--influx-url``/``--lineage-url``: into that URL, so
  points spooled under a mistyped port go where they belong.
- ``drop DIR ... | --all``: delete spooled data for good; prints how much was dropped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "spool", help="show, replay or drop data spooled while a store was unreachable",
        description="The on-disk spool per destination: status (default), replay, drop.")
    p.add_argument("action", nargs="?", choices=("status", "replay", "drop"), default="status")
    p.add_argument("dirs", nargs="*", metavar="DIR",
                   help="spool directories (names from `provscope spool` or paths)")
    p.add_argument("--all", action="store_true", help="drop: every directory no process holds")
    p.add_argument("--influx-url", metavar="URL", help="replay DIR into this InfluxDB")
    p.add_argument("--lineage-url", metavar="URL", help="replay DIR into this lineage store")
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from provscope.commands import load_from_args
    from provscope.exporters.spool_admin import entries, spool_root

    config = load_from_args(args)
    root = spool_root(config)
    found = entries(root)
    if args.action == "status":
        return _status(found, root, args.json)
    chosen = _chosen(found, args.dirs, root)
    if chosen is None:
        return 2
    if args.action == "drop":
        return _drop(chosen if args.dirs else [e for e in found if args.all and not e.busy],
                     bool(args.dirs or args.all))
    return _replay(found if not args.dirs else chosen, config, args, explicit=bool(args.dirs))


def _chosen(found, names: list[str], root: Path):  # -> list[Entry] | None
    by_path = {e.path.resolve(): e for e in found}
    out = []
    for name in names:
        path = Path(name) if ("/" in name or Path(name).is_dir()) else root / name
        entry = by_path.get(path.resolve())
        if entry is None:
            print(f"provscope: spool: {name} is not a spool directory under {root}; "
                  f"`provscope spool` lists them", file=sys.stderr)
            return None
        out.append(entry)
    return out


def _status(found, root: Path, as_json: bool) -> int:
    from provscope import fallback

    stand_ins = fallback.pending()
    if as_json:
        print(json.dumps({"root": str(root), "spools": [e.as_dict() for e in found],
                          "stand_ins": [{"intended": i, "path": str(p)}
                                        for i, p in stand_ins]}, indent=2))
        return 0
    for intended, path in stand_ins:
        print(f"{path}  embedded store written while {intended} could not be written; "
              "moved there by the next provscope process that can write it")
    if not found:
        print(f"nothing spooled under {root}")
        return 0
    for e in found:
        state = "in use by a running process (it replays it)" if e.busy else "waiting"
        print(f"{e.path.name}  {e.kind} -> {e.destination}: {e.items} {e.unit} in "
              f"{e.batches} batches, {e.bytes} bytes, {state}")
    print(f"spool root: {root}; `provscope spool replay` sends them, `provscope spool drop "
          f"DIR` deletes")
    return 0


def _drop(chosen, asked: bool) -> int:
    from provscope.exporters.spool import SpoolBusy
    from provscope.exporters.spool_admin import drop

    if not asked:
        print("provscope: spool drop needs DIR ... or --all", file=sys.stderr)
        return 2
    code = 0
    for e in chosen:
        try:
            n = drop(e)
        except SpoolBusy:
            print(f"provscope: {e.path.name} is in use by a running process; not dropped",
                  file=sys.stderr)
            code = 1
            continue
        print(f"dropped {n} {e.unit} for {e.destination} ({e.path})")
    return code


def _replay(chosen, config, args: argparse.Namespace, explicit: bool) -> int:
    from provscope.exporters.spool import SpoolBusy
    from provscope.exporters.spool_admin import matches, replay

    code = 0
    for e in chosen:
        url = args.influx_url if e.kind == "influxdb" else args.lineage_url
        if e.busy or (not explicit and not url and not matches(e, config)):
            if not e.busy:
                print(f"skipped {e.path.name}: for {e.destination}, not a store of this "
                      f"configuration (name it with its URL: provscope spool replay "
                      f"{e.path.name} --{'influx' if e.kind == 'influxdb' else 'lineage'}-url "
                      f"URL)")
            continue
        try:
            out = replay(e, config, url)
        except SpoolBusy:
            print(f"skipped {e.path.name}: in use by a running process", file=sys.stderr)
            continue
        line = (f"{e.path.name}: {out.replayed} {e.unit} replayed, {out.dropped} refused "
                f"(dropped), {out.left} left")
        if out.error:
            line += f"; stopped: {out.error}"
            code = 1
        print(line)
    return code
