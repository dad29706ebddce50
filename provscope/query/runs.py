"""Runs and their tasks, entities and relations from the lineage store (SQLite or
PostgreSQL): ``runs``, ``run``, ``resolve_run_id``, ``tasks``, ``task_tree``,
``entities``, ``relations``, ``sql``."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd
import sqlalchemy as sa

from provscope.errors import ProvscopeError
from provscope.query._base import (
    TEXT,
    TimeLike,
    complete,
    connect,
    equals,
    has_tables,
    infer_typed,
    mark_partial,
    safe_url,
    schema_note,
    table_dtypes,
    to_ns,
    typed,
    utc,
)
from provscope.query._base import (
    settings as _cfg,
)

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = ["entities", "relations", "resolve_run_id", "run", "runs", "sql", "task_tree",
           "tasks"]


def _columns(table: str) -> list[str]:
    from provscope.exporters.lineage.schema import METADATA

    return [c.name for c in METADATA.tables[table].columns]


def _frame(config: Config, table: str, statement: str, params: Mapping[str, Any],
           extra: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Rows of ``table`` (plus ``extra`` columns with their dtypes) in the convention.
    A column this store's (older) schema lacks reads NA and marks the frame partial."""
    from provscope.exporters.lineage.schema import JSON_COLUMNS, TIME_COLUMNS

    extra = dict(extra or {})
    columns = _columns(table) + list(extra)
    rows: list[dict[str, Any]] = []
    note = None
    with connect(config) as conn:
        if conn is not None and has_tables(conn, table):
            note = schema_note(conn)
            rows = [dict(r) for r in conn.execute(sa.text(statement), params).mappings()]
    for row in rows:
        for col in JSON_COLUMNS.get(table, ()):
            value = row.get(col)
            if isinstance(value, str):
                row[col] = json.loads(value)
    df = typed(rows, columns, {**table_dtypes(table), **extra})
    for ns_col, ts_col in TIME_COLUMNS.get(table, {}).items():
        df[ts_col] = utc(df[ns_col])
    if "start_ns" in df and "end_ns" in df:
        df["duration_s"] = (df["end_ns"] - df["start_ns"]).astype("Float64") / 1e9
    complete(df)
    if note:
        mark_partial(df, note)
    return df


def _json_match(value: Any, want: Any) -> bool:
    if isinstance(want, float) and isinstance(value, int | float) and not isinstance(value,
                                                                                     bool):
        return float(value) == want
    return bool(value == want)


def _config_matches(run_config: Any, want: Mapping[str, Any]) -> bool:
    """Every ``key`` (dotted for nested values: ``"optim.lr"``) equals its value."""
    if not isinstance(run_config, Mapping):
        return False
    for key, expected in want.items():
        node: Any = run_config
        for part in str(key).split(".") if str(key) not in run_config else [str(key)]:
            if not isinstance(node, Mapping) or part not in node:
                return False
            node = node[part]
        if not _json_match(node, expected):
            return False
    return True


