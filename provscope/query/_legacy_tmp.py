"""Read what provscope recorded, as pandas DataFrames: runs, tasks, entities, time series.

One set of functions for every deployment. With the default configuration everything is
read from the embedded SQLite file (``embedded.path``); when ``influxdb.url`` is set, time
series come from InfluxDB (InfluxQL over HTTP ``/query``), and when ``lineage.url`` is set,
lineage comes from that SQLite or PostgreSQL database. The DataFrames have the same
columns either way.

Every function takes ``config=`` (a ``Config``); without it ``load_config()`` is used
(``$PROVSCOPE_CONFIG``, ``PROVSCOPE_*`` variables). All calls block on the store they
read. Times are Unix nanoseconds in ``*_ns`` columns and UTC ``pandas.Timestamp`` in the
matching ``*_time`` / ``time`` columns.

Example::

    from provscope import query
    runs = query.runs(limit=10)
    loss = query.series("train", "loss", run_id=runs.run_id[0])
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import sqlalchemy as sa

from provscope.errors import ProvscopeError
from provscope.ids import content_id, entity_key

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = [
    "SERIES_COLUMNS",
    "entities",
    "origin",
    "relations",
    "resolve_run_id",
    "runs",
    "runs_using",
    "series",
    "sql",
    "tasks",
]

#: Columns of ``series()``: one row per (time, field) value, long format.
SERIES_COLUMNS = ["time", "time_ns", "measurement", "field", "value", "str_value", "run_id",
                  "host", "rank", "tags"]
_COLUMN_TAGS = ("run_id", "host", "rank")

TimeLike = int | float | str | dt.datetime | pd.Timestamp | None


def _config(config: Config | None) -> Config:
    if config is not None:
        return config
    from provscope.config import load_config

    return load_config()


# ----------------------------------------------------------------------------- lineage

@functools.lru_cache(maxsize=16)
def _engine(url: str) -> sa.Engine:
    from provscope.exporters.lineage.engine import create_lineage_engine

    return create_lineage_engine(url, writer=False)


def _lineage_engine(config: Config) -> sa.Engine | None:
    """The read engine, or None when the embedded file does not exist yet."""
    url = config.lineage_url
    if url.startswith("sqlite:"):
        db = sa.engine.make_url(url).database
        if db and db != ":memory:":
            path = Path(db).expanduser().resolve()
            if not path.exists():
                return None
            url = f"sqlite:///{path}"  # the engine cache must not depend on the cwd
    return _engine(url)


def _columns(table: str) -> list[str]:
    from provscope.exporters.lineage.schema import METADATA

    return [c.name for c in METADATA.tables[table].columns]


def _dtypes(table: str) -> dict[str, Literal["boolean", "Int64", "Float64"]]:
    """Nullable pandas dtypes for the numeric and boolean columns of a table."""
    from provscope.exporters.lineage.schema import METADATA

    out: dict[str, Literal["boolean", "Int64", "Float64"]] = {}
    for col in METADATA.tables[table].columns:
        if isinstance(col.type, sa.Boolean):
            out[col.name] = "boolean"
        elif isinstance(col.type, sa.Integer):
            out[col.name] = "Int64"
        elif isinstance(col.type, sa.Float):
            out[col.name] = "Float64"
    return out


def _frame(config: Config, table: str, statement: str, params: Mapping[str, Any],
           extra: tuple[str, ...] = ()) -> pd.DataFrame:
    from provscope.exporters.lineage.schema import JSON_COLUMNS, TIME_COLUMNS

    columns = _columns(table) + list(extra)
    engine = _lineage_engine(config)
    rows: list[dict[str, Any]] = []
    if engine is not None:
        with engine.connect() as conn:
            if sa.inspect(conn).has_table(table):
                rows = [dict(r) for r in conn.execute(sa.text(statement), params).mappings()]
    df = pd.DataFrame(rows, columns=columns) if rows else pd.DataFrame(
        {c: pd.Series(dtype=object) for c in columns})
    for col in JSON_COLUMNS.get(table, ()):
        df[col] = [json.loads(v) if isinstance(v, str) else v for v in df[col]]
    for col, dtype in _dtypes(table).items():
        df[col] = df[col].astype(dtype)
    for ns_col, ts_col in TIME_COLUMNS.get(table, {}).items():
        df[ts_col] = pd.to_datetime(df[ns_col], unit="ns", utc=True)
    if "start_ns" in df and "end_ns" in df:
        df["duration_s"] = (df["end_ns"] - df["start_ns"]).astype("Float64") / 1e9
    return df.reset_index(drop=True)


def runs(*, limit: int | None = None, name: str | None = None, status: str | None = None,
         since: TimeLike = None, run_id: str | None = None,
         config: Config | None = None) -> pd.DataFrame:
    """Runs, most recent first.

    Args:
        limit: at most this many rows.
        name: only runs with this name.
        status: only runs with this status (running, lost, finished, interrupted, killed,
            failed).
        since: only runs started at or after this time (see ``series`` for time forms).
        run_id: only this run.

    Returns:
        One row per run: the ``runs`` table columns, plus ``task_count`` and
        ``duration_s`` (NA while running). A run still ``running`` whose last heartbeat
        is older than ``lineage.lost_after_s`` reads ``lost`` (ending at that heartbeat),
        whether or not an agent has marked it in the store yet.
    """
    cfg = _config(config)
    where: list[str] = []
    params: dict[str, Any] = {}
    # running and lost are told apart by the heartbeat after reading (see _lost)
    live = status in ("running", "lost")
    if name is not None:
        where.append("r.name = :name")
        params["name"] = name
    if live:
        where.append("r.status IN ('running', 'lost')")
    elif status is not None:
        where.append("r.status = :status")
        params["status"] = status
    if run_id is not None:
        where.append("r.run_id = :run_id")
        params["run_id"] = run_id
    if since is not None:
        where.append("r.start_ns >= :since")
        params["since"] = _to_ns(since)
    statement = ("SELECT r.*, (SELECT count(*) FROM tasks t WHERE t.run_id = r.run_id) "
                 "AS task_count FROM runs r"
                 + (" WHERE " + " AND ".join(where) if where else "")
                 + " ORDER BY r.start_ns IS NULL, r.start_ns DESC, r.run_id DESC")
    if limit is not None and not live:
        statement += " LIMIT :limit"
        params["limit"] = int(limit)
    df = _frame(cfg, "runs", statement, params, extra=("task_count",))
    df["task_count"] = df["task_count"].astype("Int64")
    _lost(df, cfg)
    if live:
        df = df[df["status"] == status]
        if limit is not None:
            df = df.head(int(limit))
        df = df.reset_index(drop=True)
    return df


def _lost(df: pd.DataFrame, config: Config) -> None:
    """In place: runs still ``running`` whose heartbeat is older than
    ``lineage.lost_after_s`` read ``lost``, ending at their last heartbeat (what the
    agent's reaper writes into the store, ``SqlLineageStore.mark_lost``)."""
    if df.empty or "heartbeat_ns" not in df:
        return
    import time

    cutoff = time.time_ns() - int(config.lineage.lost_after_s * 1e9)
    heartbeat = df["heartbeat_ns"]
    lost = ((df["status"] == "running") & heartbeat.notna() & (heartbeat < cutoff)) \
        .fillna(False).astype(bool)
    if not lost.any():
        return
    df.loc[lost, "status"] = "lost"
    ends = lost & df["end_ns"].isna()
    df.loc[ends, "end_ns"] = heartbeat[ends]
    df.loc[ends, "end_time"] = pd.to_datetime(heartbeat[ends], unit="ns", utc=True)
    df.loc[ends, "duration_s"] = (df.loc[ends, "end_ns"] - df.loc[ends, "start_ns"]) \
        .astype("Float64") / 1e9


def tasks(run_id: str, *, config: Config | None = None) -> pd.DataFrame:
    """The tasks of a run, in start order, with ``duration_s`` (seconds, NA while running).

    The tasks still ``running`` of a run that reads ``lost`` (see ``runs``) read ``lost``,
    ending at the run's last heartbeat.
    """
    cfg = _config(config)
    df = _frame(cfg, "tasks",
                "SELECT * FROM tasks WHERE run_id = :run_id "
                "ORDER BY start_ns IS NULL, start_ns, task_id", {"run_id": run_id})
    open_ = (df["status"] == "running").fillna(False).astype(bool) if not df.empty else None
    if open_ is not None and open_.any():
        run = runs(run_id=run_id, config=cfg)
        if len(run) and run["status"].iloc[0] == "lost":
            end = run["end_ns"].iloc[0]
            df.loc[open_, "status"] = "lost"
            ends = open_ & df["end_ns"].isna()
            if not pd.isna(end):
                df.loc[ends, "end_ns"] = end
                df.loc[ends, "end_time"] = pd.to_datetime(end, unit="ns", utc=True)
                df.loc[ends, "duration_s"] = (df.loc[ends, "end_ns"] - df.loc[ends, "start_ns"]
                                              ).astype("Float64") / 1e9
    return df


def entities(run_id: str, *, config: Config | None = None) -> pd.DataFrame:
    """Entities of a run: those it created plus those its tasks used or generated."""
    return _frame(
        _config(config), "entities",
        "SELECT * FROM entities WHERE run_id = :run_id OR entity_id IN ("
        " SELECT rel.object_id FROM relations rel WHERE rel.relation IN ('used', 'generated')"
        " AND (rel.run_id = :run_id OR rel.subject_id IN"
        " (SELECT task_id FROM tasks WHERE run_id = :run_id)))"
        " ORDER BY created_ns IS NULL, created_ns, entity_id", {"run_id": run_id})


def relations(run_id: str, *, config: Config | None = None) -> pd.DataFrame:
    """PROV relations of a run's tasks: used / generated (task, entity), informed (task, task).

    ``subject_id`` is the task; ``object_id`` the entity or the informing task; ``role`` is
    ``""`` when none was given.
    """
    return _frame(
        _config(config), "relations",
        "SELECT * FROM relations WHERE run_id = :run_id OR subject_id IN"
        " (SELECT task_id FROM tasks WHERE run_id = :run_id)"
        " ORDER BY time_ns IS NULL, time_ns, relation, subject_id, object_id",
        {"run_id": run_id})


# ----------------------------------------------------------------------------- entity graph

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _entity_match(what: str | os.PathLike[str], config: Config) -> tuple[str, dict[str, Any]]:
    """A SQL condition on ``e`` (entities) selecting what ``what`` names, with its params.

    An entity id, a digest, a URI, or a local path keyed as the job keys it
    (``provscope.ids.entity_key``): its sha256 up to ``client.hash_max_bytes``, else its
    URI, size and modification time; a path that does not exist: its URI.
    """
    text = os.fspath(what).strip()
    if _UUID.fullmatch(text.lower()):
        return "e.entity_id = :what", {"what": text.lower()}
    if text.startswith("sha256:"):
        return "e.digest = :what", {"what": text.lower()}
    if "://" in text and not text.startswith("file://"):
        return "e.uri = :what", {"what": text}
    path = Path(text.removeprefix("file://")).expanduser().absolute()
    uri = path.as_uri()
    try:
        st = path.stat()
    except OSError:
        return "e.uri = :what", {"what": uri}
    if path.is_dir():  # keyed by the total size of its files: every version at the path
        return "e.uri = :what", {"what": uri}
    digest = None
    if st.st_size <= config.client.hash_max_bytes:
        with open(path, "rb") as fh:
            digest = "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()
    key = entity_key(digest=digest, uri=uri, size_bytes=st.st_size, mtime_ns=st.st_mtime_ns)
    return "e.entity_id = :what", {"what": content_id(key) if key else ""}


def _graph_frame(config: Config, statement: str, params: Mapping[str, Any],
                 columns: list[str], ints: tuple[str, ...]) -> pd.DataFrame:
    engine = _lineage_engine(config)
    rows: list[tuple[Any, ...]] = []
    if engine is not None:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            if all(inspector.has_table(t) for t in ("entities", "relations")):
                rows = [tuple(r) for r in conn.execute(sa.text(statement), params)]
    df = pd.DataFrame(rows, columns=columns) if rows else pd.DataFrame(
        {c: pd.Series(dtype=object) for c in columns})
    for col in ints:
        df[col] = df[col].astype("Int64")
        if col.endswith("_ns"):
            df[col.removesuffix("_ns") + "_time" if col != "time_ns" else "time"] = \
                pd.to_datetime(df[col], unit="ns", utc=True)
    return df.reset_index(drop=True)


_USES = (
    "SELECT COALESCE(rel.run_id, t.run_id) AS run_id, r.name AS run_name,"
    " r.status AS run_status, r.start_ns AS run_start_ns, rel.subject_id AS task_id,"
    " t.name AS task_name, e.entity_id, e.kind, e.name, e.uri, e.digest, rel.role,"
    " rel.time_ns"
    " FROM entities e"
    " JOIN relations rel ON rel.object_id = e.entity_id AND rel.relation = 'used'"
    " LEFT JOIN tasks t ON t.task_id = rel.subject_id"
    " LEFT JOIN runs r ON r.run_id = COALESCE(rel.run_id, t.run_id)"
    " WHERE {match}"
    " ORDER BY rel.time_ns IS NULL, rel.time_ns DESC, rel.subject_id"
)
_USES_COLUMNS = ["run_id", "run_name", "run_status", "run_start_ns", "task_id", "task_name",
                 "entity_id", "kind", "name", "uri", "digest", "role", "time_ns"]


def runs_using(what: str | os.PathLike[str], *, config: Config | None = None) -> pd.DataFrame:
    """Which runs used an entity (a dataset, file, model, checkpoint): one row per use.

    Args:
        what: an entity id; a digest (``"sha256:<hex>"``: the same bytes wherever they
            lay); a URI (``s3://...``); or a local path, identified as the job identifies
            it (its sha256 up to ``client.hash_max_bytes``, hashed here, so this blocks
            while it reads; else its size and modification time). A path that does not
            exist, and a directory, match every entity recorded at that path.

    Returns:
        Columns ``run_id``, ``run_name``, ``run_status``, ``run_start_ns`` /
        ``run_start_time``, ``task_id`` (the task, or the run for a use outside any
        task), ``task_name``, ``entity_id``, ``kind``, ``name``, ``uri``, ``digest``,
        ``role``, ``time_ns`` / ``time``; the most recent use first.
        ``df.run_id.unique()`` lists the runs.
    """
    config = _config(config)
    match, params = _entity_match(what, config)
    return _graph_frame(config, _USES.format(match=match), params, _USES_COLUMNS,
                        ("run_start_ns", "time_ns"))


# The entity, then what it was derived from, recursively, each with what generated it.
# UNION (not UNION ALL) and the depth bound keep a cycle (bytes saved again after a
# change) finite; the CASTs type the NULLs of the first row as PostgreSQL requires.
_ORIGIN = (
    "WITH RECURSIVE chain(entity_id, depth, source_of, role) AS ("
    " SELECT e.entity_id, 0, CAST(NULL AS VARCHAR(64)), CAST(NULL AS VARCHAR(64))"
    " FROM entities e WHERE {match}"
    " UNION"
    " SELECT d.object_id, c.depth + 1, c.entity_id, d.role"
    " FROM chain c JOIN relations d ON d.relation = 'derived' AND d.subject_id = c.entity_id"
    " WHERE c.depth < :max_depth)"
    " SELECT c.depth, c.entity_id, e.kind, e.name, e.uri, e.digest, e.size_bytes,"
    " e.created_ns, c.source_of, c.role, g.subject_id AS generated_by, t.name AS task_name,"
    " COALESCE(g.run_id, t.run_id) AS run_id, r.name AS run_name"
    " FROM chain c"
    " LEFT JOIN entities e ON e.entity_id = c.entity_id"
    " LEFT JOIN relations g ON g.object_id = c.entity_id AND g.relation = 'generated'"
    " LEFT JOIN tasks t ON t.task_id = g.subject_id"
    " LEFT JOIN runs r ON r.run_id = COALESCE(g.run_id, t.run_id)"
    " ORDER BY c.depth, c.entity_id, g.time_ns"
)
_ORIGIN_COLUMNS = ["depth", "entity_id", "kind", "name", "uri", "digest", "size_bytes",
                   "created_ns", "source_of", "role", "generated_by", "task_name", "run_id",
                   "run_name"]


def origin(what: str | os.PathLike[str], *, max_depth: int = 10_000,
           config: Config | None = None) -> pd.DataFrame:
    """Where an entity (typically a checkpoint) came from: the entity, what it was derived
    from (the model, the previous checkpoint, ...), recursively, and the task and run
    that generated each.

    Args:
        what: as for ``runs_using``.
        max_depth: longest chain of ``derived`` relations followed.

    Returns:
        One row per (entity, source_of, generator), nearest first: ``depth`` (0: the
        entity itself), ``entity_id``, ``kind``, ``name``, ``uri``, ``digest``,
        ``size_bytes``, ``created_ns`` / ``created_time``, ``source_of`` (the entity one
        step nearer that was derived from this one), ``role`` (``model``,
        ``previous_checkpoint``, ``source``), ``generated_by`` (task id, or run id for an
        output recorded outside any task), ``task_name``, ``run_id``, ``run_name``.
    """
    config = _config(config)
    match, params = _entity_match(what, config)
    params = {**params, "max_depth": int(max_depth)}
    df = _graph_frame(config, _ORIGIN.format(match=match), params, _ORIGIN_COLUMNS,
                      ("depth", "size_bytes", "created_ns"))
    # A cycle reaches an entity again further down: keep its nearest occurrence.
    keys = ["entity_id", "source_of", "role", "generated_by"]
    return df.drop_duplicates(subset=keys, keep="first").reset_index(drop=True)


def resolve_run_id(prefix: str, *, config: Config | None = None) -> str:
    """The full run id that starts with ``prefix``.

    Raises:
        ProvscopeError: no run, or several runs, match (one line naming them).
    """
    if not isinstance(prefix, str):
        raise ProvscopeError(f"run id {prefix!r} is not a string; `provscope runs` lists "
                             "the recorded runs")
    prefix = prefix.strip()
    if not prefix:
        raise ProvscopeError("run id is empty; `provscope runs` lists the recorded runs")
    config = _config(config)
    engine = _lineage_engine(config)
    found: list[str] = []
    if engine is not None:
        with engine.connect() as conn:
            if sa.inspect(conn).has_table("runs"):
                pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                found = list(conn.execute(
                    sa.text("SELECT run_id FROM runs WHERE run_id LIKE :p ESCAPE '\\' "
                            "ORDER BY run_id LIMIT 6"), {"p": pattern + "%"}).scalars())
    if not found:
        raise ProvscopeError(f"no run id starts with {prefix!r} in "
                             f"{_safe(config.lineage_url)}; `provscope runs` lists them")
    if len(found) > 1 and prefix not in found:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise ProvscopeError(f"run id prefix {prefix!r} is ambiguous ({shown}); "
                             "give more characters")
    return prefix if prefix in found else found[0]


def sql(statement: str, params: Mapping[str, Any] | None = None, *,
        config: Config | None = None) -> pd.DataFrame:
    """Run a read-only SQL query on the lineage store (e.g. accuracy versus GPU-hours)."""
    engine = _lineage_engine(_config(config))
    if engine is None:
        return pd.DataFrame()
    with engine.connect() as conn:
        result = conn.execute(sa.text(statement), dict(params or {}))
        return pd.DataFrame(result.fetchall(), columns=list(result.keys()))


def _safe(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the lineage store"


# ----------------------------------------------------------------------------- time series

def _to_ns(value: TimeLike) -> int | None:
    """Unix ns from int (ns), float (Unix seconds), ISO string, datetime or Timestamp."""
    if value is None:
        return None
    allowed = ("allowed: int Unix ns, float Unix seconds, an ISO 8601 string or a datetime, "
               "between 1677-09-22 and 2262-04-11")
    if isinstance(value, bool):
        raise ProvscopeError(f"time {value!r} is a bool; {allowed}")
    if isinstance(value, int):
        ns = value
    elif isinstance(value, float):
        if value != value or abs(value) > 9.2e9:  # NaN, infinities, beyond int64 ns
            raise ProvscopeError(f"time {value!r} is out of range; {allowed}")
        ns = int(value * 1e9)
    else:
        try:
            ts = pd.Timestamp(value)
            if ts.tzinfo is None:
                ts = ts.tz_localize("UTC")
            ns = int(ts.value)
        except (ValueError, TypeError, OverflowError) as exc:
            text = " ".join(str(exc).split())[:120]
            raise ProvscopeError(f"time {str(value)[:60]!r} is not a time ({text}); "
                                 f"{allowed}") from None
        if ts is pd.NaT:
            raise ProvscopeError(f"time {str(value)[:60]!r} is not a time; {allowed}")
    if not -(2**63) <= ns < 2**63:
        raise ProvscopeError(f"time {value!r} is out of range; {allowed}")
    return ns


def series(measurement: str, field: str | None = None, run_id: str | None = None,
           start: TimeLike = None, end: TimeLike = None,
           tags: Mapping[str, Any] | None = None, *,
           config: Config | None = None) -> pd.DataFrame:
    """Time-series values of one measurement, long format (one row per time and field).

    Args:
        measurement: e.g. ``"train"``, ``"gpu"`` (see ``provscope.catalogue``).
        field: one field, or None for all.
        run_id: only points tagged with this run.
        start, end: inclusive time range: int Unix ns, float Unix seconds, ISO string or
            datetime (naive means UTC).
        tags: other tag filters, e.g. ``{"host": "node1", "gpu": "0"}``.

    Returns:
        Columns ``SERIES_COLUMNS``: ``time`` (UTC), ``time_ns``, ``measurement``,
        ``field``, ``value`` (float; booleans 0/1), ``str_value`` (string fields),
        ``run_id``, ``host``, ``rank`` (tag strings) and ``tags`` (dict of the other tags),
        sorted by time then field.

    Raises:
        ProvscopeError: InfluxDB unreachable or answering an error.
    """
    config = _config(config)
    filters = {str(k): str(v) for k, v in (tags or {}).items()}
    if run_id is not None:
        filters["run_id"] = run_id
    lo, hi = _to_ns(start), _to_ns(end)
    if url := config.influxdb.url:
        rows = _influx_rows(config, url, measurement, field, filters, lo, hi)
    else:
        rows = _embedded_rows(config, measurement, field, filters, lo, hi)
    return _series_frame(rows)


def _series_frame(rows: list[tuple[Any, ...]]) -> pd.DataFrame:
    cols = SERIES_COLUMNS[1:]
    df = pd.DataFrame(rows, columns=cols) if rows else pd.DataFrame(
        {c: pd.Series(dtype=object) for c in cols})
    df["time_ns"] = df["time_ns"].astype("int64")
    df["value"] = df["value"].astype("float64")
    df.insert(0, "time", pd.to_datetime(df["time_ns"], unit="ns", utc=True))
    df = df.sort_values(["time_ns", "field"], kind="stable").reset_index(drop=True)
    return df[SERIES_COLUMNS]


def _embedded_rows(config: Config, measurement: str, field: str | None,
                   filters: Mapping[str, str], lo: int | None,
                   hi: int | None) -> list[tuple[Any, ...]]:
    import sqlite3

    path = Path(config.embedded.path).expanduser()
    if not path.exists():
        return []
    where = ["measurement = ?"]
    params: list[Any] = [measurement]
    if field is not None:
        where.append("field = ?")
        params.append(field)
    if lo is not None:
        where.append("time_ns >= ?")
        params.append(lo)
    if hi is not None:
        where.append("time_ns <= ?")
        params.append(hi)
    for key, value in filters.items():
        if key in _COLUMN_TAGS:
            where.append(f"{key} = ?")
        else:
            where.append("json_extract(tags, ?) = ?")
            params.append('$."' + key.replace('"', '\\"') + '"')
        params.append(value)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'points'").fetchone():
            return []
        raw = conn.execute(
            "SELECT time_ns, measurement, field, value, str_value, run_id, host, rank, tags "
            f"FROM points WHERE {' AND '.join(where)} ORDER BY time_ns, field", params,
        ).fetchall()
    finally:
        conn.close()
    return [(*r[:8], json.loads(r[8]) if r[8] else {}) for r in raw]


def _ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _influxql(measurement: str, field: str | None, filters: Mapping[str, str],
             lo: int | None, hi: int | None) -> str:
    """The InfluxQL ``series()`` sends (tags come back through ``GROUP BY *``)."""
    where = [f"{_ident(k)} = {_literal(v)}" for k, v in filters.items()]
    if lo is not None:
        where.append(f"time >= {int(lo)}")
    if hi is not None:
        where.append(f"time <= {int(hi)}")
    q = f"SELECT {_ident(field) if field else '*'} FROM {_ident(measurement)}"
    if where:
        q += " WHERE " + " AND ".join(where)
    return q + " GROUP BY *"


def _influx_rows(config: Config, url: str, measurement: str, field: str | None,
                 filters: Mapping[str, str], lo: int | None,
                 hi: int | None) -> list[tuple[Any, ...]]:
    ic = config.influxdb
    db = ic.bucket or ic.database if ic.api == "v2" else ic.database
    params = {"db": db, "q": _influxql(measurement, field, filters, lo, hi), "epoch": "ns",
              "chunked": "true", "chunk_size": "10000"}
    if ic.retention_policy:
        params["rp"] = ic.retention_policy
    parts = urllib.parse.urlsplit(url)
    username, password = ic.username, ic.secret("password")
    if parts.username and not username:  # http://user:pw@host, as the writer reads it
        username = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "") or password
    if username:
        params["u"] = username
        params["p"] = password or ""
    headers = {"Accept": "application/json"}
    token = ic.secret("token")
    if token:
        headers["Authorization"] = f"Token {token}"
    # No credentials in the request URL, nor in any message naming it.
    url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    url = url.rstrip("/") + "/query"
    request = urllib.request.Request(url, data=urllib.parse.urlencode(params).encode(),
                                     headers=headers, method="POST")
    tls = None
    if parts.scheme == "https":  # verified unless influxdb.tls_verify: false
        import ssl

        tls = ssl.create_default_context(cafile=ic.tls_ca_file)
        if not ic.tls_verify:
            tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(request, timeout=ic.timeout_s, context=tls) as resp:
            text = resp.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:200]
        raise ProvscopeError(f"InfluxDB query at {url} failed: HTTP {exc.code} {detail}") \
            from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ProvscopeError(f"InfluxDB at {url} is unreachable: {reason}") from None
    return _melt_influx(text, measurement)


def _melt_influx(text: str, measurement: str) -> list[tuple[Any, ...]]:
    decoder = json.JSONDecoder()
    rows: list[tuple[Any, ...]] = []
    pos, n = 0, len(text)
    while pos < n:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            break
        chunk, pos = decoder.raw_decode(text, pos)
        if chunk.get("error"):
            raise ProvscopeError(f"InfluxDB query failed: {chunk['error']}")
        for result in chunk.get("results", []):
            if result.get("error"):
                raise ProvscopeError(f"InfluxDB query failed: {result['error']}")
            for s in result.get("series", []):
                tags = {k: v for k, v in (s.get("tags") or {}).items() if v != ""}
                run_id, host, rank = (tags.pop(k, None) for k in _COLUMN_TAGS)
                columns = s["columns"]
                for values in s.get("values", []):
                    t = int(values[0])
                    for name, v in zip(columns[1:], values[1:], strict=True):
                        if v is None:
                            continue
                        if isinstance(v, str):
                            rows.append((t, measurement, name, None, v, run_id, host, rank,
                                         dict(tags)))
                        else:
                            rows.append((t, measurement, name, float(v), None, run_id, host,
                                         rank, dict(tags)))
    return rows
