"""``provscope diff``, ``provscope reproduce`` and ``provscope cost``: runs side by side,
what it takes to rerun one, and quality against cost (``provscope.compare``).

Each reads the stores the configuration names (the embedded file by default) and prints
plain aligned text, or JSON with ``--json``. An unknown or ambiguous run id, or a run
still in progress without ``--partial``, is one line and exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from provscope.commands.lineage import format_bytes, format_duration

__all__ = ["register"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--partial", action="store_true",
                   help="accept runs still in progress (values so far, marked partial)")
    p.add_argument("--lineage-url", metavar="URL",
                   help="read this lineage store (sqlite:///PATH or postgresql://...)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``diff``, ``reproduce`` and ``cost`` subcommands."""
    d = sub.add_parser(
        "diff", help="what differs between two runs",
        description="Config, code version, environment (packages, Python, torch, CUDA, "
        "hosts), data digests and final metrics of two runs, side by side. Run ids may "
        "be unambiguous prefixes.")
    d.add_argument("run_a", metavar="RUN_A", help="run id or an unambiguous prefix")
    d.add_argument("run_b", metavar="RUN_B", help="run id or an unambiguous prefix")
    d.add_argument("--all", action="store_true", help="list the keys that are the same too")
    _common(d)
    d.set_defaults(handler=run_diff)

    r = sub.add_parser(
        "reproduce", help="how to rerun a run, and what is missing to do so",
        description="The exact command, config, code commit and data digests of a run, "
        "and what stands in the way of rerunning it: a dirty working tree, a commit or "
        "command not recorded, data changed or gone since (local files are digested "
        "again). Exit 0 when nothing is missing, 3 when something is.")
    r.add_argument("run_id", metavar="RUN_ID", help="run id or an unambiguous prefix")
    r.add_argument("--no-check", action="store_true",
                   help="do not read the data files again (faster; data not checked)")
    _common(r)
    r.set_defaults(handler=run_reproduce)

    c = sub.add_parser(
        "cost", help="quality against cost across runs, Pareto front marked",
        description="Each run's final (or best) metric against GPU-hours, energy, wall "
        "time and bytes read; '*' marks the Pareto front (no other run is better and "
        "cheaper). Without RUN_IDs: every ended run (--name filters).")
    c.add_argument("run_ids", metavar="RUN_ID", nargs="*",
                   help="runs to compare (default: every ended run)")
    c.add_argument("--metric", default="loss",
                   help="a field of the train measurement (default loss)")
    c.add_argument("--mode", choices=("min", "max"), default="min",
                   help="min: lower is better (default); max: higher is better")
    c.add_argument("--best", action="store_true",
                   help="use each run's best value instead of its final one")
    c.add_argument("--name", help="only runs with this name")
    c.add_argument("-n", "--limit", type=int, default=None, metavar="N",
                   help="at most N runs (most recent first)")
    _common(c)
    c.set_defaults(handler=run_cost)


def _config(args: argparse.Namespace) -> Any:
    from provscope.commands import load_from_args

    return load_from_args(args, **{"lineage.url": args.lineage_url})


def _cell(value: Any, width: int = 48) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, dict | list):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)


def _partial_note(ids: list[str]) -> None:
    if ids:
        print(f"partial: still running: {', '.join(ids)} (values so far)", file=sys.stderr)



# ----------------------------------------------------------------------------- diff

def run_diff(args: argparse.Namespace) -> int:
    """``provscope diff RUN_A RUN_B``. Returns the exit code."""
    from provscope import compare

    df = compare.diff(args.run_a, args.run_b, only_differences=not args.all,
                      partial=args.partial, config=_config(args))
    if args.json:
        print(compare.to_json(df))
        return 0
    a, b = df.attrs["run_a"], df.attrs["run_b"]
    print(f"A  {a}\nB  {b}")
    if df.empty:
        print("\nno differences in config, code, environment, data or final metrics")
    for section, part in df.groupby("section", sort=False):
        rows = [[str(r.key), _cell(r.a), _cell(r.b)] for r in part.itertuples()]
        print(f"\n{section}")
        print(_table(["KEY", "A", "B"], rows))
    _partial_note(df.attrs["running"])
    return 0


