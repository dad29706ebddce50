"""One JSON-safe converter for every value provscope stores as JSON.

Task arguments and results, run configs, model hyperparameters, lineage JSON columns and
the CLI's ``--json`` output all go through ``jsonable``. It never raises and never
pickles; the ``Limits`` decide how much of a big value is kept:

- ``SUMMARY``: task arguments and results (a task row stays a few KB).
- ``CONFIG``: a run's config and a model's hyperparameters (kept nearly whole).
- ``WHOLE``: no size limits (the lineage store's last resort and the CLI's output);
  only a depth guard against self-referencing containers.

The rules, whatever the limits:

- ``None``, bools, ints and finite floats pass through; NaN and infinities become the
  strings ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has no such numbers, and ``null``
  would read as "unknown").
- Strings pass through (a long one becomes ``{"type": "str", "len", "head"}``); bytes
  become ``{"type", "len"}``; paths their string; dates and times ISO 8601 (``NaT``
  becomes ``None``).
- Tensors and arrays become ``{"type", "shape", "dtype", "device", "numel"}``; a 0-d
  tensor or a numpy scalar its value.
- Mappings, lists, tuples, sets (sorted), dataclasses, pydantic models and
  ``argparse.Namespace`` are converted item by item (a big one becomes
  ``{"type", "len", "first"}``).
- Open files become ``{"type", "name", "mode"}``; anything else ``{"type", "repr"}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import json
import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["CONFIG", "SUMMARY", "WHOLE", "Limits", "dumps", "jsonable", "summarise"]


@dataclasses.dataclass(frozen=True)
class Limits:
    """How much of a value ``jsonable`` keeps (None: no limit).

    Attributes:
        max_str: longest string kept whole, characters.
        max_items: longest list/tuple kept item by item.
        max_keys: most keys of a mapping (fields of an object) kept.
        max_depth: deepest nesting converted item by item; deeper containers are
            described by type and length.
    """

    max_str: int | None
    max_items: int | None
    max_keys: int | None
    max_depth: int


SUMMARY = Limits(max_str=256, max_items=16, max_keys=32, max_depth=4)
CONFIG = Limits(max_str=4096, max_items=256, max_keys=1024, max_depth=4)
WHOLE = Limits(max_str=None, max_items=None, max_keys=None, max_depth=64)

_HEAD = 3  # items shown of a container too big to keep
_HEAD_LIMITS = Limits(max_str=64, max_items=_HEAD, max_keys=_HEAD, max_depth=0)
_REPR_MAX = 120


def jsonable(value: Any, limits: Limits = WHOLE) -> Any:
    """A JSON-safe copy of ``value`` (see the module docstring). Never raises."""
    try:
        return _convert(value, limits, 0)
    except Exception:  # a hostile __repr__/__len__/__iter__: describe the type only
        return {"type": _qualname(value)}


def summarise(value: Any) -> Any:
    """``jsonable(value, SUMMARY)``: a small description for a task's params or result."""
    return jsonable(value, SUMMARY)


_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def dumps(value: Any) -> str:
    """Compact JSON text of ``value``; what plain ``json`` rejects goes through
    ``jsonable`` first. Never raises."""
    try:
        return _ENCODER.encode(value)  # the common case: already plain JSON
    except (TypeError, ValueError, RecursionError):
        return _ENCODER.encode(jsonable(value))


def _qualname(value: Any) -> str:
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _too_many(n: int, limit: int | None) -> bool:
    return limit is not None and n > limit


def _tensor_like(value: Any) -> dict[str, Any] | None:
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return None
    try:
        dims = [int(d) for d in shape]
    except (TypeError, ValueError):
        return None
    out: dict[str, Any] = {"type": _qualname(value), "shape": dims, "dtype": str(dtype)}
    device = getattr(value, "device", None)
    if device is not None:
        out["device"] = str(device)
    out["numel"] = math.prod(dims)
    return out


def _ordered(items: set[Any] | frozenset[Any]) -> list[Any]:
    """A set's items in a stable order (sorted when they compare), so equal sets give
    equal JSON."""
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=repr)


def _convert(value: Any, limits: Limits, depth: int) -> Any:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(float(value))
    if isinstance(value, str):
        if not _too_many(len(value), limits.max_str):
            return value
        return {"type": "str", "len": len(value), "head": value[:64]}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"type": _qualname(value), "len": len(value)}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dt.date | dt.time):
        # pandas' NaT is a datetime that is not equal to itself.
        return None if value != value else value.isoformat()
    tensor = _tensor_like(value)
    if tensor is not None:
        if not tensor["shape"] and hasattr(value, "item"):
            try:  # a 0-d tensor or numpy scalar: its value is the useful part
                return _convert(value.item(), limits, depth)
            except Exception:
                pass
        return tensor
    if isinstance(value, io.IOBase):
        return {"type": _qualname(value), "name": str(getattr(value, "name", "")),
                "mode": str(getattr(value, "mode", ""))}
    nxt = depth + 1
    deep = depth >= limits.max_depth
    if isinstance(value, Mapping):
        n = len(value)
        if not _too_many(n, limits.max_keys) and not deep:
            return {str(k): _convert(v, limits, nxt) for k, v in value.items()}
        keys = [str(k)[:64] for _, k in zip(range(_HEAD * 3), value, strict=False)]
        return {"type": _qualname(value), "len": n, "first_keys": keys}
    if isinstance(value, list | tuple | set | frozenset):
        n = len(value)
        if not _too_many(n, limits.max_items) and not deep:
            if isinstance(value, set | frozenset):
                value = _ordered(value)
            return [_convert(v, limits, nxt) for v in value]
        head = [_convert(v, _HEAD_LIMITS, 0)
                for _, v in zip(range(_HEAD), value, strict=False)]
        return {"type": _qualname(value), "len": n, "first": head}
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and not deep:
        fields = dataclasses.fields(value)[:limits.max_keys]
        return {f.name: _convert(getattr(value, f.name), limits, nxt) for f in fields}
    model_fields = getattr(type(value), "model_fields", None)  # pydantic models
    if isinstance(model_fields, Mapping) and not deep:
        names = list(model_fields)[:limits.max_keys]
        return {k: _convert(getattr(value, k, None), limits, nxt) for k in names}
    if type(value).__name__ == "Namespace" and hasattr(value, "__dict__"):  # argparse
        return _convert(vars(value), limits, depth)
    out: dict[str, Any] = {"type": _qualname(value)}
    if hasattr(value, "__len__"):
        with contextlib.suppress(Exception):
            out["len"] = len(value)
    text = repr(value)
    out["repr"] = text if len(text) <= _REPR_MAX else text[:_REPR_MAX - 3] + "..."
    return out
