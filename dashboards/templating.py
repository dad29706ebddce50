"""Template variables (``run``, ``host``, ``rank``, ``gpu``, ``layer``) and the task
annotation, shared by the dashboards so that every dashboard names and fills them alike.

Every variable is queried from the stores (runs from the lineage store, tags from
InfluxDB), refreshed when the time range changes, multi-valued with "All" selected by
default; a link that sets ``var-run=<id>`` selects exactly that run. The names are part
of the dashboards' contract: data links from the lineage tables set them.
"""

from __future__ import annotations

from typing import cast

from grafana_foundation_sdk.builders.dashboard import AnnotationQuery, QueryVariable
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.models.dashboard import (
    AnnotationTarget,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from provscope.dashboards.queries import (
    INFLUXDB,
    LINEAGE,
    Sql,
    SqlTarget,
    ident,
    matches,
    sql_in,
)

__all__ = [
    "VARIABLES",
    "host_from_influx",
    "host_from_tasks",
    "rank_from_influx",
    "rank_from_tasks",
    "run_in_range",
    "run_variable",
    "tag_variable",
    "task_annotation",
]

#: The variable names the dashboards and their links share.
VARIABLES = ("run", "host", "rank", "gpu", "layer")

_ALL = VariableOption(selected=True, text="All", value="$__all")

def run_in_range(alias: str = "") -> tuple[str, ...]:
    """SQL conditions: the run (table alias ``alias``) overlaps the time range; a run in
    progress has no end yet."""
    p = f"{alias}." if alias else ""
    return (f"{p}start_time <= $__timeTo()",
            f"({p}end_time IS NULL OR {p}end_time >= $__timeFrom())")


def _variable(name: str, label: str, description: str, query: str,
              sort: VariableSort) -> QueryVariable:
    return (QueryVariable(name).label(label).description(description).query(query)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(sort).multi(True)
            .include_all(True).current(_ALL))


def run_variable() -> QueryVariable:
    """``run``: runs whose lifetime overlaps the time range, newest first, shown by name."""
    q = Sql(("run_id AS __value",
             "COALESCE(name, 'run') || ' ' || left(run_id, 13) AS __text"),
            "runs", run_in_range(), order_by=("start_ns DESC",), limit=200)
    return _variable("run", "Run", "Runs active in the time range (lineage store).",
                     q.text(), VariableSort.DISABLED).datasource(LINEAGE)


def _show_tag(measurement: str, key: str, where: tuple[str, ...]) -> str:
    q = f"SHOW TAG VALUES FROM {ident(measurement)} WITH KEY = {ident(key)}"
    return q + (" WHERE " + " AND ".join(where) if where else "")


def tag_variable(name: str, label: str, measurement: str, key: str, *,
                 where: tuple[str, ...] = (), numeric: bool = False) -> QueryVariable:
    """A variable holding the values of tag ``key`` of ``measurement`` (InfluxDB)."""
    return _variable(
        name, label, f"Values of the {key!r} tag of {measurement!r} (InfluxDB).",
        _show_tag(measurement, key, where),
        VariableSort.NUMERICAL_ASC if numeric else VariableSort.ALPHABETICAL_ASC,
    ).datasource(INFLUXDB)


def host_from_influx(measurement: str, *, by_run: bool = True) -> QueryVariable:
    """``host``: hosts that wrote ``measurement`` (for the selected runs)."""
    where = (matches("run_id", "run"),) if by_run else ()
    return tag_variable("host", "Host", measurement, "host", where=where)


def rank_from_influx(measurement: str) -> QueryVariable:
    """``rank``: ranks of the selected runs and hosts that wrote ``measurement``."""
    return tag_variable("rank", "Rank", measurement, "rank",
                        where=(matches("run_id", "run"), matches("host", "host")),
                        numeric=True)


def host_from_tasks() -> QueryVariable:
    """``host``: hosts that ran tasks of the selected runs (lineage store)."""
    q = Sql(("DISTINCT host",), "tasks", (sql_in("run_id", "run"), "host IS NOT NULL"),
            order_by=("host",))
    return _variable("host", "Host", "Hosts that ran tasks of the selected runs.", q.text(),
                     VariableSort.ALPHABETICAL_ASC).datasource(LINEAGE)


def rank_from_tasks() -> QueryVariable:
    """``rank``: ranks that ran tasks of the selected runs on the selected hosts."""
    q = Sql(("DISTINCT rank",), "tasks",
            (sql_in("run_id", "run"), sql_in("host", "host"), "rank IS NOT NULL"),
            order_by=("rank",))
    return _variable("rank", "Rank", "Ranks that ran tasks of the selected runs.", q.text(),
                     VariableSort.NUMERICAL_ASC).datasource(LINEAGE)


def task_annotation(*, by_rank: bool = True) -> AnnotationQuery:
    """Tasks of the selected runs (steps left out: one per step would hide the graph) as
    regions from their start to their end, from the lineage store."""
    where = [sql_in("run_id", "run"), "kind <> 'step'", "start_time <= $__timeTo()",
             "COALESCE(end_time, now()) >= $__timeFrom()"]
    if by_rank:
        where += [sql_in("host", "host"), sql_in("rank", "rank")]
    q = Sql(("start_time AS time", "end_time AS timeend",
             "name || ' (' || kind || ', ' || COALESCE(status, 'running') || ', ' || host "
             "|| ' rank ' || COALESCE(CAST(rank AS text), '-') || ')' AS text",
             "kind AS tags"),
            "tasks", tuple(where), order_by=("start_ns",), limit=500)
    target = cast(cogbuilder.Builder[AnnotationTarget], SqlTarget(q, ref_id="Anno"))
    return (AnnotationQuery().name("Tasks").datasource(LINEAGE).enable(True)
            .icon_color("rgba(0, 211, 255, 1)").target(target))
