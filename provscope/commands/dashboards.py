"""``provscope dashboards build``: generate the Grafana dashboards and their provider."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dashboards",
        help="generate the Grafana dashboards (provisioning files)",
        description="Generate provscope's Grafana dashboards as JSON, with the dashboard "
        "provider file, under a provisioning directory. The output is deterministic: the "
        "same provscope writes the same bytes.",
    )
    actions = p.add_subparsers(dest="dashboards_action", metavar="ACTION")
    build = actions.add_parser(
        "build", help="write provisioning/dashboards/{provscope.yaml,json/<uid>.json}",
        description="Write the dashboard provider (DIR/dashboards/provscope.yaml) and one "
        "JSON file per dashboard (DIR/dashboards/json/<uid>.json); unchanged files are "
        "left as they are.")
    build.add_argument("--out", metavar="DIR", default="provisioning", type=Path,
                       help="provisioning directory (default: ./provisioning)")
    build.set_defaults(handler=run)
    p.set_defaults(handler=lambda _args: p.print_help() or 2)


def run(args: argparse.Namespace) -> int:
    """Build the dashboards into ``args.out``; prints one line per file written."""
    try:
        from provscope.dashboards.build import BUILDERS, write
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("grafana_foundation_sdk"):
            from provscope.errors import ConfigError

            raise ConfigError("provscope dashboards build needs grafana-foundation-sdk: "
                              "pip install 'provscope[dashboards]'") from None
        raise
    written = write(args.out)
    for path in written:
        print(f"wrote {path}")
    print(f"{len(BUILDERS)} dashboards in {args.out / 'dashboards'}, {len(written)} files changed")
    return 0
