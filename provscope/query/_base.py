"""What every query module shares: the configuration, times, the lineage engine and its
errors, the one missing-value convention, and partial results.

Missing values: every frame the query API returns marks a missing cell with ``pd.NA``
through pandas' nullable dtypes (``Float64``, ``Int64``, ``boolean``, ``string``; JSON
columns are ``object`` holding dicts, lists or ``pd.NA``), except time columns, where
pandas has only ``NaT``. ``pd.isna(cell)`` is the one test for all of them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from provscope.errors import ProvscopeError

if TYPE_CHECKING:
    from provscope.config import Config

TimeLike = int | float | str | dt.datetime | pd.Timestamp | None

#: The dtype of a text column (missing: ``pd.NA``, not NaN as pandas' default ``str``).
TEXT = pd.StringDtype("python", na_value=pd.NA)


class PartialResultWarning(UserWarning):
    """A query answered with part of what was asked (a run still in progress, series
    expired or never written, an older lineage schema). The same line is in
    ``df.attrs["warnings"]`` and ``df.attrs["partial"]`` is True."""


def settings(config: Config | None) -> Config:
    """``config``, or the configuration ``load_config()`` finds."""
    if config is not None:
        return config
    from provscope.config import load_config

    return load_config()


def mark_partial(df: Any, line: str | None = None, *, warn: bool = True) -> None:
    """In place: ``df.attrs["partial"] = True`` and, with ``line``, the line appended to
    ``df.attrs["warnings"]`` (and issued as a ``PartialResultWarning``)."""
    df.attrs["partial"] = True
    if line:
        df.attrs.setdefault("warnings", [])
        if line not in df.attrs["warnings"]:
            df.attrs["warnings"].append(line)
            if warn:
                warnings.warn(line, PartialResultWarning, stacklevel=3)


def complete(df: Any) -> Any:
    """In place: ``df.attrs["partial"] = False`` unless already marked. Returns ``df``."""
    df.attrs.setdefault("partial", False)
    df.attrs.setdefault("warnings", [])
    return df


def equals(value: Any, text: str) -> bool:
    """``value == text`` for a cell that may be missing (``pd.NA`` compares to NA)."""
    return isinstance(value, str) and value == text


# ----------------------------------------------------------------------------- times

def to_ns(value: TimeLike) -> int | None:
    """Unix ns from int (ns), float (Unix seconds), ISO string, datetime or Timestamp."""
    if value is None:
        return None
    allowed = ("allowed: int Unix ns, float Unix seconds, an ISO 8601 string or a datetime, "
               "between 1677-09-22 and 2262-04-11")
    if isinstance(value, bool):
        raise ProvscopeError(f"time {value!r} is a bool; {allowed}")
    if isinstance(value, int | np.integer):
        ns = int(value)
    elif isinstance(value, float | np.floating):
        if value != value or abs(value) > 9.2e9:  # NaN, infinities, beyond int64 ns
            raise ProvscopeError(f"time {value!r} is out of range; {allowed}")
        ns = int(value * 1e9)
    else:
        try:
            ts = pd.Timestamp(value)
            if ts is pd.NaT:
                raise ValueError("not a time")
            if ts.tzinfo is None:
                ts = ts.tz_localize("UTC")
            ns = int(ts.value)
        except (ValueError, TypeError, OverflowError) as exc:
            text = " ".join(str(exc).split())[:120]
            raise ProvscopeError(f"time {str(value)[:60]!r} is not a time ({text}); "
                                 f"{allowed}") from None
    if not -(2**63) <= ns < 2**63:
        raise ProvscopeError(f"time {value!r} is out of range; {allowed}")
    return ns


def utc(ns: Any) -> Any:
    """Unix ns (scalar, array or Series; NA allowed) as UTC timestamps."""
    return pd.to_datetime(ns, unit="ns", utc=True)


# ----------------------------------------------------------------------------- lineage store

@functools.lru_cache(maxsize=16)
def _engine(url: str) -> sa.Engine:
    from provscope.exporters.lineage.engine import create_lineage_engine

    return create_lineage_engine(url, writer=False)


def lineage_engine(config: Config) -> sa.Engine | None:
    """The read engine, or None when the embedded file does not exist yet (reading never
    creates it)."""
    url = config.lineage_url
    if url.startswith("sqlite:"):
        db = sa.engine.make_url(url).database
        if db and db != ":memory:":
            path = Path(db).expanduser().resolve()
            if not path.exists():
                return None
            url = f"sqlite:///{path}"  # the engine cache must not depend on the cwd
    return _engine(url)


def safe_url(url: str) -> str:
    """A lineage URL without its password, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the lineage store"


def _driver_line(exc: BaseException) -> str:
    inner = getattr(exc, "orig", None) or exc
    lines = [x.strip() for x in str(inner).strip().splitlines() if x.strip()]
    from provscope.redact import redact

    return redact(lines[0] if lines else type(inner).__name__)[:200]


