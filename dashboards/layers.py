"""Layers: per-layer statistics of the sampled steps (``provscope.watch``) for the
selected layers: a heatmap across layers and time, and one series per layer of each
statistic; NaN/Inf counts in the layers' outputs.

Source: measurement ``layer`` (one point per watched module and sampled step), tags
``run_id``, ``host``, ``rank``, ``layer``, ``module_type``; the step is a field.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import heatmap as hm
from grafana_foundation_sdk.builders.dashboard import Dashboard, Row
from grafana_foundation_sdk.builders.timeseries import Panel
from grafana_foundation_sdk.models import heatmap as hm_models
from grafana_foundation_sdk.models.dashboard import GridPos
from provscope.dashboards import panels
from provscope.dashboards.base import dashboard
from provscope.dashboards.links import LAYERS
from provscope.dashboards.queries import INFLUXDB, InfluxQL, InfluxTarget, ident, matches
from provscope.dashboards.templating import (
    host_from_influx,
    rank_from_influx,
    run_variable,
    tag_variable,
    task_annotation,
)

__all__ = ["build"]

M = "layer"
WHERE = (matches("run_id", "run"), matches("host", "host"), matches("rank", "rank"),
         matches("layer", "layer"))
BY = ("run_id", "host", "rank", "layer")
ALIAS = "$tag_layer ($tag_host rank $tag_rank)"


def _metric(field: str, **kw) -> Panel:
    return panels.metric(M, field, where=WHERE, by=BY, alias=ALIAS, **kw)


def _heatmap(field: str, *, log: bool) -> hm.Panel:
    """One statistic across layers (rows) and time: each layer's series is one row."""
    s = panels.spec(M, field)
    q = InfluxQL(M, (f"mean({ident(field)})",), WHERE, ("layer",))
    color = (hm.HeatmapColorOptions().mode(hm_models.HeatmapColorMode.SCHEME)
             .scheme("Spectral").scale(hm_models.HeatmapColorScale.EXPONENTIAL if log else
                                       hm_models.HeatmapColorScale.LINEAR).exponent(0.5)
             .steps(64))
    return (hm.Panel().title(f"{panels.title(s)} by layer").description(panels.describe(s))
            .datasource(INFLUXDB).unit(panels.unit(s)).calculate(False).color(color)
            .y_axis(hm.YAxisConfig().axis_label("layer"))
            .with_target(InfluxTarget(q, alias="$tag_layer"))
            .grid_pos(GridPos(h=9, w=12, x=0, y=0)))


def build() -> Dashboard:
    """The Layers dashboard (uid ``provscope-layers``)."""
    nan, inf = panels.spec(M, "activation_nan_elements"), panels.spec(M, "activation_inf_elements")
    bad = InfluxQL(M, (f'sum({ident(nan.field)}) AS "NaN"', f'sum({ident(inf.field)}) AS "Inf"'),
                   WHERE[:3], interval=False)
    return (
        dashboard(LAYERS, "provscope / Layers",
                  "Per-layer activation, gradient, weight and update statistics of the "
                  "sampled steps, forward and backward time, NaN/Inf counts.")
        .with_variable(run_variable())
        .with_variable(host_from_influx(M))
        .with_variable(rank_from_influx(M))
        .with_variable(tag_variable(
            "layer", "Layer", M, "layer",
            where=(matches("run_id", "run"), matches("host", "host"), matches("rank", "rank"))))
        .annotation(task_annotation())
        .with_row(Row("Across layers"))
        .with_panel(_heatmap("grad_norm", log=True))
        .with_panel(_heatmap("update_ratio", log=True))
        .with_panel(panels.stat(
            "NaN/Inf in outputs", f"{nan.help} {inf.help} Summed over the selected "
            "layers and the time range; anything above 0 is red.", "none",
            [InfluxTarget(bad, alias="$col")], w=6, h=6, calc="sum", steps=((1, "red"),)))
        .with_panel(panels.fields(
            "NaN/Inf per layer", M, ("activation_nan_elements", "activation_inf_elements"),
            where=WHERE, by=BY, alias=f"$col {ALIAS}", agg="max", w=18, h=6))
        .with_row(Row("Gradients and updates"))
        .with_panel(_metric("grad_norm", title_="Gradient norm"))
        .with_panel(_metric("update_ratio", title_="Update ratio (||dW|| / ||W||)"))
        .with_panel(_metric("weight_norm", title_="Weight norm"))
        .with_row(Row("Activations"))
        .with_panel(_metric("activation_mean"))
        .with_panel(_metric("activation_std"))
        .with_panel(_metric("activation_abs_max"))
        .with_panel(_metric("activation_zero_fraction", min_=0, max_=1))
        .with_row(Row("Time"))
        .with_panel(_metric("forward_seconds", title_="Forward time", min_=0))
        .with_panel(_metric("backward_seconds", title_="Backward time", min_=0))
    )
