"""Small typed query builders: InfluxQL for the time series, SQL for the lineage store.

grafana-foundation-sdk has no InfluxDB or SQL query builders, so the targets are built
here: ``InfluxQL`` and ``Sql`` render query text from parts (so that every panel filters
on the template variables the same way), and ``InfluxTarget``/``SqlTarget`` wrap the text
into a Grafana target that any SDK panel accepts through ``with_target``.

Template variables are written in Grafana's explicit formats: ``${run:regex}`` inside an
InfluxQL regular expression (one value escaped, several as ``(a|b)``), and
``${run:sqlstring}`` inside SQL ``IN (...)`` (quoted, comma-separated), so one query works
for one, several or all selected values.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models.dashboard import DataSourceRef

__all__ = [
    "INFLUXDB",
    "LINEAGE",
    "PROMETHEUS",
    "InfluxQL",
    "InfluxTarget",
    "RawTarget",
    "Sql",
    "SqlTarget",
    "ident",
    "matches",
    "sql_in",
]

#: Datasource uids fixed by the provisioning files (provisioning/datasources/).
INFLUXDB = DataSourceRef(type_val="influxdb", uid="provscope-influxdb")
LINEAGE = DataSourceRef(type_val="grafana-postgresql-datasource", uid="provscope-lineage")
PROMETHEUS = DataSourceRef(type_val="prometheus", uid="provscope-prometheus")


def ident(name: str) -> str:
    """An InfluxQL identifier in double quotes (measurements, fields and tags)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def matches(tag: str, variable: str) -> str:
    """InfluxQL condition: tag ``tag`` is one of the values selected in ``variable``."""
    return f"{ident(tag)} =~ /^${{{variable}:regex}}$/"


def sql_in(column: str, variable: str) -> str:
    """SQL condition: ``column`` (cast to text) is one of the values selected in ``variable``."""
    return f"CAST({column} AS text) IN (${{{variable}:sqlstring}})"


@dataclass(frozen=True)
class InfluxQL:
    """One InfluxQL ``SELECT`` over one measurement, restricted to the dashboard's time range.

    Args:
        measurement: the measurement (``gpu``).
        select: select expressions, already quoted (``mean("loss") AS "loss"``).
        where: extra conditions joined with AND (``matches("run_id", "run")``); the time
            filter ``$timeFilter`` is always added.
        group_by: tag keys to group by (one series per value combination).
        interval: group by ``time($__interval)`` (a time series); False: one row per
            group over the whole range (tables and stats).
        fill: the ``fill()`` policy when grouping by time.
    """

    measurement: str
    select: tuple[str, ...]
    where: tuple[str, ...] = ()
    group_by: tuple[str, ...] = ()
    interval: bool = True
    fill: str = "none"

    def text(self) -> str:
        """The query text with Grafana's macros left in place."""
        conds = [*self.where, "$timeFilter"]
        groups = (["time($__interval)"] if self.interval else []) + [ident(t) for t in
                                                                   self.group_by]
        out = (f"SELECT {', '.join(self.select)} FROM {ident(self.measurement)} "
               f"WHERE {' AND '.join(conds)}")
        if groups:
            out += f" GROUP BY {', '.join(groups)}"
        if self.interval:
            out += f" fill({self.fill})"
        return out


@dataclass(frozen=True)
class Sql:
    """One SQL ``SELECT`` against the lineage store (PostgreSQL dialect).

    Args:
        select: column expressions (``"run_id"``, ``"end_ns / 1000000 AS end_ms"``).
        from_: the FROM clause, joins included.
        where: conditions joined with AND.
        group_by, order_by: clause bodies; empty: left out.
        limit: row limit; 0: none.
    """

    select: tuple[str, ...]
    from_: str
    where: tuple[str, ...] = ()
    group_by: tuple[str, ...] = ()
    order_by: tuple[str, ...] = ()
    limit: int = 0

    def text(self) -> str:
        """The query text with Grafana's macros left in place."""
        parts = [f"SELECT {', '.join(self.select)}", f"FROM {self.from_}"]
        if self.where:
            parts.append("WHERE " + " AND ".join(self.where))
        if self.group_by:
            parts.append("GROUP BY " + ", ".join(self.group_by))
        if self.order_by:
            parts.append("ORDER BY " + ", ".join(self.order_by))
        if self.limit:
            parts.append(f"LIMIT {self.limit}")
        return "\n".join(parts)


class RawTarget(cogvariants.Dataquery):
    """A Grafana target written as the plugin's JSON (the SDK has no model for it)."""

    def __init__(self, fields: dict[str, object]) -> None:
        self.fields = fields

    def to_json(self) -> dict[str, object]:
        return dict(self.fields)


@dataclass
class InfluxTarget(cogbuilder.Builder[RawTarget]):
    """An InfluxQL target (raw query mode) on the provscope InfluxDB datasource.

    Args:
        query: the query.
        ref_id: the target's letter, unique within its panel.
        alias: legend text (``$tag_host gpu $tag_gpu``); empty: Grafana's default.
        result_format: ``time_series`` or ``table``.
    """

    query: InfluxQL
    ref_id: str = "A"
    alias: str = ""
    result_format: typing.Literal["time_series", "table"] = "time_series"
    extra: dict[str, object] = field(default_factory=dict)

    def build(self) -> RawTarget:
        out: dict[str, object] = {
            "datasource": INFLUXDB.to_json(),
            "query": self.query.text(),
            "rawQuery": True,
            "refId": self.ref_id,
            "resultFormat": self.result_format,
        }
        if self.alias:
            out["alias"] = self.alias
        out.update(self.extra)
        return RawTarget(out)


@dataclass
class SqlTarget(cogbuilder.Builder[RawTarget]):
    """A SQL target (code mode) on the provscope lineage datasource.

    Args:
        query: the query.
        ref_id: the target's letter, unique within its panel.
        format: ``table`` or ``time_series``.
    """

    query: Sql
    ref_id: str = "A"
    format: typing.Literal["table", "time_series"] = "table"

    def build(self) -> RawTarget:
        return RawTarget({
            "datasource": LINEAGE.to_json(),
            "editorMode": "code",
            "format": self.format,
            "rawQuery": True,
            "rawSql": self.query.text(),
            "refId": self.ref_id,
        })
