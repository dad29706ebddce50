"""Read what provscope recorded, as pandas DataFrames: runs, tasks, lineage, time series,
resource summaries.

One set of functions for every deployment, identical frames from each. With the default
configuration everything is read from the embedded SQLite file (``embedded.path``); when
``influxdb.url`` is set, time series come from InfluxDB (InfluxQL over HTTP ``/query``),
and when ``lineage.url`` is set, lineage comes from that SQLite or PostgreSQL database.

Every function takes ``config=`` (a ``Config``); without it ``load_config()`` is used
(``$PROVSCOPE_CONFIG``, ``PROVSCOPE_*`` variables). All calls block on the store they
read. Every value passed in is bound as a parameter, never formatted into SQL or
InfluxQL. Times are Unix nanoseconds in ``*_ns`` columns and UTC ``pandas.Timestamp``
in the matching ``*_time`` / ``time`` columns.

Missing values: ``pd.NA`` everywhere (nullable dtypes ``Float64``, ``Int64``,
``boolean``, ``string``; JSON columns hold dicts or ``pd.NA``), ``NaT`` in time columns.
A frame answering part of the question (a run still running, series expired, an older
lineage schema) has ``df.attrs["partial"] = True`` and one line per reason in
``df.attrs["warnings"]`` (also issued as ``PartialResultWarning``).

Example::

    from provscope import query
    run = query.run("latest")
    loss = query.series("train", ["loss", "lr"], run_id=run.run_id)   # indexed by step
    nodes = query.node_series(run.run_id)                              # cpu, memory, gpu
    cost = query.resource_summary(run.run_id)
"""

from __future__ import annotations

from provscope.query._base import PartialResultWarning, TimeLike
from provscope.query._base import safe_url as _safe  # noqa: F401  (provscope.commands)
from provscope.query._base import to_ns as _to_ns  # noqa: F401  (tests, callers)
from provscope.query.lineage import derived_from, origin, produced_by, runs_using, used_by
from provscope.query.runs import (
    entities,
    relations,
    resolve_run_id,
    run,
    runs,
    sql,
    task_tree,
    tasks,
)
from provscope.query.series import SERIES_COLUMNS, points, series
from provscope.query.summaries import NODE_FIELDS, node_series, resource_summary

__all__ = [
    "NODE_FIELDS",
    "SERIES_COLUMNS",
    "PartialResultWarning",
    "TimeLike",
    "derived_from",
    "entities",
    "node_series",
    "origin",
    "points",
    "produced_by",
    "relations",
    "resolve_run_id",
    "resource_summary",
    "run",
    "runs",
    "runs_using",
    "series",
    "sql",
    "task_tree",
    "tasks",
    "used_by",
]
