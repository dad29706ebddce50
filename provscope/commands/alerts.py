"""``provscope alerts build``: Grafana alert rules and Prometheus rules from the config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "alerts",
        help="generate the alert rules (Grafana provisioning, Prometheus)",
        description="Generate alert rules from the `alerts` section of the configuration "
        "(the shipped rules merged with yours; docs/alerts.md): Grafana-provisioned rules "
        "on InfluxDB, a contact point and a notification policy, and Prometheus alerting "
        "rules over the agent's /metrics. The output is deterministic.",
    )
    actions = p.add_subparsers(dest="alerts_action", metavar="ACTION")
    build = actions.add_parser(
        "build", help="write DIR/alerting/*.yaml and DIR/prometheus/provscope-rules.yml",
        description="Validate the alert rules (one line per problem, exit code 2) and "
        "write DIR/alerting/{provscope-rules,contact-points,policies}.yaml and "
        "DIR/prometheus/provscope-rules.yml; unchanged files are left as they are.")
    build.add_argument("--out", metavar="DIR", default="provisioning", type=Path,
                       help="provisioning directory (default: ./provisioning)")
    build.set_defaults(handler=run)
    p.set_defaults(handler=lambda _args: p.print_help() or 2)


def run(args: argparse.Namespace) -> int:
    """Build the alert files into ``args.out``. Every configuration problem is printed,
    one line each, before anything is written (exit code 2)."""
    from provscope.commands import split_override
    from provscope.config import load_config
    from provscope.dashboards.alert_build import build

    problems: list[str] = []
    overrides = dict(split_override(text) for text in args.overrides)
    config = load_config(args.config, overrides=overrides, report=problems.append)
    if problems:
        for line in problems:
            print(f"provscope: {line}", file=sys.stderr)
        return 2
    rules = config.alerts.enabled_rules()
    for path in build(config.alerts, args.out):
        print(f"wrote {path}")
    print(f"{len(rules)} alert rules ({', '.join(rules) or 'none'})")
    return 0
