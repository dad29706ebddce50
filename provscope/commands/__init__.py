"""One module per ``provscope`` subcommand; each defines ``register(subparsers)``."""

from __future__ import annotations

import argparse

from provscope.config import Config, load_config, split_override

__all__ = ["load_from_args"]


def load_from_args(args: argparse.Namespace, **extra: object) -> Config:
    """The validated Config for parsed CLI args (file, env, ``--set``, command flags).

    Raises:
        ConfigError: a bad file, variable, ``--set`` or flag value (one line).
    """
    overrides: dict[str, object] = {}
    for text in args.overrides:
        key, value = split_override(text)
        overrides[key] = value
    overrides.update({k: v for k, v in extra.items() if v is not None})
    return load_config(args.config, overrides=overrides)