def runs(*, limit: int | None = None, name: str | None = None, status: str | None = None,
         since: TimeLike = None, until: TimeLike = None, run_id: str | None = None,
         config: Config | Mapping[str, Any] | None = None,
         settings: Config | None = None) -> pd.DataFrame:
    """Runs, most recent first. Blocks on the lineage store.

    Args:
        limit: at most this many rows (after every filter).
        name: only runs with this name.
        status: only runs with this status (running, lost, finished, interrupted, killed,
            failed).
        since, until: only runs started at or after / at or before this time (int Unix
            ns, float Unix seconds, ISO string, datetime; naive means UTC).
        run_id: only this run (the full id; ``run()`` takes prefixes and ``"latest"``).
        config: a mapping filters on the run's config values (``{"lr": 0.1}``; a dotted
            key reaches into nested values: ``{"optim.lr": 0.1}``; compared after
            reading, never put into SQL); a ``Config`` says which store to read, as for
            every function here.
        settings: the ``Config`` to read with when ``config`` is a filter.

    Returns:
        One row per run: the ``runs`` table columns, plus ``task_count`` and
        ``duration_s`` (NA while running). A run still ``running`` whose last heartbeat
        is older than ``lineage.lost_after_s`` reads ``lost`` (ending at that heartbeat).
        ``attrs["partial"]`` is True when a listed run is still running.
    """
    want: Mapping[str, Any] | None = None
    if isinstance(config, Mapping):
        want, config = config, None
    cfg = _cfg(settings if settings is not None else config)
    where: list[str] = []
    params: dict[str, Any] = {}
    live = status in ("running", "lost")  # told apart by the heartbeat after reading
    if name is not None:
        where.append("r.name = :name")
        params["name"] = str(name)
    if live:
        where.append("r.status IN ('running', 'lost')")
    elif status is not None:
        where.append("r.status = :status")
        params["status"] = str(status)
    if run_id is not None:
        where.append("r.run_id = :run_id")
        params["run_id"] = str(run_id)
    if since is not None:
        where.append("r.start_ns >= :since")
        params["since"] = to_ns(since)
    if until is not None:
        where.append("r.start_ns <= :until")
        params["until"] = to_ns(until)
    statement = ("SELECT r.*, (SELECT count(*) FROM tasks t WHERE t.run_id = r.run_id) "
                 "AS task_count FROM runs r"
                 + (" WHERE " + " AND ".join(where) if where else "")
                 + " ORDER BY r.start_ns IS NULL, r.start_ns DESC, r.run_id DESC")
    if limit is not None and not live and want is None:
        statement += " LIMIT :limit"
        params["limit"] = max(0, int(limit))
    df = _frame(cfg, "runs", statement, params, extra={"task_count": "Int64"})
    _lost(df, cfg)
    keep = pd.Series(True, index=df.index)
    if live:
        keep &= (df["status"] == status).fillna(False).astype(bool)
    if want is not None:
        keep &= pd.Series([_config_matches(c, want) for c in df["config"]], index=df.index,
                          dtype=bool)
    if not keep.all():
        attrs = dict(df.attrs)
        df = df[keep].reset_index(drop=True)
        df.attrs.update(attrs)
    if limit is not None and len(df) > max(0, int(limit)):
        attrs = dict(df.attrs)
        df = df.head(max(0, int(limit))).reset_index(drop=True)
        df.attrs.update(attrs)
    if (df["status"] == "running").fillna(False).any():
        mark_partial(df, None)
    return df


def _lost(df: pd.DataFrame, config: Config) -> None:
    """In place: runs still ``running`` whose heartbeat is older than
    ``lineage.lost_after_s`` read ``lost``, ending at their last heartbeat (what the
    agent's reaper writes into the store, ``SqlLineageStore.mark_lost``)."""
    if df.empty:
        return
    cutoff = time.time_ns() - int(config.lineage.lost_after_s * 1e9)
    heartbeat = df["heartbeat_ns"]
    lost = ((df["status"] == "running") & heartbeat.notna() & (heartbeat < cutoff)) \
        .fillna(False).astype(bool)
    if not lost.any():
        return
    df.loc[lost, "status"] = "lost"
    ends = lost & df["end_ns"].isna()
    df.loc[ends, "end_ns"] = heartbeat[ends]
    df.loc[ends, "end_time"] = utc(heartbeat[ends])
    df.loc[ends, "duration_s"] = (df.loc[ends, "end_ns"] - df.loc[ends, "start_ns"]) \
        .astype("Float64") / 1e9


