"""``provscope config``: print the defaults sample, or validate and print the effective config."""

from __future__ import annotations

import argparse

import yaml


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="show or check configuration",
        description="Print a commented sample of every setting (--defaults), the environment "
        "variables (--env), or validate the effective configuration and print it.",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--defaults", action="store_true",
                       help="print every setting with its default, commented out")
    group.add_argument("--env", action="store_true",
                       help="list the PROVSCOPE_* environment variables and their keys")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from provscope.config import defaults_yaml, env_names

    if args.defaults:
        print(defaults_yaml(), end="")
        return 0
    if args.env:
        for var, key in env_names().items():
            print(f"{var:55s} {key}")
        return 0
    from provscope.commands import load_from_args
    from provscope.config import redacted

    config = load_from_args(args)
    # Passwords and tokens print as ***, URLs without passwords (docs/security.md).
    print(yaml.safe_dump(redacted(config), sort_keys=False), end="")
    return 0
