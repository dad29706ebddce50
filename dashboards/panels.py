"""Panels built from catalogue entries: titles, units and descriptions come from
``provscope.catalogue``, so a field's unit or meaning is written in one place only.

``metric`` draws one catalogued field (a gauge as it is, a counter as its rate through
``non_negative_derivative``); ``fields`` draws several fields of one measurement in one
panel; ``timeseries``, ``stat`` and ``table`` are the plain shapes every dashboard uses,
with the sizes a person would pick (full grid width is 24).
"""

from __future__ import annotations

from collections.abc import Sequence

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import table as table_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.builders.dashboard import ThresholdsConfig
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    DynamicConfigValue,
    GridPos,
    Threshold,
    ThresholdsMode,
)
from provscope.dashboards.queries import INFLUXDB, InfluxQL, InfluxTarget, ident

from provscope.catalogue import GRAFANA_UNITS, MetricSpec, lookup

__all__ = [
    "Target",
    "describe",
    "fields",
    "metric",
    "select",
    "spec",
    "stat",
    "table",
    "thresholds",
    "timeseries",
    "title",
    "unit",
    "unit_override",
]

Target = cogbuilder.Builder  # any SDK target builder (InfluxTarget, SqlTarget)

# Unit words whose names end field keys; stripped from titles.
_SUFFIXES = ("_bytes", "_percent", "_seconds", "_celsius", "_watts", "_joules", "_hertz")

# The Grafana unit of a counter's per-second rate, by the counter's unit.
_RATE_UNITS = {"bytes": "Bps", "count": "cps", "points": "short", "joules": "watt",
               "seconds": "percentunit"}


def spec(measurement: str, field: str) -> MetricSpec:
    """The catalogue entry of ``measurement.field``; a dashboard may only draw what the
    catalogue declares, so an unknown name fails the build at once."""
    found = lookup(measurement, field)
    if found is None:
        raise KeyError(f"{measurement}.{field} is not in provscope.catalogue; declare it "
                       "there before a dashboard draws it")
    return found


def title(s: MetricSpec) -> str:
    """A panel or series title from the field key (``memory_used_bytes`` -> ``Memory used``)."""
    name = s.field.removesuffix("_total")
    for suffix in _SUFFIXES:
        name = name.removesuffix(suffix)
    words = name.replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def describe(s: MetricSpec, *, rate: bool = False) -> str:
    """The catalogue's help text, saying when a counter is shown as its rate."""
    if rate:
        return f"{s.help} Shown as a rate per second (non_negative_derivative of the counter)."
    return s.help


def unit(s: MetricSpec, *, rate: bool = False) -> str:
    """The Grafana unit of the field, or of its rate per second."""
    if rate:
        return _RATE_UNITS.get(s.unit, "short")
    return GRAFANA_UNITS.get(s.unit, "short")


def unit_override(unit_: str) -> DynamicConfigValue:
    """A field override property setting the unit of one column (tables)."""
    return DynamicConfigValue(id_val="unit", value=unit_)


def select(s: MetricSpec, *, agg: str = "mean", rate: bool = False, name: str = "") -> str:
    """The InfluxQL select expression of one field: ``agg(field)``, or for a counter the
    per-second ``non_negative_derivative`` of its last value in each interval."""
    col = name or title(s)
    if rate:
        return f'non_negative_derivative(last({ident(s.field)}), 1s) AS {ident(col)}'
    return f"{agg}({ident(s.field)}) AS {ident(col)}"


def thresholds(*steps: tuple[float, str]) -> ThresholdsConfig:
    """Absolute thresholds: green below the first step, then each step's colour from its
    value on (``(85, "orange"), (95, "red")``)."""
    return ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
        [Threshold(value=None, color="green")]
        + [Threshold(value=v, color=c) for v, c in steps])


def _size(panel, w: int, h: int):
    # x = y = 0 lets Dashboard.with_panel place the panel after the previous one.
    return panel.grid_pos(GridPos(h=h, w=w, x=0, y=0))


