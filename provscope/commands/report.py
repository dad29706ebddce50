"""``provscope report RUN_ID [RUN_ID ...] -o report.html``: one self-contained HTML file
(``provscope.report``)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` subcommand."""
    p = sub.add_parser(
        "report", help="an HTML report of one or more runs (self-contained file)",
        description="Summary, task timeline, loss and throughput curves, GPU/CPU/memory/"
        "IO utilisation, a layer-statistics heatmap and the resource summary of each run; "
        "for several runs also their differences, their curves together and quality "
        "against cost. Plots are embedded: the file fetches nothing when opened.")
    p.add_argument("run_ids", metavar="RUN_ID", nargs="+",
                   help="run ids, unambiguous prefixes, or latest")
    p.add_argument("-o", "--output", metavar="FILE", default="report.html",
                   help="the HTML file to write (default report.html)")
    p.add_argument("--partial", action="store_true",
                   help="accept runs still in progress (what is recorded so far)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--lineage-url", metavar="URL",
                   help="read this lineage store (sqlite:///PATH or postgresql://...)")
    p.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    """``provscope report``. Returns the exit code."""
    from provscope import report
    from provscope.commands import load_from_args

    config = load_from_args(args, **{"lineage.url": args.lineage_url})
    done = report.write(args.run_ids, args.output, partial=args.partial,
                        progress=not args.no_progress and sys.stderr.isatty(), config=config)
    print(f"wrote {done['path']} ({done['bytes'] / 1024:.0f} KiB, {len(done['runs'])} "
          f"run{'s' if len(done['runs']) != 1 else ''}, {done['seconds']:.1f} s)")
    return 0
