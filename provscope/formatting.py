"""Missing values and human-readable durations and sizes, for the CLI and the report."""

from __future__ import annotations

from typing import Any

__all__ = ["format_bytes", "format_duration", "is_missing"]


def is_missing(value: Any) -> bool:
    """None, NaN, ``pd.NA`` or ``NaT``; containers and strings never are (pandas is
    imported lazily: every CLI command imports this module)."""
    if value is None:
        return True
    if isinstance(value, str | dict | list | tuple | bool):
        return False
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def format_duration(seconds: Any) -> str:
    """``45 ms``, ``12.3 s``, ``2m 03s``, ``1h 02m``; ``-`` when unknown."""
    if is_missing(seconds):
        return "-"
    s = float(seconds)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"


def format_bytes(n: Any) -> str:
    """``512 B``, ``1.2 MiB``, up to TiB; ``-`` when unknown."""
    if is_missing(n):
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