def timeseries(
    title_: str, description: str, unit_: str, targets: Sequence[cogbuilder.Builder], *,
    w: int = 12, h: int = 8, min_: float | None = None, max_: float | None = None,
    datasource: DataSourceRef = INFLUXDB, stack: bool = False,
) -> ts_b.Panel:
    """A time-series panel: lines, legend as a table with last and max on the bottom."""
    panel = (
        ts_b.Panel().title(title_).description(description).unit(unit_)
        .datasource(datasource).line_width(1).fill_opacity(10).show_points(
            common.VisibilityMode.NEVER).span_nulls(True)
        .legend(common_b.VizLegendOptions().display_mode(common.LegendDisplayMode.TABLE)
                .placement(common.LegendPlacement.BOTTOM).show_legend(True)
                .calcs(["lastNotNull", "max"]))
    )
    if min_ is not None:
        panel = panel.min(min_)
    if max_ is not None:
        panel = panel.max(max_)
    if stack:
        panel = panel.stacking(common_b.StackingConfig().mode(common.StackingMode.NORMAL))
    for t in targets:
        panel = panel.with_target(t)
    return _size(panel, w, h)


def metric(
    measurement: str, field: str, *, where: Sequence[str] = (), by: Sequence[str] = (),
    alias: str = "", agg: str = "mean", title_: str = "", unit_: str = "",
    w: int = 12, h: int = 8, min_: float | None = None, max_: float | None = None,
) -> ts_b.Panel:
    """One catalogued field as a time series: a gauge aggregated with ``agg`` per
    interval, a counter as its rate per second. Grouped by the tags ``by``."""
    s = spec(measurement, field)
    rate = s.kind == "counter"
    q = InfluxQL(measurement, (select(s, agg=agg, rate=rate),), tuple(where), tuple(by))
    suffix = " /s" if rate and s.unit not in ("seconds", "joules") else ""
    return timeseries(title_ or title(s) + suffix, describe(s, rate=rate),
                      unit_ or unit(s, rate=rate), [InfluxTarget(q, alias=alias)], w=w, h=h,
                      min_=min_ if min_ is not None else (0 if rate else None), max_=max_)


def fields(
    title_: str, measurement: str, names: Sequence[str], *, where: Sequence[str] = (),
    by: Sequence[str] = (), alias: str = "$col", agg: str = "mean", unit_: str = "",
    w: int = 12, h: int = 8, min_: float | None = None, max_: float | None = None,
    stack: bool = False,
) -> ts_b.Panel:
    """Several catalogued fields of one measurement in one panel (same unit), one query;
    the description lists each field's help."""
    specs = [spec(measurement, n) for n in names]
    rate = specs[0].kind == "counter"
    units = {unit(s, rate=s.kind == "counter") for s in specs}
    if len(units) != 1 and not unit_:
        raise ValueError(f"panel {title_!r} mixes units {sorted(units)}")
    q = InfluxQL(measurement, tuple(select(s, agg=agg, rate=s.kind == "counter")
                                    for s in specs), tuple(where), tuple(by))
    description = " ".join(f"{title(s)}: {describe(s, rate=s.kind == 'counter')}"
                           for s in specs)
    return timeseries(title_, description, unit_ or units.pop(),
                      [InfluxTarget(q, alias=alias)], w=w, h=h,
                      min_=min_ if min_ is not None else (0 if rate else None), max_=max_,
                      stack=stack)


def stat(
    title_: str, description: str, unit_: str, targets: Sequence[cogbuilder.Builder], *,
    w: int = 6, h: int = 5, calc: str = "lastNotNull", fields_: str = "",
    datasource: DataSourceRef = INFLUXDB, steps: Sequence[tuple[float, str]] = (),
) -> stat_b.Panel:
    """A stat panel reducing each series with ``calc`` (``fields_``: which fields, as a
    Grafana field matcher such as ``/^Time$/``)."""
    reduce = common_b.ReduceDataOptions().calcs([calc]).values(False)
    if fields_:
        reduce = reduce.fields(fields_)
    panel = (stat_b.Panel().title(title_).description(description).unit(unit_)
             .datasource(datasource).reduce_options(reduce)
             .graph_mode(common.BigValueGraphMode.AREA))
    if steps:
        panel = panel.thresholds(thresholds(*steps)).color_mode(
            common.BigValueColorMode.BACKGROUND)
    for t in targets:
        panel = panel.with_target(t)
    return _size(panel, w, h)


def table(
    title_: str, description: str, targets: Sequence[cogbuilder.Builder], *,
    datasource: DataSourceRef, w: int = 24, h: int = 9,
) -> table_b.Panel:
    """A table panel with sortable, filterable columns."""
    panel = (table_b.Panel().title(title_).description(description).datasource(datasource)
             .filterable(True))
    for t in targets:
        panel = panel.with_target(t)
    return _size(panel, w, h)