@contextlib.contextmanager
def connect(config: Config) -> Iterator[sa.Connection | None]:
    """A read connection to the lineage store (None: the embedded file does not exist).

    Raises:
        ProvscopeError: the store is unreachable or is not a provscope database (one
            line naming it, without its password).
    """
    engine = lineage_engine(config)
    if engine is None:
        yield None
        return
    where = safe_url(config.lineage_url)
    try:
        conn = engine.connect()
    except sa.exc.SQLAlchemyError as exc:
        raise ProvscopeError(f"lineage store {where} is unreachable: "
                             f"{_driver_line(exc)}") from exc  # the cause: for `-v`
    try:
        yield conn
    except sa.exc.SQLAlchemyError as exc:
        older = schema_note(conn)
        hint = f" ({older})" if older else ""
        raise ProvscopeError(f"reading lineage store {where} failed: {_driver_line(exc)}"
                             f"{hint}") from exc
    finally:
        conn.close()


def schema_version(conn: sa.Connection) -> int:
    """The schema version of the store (0: no provscope tables)."""
    try:
        from provscope.exporters.lineage.schema import current_version

        return current_version(conn)
    except sa.exc.SQLAlchemyError:
        conn.rollback()
        return 0


def schema_note(conn: sa.Connection) -> str | None:
    """One line when the store's schema is older than the one this release reads."""
    from provscope.exporters.lineage.schema import SCHEMA_VERSION

    found = schema_version(conn)
    if 0 < found < SCHEMA_VERSION:
        return (f"lineage database has schema version {found}, older than this provscope "
                f"reads ({SCHEMA_VERSION}); columns added since read as NA until a "
                "provscope writer (a run, `provscope agent`) upgrades it")
    return None


def has_tables(conn: sa.Connection, *tables: str) -> bool:
    inspector = sa.inspect(conn)
    return all(inspector.has_table(t) for t in tables)


# ----------------------------------------------------------------------------- dtypes

def table_dtypes(table: str) -> dict[str, Any]:
    """The nullable dtype of each column of a lineage table (JSON columns: object)."""
    from provscope.exporters.lineage.schema import JSON_COLUMNS, METADATA

    out: dict[str, Any] = {}
    json_cols = JSON_COLUMNS.get(table, ())
    for col in METADATA.tables[table].columns:
        if col.name in json_cols:
            out[col.name] = object
        elif isinstance(col.type, sa.Boolean):
            out[col.name] = "boolean"
        elif isinstance(col.type, sa.Integer):
            out[col.name] = "Int64"
        elif isinstance(col.type, sa.Float):
            out[col.name] = "Float64"
        elif isinstance(col.type, sa.DateTime):
            out[col.name] = "datetime64[ns, UTC]"
        else:
            out[col.name] = TEXT
    return out


def typed(rows: list[Any], columns: list[str], dtypes: Mapping[str, Any]) -> pd.DataFrame:
    """A frame of ``rows`` (tuples or dicts) with ``columns`` in the convention: each
    column cast to its dtype (``Int64``, ``Float64``, ``boolean``, ``TEXT``, object
    JSON, datetime); a missing cell is ``pd.NA`` (``NaT`` in time columns)."""
    if rows and isinstance(rows[0], Mapping):
        data = {c: [r.get(c) for r in rows] for c in columns}
    else:
        data = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
    out: dict[str, Any] = {}
    for c in columns:
        values = data[c]
        dtype = dtypes.get(c, object)
        if dtype == "datetime64[ns, UTC]":
            out[c] = pd.Series(pd.to_datetime(pd.Series(values, dtype=object), utc=True,
                                              format="mixed"), dtype=dtype)
        elif dtype is object:
            out[c] = pd.Series([pd.NA if v is None else v for v in values], dtype=object)
        elif dtype in ("Int64", "Float64", "boolean"):
            out[c] = pd.Series(pd.array([None if v is None else v for v in values],
                                        dtype=dtype))
        else:
            out[c] = pd.Series([None if v is None else str(v) for v in values], dtype=dtype)
    return pd.DataFrame(out, columns=columns)


def infer_typed(df: pd.DataFrame) -> pd.DataFrame:
    """A frame of unknown columns (``sql()``) brought into the convention by content."""
    out: dict[str, Any] = {}
    for c in df.columns:
        s = df[c]
        if pd.api.types.is_bool_dtype(s):
            out[c] = s.astype("boolean")
        elif pd.api.types.is_integer_dtype(s):
            out[c] = s.astype("Int64")
        elif pd.api.types.is_float_dtype(s):
            out[c] = s.astype("Float64")
        elif pd.api.types.is_datetime64_any_dtype(s):
            out[c] = s
        else:
            values = [None if v is None or (isinstance(v, float) and v != v) else v
                      for v in s.tolist()]
            present = [v for v in values if v is not None]
            if present and all(isinstance(v, str) for v in present):
                out[c] = pd.Series(values, dtype=TEXT, index=s.index)
            elif present and all(isinstance(v, bool) for v in present):
                out[c] = pd.Series(values, dtype="boolean", index=s.index)
            elif present and all(isinstance(v, int) and not isinstance(v, bool)
                                 for v in present):
                out[c] = pd.Series(values, dtype="Int64", index=s.index)
            elif present and all(isinstance(v, int | float) and not isinstance(v, bool)
                                 for v in present):
                out[c] = pd.Series(values, dtype="Float64", index=s.index)
            else:
                out[c] = pd.Series([pd.NA if v is None else v for v in values],
                                   dtype=object, index=s.index)
    return pd.DataFrame(out, columns=list(df.columns), index=df.index)
