"""The ``provscope`` command line.

Each subcommand lives in one module of ``provscope.commands`` that defines
``register(subparsers)`` (adds its parser and sets ``handler``). Only this module
installs signal handlers (through the commands it runs). Exit codes: 0 ok, 1 failure,
2 bad usage or bad configuration (one line on stderr, never a traceback), and a wrapped
command's own code for ``provscope run``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from provscope._version import __version__
from provscope.errors import ConfigError, ProvscopeError

__all__ = ["main"]

# Command modules, in the order --help lists them.
COMMAND_MODULES = (
    "provscope.commands.demo",
    "provscope.commands.agent",
    "provscope.commands.run",
    "provscope.commands.lineage",
    "provscope.commands.compare",
    "provscope.commands.export",
    "provscope.commands.report",
    "provscope.commands.config",
    "provscope.commands.spool",
    "provscope.commands.dashboards",
    "provscope.commands.alerts",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="provscope",
        description="Live telemetry and full provenance for training runs: a node agent, "
        "PyTorch layer metrics, lineage in SQL, Grafana as code.",
    )
    parser.add_argument("--version", action="version", version=f"provscope {__version__}")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="YAML config file (default: $PROVSCOPE_CONFIG, else defaults)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        dest="overrides",
                        help="override one setting, e.g. --set influxdb.url=http://127.0.0.1:8086 "
                        "(repeatable; see `provscope config --defaults`)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # a command not built in this release
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``provscope`` console script. Returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="provscope: %(levelname)s %(name)s: %(message)s")
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except ConfigError as exc:
        print(f"provscope: {exc}", file=sys.stderr)
        return 2
    except ProvscopeError as exc:
        if args.verbose and exc.__cause__ is not None:  # a store's own error behind it
            import traceback

            traceback.print_exc()
        print(f"provscope: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as Unix tools do.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        # A corrupt file, an unreachable database, a full disk: one line, never a
        # traceback (-v shows it). Secrets are cut out of the line.
        if args.verbose:
            import traceback

            traceback.print_exc()
        hint = "" if args.verbose else " (run with -v for the details)"
        print(f"provscope: {args.command}: {one_line(exc)}{hint}", file=sys.stderr)
        return 1


def one_line(exc: BaseException) -> str:
    """An exception as one line a person can act on: the database driver's own message
    for SQLAlchemy errors (not its SQL and background link), credentials removed."""
    from provscope.redact import redact

    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), type(inner).__name__)
    name = type(inner).__name__
    return redact(first if first.startswith(name) else f"{name}: {first}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