# ----------------------------------------------------------------------------- reproduce

def run_reproduce(args: argparse.Namespace) -> int:
    """``provscope reproduce RUN_ID``. Exit 0 when reproducible as recorded, else 3."""
    from provscope import compare

    rep = compare.reproduce(args.run_id, check_files=not args.no_check,
                            partial=args.partial, config=_config(args))
    if args.json:
        print(compare.to_json(rep))
        return 0 if rep.ready else 3
    code = rep.code
    print(f"run      {rep.run_id}  {rep.name or '-'}  ({rep.status or '-'})")
    print(f"hosts    {', '.join(rep.hosts) or '-'}")
    env = rep.environment
    packages: dict[str, Any] = env["packages"] if isinstance(env.get("packages"), dict) else {}
    versions = [f"python {env['python']}"] if env.get("python") else []
    versions += [f"{k} {v}" for k, v in sorted(packages.items())]
    if env.get("cuda"):
        versions.append(f"CUDA {env['cuda']}")
    print(f"software {', '.join(versions) or '-'}")
    print("\nto rerun it:")
    if code.get("commit"):
        where = f" -C {code['repo']}" if code.get("repo") else ""
        print(f"  git{where} checkout {code['commit']}"
              + ("   # the run had uncommitted changes" if code.get("dirty") else ""))
    print(f"  {rep.command}" if rep.command else "  (no command recorded)")
    if rep.config:
        print("\nconfig")
        print("  " + json.dumps(rep.config, indent=2, default=str).replace("\n", "\n  "))
    if rep.data:
        print("\ndata")
        rows = [[c.status, c.kind or "-", c.uri or c.name or "-", _cell(c.digest, 80),
                 format_bytes(c.size_bytes)] for c in rep.data]
        print(_table(["STATUS", "KIND", "URI", "RECORDED DIGEST", "SIZE"], rows))
    if rep.missing:
        print("\nmissing to rerun it exactly:")
        for line in rep.missing:
            print(f"  - {line}")
    else:
        print("\nnothing missing: same command, clean commit, data unchanged")
    _partial_note([rep.run_id] if rep.partial else [])
    return 0 if rep.ready else 3


# ----------------------------------------------------------------------------- cost

def run_cost(args: argparse.Namespace) -> int:
    """``provscope cost [RUN_ID ...]``. Returns the exit code."""
    from provscope import compare

    df = compare.quality_cost(args.run_ids or None, metric=args.metric, mode=args.mode,
                              which="best" if args.best else "final", name=args.name,
                              limit=args.limit, partial=args.partial, config=_config(args))
    if args.json:
        print(compare.to_json(df))
        return 0
    if df.empty:
        print("no ended runs to compare (`provscope runs` lists them)")
        return 0

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None or v != v else fmt.format(float(v))

    label = f"{'BEST' if args.best else 'FINAL'} {args.metric.upper()}"
    rows = [["*" if r["pareto"] else "", str(r["run_id"]), _cell(r["name"], 24),
             num(r["value"], "{:.6g}"), num(r["gpu_hours"], "{:.4g}"),
             num(r["energy_kwh"], "{:.4g}"), format_duration(r["wall_s"]),
             format_bytes(r["read_bytes"])]
            for r in df.astype(object).where(df.notna(), None).to_dict(orient="records")]
    print(_table(["", "RUN ID", "NAME", label, "GPU H", "ENERGY KWH", "WALL", "READ"], rows))
    print(f"\n* Pareto front: no other run has a better {args.metric} "
          f"({'lower' if args.mode == 'min' else 'higher'} is better) at no more cost")
    _partial_note(df.attrs["running"])
    return 0