def resolve_run_id(prefix: str, *, config: Config | None = None) -> str:
    """The full run id that starts with ``prefix``; ``"latest"`` is the most recently
    started run. Blocks on the lineage store.

    Raises:
        ProvscopeError: no run, or several runs, match (one line naming them).
    """
    if not isinstance(prefix, str):
        raise ProvscopeError(f"run id {prefix!r} is not a string; `provscope runs` lists "
                             "the recorded runs")
    prefix = prefix.strip()
    if not prefix:
        raise ProvscopeError("run id is empty; `provscope runs` lists the recorded runs")
    config = _cfg(config)
    found: list[str] = []
    with connect(config) as conn:
        if conn is not None and has_tables(conn, "runs"):
            if prefix == "latest":
                found = list(conn.execute(sa.text(
                    "SELECT run_id FROM runs ORDER BY start_ns IS NULL, start_ns DESC, "
                    "run_id DESC LIMIT 1")).scalars())
                if found:
                    return found[0]
            else:
                pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                found = list(conn.execute(
                    sa.text("SELECT run_id FROM runs WHERE run_id LIKE :p ESCAPE '\\' "
                            "ORDER BY run_id LIMIT 6"), {"p": pattern + "%"}).scalars())
    if not found:
        if prefix == "latest":
            raise ProvscopeError(f"no runs recorded in {safe_url(config.lineage_url)} "
                                 "(`provscope demo` records one)")
        raise ProvscopeError(f"no run id starts with {prefix[:80]!r} in "
                             f"{safe_url(config.lineage_url)}; `provscope runs` lists them")
    if len(found) > 1 and prefix not in found:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise ProvscopeError(f"run id prefix {prefix!r} is ambiguous ({shown}); "
                             "give more characters")
    return prefix if prefix in found else found[0]


def run(run_id: str = "latest", *, config: Config | None = None) -> pd.Series:
    """One run as a row (a ``pd.Series`` with the columns of ``runs()``).

    Args:
        run_id: a full id, an unambiguous prefix, or ``"latest"`` (the default).

    Returns:
        The run; ``attrs["partial"]`` is True while it is still running.

    Raises:
        ProvscopeError: unknown or ambiguous id, unreachable store (one line).
    """
    cfg = _cfg(config)
    full = resolve_run_id(run_id, config=cfg)
    df = runs(run_id=full, config=cfg)
    if df.empty:  # deleted between the two reads
        raise ProvscopeError(f"run {full} is no longer in {safe_url(cfg.lineage_url)}")
    row = df.iloc[0].copy()
    row.attrs = {"partial": equals(row["status"], "running"),
                 "warnings": list(df.attrs.get("warnings", []))}
    return row


def _run_status(run_id: str, config: Config) -> Any:
    df = runs(run_id=run_id, config=config)
    return None if df.empty else df.iloc[0]


def tasks(run_id: str, *, config: Config | None = None) -> pd.DataFrame:
    """The tasks of a run, in start order. Blocks on the lineage store.

    Returns:
        The ``tasks`` table columns, ``duration_s`` (seconds, NA while running),
        ``depth`` (0: a top-level task) and ``path`` (task names from the top, joined
        with ``/``). The tasks still ``running`` of a run that reads ``lost`` read
        ``lost``, ending at the run's last heartbeat. ``attrs["partial"]`` is True while
        the run (or a task) is still running.
    """
    cfg = _cfg(config)
    df = _frame(cfg, "tasks",
                "SELECT * FROM tasks WHERE run_id = :run_id "
                "ORDER BY start_ns IS NULL, start_ns, task_id", {"run_id": str(run_id)})
    open_ = (df["status"] == "running").fillna(False).astype(bool)
    info = _run_status(str(run_id), cfg)
    if info is not None and equals(info["status"], "running"):
        mark_partial(df, None)
    if open_.any():
        if info is not None and equals(info["status"], "lost"):
            end = info["end_ns"]
            df.loc[open_, "status"] = "lost"
            ends = open_ & df["end_ns"].isna()
            if not pd.isna(end):
                df.loc[ends, "end_ns"] = end
                df.loc[ends, "end_time"] = utc(end)
                df.loc[ends, "duration_s"] = (df.loc[ends, "end_ns"]
                                              - df.loc[ends, "start_ns"]).astype("Float64") / 1e9
        else:
            mark_partial(df, None)
    _depth_and_path(df)
    return df


