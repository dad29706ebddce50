"""Training: loss, learning rate, gradient norm, step time and throughput per run and
rank against time, with the step itself as a series, and the run's tasks as annotations.

Source: measurement ``train`` (one point per step, written by ``run.log``, ``run.steps``
and ``provscope.watch``), tags ``run_id``, ``host``, ``rank``; the step is a field.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard, Row
from grafana_foundation_sdk.builders.timeseries import Panel
from provscope.dashboards import panels
from provscope.dashboards.base import dashboard
from provscope.dashboards.links import TRAINING
from provscope.dashboards.queries import InfluxQL, InfluxTarget, ident, matches
from provscope.dashboards.templating import (
    host_from_influx,
    rank_from_influx,
    run_variable,
    task_annotation,
)

__all__ = ["build"]

M = "train"
WHERE = (matches("run_id", "run"), matches("host", "host"), matches("rank", "rank"))
BY = ("run_id", "host", "rank")
ALIAS = "$tag_host rank $tag_rank ($tag_run_id)"


def _metric(field: str, **kw) -> Panel:
    return panels.metric(M, field, where=WHERE, by=BY, alias=ALIAS, **kw)


def _last(field: str, ref: str) -> InfluxTarget:
    s = panels.spec(M, field)
    q = InfluxQL(M, (f"last({ident(field)}) AS {ident(panels.title(s))}",), WHERE, BY,
                 interval=False)
    return InfluxTarget(q, ref_id=ref, alias=ALIAS)


def build() -> Dashboard:
    """The Training dashboard (uid ``provscope-training``)."""
    step, sps = panels.spec(M, "step"), panels.spec(M, "samples_per_second")
    d = (
        dashboard(TRAINING, "provscope / Training",
                  "Per-step training scalars of the selected runs, per host and rank.")
        .with_variable(run_variable())
        .with_variable(host_from_influx(M))
        .with_variable(rank_from_influx(M))
        .annotation(task_annotation())
        .with_row(Row("Progress"))
        .with_panel(panels.stat("Step", panels.describe(step), "none", [_last("step", "A")]))
        .with_panel(panels.stat("Samples/s", panels.describe(sps), panels.unit(sps),
                                [_last("samples_per_second", "A")]))
        .with_panel(panels.stat("Epoch", panels.describe(panels.spec(M, "epoch")), "none",
                                [_last("epoch", "A")]))
        .with_panel(panels.stat(
            "Step time", panels.describe(panels.spec(M, "step_time_seconds")), "s",
            [_last("step_time_seconds", "A")]))
        .with_row(Row("Optimisation"))
        .with_panel(panels.fields("Loss", M, ("loss", "eval_loss"), where=WHERE, by=BY,
                                  alias=f"$col {ALIAS}"))
        .with_panel(_metric("lr", title_="Learning rate"))
        .with_panel(_metric("grad_norm", title_="Gradient norm (global)"))
        .with_panel(_metric("step", agg="last", title_="Step", unit_="none"))
        .with_row(Row("Speed"))
        .with_panel(_metric("step_time_seconds", title_="Step time", min_=0))
        .with_panel(_metric("samples_per_second", title_="Samples/s", min_=0))
        .with_panel(_metric("tokens_per_second", title_="Tokens/s", min_=0))
    )
    return d
