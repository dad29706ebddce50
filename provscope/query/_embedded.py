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

import contextlib
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
        fast = _arrow(path, case, clause, [*names, *params], filters)
        if fast is not None:
            time_ns, codes, value, strings, key, keys = fast
            if not len(time_ns):
                return Columns.empty()
            t, k, out = pivot(time_ns, key, codes, names, value, strings)
            return Columns(t, k, keys, out)
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


def _arrow(path: Path, case: str, clause: str, params: list[Any],
           filters: Mapping[str, Sequence[str]]) -> \
        tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray,
              list[dict[str, str]]] | None:
    """The rows through the ADBC SQLite driver as numpy arrays (``time_ns``, field codes,
    float64 values with NaN, text values or None, tag-set codes) and the tag sets in
    order of first appearance: the same arrays the ``sqlite3`` path builds. None when the
    driver is not installed or fails in any way (the caller then reads with
    ``sqlite3``). Blocks while it reads."""
    try:
        import adbc_driver_sqlite.dbapi as adbc
        import pyarrow as pa
        import pyarrow.compute as pc
    except ImportError:
        return None
    # The driver's cost is per cell, so as few columns as the rows allow: a tag column
    # the filter pins to one value is not read (`IN (?)` matches that exact text only),
    # the others and the JSON tags are folded into one string.
    pinned = {k: v[0] for k in _COLUMN_TAGS if len(v := filters.get(k, ())) == 1
              and isinstance(v[0], str)}
    free = [k for k in _COLUMN_TAGS if k not in pinned]
    fold = f" || '{_SEP}' || ".join([*(f"coalesce({k}, '')" for k in free),
                                     "coalesce(tags, '')"])
    # Numbers first, without str_value: most measurements hold no text, and every
    # column costs the driver time per row. Text (and a cell with neither) can only be
    # where value is NULL; those rows are read again with str_value and used only when
    # they are exactly the NULL rows of the first read (same times, fields and tags, in
    # order), else everything is read once more with placeholders and NULL flags. The
    # flags are also the way out when the driver mistypes a column: it types a column
    # from its first batch (all NULL: int64) and refuses a later row of another type.
    numbers = f"SELECT time_ns, {case}, value, {fold} FROM points WHERE {clause}"
    texts = (f"SELECT time_ns, {case}, str_value, {fold} FROM points "
             f"WHERE {clause} AND value IS NULL")
    flagged = (f"SELECT time_ns, {case}, ifnull(value, 0.0), {fold}, value IS NULL, "
               f"ifnull(str_value, ''), str_value IS NULL FROM points WHERE {clause}")
    text_types = (pa.string(), pa.large_string())
    try:
        with adbc.connect(f"file:{path}?mode=ro") as conn:
            table: Any = None
            text_values: list[str | None] = []
            try:
                table = _fetch(conn, numbers, params)
                value_null = pc.is_null(table.column(2)).to_numpy(zero_copy_only=False)
                if value_null.any():
                    nulls = pa.array(value_null)
                    extra = _fetch(conn, texts, params)
                    same = extra.num_rows == int(value_null.sum()) and all(
                        extra.column(i).combine_chunks().equals(
                            pc.filter(table.column(i), nulls).combine_chunks())
                        for i in (0, 1, 3))
                    str_col = extra.column(2)
                    if not same or (str_col.type not in text_types
                                    and str_col.null_count != len(str_col)):
                        raise ValueError("the rows without a number changed between reads")
                    text_values = str_col.to_pylist() if str_col.type in text_types \
                        else [None] * len(str_col)
            except (adbc.Error, OSError, ValueError) as exc:  # a type error is an OSError
                log.debug("ADBC read of %s: %s; reading with flags", path, exc)
                table = _fetch(conn, flagged, params)
                value_null = table.column(4).to_numpy().astype(bool)
                str_null = table.column(6).to_numpy().astype(bool)
                is_text = value_null & ~str_null  # a number wins over text, as in sqlite3's
                every = np.full(table.num_rows, None, dtype=object)
                if is_text.any():
                    every[is_text] = pc.filter(table.column(5), pa.array(is_text)).to_pylist()
                text_values = list(every[value_null])
        n = table.num_rows
        if not n:
            empty = np.empty(0, np.int64)
            return empty, empty, np.empty(0), None, empty, []
        time_col, code_col, value_col, fold_col = table.columns[:4]
        if time_col.type != pa.int64() or code_col.type != pa.int64() \
                or fold_col.type not in text_types \
                or (value_col.type != pa.float64() and not value_null.all()):
            return None  # not the table's declared types: sqlite3 reads them as they are
        if value_null.all():
            value = np.full(n, np.nan)
        else:
            value = value_col.to_numpy().astype(np.float64)  # a copy; NULL -> NaN
            value[value_null] = np.nan
        strings = None
        if any(v is not None for v in text_values):
            strings = np.full(n, None, dtype=object)
            strings[value_null] = np.array(text_values, dtype=object)
        # Tag sets as codes in order of first appearance (as pd.factorize gives).
        folded = pc.dictionary_encode(fold_col.combine_chunks())
        keys = []
        for text in folded.dictionary.to_pylist():
            *tag_values, extra_tags = text.split(_SEP, len(free))
            parts = {**pinned, **dict(zip(free, tag_values, strict=True))}
            keys.append(_tags(_SEP.join([*(parts[k] for k in _COLUMN_TAGS), extra_tags])))
        return (time_col.to_numpy().astype(np.int64, copy=False),
                code_col.to_numpy().astype(np.int64, copy=False), value, strings,
                folded.indices.to_numpy().astype(np.int64), keys)
    except Exception as exc:  # any driver failure: the sqlite3 path reads instead
        log.debug("ADBC read of %s failed, reading with sqlite3: %s", path, exc)
        return None


def _fetch(conn: Any, sql: str, params: list[Any]) -> Any:
    """One SELECT's rows as a pyarrow Table, in large batches (fewer, and typed from
    more rows)."""
    with conn.cursor() as cur:
        with contextlib.suppress(Exception):  # an older driver without the option
            cur.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": "131072"})
        cur.execute(sql, params)
        return cur.fetch_arrow_table()


def _tags(folded: str) -> dict[str, str]:
    run_id, host, rank, extra = folded.split(_SEP, 3)
    tags = json.loads(extra) if extra else {}
    tags.update({k: v for k, v in (("run_id", run_id), ("host", host), ("rank", rank)) if v})
    return {k: str(v) for k, v in tags.items() if v not in (None, "")}
