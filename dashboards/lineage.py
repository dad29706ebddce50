"""Lineage: runs and tasks from the SQL store, a task timeline, and the entities each
task used and produced with their digests. Every run, task and entity row links to the
Training, Layers and Nodes dashboards with its run, host, rank and the task's exact time
window (``(run_id, host, rank, start, end)`` names a row's series, docs/lineage.md).
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import statetimeline as st
from grafana_foundation_sdk.builders.dashboard import Dashboard, Row
from grafana_foundation_sdk.builders.table import Panel as Table
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DashboardLink as DashboardLinkModel
from grafana_foundation_sdk.models.dashboard import DataTransformerConfig, GridPos
from provscope.dashboards import panels
from provscope.dashboards.base import dashboard
from provscope.dashboards.links import LAYERS, LINEAGE, NODES, TRAINING, row_link
from provscope.dashboards.queries import LINEAGE as LINEAGE_DS
from provscope.dashboards.queries import Sql, SqlTarget, sql_in
from provscope.dashboards.sqlparts import NOW_NS, duration_s, end_ms, start_ms
from provscope.dashboards.templating import (
    host_from_tasks,
    rank_from_tasks,
    run_variable,
)

__all__ = ["build"]

_TASKS = (sql_in("t.run_id", "run"), sql_in("t.host", "host"), sql_in("t.rank", "rank"),
          "t.start_time <= $__timeTo()", "COALESCE(t.end_time, now()) >= $__timeFrom()")
_TASK_VARS = {"run": "run_id", "host": "host", "rank": "rank"}


def _task_links() -> list[cogbuilder.Builder[DashboardLinkModel]]:
    return [row_link("Training in this task's window", TRAINING, _TASK_VARS),
            row_link("Layers in this task's window", LAYERS, _TASK_VARS),
            row_link("Nodes in this task's window", NODES, _TASK_VARS)]


def _runs() -> Table:
    q = Sql(("r.run_id", "r.name", "r.status", "r.campaign", "r.user_name", "r.host",
             "r.start_time", "r.end_time", duration_s("r"), "r.code_commit", "r.code_dirty",
             "r.command", start_ms("r"), end_ms("r")),
            "runs r", (sql_in("r.run_id", "run"),), order_by=("r.start_ns DESC",), limit=200)
    return (panels.table("Runs", "The selected runs. A row links to the run's Training "
                         "and Nodes dashboards over its lifetime.", [SqlTarget(q)],
                         datasource=LINEAGE_DS, h=6)
            .data_links([row_link("Training of this run", TRAINING, {"run": "run_id"}),
                         row_link("Nodes during this run", NODES, {"run": "run_id"})])
            .override_by_name("duration_s", [panels.unit_override("s")]))


def _tasks() -> Table:
    cols = ("t.task_id", "t.run_id", "t.parent_task_id", "t.name", "t.kind", "t.status",
            "t.host", "t.rank", "t.start_time", "t.end_time", duration_s("t"),
            "t.cpu_seconds", "t.peak_rss_bytes", "t.gpu_seconds", "t.gpu_energy_joules",
            "t.read_bytes", "t.write_bytes", "t.error", start_ms("t"), end_ms("t"))
    q = Sql(cols, "tasks t", _TASKS, order_by=("t.start_ns DESC",), limit=500)
    t = panels.table("Tasks", "Tasks of the selected runs, hosts and ranks in the time "
                     "range, newest first, with the resource summary taken at task end. A "
                     "row links to Training, Layers and Nodes over the task's exact window.",
                     [SqlTarget(q)], datasource=LINEAGE_DS, h=10).data_links(_task_links())
    for col, u in (("duration_s", "s"), ("cpu_seconds", "s"), ("gpu_seconds", "s"),
                   ("peak_rss_bytes", "bytes"), ("read_bytes", "bytes"),
                   ("write_bytes", "bytes"), ("gpu_energy_joules", "joule")):
        t = t.override_by_name(col, [panels.unit_override(u)])
    return t


def _timeline() -> st.Panel:
    """One lane per task kind: each task's start sets its lane to the task's name and its
    end clears it (NULL). The rows come back long (time, kind, task) and Grafana's
    ``partitionByValues`` splits them into one lane per kind."""
    kinds = "t.kind NOT IN ('run', 'step')"
    starts = Sql(("t.start_time AS time", "1 AS phase", "t.kind", "t.name AS task"),
                 "tasks t", (*_TASKS, kinds))
    ends = Sql(("t.end_time AS time", "0 AS phase", "t.kind", "NULL AS task"), "tasks t",
               (*_TASKS, kinds, "t.end_time IS NOT NULL"))
    q = Sql(("time", "kind", "task"), f"({starts.text()}\nUNION ALL\n{ends.text()}) AS events",
            order_by=("time", "phase"))
    split = DataTransformerConfig(id_val="partitionByValues",
                                  options={"fields": ["kind"], "keepFields": False})
    return (st.Panel().title("Task timeline")
            .description("Tasks of the selected runs, one lane per kind (steps left out: "
                         "see Training): a bar from each task's start to its end, named by "
                         "the task.")
            .datasource(LINEAGE_DS).merge_values(True).show_value(common.VisibilityMode.AUTO)
            .with_target(SqlTarget(q)).with_transformation(split)
            .grid_pos(GridPos(h=8, w=24, x=0, y=0)))


def _entities() -> Table:
    """Entities with the task (or, for a run-level use, the run) that used or made them."""
    cols = ("rel.relation", "COALESCE(t.name, 'run ' || r.name) AS task", "e.kind",
            "e.name", "e.uri", "e.digest", "e.size_bytes", "rel.role", "rel.time",
            "e.entity_id", "r.run_id", "COALESCE(t.host, r.host) AS host",
            "COALESCE(CAST(t.rank AS text), '$__all') AS rank",
            "COALESCE(t.start_ns, r.start_ns) / 1000000 AS start_ms",
            f"COALESCE(t.end_ns, r.end_ns, {NOW_NS}) / 1000000 AS end_ms")
    q = Sql(cols, "relations rel JOIN entities e ON e.entity_id = rel.object_id "
            "LEFT JOIN tasks t ON t.task_id = rel.subject_id "
            "JOIN runs r ON r.run_id = COALESCE(t.run_id, rel.run_id)",
            ("rel.relation IN ('used', 'generated')", sql_in("r.run_id", "run"),
             f"(t.task_id IS NULL OR ({sql_in('t.host', 'host')} AND "
             f"{sql_in('t.rank', 'rank')}))", "rel.time <= $__timeTo()"),
            order_by=("rel.time_ns DESC",), limit=500)
    return (panels.table("Entities used and produced",
                         "Datasets, models, checkpoints and files each task (or the run) "
                         "used or generated, with their content digest. A row links to the "
                         "task's window (the run's for a run-level use).", [SqlTarget(q)],
                         datasource=LINEAGE_DS, h=9)
            .data_links(_task_links())
            .override_by_name("size_bytes", [panels.unit_override("bytes")]))


def build() -> Dashboard:
    """The Lineage dashboard (uid ``provscope-lineage``)."""
    return (
        dashboard(LINEAGE, "provscope / Lineage",
                  "Runs, tasks and entities from the lineage store, linked to their time "
                  "series.")
        .with_variable(run_variable())
        .with_variable(host_from_tasks())
        .with_variable(rank_from_tasks())
        .with_row(Row("Runs and tasks"))
        .with_panel(_runs())
        .with_panel(_timeline())
        .with_panel(_tasks())
        .with_row(Row("Entities"))
        .with_panel(_entities())
    )

