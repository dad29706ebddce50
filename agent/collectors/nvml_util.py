"""Small helpers shared by the NVML modules: error codes and constants read safely.

Codes and constants are read by value with a default, so an older ``pynvml`` (or a
stand-in module) that lacks a name, or carries something else under it, cannot break
the collector.
"""

from __future__ import annotations

from typing import Any

__all__ = ["nvml_const", "nvml_error_code"]


def nvml_error_code(exc: BaseException) -> int | None:
    """The ``nvmlReturn_t`` of an ``NVMLError`` (its ``value``), else None."""
    value = getattr(exc, "value", None)
    return value if type(value) is int else None


def nvml_const(nv: Any, name: str, default: int | None = None) -> int | None:
    """``nv.<name>`` when it is an integer constant, else ``default``."""
    value = getattr(nv, name, None) if isinstance(name, str) else None
    return value if type(value) is int else default
