"""``provscope demo``: train a tiny model on the CPU and record everything about it.

Works on a fresh machine with no server: time series and lineage go to the embedded
SQLite file. ``--influx-url`` / ``--lineage-url`` (or the same keys in the config file)
send them to InfluxDB and PostgreSQL instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import time
from pathlib import Path

from provscope.destinations import absolute_paths, destinations
from provscope.errors import ConfigError, ProvscopeError

__all__ = ["register"]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not allowed; a number of seconds in (0, 86400]")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; a whole number >= 1")
    return int(text)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="train a tiny transformer on the CPU (~30 s) and record it",
        description="Train a tiny character-level transformer on text shipped with "
        "provscope, recording the run, its tasks, scalars, dataset and checkpoint. "
        "No server needed: everything goes to the embedded SQLite file unless "
        "--influx-url/--lineage-url (or the config) name servers.",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=_positive_float, default=30.0,
                        help="training wall time in seconds (default 30)")
    length.add_argument("--steps", type=_positive_int, default=None,
                        help="train exactly this many steps instead of --seconds")
    parser.add_argument("--out", default="provscope-demo", metavar="DIR",
                        help="where the checkpoint is saved (default ./provscope-demo/)")
    parser.add_argument("--influx-url", default=None, metavar="URL",
                        help="send time series to this InfluxDB (sets influxdb.url)")
    parser.add_argument("--lineage-url", default=None, metavar="URL",
                        help="send lineage to this database, postgresql://user@host:port/db "
                        "or sqlite:///file.db (sets lineage.url)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-watch", action="store_true",
                        help="no layer statistics (provscope.watch) on the model")
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from provscope.commands import load_from_args

    start = time.perf_counter()
    if args.influx_url and not re.match(r"^https?://", args.influx_url):
        raise ConfigError(f"--influx-url {args.influx_url!r} is not allowed; "
                          "use http://host:port or https://host:port")
    if args.lineage_url and not re.match(r"^(postgresql(\+\w+)?|sqlite)://", args.lineage_url):
        raise ConfigError(f"--lineage-url {args.lineage_url!r} is not allowed; use "
                          "postgresql://user@host:port/db or sqlite:///path.db")
    config = load_from_args(args, **{"influxdb.url": args.influx_url,
                                     "lineage.url": args.lineage_url})
    if importlib.util.find_spec("torch") is None:
        raise ProvscopeError("provscope demo needs PyTorch; install it with "
                             "pip install 'provscope[torch]'") from None
    from provscope import fallback
    from provscope.demo import train

    out_dir = Path(args.out).expanduser().absolute()
    reason = fallback.unwritable(str(out_dir / "checkpoint.probe"))
    if reason is not None:
        raise ProvscopeError(f"cannot write the checkpoint directory {out_dir} ({reason}); "
                             "give --out DIR in a writable place")
    result = train(config, seconds=args.seconds, steps=args.steps, out_dir=args.out,
                   progress=not args.no_progress, watch=not args.no_watch)
    wall = time.perf_counter() - start
    if result.sink_mode in ("failed", "drop"):
        raise ProvscopeError("the demo's records could not be written (the pipeline did not "
                             "start; see the warning above); nothing was recorded")
    print()
    if result.sink_mode == "agent":
        print("Data went to the provscope agent on this node, which writes it to its stores.")
    else:
        used = absolute_paths(config)
        if fallback.unwritable(used.embedded.path) is not None:
            stand_in = fallback.fallback_dir(used.embedded.path) / "provscope.db"
            used = used.model_copy(update={"embedded": used.embedded.model_copy(
                update={"path": str(stand_in)})})
        where = destinations(used)  # no credentials, absolute paths
        print("Data went to:")
        print(f"  time series  {where['time_series']}")
        print(f"  lineage      {where['lineage']}")
    print(f"  checkpoint   {result.checkpoint}")
    print()
    eval_text = f" (eval {result.eval_loss:.4f})" if result.eval_loss is not None else ""
    written = result.written.get("points", 0)
    rows = [
        ("run", result.run_id),
        ("tasks", f"{result.counts.get('tasks', 0)} recorded ({result.epochs} "
                  f"epoch{'' if result.epochs == 1 else 's'}, {result.steps} steps, "
                  "step tasks sampled)"),
        ("points", f"{result.counts.get('points', 0)} "
                   f"{'written' if result.flushed else 'recorded, not all written yet'}"
                   + (f" ({written} field values stored)" if written else "")),
        ("entities", str(result.counts.get("entities", 0))),
        ("final loss", f"{result.final_loss:.4f}{eval_text}"),
        ("wall time", f"{wall:.1f} s (training {result.train_s:.1f} s)"),
        ("inspect", f"provscope show {result.run_id}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("Summary")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if not result.flushed:
        print("note: not every record was written before the deadline; the rest is spooled "
              "and sent when the destination answers", flush=True)
    return 0
