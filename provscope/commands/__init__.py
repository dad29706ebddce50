"""One module per ``provscope`` subcommand; each defines ``register(subparsers)``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from provscope.config import Config, load_config, split_override

__all__ = ["load_from_args", "load_lenient"]


def load_from_args(args: argparse.Namespace, **extra: object) -> Config:
    """The validated Config for parsed CLI args (file, env, ``--set``, command flags).

    Raises:
        ConfigError: a bad file, variable, ``--set`` or flag value (one line).
    """
    return _load(args, None, extra)


def load_lenient(args: argparse.Namespace, report: Callable[[str], Any],
                 **extra: object) -> Config:
    """As ``load_from_args``, but each problem is passed to ``report`` as one line and
    that setting alone keeps its default (``provscope run``, which always runs its
    command). Never raises ``ConfigError``."""
    return _load(args, report, extra)


def _load(args: argparse.Namespace, report: Callable[[str], Any] | None,
          extra: dict[str, object]) -> Config:
    overrides: dict[str, object] = {}
    for text in args.overrides:
        try:
            key, value = split_override(text)
        except Exception as exc:
            if report is None:
                raise
            report(str(exc))
            continue
        overrides[key] = value
    overrides.update({k: v for k, v in extra.items() if v is not None})
    return load_config(args.config, overrides=overrides, report=report)
