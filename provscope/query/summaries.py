"""Answers that join lineage and time series in one call: ``node_series`` (the node
series of a run's or task's hosts over its time window) and ``resource_summary``
(per-run and per-task resources with utilisation and final metrics)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from provscope.errors import ProvscopeError
from provscope.query._base import (
    TEXT,
    PartialResultWarning,
    complete,
    connect,
    equals,
    has_tables,
    mark_partial,
    settings,
    utc,
)
from provscope.query.runs import resolve_run_id, runs, tasks
from provscope.query.series import series

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = ["NODE_FIELDS", "node_series", "resource_summary"]

#: What ``node_series`` reads by default (``measurement.field``).
NODE_FIELDS = ("cpu.usage_percent", "memory.used_bytes", "memory.used_percent",
               "gpu.utilization_percent", "gpu.memory_used_bytes", "gpu.power_watts")


def _window(of: str, config: Config) -> dict[str, Any]:
    """run_id, task_id, hosts, start_ns, end_ns, running of a task id or a run id
    (prefix, ``latest``)."""
    task = None
    if isinstance(of, str) and of.strip():
        with connect(config) as conn:
            if conn is not None and has_tables(conn, "tasks"):
                task = conn.execute(sa.text(
                    "SELECT task_id, run_id, host, start_ns, end_ns, status FROM tasks "
                    "WHERE task_id = :t"), {"t": of.strip()}).first()
    if task is not None:
        info = runs(run_id=task.run_id, config=config)
        run_running = not info.empty and equals(info["status"].iloc[0], "running")
        hosts = [task.host] if task.host else _run_hosts(task.run_id, info, config)
        running = task.end_ns is None and (task.status == "running" or run_running)
        return {"run_id": task.run_id, "task_id": task.task_id, "hosts": hosts,
                "start_ns": task.start_ns, "end_ns": task.end_ns, "running": running}
    run_id = resolve_run_id(of, config=config)
    info = runs(run_id=run_id, config=config)
    row = info.iloc[0]
    return {"run_id": run_id, "task_id": None, "hosts": _run_hosts(run_id, info, config),
            "start_ns": None if pd.isna(row["start_ns"]) else int(row["start_ns"]),
            "end_ns": None if pd.isna(row["end_ns"]) else int(row["end_ns"]),
            "running": equals(row["status"], "running")}


def _run_hosts(run_id: str, info: pd.DataFrame, config: Config) -> list[str]:
    hosts = set()
    if not info.empty and not pd.isna(info["host"].iloc[0]):
        hosts.add(str(info["host"].iloc[0]))
    with connect(config) as conn:
        if conn is not None and has_tables(conn, "tasks"):
            hosts |= {h for h in conn.execute(sa.text(
                "SELECT DISTINCT host FROM tasks WHERE run_id = :r AND host IS NOT NULL"),
                {"r": run_id}).scalars() if h}
    return sorted(hosts)


def _node_fields(fields: str | Sequence[str] | None) -> dict[str, list[str]]:
    names = [fields] if isinstance(fields, str) else list(fields or NODE_FIELDS)
    out: dict[str, list[str]] = {}
    for name in names:
        if not isinstance(name, str) or name.count(".") < 1 or name.startswith(".") \
                or name.endswith("."):
            raise ProvscopeError(f"node field {name!r} is not allowed; allowed: "
                                 "'measurement.field', e.g. 'cpu.usage_percent'")
        measurement, _, field = name.partition(".")
        out.setdefault(measurement, []).append(field)
    return out


def node_series(of: str = "latest", fields: str | Sequence[str] | None = None, *,
                resample: str | None = None, agg: str = "mean",
                config: Config | None = None) -> pd.DataFrame:
    """The node series (agent collectors) of the hosts a run or task ran on, over its
    time window, in one frame. Blocks on the lineage store and the time-series store.

    Args:
        of: a task id, or a run id (prefix, ``"latest"``).
        fields: ``"measurement.field"`` names (default ``NODE_FIELDS``: CPU and memory
            use, GPU utilisation, memory and power).
        resample, agg: as for ``series`` (time bins).

    Returns:
        Indexed by ``time`` (UTC); columns ``host`` and the other tags the measurements
        carry (``gpu``, ``gpu_uuid``, ``device``, ...), then one column per field named
        ``measurement.field``. Rows of measurements with the same tags and time are one
        row (CPU and memory samples of one tick). The window is the run's (or task's)
        start to its end, or to now while it runs (then ``attrs["partial"]`` is True).
        ``attrs``: ``run_id``, ``task_id``, ``hosts``, ``start_ns``, ``end_ns``.
    """
    cfg = settings(config)
    wanted = _node_fields(fields)
    win = _window(of, cfg)
    end = win["end_ns"] if win["end_ns"] is not None else time.time_ns()
    frames = []
    note = None
    if not win["hosts"]:
        note = f"no host recorded for {'task' if win['task_id'] else 'run'} {of}"
    elif win["start_ns"] is None:
        note = f"no start time recorded for {'task' if win['task_id'] else 'run'} {of}"
    else:
        for measurement, names in wanted.items():
            df = series(measurement, names, host=win["hosts"], start=win["start_ns"],
                        end=end, index="time", resample=resample, agg=agg, config=cfg)
            tags = [t for t in df.attrs.get("tags", []) if t not in ("run_id", "rank")]
            df = df[[*tags, *names]].rename(columns={n: f"{measurement}.{n}" for n in names})
            frames.append(df.reset_index())
    columns = [f"{m}.{f}" for m, fs in wanted.items() for f in fs]
    if frames:
        joined = pd.concat(frames, ignore_index=True, sort=False)
        tags = [c for c in joined.columns if c not in columns and c != "time"]
        tags = ["host", *sorted(t for t in tags if t != "host")]
        for t in tags:
            joined[t] = joined[t].astype(TEXT)
        for c in columns:
            if c not in joined:
                joined[c] = pd.array([pd.NA] * len(joined), dtype="Float64")
        out = joined.groupby(["time", *tags], dropna=False, sort=True)[columns].first()
        out = out.reset_index(level=tags)[[*tags, *columns]]
    else:
        out = pd.DataFrame({"host": pd.array([], dtype=TEXT),
                            **{c: pd.array([], dtype="Float64") for c in columns}},
                           index=pd.DatetimeIndex([], tz="UTC", name="time"))
    out.attrs = {}
    complete(out)
    out.attrs.update({"run_id": win["run_id"], "task_id": win["task_id"],
                      "hosts": win["hosts"], "start_ns": win["start_ns"], "end_ns": end})
    if win["running"]:
        mark_partial(out, f"run {win['run_id']} is still running: node series up to now")
    if note:
        mark_partial(out, note)
    return out


def _ns(index: pd.Index) -> np.ndarray:
    """A UTC time index as Unix ns."""
    return np.asarray(index.to_numpy(dtype="datetime64[ns]")).view(np.int64)


def _window_mean(times: np.ndarray, values: np.ndarray, starts: np.ndarray,
                 ends: np.ndarray) -> np.ndarray:
    """Mean of ``values`` (NaN: no value) with ``start <= time <= end``, per window."""
    order = np.argsort(times, kind="stable")
    t, v = times[order], values[order]
    ok = ~np.isnan(v)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    ccnt = np.concatenate([[0], np.cumsum(ok)])
    i0 = np.searchsorted(t, starts, "left")
    i1 = np.searchsorted(t, ends, "right")
    n = ccnt[i1] - ccnt[i0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (csum[i1] - csum[i0]) / np.maximum(n, 1), np.nan)


def _last_in_window(times: np.ndarray, values: np.ndarray, starts: np.ndarray,
                    ends: np.ndarray) -> np.ndarray:
    """The last value (by time) with ``start <= time <= end``, per window (NaN: none)."""
    ok = ~np.isnan(values)
    t, v = times[ok], values[ok]
    order = np.argsort(t, kind="stable")
    t, v = t[order], v[order]
    idx = np.searchsorted(t, ends, "right") - 1
    valid = idx >= 0
    found = np.where(valid, idx, 0)
    valid &= (t[found] >= starts) if len(t) else np.zeros(len(starts), dtype=bool)
    return np.where(valid, v[found] if len(v) else np.nan, np.nan)


_RESOURCES = ("cpu_seconds", "peak_rss_bytes", "gpu_seconds", "gpu_energy_joules",
              "read_bytes", "write_bytes")
_UTILISATION = {"cpu.usage_percent": "cpu_usage_percent_mean",
                "memory.used_bytes": "memory_used_bytes_mean",
                "gpu.utilization_percent": "gpu_utilization_percent_mean",
                "gpu.power_watts": "gpu_power_watts_mean"}


def resource_summary(run_id: str = "latest", *, metrics: str = "train",
                     config: Config | None = None) -> pd.DataFrame:
    """What a run and each of its tasks cost, beside the metrics they reached. Blocks on
    the lineage store and the time-series store.

    Args:
        run_id: a run id, an unambiguous prefix or ``"latest"``.
        metrics: the measurement whose fields give the ``final_<field>`` columns.

    Returns:
        One row for the run (``level == "run"``, first), then one per task in start
        order (``level == "task"``), with ``run_id``, ``task_id``, ``name``, ``kind``,
        ``path``, ``depth``, ``status``, ``start_time``, ``end_time``, ``duration_s``;
        the recorded resources ``cpu_seconds``, ``peak_rss_bytes``, ``gpu_seconds``,
        ``gpu_energy_joules``, ``read_bytes``, ``write_bytes`` (the run's: the sum over
        its top-level tasks, the peak's maximum), ``gpu_hours``, ``energy_kwh``; the
        node utilisation over the window on its hosts ``cpu_usage_percent_mean``,
        ``memory_used_bytes_mean``, ``gpu_utilization_percent_mean``,
        ``gpu_power_watts_mean``; and ``final_<field>`` for each numeric field of
        ``metrics``: the last value logged in the window (any rank). Missing: ``pd.NA``.
        ``attrs["partial"]`` is True while the run is still running.
    """
    cfg = settings(config)
    rid = resolve_run_id(run_id, config=cfg)
    info = runs(run_id=rid, config=cfg).iloc[0]
    tk = tasks(rid, config=cfg)
    running = equals(info["status"], "running")
    now = time.time_ns()
    top = tk[tk["depth"] == 0]
    run_row: dict[str, Any] = {
        "level": "run", "run_id": rid, "task_id": None, "name": info["name"],
        "kind": None, "path": None, "depth": None, "status": info["status"],
        "start_ns": info["start_ns"], "end_ns": info["end_ns"],
    }
    for col in _RESOURCES:
        known = top[col].dropna()
        run_row[col] = (known.max() if col == "peak_rss_bytes" else known.sum()) \
            if len(known) else None
    rows = [run_row]
    for rec in tk.to_dict(orient="records"):
        rows.append({"level": "task", "run_id": rid, "task_id": rec["task_id"],
                     "name": rec["name"], "kind": rec["kind"], "path": rec["path"],
                     "depth": rec["depth"], "status": rec["status"],
                     "start_ns": rec["start_ns"], "end_ns": rec["end_ns"],
                     **{c: rec[c] for c in _RESOURCES}})
    df = pd.DataFrame(rows)
    for col in ("level", "run_id", "task_id", "name", "kind", "path", "status"):
        df[col] = pd.array([None if pd.isna(v) else str(v) for v in df[col]], dtype=TEXT)
    for col in ("depth", "start_ns", "end_ns", "peak_rss_bytes", "read_bytes",
                "write_bytes"):
        df[col] = pd.array([None if pd.isna(v) else int(v) for v in df[col]], dtype="Int64")
    for col in ("cpu_seconds", "gpu_seconds", "gpu_energy_joules"):
        df[col] = pd.array([None if pd.isna(v) else float(v) for v in df[col]],
                           dtype="Float64")
    df["start_time"], df["end_time"] = utc(df["start_ns"]), utc(df["end_ns"])
    df["duration_s"] = (df["end_ns"] - df["start_ns"]).astype("Float64") / 1e9
    df["gpu_hours"] = df["gpu_seconds"] / 3600.0
    df["energy_kwh"] = df["gpu_energy_joules"] / 3.6e6
    starts = df["start_ns"].to_numpy(dtype=np.float64, na_value=np.nan)
    ends = df["end_ns"].to_numpy(dtype=np.float64, na_value=np.nan)
    ends = np.where(np.isnan(ends), now, ends)
    has_window = ~np.isnan(starts)
    starts_i = np.where(has_window, starts, 0).astype(np.int64)
    ends_i = ends.astype(np.int64)

    with warnings.catch_warnings():  # this frame says it once, below
        warnings.simplefilter("ignore", PartialResultWarning)
        nodes = node_series(rid, list(_UTILISATION), config=cfg) if not pd.isna(
            info["start_ns"]) else None
        train = series(metrics, run_id=rid, index="time", config=cfg) if metrics else None
    for field, col in _UTILISATION.items():
        out = np.full(len(df), np.nan)
        if nodes is not None and len(nodes) and field in nodes:
            times = _ns(nodes.index)
            values = nodes[field].to_numpy(dtype=np.float64, na_value=np.nan)
            out = _window_mean(times, values, starts_i, ends_i)
        out[~has_window] = np.nan
        df[col] = pd.arrays.FloatingArray(np.nan_to_num(out), np.isnan(out))

    if train is not None and len(train):
        times = _ns(train.index)
        for field in train.attrs.get("fields", []):
            col = train[field]
            if col.dtype == TEXT:
                continue
            values = col.to_numpy(dtype=np.float64, na_value=np.nan)
            last = _last_in_window(times, values, starts_i, ends_i)
            last[0] = values[~np.isnan(values)][-1] if (~np.isnan(values)).any() else np.nan
            last[~has_window & (np.arange(len(df)) > 0)] = np.nan
            df[f"final_{field}"] = pd.arrays.FloatingArray(np.nan_to_num(last), np.isnan(last))
    df.attrs = {}
    complete(df)
    if running:
        mark_partial(df, f"run {rid} is still running: resources and metrics so far")
    return df