def _depth_and_path(df: pd.DataFrame) -> None:
    """In place: ``depth`` and ``path`` from ``parent_task_id`` (a parent outside the run
    makes a top-level task; a cycle is cut where it closes)."""
    ids = df["task_id"].tolist()
    parent = dict(zip(ids, df["parent_task_id"].tolist(), strict=True))
    name = dict(zip(ids, df["name"].tolist(), strict=True))
    depth: dict[str, int] = {}
    path: dict[str, str] = {}
    for tid in ids:
        chain = [tid]
        seen = {tid}
        p = parent.get(tid)
        while isinstance(p, str) and p in parent and p not in seen and p not in depth:
            chain.append(p)
            seen.add(p)
            p = parent.get(p)
        base_depth, base_path = (depth[p] + 1, path[p] + "/") if isinstance(p, str) and \
            p in depth else (0, "")
        for i, t in enumerate(reversed(chain)):
            label = name.get(t)
            depth[t] = base_depth + i
            path[t] = base_path + (str(label) if isinstance(label, str) else t)
            base_path = path[t] + "/"
    df["depth"] = pd.array([depth[t] for t in ids], dtype="Int64")
    df["path"] = pd.array([path[t] for t in ids], dtype=TEXT)


def task_tree(run_id: str, *, config: Config | None = None) -> list[dict[str, Any]]:
    """A run's tasks as a nested tree: a list of top-level tasks, each a dict of its
    columns (as in ``tasks()``; missing values ``None``, times as Unix ns and UTC
    timestamps) with ``children`` (a list of such dicts, in start order)."""
    df = tasks(run_id, config=config)
    nodes: dict[str, dict[str, Any]] = {}
    for rec in df.to_dict(orient="records"):
        node: dict[str, Any] = {str(k): (None if not isinstance(v, dict | list) and
                                         pd.isna(v) else v) for k, v in rec.items()}
        node["children"] = []
        nodes[node["task_id"]] = node
    roots: list[dict[str, Any]] = []
    for node in nodes.values():
        parent = nodes.get(str(node["parent_task_id"])) if node["depth"] else None
        (parent["children"] if parent is not None else roots).append(node)
    return roots


def entities(run_id: str, *, config: Config | None = None) -> pd.DataFrame:
    """Entities of a run: those it created plus those its tasks used or generated."""
    return _frame(
        _cfg(config), "entities",
        "SELECT * FROM entities WHERE run_id = :run_id OR entity_id IN ("
        " SELECT rel.object_id FROM relations rel WHERE rel.relation IN ('used', 'generated')"
        " AND (rel.run_id = :run_id OR rel.subject_id IN"
        " (SELECT task_id FROM tasks WHERE run_id = :run_id)))"
        " ORDER BY created_ns IS NULL, created_ns, entity_id", {"run_id": str(run_id)})


def relations(run_id: str, *, config: Config | None = None) -> pd.DataFrame:
    """PROV relations of a run's tasks: used / generated (task, entity), informed (task, task).

    ``subject_id`` is the task; ``object_id`` the entity or the informing task; ``role`` is
    ``""`` when none was given.
    """
    return _frame(
        _cfg(config), "relations",
        "SELECT * FROM relations WHERE run_id = :run_id OR subject_id IN"
        " (SELECT task_id FROM tasks WHERE run_id = :run_id)"
        " ORDER BY time_ns IS NULL, time_ns, relation, subject_id, object_id",
        {"run_id": str(run_id)})


def sql(statement: str, params: Mapping[str, Any] | None = None, *,
        config: Config | None = None) -> pd.DataFrame:
    """Run a read-only SQL query on the lineage store (e.g. accuracy versus GPU-hours).

    Values go in ``params`` (``:name`` placeholders), never into ``statement``. The
    columns follow the missing-value convention by their content.
    """
    with connect(_cfg(config)) as conn:
        if conn is None:
            return complete(pd.DataFrame())
        result = conn.execute(sa.text(statement), dict(params or {}))
        df = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
    return complete(infer_typed(df))
