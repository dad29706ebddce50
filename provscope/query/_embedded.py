"""Time series from the embedded SQLite file (``points``, one row per field value).

The fast path, hand-written because the obvious one (``pandas.read_sql`` and a pivot)
builds a Python object per cell several times over: one SELECT of as few Python
objects per row as the rows allow (the field as a small integer code from a bound
``CASE``, the three tag columns and the other tags folded into one string by SQLite),
``fetchall``, then numpy for the rest (``Columns``, ``pivot``). Every value is bound."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from provscope.errors import ProvscopeError
from provscope.query._columns import Columns, pivot

_COLUMN_TAGS = ("run_id", "host", "rank")
_SEP = "\x1f"  # between the folded tag columns (a tag value cannot hold it: sanitised)


def _open(path: Path) -> sqlite3.Connection | None:
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'points'").fetchone():
            conn.close()
            return None
    except sqlite3.DatabaseError as exc:
        raise ProvscopeError(f"embedded store {path} cannot be read: {exc}") from None
    return conn


def where(measurement: str, fields: Sequence[str] | None,
          filters: Mapping[str, Sequence[str]], lo: int | None,
          hi: int | None) -> tuple[str, list[Any]]:
    """The WHERE clause (with ``?`` placeholders) and its parameters."""
    clauses = ["measurement = ?"]
    params: list[Any] = [measurement]
    if fields is not None:
        clauses.append(f"field IN ({', '.join('?' * len(fields))})")
        params += list(fields)
    if lo is not None:
        clauses.append("time_ns >= ?")
        params.append(lo)
    if hi is not None:
        clauses.append("time_ns <= ?")
        params.append(hi)
    for key, values in filters.items():
        marks = ", ".join("?" * len(values))
        if key in _COLUMN_TAGS:
            clauses.append(f"{key} IN ({marks})")
        else:
            clauses.append(f"json_extract(tags, ?) IN ({marks})")
            params.append('$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"')
        params += list(values)
    return " AND ".join(clauses), params


def read(path: Path, measurement: str, fields: Sequence[str] | None,
         filters: Mapping[str, Sequence[str]], lo: int | None, hi: int | None) -> Columns:
    """Rows of ``measurement`` as ``Columns``. Blocks while it reads the file."""
    conn = _open(path)
    if conn is None:
        return Columns.empty()
    clause, params = where(measurement, fields, filters, lo, hi)
    try:
        if fields is None:
            names = [r[0] for r in conn.execute(
                f"SELECT DISTINCT field FROM points WHERE {clause}", params)]
        else:
            names = list(dict.fromkeys(fields))
        if not names:
            return Columns.empty()
        # The field as its position in `names`: a small int, which CPython does not
        # allocate; the tags folded into one string: one object instead of four.
        case = "CASE field " + " ".join(f"WHEN ? THEN {i}" for i in range(len(names))) \
            + " END"
        fold = (f"coalesce(run_id, '') || '{_SEP}' || coalesce(host, '') || '{_SEP}' || "
                f"coalesce(rank, '') || '{_SEP}' || coalesce(tags, '')")
        # One column for numbers and text (a field holds one type only); text gets a
        # leading STX so that no text ("1.5") can pass the float cast below as a number.
        rows = conn.execute(
            f"SELECT time_ns, {case}, coalesce(value, char(2) || str_value), {fold} "
            f"FROM points WHERE {clause}", [*names, *params]).fetchall()
    except sqlite3.DatabaseError as exc:
        raise ProvscopeError(f"embedded store {path} cannot be read: {exc}") from None
    finally:
        conn.close()
    if not rows:
        return Columns.empty()
    # One object array, then one cast per column (faster than transposing with zip).
    grid = np.array(rows, dtype=object)
    del rows
    time_ns = grid[:, 0].astype(np.int64)
    codes = grid[:, 1].astype(np.int64)
    mixed = grid[:, 2]
    strings = None
    try:
        value = mixed.astype(np.float64)  # NULL (None) -> NaN
    except (TypeError, ValueError):  # a text field among them
        is_text = np.fromiter((type(v) is str for v in mixed), dtype=bool, count=len(mixed))
        numbers = mixed.copy()
        numbers[is_text] = None
        value = numbers.astype(np.float64)
        strings = np.array([v[1:] if t else None for v, t in zip(mixed, is_text,
                                                                   strict=True)],
                           dtype=object)
    key, uniques = pd.factorize(grid[:, 3])
    keys = [_tags(u) for u in uniques]
    t, k, out = pivot(time_ns, key.astype(np.int64), codes, names, value, strings)
    return Columns(t, k, keys, out)


def _tags(folded: str) -> dict[str, str]:
    run_id, host, rank, extra = folded.split(_SEP, 3)
    tags = json.loads(extra) if extra else {}
    tags.update({k: v for k, v in (("run_id", run_id), ("host", host), ("rank", rank)) if v})
    return {k: str(v) for k, v in tags.items() if v not in (None, "")}
