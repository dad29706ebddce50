"""One module per ``provscope`` subcommand; each defines ``register(subparsers)``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from provscope.config import Config, load_config, split_override

__all__ = ["load_from_args"]


def load_from_args(args: argparse.Namespace, report: Callable[[str], Any] | None = None,
                   **extra: object) -> Config:
    """The validated Config for parsed CLI args (file, env, ``--set``, command flags).

    Args:
        report: None: the first problem raises. A callable (``provscope run``, which
            always runs its command): each problem is passed to it as one line and that
            setting alone keeps its default.

    Raises:
        ConfigError: (strict) a bad file, variable, ``--set`` or flag value (one line).
    """
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
