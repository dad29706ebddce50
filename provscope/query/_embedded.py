"""Time series from the embedded SQLite file (``points``, one row per field value).

The fast path, hand-written because the obvious one (``pandas.read_sql`` and a pivot)
builds a Python object per cell several times over: one SELECT of as few Python
objects per row as the rows allow (the field as a small integer code from a bound
``CASE``, the three tag columns and the other tags folded into one string by SQLite),
``fetchall``, then numpy for the rest (``Columns``, ``pivot``). Every value is bound.

Faster still when the ``fast`` extra is installed: the same bound SELECT is read with
the ADBC SQLite driver (``adbc-driver-sqlite``) into Arrow columns in C, with no Python
object per cell (``_arrow``). Its results are the same arrays as the ``sqlite3`` path's;
when the driver is missing or answers with any error (it types a column from its first
rows and refuses a later row of another type), the ``sqlite3`` path reads instead."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from provscope.errors import ProvscopeError
from provscope.query._columns import Columns, pivot

log = logging.getLogger("provscope.query")

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
        fast = _arrow(path, case, fold, clause, [*names, *params])
        if fast is not None:
            time_ns, codes, value, strings, key, uniques = fast
            if not len(time_ns):
                return Columns.empty()
            t, k, out = pivot(time_ns, key, codes, names, value, strings)
            return Columns(t, k, [_tags(u) for u in uniques], out)
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


def _arrow(path: Path, case: str, fold: str, clause: str, params: list[Any]) -> \
        tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray,
              list[str]] | None:
    """The rows through the ADBC SQLite driver as numpy arrays (``time_ns``, field codes,
    float64 values with NaN, text values or None, the folded tags as codes into the
    distinct folded tags in order of first appearance), the same arrays the ``sqlite3``
    path builds; None when the driver is not installed or fails in any way (the caller
    then reads with ``sqlite3``). Blocks while it reads."""
    try:
        import adbc_driver_sqlite.dbapi as adbc
        import pyarrow as pa
        import pyarrow.compute as pc
    except ImportError:
        return None
    # No column may be NULL in the first rows: the driver types a column from its first
    # batch (an all-NULL batch reads as int64) and refuses a later row of another type.
    # So value and str_value come with a placeholder and `kind` says which one holds
    # the cell: 0 a number, 1 text, 2 neither.
    sql = (f"SELECT time_ns, {case}, ifnull(value, 0.0), ifnull(str_value, ''), "
           "CASE WHEN value IS NOT NULL THEN 0 WHEN str_value IS NOT NULL THEN 1 ELSE 2 END, "
           f"{fold} FROM points WHERE {clause}")
    try:
        with adbc.connect(f"file:{path}?mode=ro") as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            table = cur.fetch_arrow_table()
        if not table.num_rows:
            empty = np.empty(0, np.int64)
            return empty, empty, np.empty(0), None, empty, []
        time_col, code_col, value_col, str_col, kind_col, fold_col = table.columns
        if (str(time_col.type), str(code_col.type), str(value_col.type),
                str(kind_col.type)) != ("int64", "int64", "double", "int64") \
                or str(str_col.type) not in ("string", "large_string"):
            return None  # not the table's declared types: sqlite3 reads it as it is
        kind = kind_col.to_numpy()
        value = value_col.to_numpy().copy()
        value[kind != 0] = np.nan
        strings = None
        is_text = kind == 1
        if is_text.any():
            strings = np.full(len(kind), None, dtype=object)
            strings[is_text] = pc.filter(str_col, pa.array(is_text)).to_pylist()
        # The tag sets as codes, in order of first appearance (as pd.factorize gives).
        folded = pc.dictionary_encode(fold_col.combine_chunks())
        return (time_col.to_numpy().astype(np.int64, copy=False),
                code_col.to_numpy().astype(np.int64, copy=False), value, strings,
                folded.indices.to_numpy().astype(np.int64), folded.dictionary.to_pylist())
    except Exception as exc:  # any driver failure: the sqlite3 path reads instead
        log.debug("ADBC read of %s failed, reading with sqlite3: %s", path, exc)
        return None


def _tags(folded: str) -> dict[str, str]:
    run_id, host, rank, extra = folded.split(_SEP, 3)
    tags = json.loads(extra) if extra else {}
    tags.update({k: v for k, v in (("run_id", run_id), ("host", host), ("rank", rank)) if v})
    return {k: str(v) for k, v in tags.items() if v not in (None, "")}
