"""One rule for a test whose server or tool is missing: skip it, except in CI.

Outside CI a developer without InfluxDB, PostgreSQL, Prometheus or ``promtool`` installed
still runs everything else; with ``CI`` set (``1``/``true``/``yes``) the same test fails,
so a CI machine that lacks them cannot pass by skipping.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

__all__ = ["in_ci", "require_binary", "unavailable"]


def in_ci() -> bool:
    """True when the ``CI`` environment variable says so (``1``, ``true``, ``yes``)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str | BaseException) -> NoReturn:
    """Skip the calling test with ``reason``; fail it instead when ``in_ci()``."""
    import pytest  # only tests call this; provscope itself does not depend on pytest

    if in_ci():
        pytest.fail(f"required in CI but missing: {reason}")
    pytest.skip(str(reason))


def require_binary(name: str, package: str, path: str | None = None) -> str:
    """The full path of executable ``name``, or ``unavailable`` naming the package."""
    found = shutil.which(name, path=path)
    if found is None:
        unavailable(f"{name} is not installed (package: {package})")
    return found
