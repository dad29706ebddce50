"""Overview: runs in progress and recent (lineage store) with status, duration, hosts and
throughput; every node's health at a glance; the health of provscope's own agents
(points dropped, spool size, queue depth, when each last reported).
"""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard, Row
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.table import Panel as Table
from provscope.dashboards import panels
from provscope.dashboards.base import dashboard
from provscope.dashboards.links import LINEAGE as LINEAGE_UID
from provscope.dashboards.links import NODES, OVERVIEW, TRAINING, row_link
from provscope.dashboards.queries import (
    INFLUXDB,
    LINEAGE,
    InfluxQL,
    InfluxTarget,
    Sql,
    SqlTarget,
    ident,
)
from provscope.dashboards.sqlparts import duration_s, end_ms, start_ms
from provscope.dashboards.templating import run_in_range

__all__ = ["build"]


def _count(title: str, description: str, where: tuple[str, ...],
           steps: tuple[tuple[float, str], ...] = ()) -> Stat:
    q = Sql(("count(*) AS runs",), "runs", where)
    return panels.stat(title, description, "none", [SqlTarget(q)], datasource=LINEAGE,
                       steps=steps)


def _runs_table() -> Table:
    hosts = ("(SELECT string_agg(DISTINCT t.host, ', ') FROM tasks t "
             "WHERE t.run_id = r.run_id) AS hosts")
    ranks = ("(SELECT count(DISTINCT t.rank) FROM tasks t WHERE t.run_id = r.run_id) "
             "AS ranks")
    q = Sql(("r.run_id", "r.name", "r.status", "r.campaign", "r.start_time", "r.end_time",
             duration_s("r"), hosts, ranks, "r.user_name", start_ms("r"), end_ms("r")),
            "runs r", run_in_range("r"), order_by=("r.start_ns DESC",),
            limit=100)
    return (panels.table("Runs", "Runs active in the time range, newest first. A row links "
                         "to its Training and Nodes dashboards over the run's lifetime, and "
                         "to its lineage.", [SqlTarget(q)], datasource=LINEAGE, w=24, h=8)
            .data_links([
                row_link("Training of this run", TRAINING, {"run": "run_id"}),
                row_link("Nodes during this run", NODES, {"run": "run_id"}),
                row_link("Lineage of this run", LINEAGE_UID, {"run": "run_id"}),
            ])
            .override_by_name("duration_s", [panels.unit_override("s")]))


def _throughput() -> Table:
    s, st, sp = (panels.spec("train", f) for f in
                 ("samples_per_second", "step", "step_time_seconds"))
    q = InfluxQL("train", (f'last({ident(s.field)}) AS "samples_per_second"',
                           f'last({ident(st.field)}) AS "step"',
                           f'mean({ident(sp.field)}) AS "step_time_seconds"'),
                 group_by=("run_id", "host", "rank"), interval=False)
    return (panels.table("Throughput", f"Per run, host and rank over the time range: "
                         f"samples_per_second (last): {s.help} step (last): {st.help} "
                         f"step_time_seconds (mean): {sp.help}",
                         [InfluxTarget(q, result_format="table")],
                         datasource=INFLUXDB,
                         w=24, h=6)
            .override_by_name("step_time_seconds", [panels.unit_override("s")]))


def _node_stat(title: str, measurement: str, field: str, agg: str, by: tuple[str, ...],
               alias: str, steps: tuple[tuple[float, str], ...], w: int = 4) -> Stat:
    s = panels.spec(measurement, field)
    q = InfluxQL(measurement, (f"{agg}({ident(field)})",), group_by=by)
    return panels.stat(title, f"{s.help} The latest {agg} per {', '.join(by)}.",
                       panels.unit(s), [InfluxTarget(q, alias=alias)], w=w, steps=steps)


def _agent_fresh() -> Stat:
    s = panels.spec("agent", "uptime_seconds")
    q = InfluxQL("agent", (f"last({ident(s.field)})",), group_by=("host",), interval=False)
    return panels.stat("Last report", "When each node's agent last wrote its own health "
                       f"point (uptime: {s.help}) Older than a minute: the agent or the "
                       "database is away.", "dateTimeFromNow",
                       [InfluxTarget(q, alias="$tag_host")], w=6, h=8, fields_="/^Time$/")


def build() -> Dashboard:
    """The Overview dashboard (uid ``provscope-overview``)."""
    health = ("host", "component")
    return (
        dashboard(OVERVIEW, "provscope / Overview",
                  "Runs, node health and provscope's own health at a glance.")
        .with_row(Row("Runs"))
        .with_panel(_count("Runs in progress", "Runs whose status is running.",
                           ("status = 'running'",)))
        .with_panel(_count("Runs in range", "Runs active in the time range.", run_in_range()))
        .with_panel(_count("Failed or killed in range", "Runs active in the time range "
                           "that failed or were killed.",
                           (*run_in_range(), "status IN ('failed', 'killed')"),
                           steps=((1, "red"),)))
        .with_panel(_count("Interrupted in range", "Runs active in the time range that "
                           "were interrupted.", (*run_in_range(), "status = 'interrupted'"),
                           steps=((1, "orange"),)))
        .with_panel(_runs_table())
        .with_panel(_throughput())
        .with_row(Row("Nodes"))
        .with_panel(_node_stat("CPU busy", "cpu", "usage_percent", "last", ("host",),
                               "$tag_host", ((80, "orange"), (95, "red"))))
        .with_panel(_node_stat("Memory used", "memory", "used_percent", "last", ("host",),
                               "$tag_host", ((80, "orange"), (90, "red"))))
        .with_panel(_node_stat("GPU utilisation", "gpu", "utilization_percent", "last",
                               ("host", "gpu"), "$tag_host gpu $tag_gpu", ()))
        .with_panel(_node_stat("GPU temperature", "gpu", "temperature_celsius", "last",
                               ("host", "gpu"), "$tag_host gpu $tag_gpu",
                               ((80, "orange"), (85, "red"))))
        .with_panel(_node_stat("GPU throttled", "gpu", "throttled", "last", ("host", "gpu"),
                               "$tag_host gpu $tag_gpu", ((1, "red"),)))
        .with_panel(_node_stat("File system used", "filesystem", "used_percent", "last",
                               ("host", "path"), "$tag_host $tag_path",
                               ((80, "orange"), (90, "red"))))
        .with_row(Row("provscope agents"))
        .with_panel(_agent_fresh())
        .with_panel(panels.metric("provscope", "points_dropped_total", by=health,
                                  alias="$tag_host $tag_component", w=9, h=8))
        .with_panel(panels.metric("provscope", "spool_bytes", by=health, agg="last",
                                  alias="$tag_host $tag_component", title_="Spool size",
                                  min_=0, w=9, h=8))
        .with_panel(panels.metric("provscope", "queue_depth", by=health, agg="max",
                                  alias="$tag_host $tag_component", min_=0))
        .with_panel(panels.metric("agent", "points_per_second", by=("host",),
                                  alias="$tag_host", title_="Points per second", min_=0))
    )
