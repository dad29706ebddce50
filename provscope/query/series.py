"""Time series as DataFrames, from the embedded SQLite file or InfluxDB (identical frames
either way): ``series`` (wide: one column per field, indexed by step or time) and
``points`` (long: one row per value)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from provscope.errors import ProvscopeError
from provscope.query import _embedded, _influx
from provscope.query._base import (
    TEXT,
    TimeLike,
    complete,
    equals,
    mark_partial,
    settings,
    to_ns,
)
from provscope.query._columns import FIXED_TAGS, Columns, frame

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = ["SERIES_COLUMNS", "points", "series"]

#: Columns of ``points()``: one row per (time, field) value, long format.
SERIES_COLUMNS = ["time", "time_ns", "measurement", "field", "value", "str_value", "run_id",
                  "host", "rank", "tags"]

_AGGS = ("mean", "median", "min", "max", "sum", "first", "last", "count")

Selector = str | int | Sequence[str | int] | None


def _values(name: str, value: Selector) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str | int) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, Sequence) and not isinstance(value, bytes) and value and all(
            isinstance(v, str | int) and not isinstance(v, bool) for v in value):
        return [str(v) for v in value]
    raise ProvscopeError(f"{name}={value!r} is not allowed; allowed: a string, an int or "
                         "a non-empty list of them")


def _filters(run_id: Selector, host: Selector, rank: Selector, layer: Selector,
             tags: Mapping[str, Any] | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in (tags or {}).items():
        values = _values(f"tags[{key!r}]", value)
        if values is not None:
            out[str(key)] = values
    for key, value in (("run_id", run_id), ("host", host), ("rank", rank),
                       ("layer", layer)):
        values = _values(key, value)
        if values is not None:
            out[key] = values
    return out


def _measurement(measurement: Any) -> str:
    if not isinstance(measurement, str) or not measurement:
        raise ProvscopeError(f"measurement {measurement!r} is not allowed; allowed: a "
                             "non-empty string such as 'train', 'gpu', 'layer' "
                             "(provscope.catalogue lists them)")
    return measurement


def _fields(fields: Any) -> list[str] | None:
    if fields is None:
        return None
    if isinstance(fields, str):
        fields = [fields]
    if isinstance(fields, Sequence) and fields and all(isinstance(f, str) and f
                                                        for f in fields):
        return list(dict.fromkeys(fields))
    raise ProvscopeError(f"fields={fields!r} is not allowed; allowed: a field name or a "
                         "non-empty list of them, or None for every field")


def _read(config: Config, measurement: str, fields: Sequence[str] | None,
          filters: Mapping[str, Sequence[str]], lo: int | None, hi: int | None) -> Columns:
    if config.influxdb.url:
        return _influx.read(config, measurement, fields, filters, lo, hi)
    return _embedded.read(Path(config.embedded.path).expanduser(), measurement, fields,
                          filters, lo, hi)


def _store(config: Config) -> str:
    if config.influxdb.url:
        from provscope.destinations import safe_url

        return f"InfluxDB {safe_url(config.influxdb.url)} database {_influx.database(config)!r}"
    return f"the embedded store {config.embedded.path}"


def _int_fields(measurement: str) -> frozenset[str]:
    from provscope.catalogue import by_measurement

    return frozenset(s.field for s in by_measurement(measurement) if s.dtype == "int")


def default_index(measurement: str) -> str:
    """``step`` for a measurement the catalogue gives a ``step`` field, else ``time``."""
    from provscope.catalogue import lookup

    return "step" if lookup(measurement, "step") is not None else "time"


def series(measurement: str, fields: str | Sequence[str] | None = None, *,
           run_id: Selector = None, host: Selector = None, rank: Selector = None,
           layer: Selector = None, tags: Mapping[str, Any] | None = None,
           start: TimeLike = None, end: TimeLike = None, index: str | None = None,
           resample: str | int | None = None, agg: str = "mean",
           config: Config | None = None) -> pd.DataFrame:
    """Time series of one measurement as a wide DataFrame: one row per time (or step)
    and tag set, one column per field. Blocks on the store it reads.

    Args:
        measurement: e.g. ``"train"``, ``"layer"``, ``"gpu"`` (``provscope.catalogue``).
        fields: a field or a list of fields (their columns in that order); None: every
            field found (sorted).
        run_id: a full run id, ``"latest"``, or a list of ids (``query.run`` resolves
            prefixes).
        host, rank, layer: only these (a value or a list); ``tags``: other tags, e.g.
            ``{"gpu": "0"}``.
        start, end: inclusive time range: int Unix ns, float Unix seconds, ISO string or
            datetime (naive means UTC).
        index: ``"step"`` (the ``step`` field; rows without one are left out) or
            ``"time"``; None: ``"step"`` when the catalogue gives the measurement a step
            field (``train``, ``layer``, ``layer_param``), else ``"time"``.
        resample: bins to aggregate into: a pandas fixed frequency (``"10s"``, ``"1min"``)
            with ``index="time"``, a number of steps with ``index="step"``. Bins are
            labelled by their start; empty bins give no row.
        agg: how a bin's numbers aggregate: mean, median, min, max, sum, first, last,
            count (text fields keep their last value).

    Returns:
        Columns: ``run_id``, ``host``, ``rank`` (always), the other tags present
        (``layer``, ``module_type``, ``gpu``, ...; sorted), ``time`` (UTC, when indexed
        by step), then the fields. Numbers are ``Float64`` (``Int64`` for fields the
        catalogue declares integers; booleans 0/1), text ``string``; a missing value is
        ``pd.NA``. Rows are sorted by the index, then the tags. ``attrs``: ``partial``
        (True while a run asked for is still running, or when its series are gone),
        ``warnings`` (one line each), ``measurement``, ``index``.

    Raises:
        ProvscopeError: a bad argument; the store unreachable or answering an error.
    """
    cfg = settings(config)
    measurement = _measurement(measurement)
    wanted = _fields(fields)
    if index is None:
        index = default_index(measurement)
    if index not in ("step", "time"):
        raise ProvscopeError(f"index={index!r} is not allowed; allowed: 'step' or 'time'")
    if agg not in _AGGS:
        raise ProvscopeError(f"agg={agg!r} is not allowed; allowed: {', '.join(_AGGS)}")
    run_ids = _values("run_id", run_id)
    if run_ids and "latest" in run_ids:
        from provscope.query.runs import resolve_run_id

        latest = resolve_run_id("latest", config=cfg)
        run_ids = [latest if r == "latest" else r for r in run_ids]
    filters = _filters(run_ids, host, rank, layer, tags)
    lo, hi = to_ns(start), to_ns(end)
    read_fields = wanted
    if index == "step" and wanted is not None and "step" not in wanted:
        read_fields = [*wanted, "step"]
    cols = _read(cfg, measurement, read_fields, filters, lo, hi)
    if index == "step" and len(cols.time_ns) and (
            "step" not in cols.fields or cols.fields["step"].dtype == object):
        raise ProvscopeError(f"index='step' but the {measurement!r} points asked for have "
                             "no numeric 'step' field; allowed: index='time'")
    df = frame(cols, wanted, index, _int_fields(measurement))
    if resample is not None:
        df = _resample(df, resample, agg, index)
    df.attrs.update({"measurement": measurement, "index": index})
    complete(df)
    if run_ids:
        _mark_runs(df, run_ids, measurement, cfg)
    return df


def _resample(df: pd.DataFrame, rule: str | int, agg: str, index: str) -> pd.DataFrame:
    if index == "step":
        if isinstance(rule, bool) or not isinstance(rule, int | np.integer) or rule < 1:
            raise ProvscopeError(f"resample={rule!r} is not allowed with index='step'; "
                                 "allowed: a number of steps >= 1")
        step = df.index.to_numpy(dtype=np.int64, na_value=0)
        bucket = pd.Index((step // int(rule)) * int(rule), name="step")
    else:
        try:
            bucket = df.index.floor(rule)  # type: ignore[attr-defined]
        except (ValueError, TypeError) as exc:
            raise ProvscopeError(f"resample={rule!r} is not allowed with index='time' "
                                 f"({exc}); allowed: a fixed frequency such as '10s', "
                                 "'1min', '1h'") from None
        bucket = pd.Index(bucket, name="time")
    tag_cols = [c for c in df.attrs.get("tags", FIXED_TAGS) if c in df.columns]
    how: dict[str, str] = {}
    for c in df.columns:
        if c in tag_cols:
            continue
        if c == "time":
            how[c] = "first"
        elif df[c].dtype == TEXT:
            how[c] = "last"
        else:
            how[c] = agg
    if df.empty:
        return df
    grouped = df.groupby([bucket, *[df[c] for c in tag_cols]], dropna=False, sort=True)
    out = grouped.agg(how) if how else grouped.size().to_frame("count").iloc[:, :0]
    out = out.reset_index(level=list(range(1, 1 + len(tag_cols))))
    for c in tag_cols:
        out[c] = out[c].astype(TEXT)
    for c in df.columns:
        if c in out and df[c].dtype == "Int64" and agg in ("min", "max", "sum", "first",
                                                           "last", "count"):
            out[c] = out[c].astype("Int64")
        elif c in out and c not in tag_cols and c != "time" and df[c].dtype != TEXT:
            out[c] = out[c].astype("Int64" if agg == "count" else "Float64")
    return out[[c for c in df.columns if c in out]]


def _mark_runs(df: pd.DataFrame, run_ids: list[str], measurement: str,
               config: Config) -> None:
    """Mark the frame partial for a run still running, or one whose series are gone."""
    from provscope.query.runs import runs

    for rid in run_ids:
        try:
            info = runs(run_id=rid, config=config)
        except ProvscopeError:
            continue  # no lineage to say more (e.g. an InfluxDB-only reader)
        if info.empty:
            continue
        row = info.iloc[0]
        if equals(row["status"], "running"):
            mark_partial(df, f"run {rid} is still running: its series end at the latest "
                         "point written so far")
            continue  # no points yet is no news while it runs
        has = (df["run_id"] == rid).fillna(False).any() if len(df) else False
        if not has:
            mark_partial(df, _missing_line(rid, row, measurement, config))


def _missing_line(run_id: str, row: Any, measurement: str, config: Config) -> str:
    ended = row["end_ns"] if not pd.isna(row["end_ns"]) else row["start_ns"]
    if config.influxdb.url and not pd.isna(ended):
        policy = _influx.retention(config)
        if policy is not None:
            name, keep = policy
            age = time.time_ns() - int(ended)
            if age > keep:
                return (f"no {measurement!r} points of run {run_id}: they expired "
                        f"(retention policy {name!r} keeps {keep / 3.6e12:g} h; the run "
                        f"ended {age / 3.6e12:.0f} h ago)")
    return (f"no {measurement!r} points of run {run_id} in {_store(config)} (never "
            "written there, or deleted)")


def points(measurement: str, field: str | None = None, run_id: str | None = None,
           start: TimeLike = None, end: TimeLike = None,
           tags: Mapping[str, Any] | None = None, *,
           config: Config | None = None) -> pd.DataFrame:
    """Time-series values of one measurement, long format (one row per time and field).

    Args:
        measurement: e.g. ``"train"``, ``"gpu"``.
        field: one field, or None for all.
        run_id: only points tagged with this run.
        start, end: inclusive time range (as for ``series``).
        tags: other tag filters, e.g. ``{"host": "node1", "gpu": "0"}``.

    Returns:
        Columns ``SERIES_COLUMNS``: ``time`` (UTC), ``time_ns``, ``measurement``,
        ``field``, ``value`` (``Float64``; booleans 0/1), ``str_value`` (``string``, text
        fields), ``run_id``, ``host``, ``rank`` (``string``) and ``tags`` (dict of the
        other tags), sorted by time, field, then tags. A missing value is ``pd.NA``.

    Raises:
        ProvscopeError: a bad argument; the store unreachable or answering an error.
    """
    cfg = settings(config)
    measurement = _measurement(measurement)
    wanted = _fields(field)
    filters = _filters(run_id, None, None, None, tags)
    cols = _read(cfg, measurement, wanted, filters, to_ns(start), to_ns(end))
    names = sorted(cols.fields)
    parts = []
    for name in names:
        values = cols.fields[name]
        present = np.array([v is not None for v in values], dtype=bool) \
            if values.dtype == object else ~np.isnan(values)
        rows = np.flatnonzero(present)
        parts.append((name, rows, values[rows]))
    n = sum(len(r) for _, r, _ in parts)
    time_ns = np.concatenate([cols.time_ns[r] for _, r, _ in parts]) if parts else \
        np.empty(0, np.int64)
    key = np.concatenate([cols.key[r] for _, r, _ in parts]) if parts else \
        np.empty(0, np.int64)
    fcode = np.concatenate([np.full(len(r), i) for i, (_, r, _) in enumerate(parts)]) \
        if parts else np.empty(0, np.int64)
    num = np.full(n, np.nan)
    txt = np.full(n, None, dtype=object)
    pos = 0
    for _, r, v in parts:
        if v.dtype == object:
            txt[pos:pos + len(r)] = v
        else:
            num[pos:pos + len(r)] = v
        pos += len(r)
    key_order = sorted(range(len(cols.keys)), key=lambda i: sorted(cols.keys[i].items()))
    rank_of = np.empty(len(cols.keys), dtype=np.int64)
    rank_of[key_order] = np.arange(len(cols.keys))
    order = np.lexsort((rank_of[key] if n else key, fcode, time_ns))
    time_ns, key, fcode, num, txt = (a[order] for a in (time_ns, key, fcode, num, txt))
    per_key = {t: np.array([cols.keys[i].get(t) for i in range(len(cols.keys))] or [None],
                           dtype=object) for t in FIXED_TAGS}
    other = [{k: v for k, v in tags_.items() if k not in FIXED_TAGS} for tags_ in cols.keys]
    df = pd.DataFrame({
        "time": pd.DatetimeIndex(time_ns.astype("datetime64[ns]")).tz_localize("UTC"),
        "time_ns": time_ns,
        "measurement": pd.array([measurement] * n, dtype=TEXT),
        "field": pd.array(np.array(names, dtype=object)[fcode] if n else [], dtype=TEXT),
        "value": pd.arrays.FloatingArray(np.nan_to_num(num), np.isnan(num)),
        "str_value": pd.array(txt, dtype=TEXT),
        **{t: pd.array(per_key[t][key] if n else [], dtype=TEXT) for t in FIXED_TAGS},
        "tags": pd.Series([dict(other[k]) for k in key], dtype=object),
    }, columns=SERIES_COLUMNS)
    return complete(df)
