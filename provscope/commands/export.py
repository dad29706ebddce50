"""``provscope export RUN_ID --format prov-json|prov-n|prov-o [-o FILE]``: a run as a
W3C PROV document (``provscope.provexport``)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand."""
    p = sub.add_parser(
        "export", help="a run as a W3C PROV document (PROV-JSON, PROV-N, PROV-O)",
        description="The run and its tasks as activities; datasets, models and "
        "checkpoints as entities; hosts, the user and the software as agents; with used, "
        "wasGeneratedBy, wasDerivedFrom, wasInformedBy and wasAssociatedWith. RUN_ID may "
        "be an unambiguous prefix or 'latest'.")
    p.add_argument("run_id", metavar="RUN_ID", help="run id, an unambiguous prefix, or latest")
    p.add_argument("-f", "--format", dest="fmt", default="prov-json",
                   choices=("prov-json", "prov-n", "prov-o"),
                   help="prov-json (default), prov-n (PROV-N text) or prov-o (RDF Turtle)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write to FILE instead of standard output")
    p.add_argument("--partial", action="store_true",
                   help="accept a run still in progress (what is recorded so far)")
    p.add_argument("--lineage-url", metavar="URL",
                   help="read this lineage store (sqlite:///PATH or postgresql://...)")
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    """``provscope export``. Returns the exit code."""
    from provscope import compare, provexport
    from provscope.commands import load_from_args
    from provscope.errors import ProvscopeError

    config = load_from_args(args, **{"lineage.url": args.lineage_url})
    row = compare.resolve(args.run_id, partial=args.partial, what="export", config=config)
    text = provexport.serialize(provexport.document(str(row["run_id"]), config=config),
                                args.fmt)
    if not text.endswith("\n"):
        text += "\n"
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as exc:
            raise ProvscopeError(f"cannot write {args.output}: {exc.strerror or exc}") \
                from None
        print(f"wrote {args.fmt} of run {row['run_id']} to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
