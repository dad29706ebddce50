"""The columnar form both time-series backends read into, and the wide frame built
from it (one code path, so the embedded file and InfluxDB give identical frames)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from provscope.query._base import TEXT

#: Tags with a column in every wide frame, in this order; other tags follow, sorted.
FIXED_TAGS = ("run_id", "host", "rank")


@dataclass
class Columns:
    """Rows of one measurement, wide: ``time_ns[i]`` and ``key[i]`` (an index into
    ``keys``, the tag sets) name row ``i``; ``fields[name][i]`` is its value: float64 with
    NaN for no value, or an object array of ``str``/``None`` for a string field."""

    time_ns: np.ndarray
    key: np.ndarray
    keys: list[dict[str, str]]
    fields: dict[str, np.ndarray] = field(default_factory=dict)

    @staticmethod
    def empty() -> Columns:
        return Columns(np.empty(0, np.int64), np.empty(0, np.int64), [], {})


def pivot(time_ns: np.ndarray, key: np.ndarray, field_code: np.ndarray,
          field_names: Sequence[str], value: np.ndarray,
          str_value: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Long rows (one per field value) to wide rows (one per tag set and time).

    A value written twice for the same tag set, time and field keeps the later one
    (InfluxDB overwrites a field of the same series and time)."""
    n = len(time_ns)
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), {}
    order = np.lexsort((time_ns, key))  # stable: among duplicates the later row is last
    t, k = time_ns[order], key[order]
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(t[1:], t[:-1], out=new[1:])
    new[1:] |= k[1:] != k[:-1]
    row = np.cumsum(new) - 1
    rows = int(row[-1]) + 1
    codes = field_code[order]
    values = value[order]
    strings = str_value[order] if str_value is not None else None
    out: dict[str, np.ndarray] = {}
    for code, name in enumerate(field_names):
        sel = codes == code
        if not sel.any():
            continue
        if strings is not None and any(v is not None for v in strings[sel]):
            col = np.full(rows, None, dtype=object)
            col[row[sel]] = strings[sel]
        else:
            col = np.full(rows, np.nan)
            col[row[sel]] = values[sel]
        out[name] = col
    return t[new], k[new], out


def concat(blocks: list[Columns]) -> Columns:
    """Blocks read in chunks into one ``Columns`` (tag sets merged by value)."""
    blocks = [b for b in blocks if len(b.time_ns)]
    if not blocks:
        return Columns.empty()
    if len(blocks) == 1:
        return blocks[0]
    keys: list[dict[str, str]] = []
    index: dict[tuple[tuple[str, str], ...], int] = {}
    key_parts = []
    for b in blocks:
        remap = np.empty(len(b.keys), dtype=np.int64)
        for i, tags in enumerate(b.keys):
            ident = tuple(sorted(tags.items()))
            if ident not in index:
                index[ident] = len(keys)
                keys.append(tags)
            remap[i] = index[ident]
        key_parts.append(remap[b.key])
    names: list[str] = []
    for b in blocks:
        names += [f for f in b.fields if f not in names]
    fields: dict[str, np.ndarray] = {}
    for name in names:
        parts = []
        is_str = any(b.fields[name].dtype == object for b in blocks if name in b.fields)
        for b in blocks:
            col = b.fields.get(name)
            if col is None:
                col = np.full(len(b.time_ns), None if is_str else np.nan,
                              dtype=object if is_str else np.float64)
            elif is_str and col.dtype != object:
                col = np.array([None if v != v else v for v in col], dtype=object)
            parts.append(col)
        fields[name] = np.concatenate(parts)
    return Columns(np.concatenate([b.time_ns for b in blocks]), np.concatenate(key_parts),
                   keys, fields)


def _integral(values: np.ndarray) -> bool:
    finite = values[~np.isnan(values)]
    return bool(np.all(np.abs(finite) < 2**63) and np.all(finite == np.round(finite)))


def field_array(name: str, values: np.ndarray, int_fields: frozenset[str]) -> Any:
    """A field column in the convention: ``Int64`` for a field the catalogue declares
    an integer (when every value is one), else ``Float64``; ``string`` for text."""
    if values.dtype == object:
        return pd.array(values, dtype=TEXT)
    mask = np.isnan(values)
    if name in int_fields and _integral(values):
        ints = np.where(mask, 0, values).astype(np.int64)
        return pd.arrays.IntegerArray(ints, mask)
    return pd.arrays.FloatingArray(np.where(mask, 0.0, values), mask)


def frame(cols: Columns, fields: Sequence[str] | None, index: str,
          int_fields: frozenset[str]) -> pd.DataFrame:
    """The wide frame: tag columns (``run_id``, ``host``, ``rank``, then the other tags
    present, sorted), ``time`` (when indexed by step), then one column per field (the
    fields asked for, in that order, else every field found, sorted); indexed by
    ``time`` (UTC) or ``step``; rows sorted by the index, then the tags."""
    names = list(fields) if fields is not None else sorted(cols.fields)
    other = sorted({k for tags in cols.keys for k, v in tags.items()
                    if v not in (None, "") and k not in FIXED_TAGS})
    tag_names = [*FIXED_TAGS, *other]
    # Sort order of the tag sets: by each tag in column order, a missing tag last.
    def sort_key(i: int) -> tuple[Any, ...]:
        tags = cols.keys[i]
        return tuple((tags.get(k) in (None, ""), tags.get(k) or "") for k in tag_names)

    by_tags = sorted(range(len(cols.keys)), key=sort_key)
    rank_of = np.empty(len(cols.keys), dtype=np.int64)
    rank_of[by_tags] = np.arange(len(cols.keys))
    key_rank = rank_of[cols.key] if len(cols.keys) else np.empty(0, np.int64)
    t = cols.time_ns
    if index == "step":
        step = cols.fields.get("step")
        if step is None or step.dtype == object:
            keep = np.zeros(len(t), dtype=bool)
            step_values = np.empty(len(t))
        else:
            keep = ~np.isnan(step)
            step_values = step
        order = np.lexsort((key_rank[keep], t[keep], step_values[keep]))
        rows = np.flatnonzero(keep)[order]
    else:
        rows = np.lexsort((key_rank, t))
    data: dict[str, Any] = {}
    key_rows = cols.key[rows]
    for tag in tag_names:
        per_key = np.array([tags.get(tag) or None for tags in cols.keys] or [None],
                           dtype=object)
        data[tag] = pd.array(per_key[key_rows] if len(cols.keys) else
                             np.full(len(rows), None, dtype=object), dtype=TEXT)
    times = pd.DatetimeIndex(t[rows].astype("datetime64[ns]")).tz_localize("UTC")
    if index == "step":
        data["time"] = times
    for name in names:
        values = cols.fields.get(name)
        if values is None:
            data[name] = pd.array(np.full(len(rows), None, dtype=object), dtype="Float64")
        else:
            data[name] = field_array(name, values[rows], int_fields)
    if index == "step":
        step_col = data.pop("step") if "step" in data else field_array(
            "step", cols.fields["step"][rows], int_fields) if "step" in cols.fields else \
            pd.array(np.empty(0), dtype="Float64")
        idx = pd.Index(step_col, name="step")
        if idx.dtype == "Int64" and not idx.hasnans:
            idx = pd.Index(idx.to_numpy(dtype=np.int64), name="step")
    else:
        idx = pd.Index(times, name="time")
    df = pd.DataFrame(data, index=idx)
    df.attrs.update({"tags": tag_names, "fields": names})
    return df
