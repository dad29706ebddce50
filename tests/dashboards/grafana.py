"""Grafana's query interpolation, as the server and the datasource plugins do it, so that
the generated queries can run against the real databases of the suite.

- Time range: InfluxQL ``$timeFilter`` -> ``time >= <from>ms and time <= <to>ms``;
  ``$__interval``/``$__interval_ms`` from the range and the panel's data points, rounded
  with Grafana's interval table; SQL ``$__timeFilter(col)``, ``$__timeFrom()``,
  ``$__timeTo()`` -> RFC 3339 UTC literals (the PostgreSQL macro engine).
- Variables: ``$var``, ``${var}`` and ``${var:format}`` with the formats ``regex``,
  ``sqlstring``, ``csv``, ``raw``, ``singlequote``, ``pipe``; "All" (``$__all``) stands for
  every value of the variable (no custom all value); the default format of a multi-value
  or include-all variable is the datasource's (InfluxDB: regex-escaped values joined as
  ``(a|b)``; SQL: quoted and comma-separated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

__all__ = ["TimeRange", "Variable", "grafana_interval", "interpolate"]

# Grafana's kbn.roundInterval: (upper bound in ms, rounded interval in ms).
_ROUND = [
    (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000),
    (3500, 2000), (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000),
    (45000, 30000), (90000, 60000), (210000, 120000), (450000, 300000), (750000, 600000),
    (1050000, 900000), (1500000, 1200000), (2700000, 1800000), (5400000, 3600000),
    (9000000, 7200000), (16200000, 10800000), (32400000, 21600000), (86400000, 43200000),
]


def _round_interval(ms: float) -> int:
    for bound, value in _ROUND:
        if ms < bound:
            return value
    return 86400000


def _interval_text(ms: int) -> str:
    """Grafana's kbn.secondsToHms-like text InfluxQL accepts (``200ms``, ``2s``, ``1m``)."""
    if ms % 3600000 == 0:
        return f"{ms // 3600000}h"
    if ms % 60000 == 0:
        return f"{ms // 60000}m"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


def grafana_interval(from_ms: int, to_ms: int, max_data_points: int = 1000,
                     min_interval_ms: int = 1) -> int:
    """``$__interval_ms`` for a range: range / data points, rounded, at least the minimum."""
    return max(_round_interval((to_ms - from_ms) / max_data_points), min_interval_ms)


@dataclass(frozen=True)
class TimeRange:
    """A dashboard time range in epoch milliseconds."""

    from_ms: int
    to_ms: int

    def rfc3339(self, ms: int) -> str:
        t = datetime.fromtimestamp(ms / 1000, tz=UTC)
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


@dataclass
class Variable:
    """A template variable as a dashboard holds it: its options and what is selected
    (``None``: "All")."""

    name: str
    options: list[str]
    selected: list[str] | None = None
    multi: bool = True
    include_all: bool = True
    extra: dict = field(default_factory=dict)

    def values(self) -> list[str]:
        return list(self.options) if self.selected is None else list(self.selected)


def _regex_escape(v: str) -> str:
    # Grafana's kbn.regexEscape (plus the InfluxDB plugin's slash escape).
    return re.sub(r"([\\^$*+?.()|\[\]{}/])", r"\\\1", v)


def _format(var: Variable, fmt: str | None, dialect: str) -> str:
    values = var.values()
    single = len(values) == 1 and not (var.multi or var.include_all)
    if fmt is None:
        if dialect == "influxql":
            fmt = "raw" if single else "regex"
        else:
            fmt = "raw" if single else "sqlstring"
    if fmt == "regex":
        esc = [_regex_escape(v) for v in values]
        return esc[0] if len(esc) == 1 else "(" + "|".join(esc) + ")"
    if fmt == "sqlstring":
        return ",".join("'" + v.replace("'", "''") + "'" for v in values)
    if fmt == "singlequote":
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
    if fmt == "csv":
        return ",".join(values)
    if fmt == "pipe":
        return "|".join(values)
    if fmt == "raw":
        return values[0] if len(values) == 1 else "{" + ",".join(values) + "}"
    raise ValueError(f"variable format {fmt!r} is not implemented in this helper")


_VAR = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)")


def interpolate(query: str, dialect: str, time_range: TimeRange,
                variables: dict[str, Variable], *, max_data_points: int = 1000,
                min_interval_ms: int = 1) -> str:
    """``query`` as Grafana sends it to the database (``dialect``: ``influxql`` or ``sql``).

    Raises:
        KeyError: a variable the dashboard does not define.
    """
    tr = time_range
    out = query
    if dialect == "influxql":
        out = out.replace("$timeFilter",
                          f"time >= {tr.from_ms}ms and time <= {tr.to_ms}ms")
    else:
        out = re.sub(r"\$__timeFilter\(([^)]+)\)",
                     lambda m: f"{m.group(1)} BETWEEN '{tr.rfc3339(tr.from_ms)}' AND "
                               f"'{tr.rfc3339(tr.to_ms)}'", out)
        out = out.replace("$__timeFrom()", f"'{tr.rfc3339(tr.from_ms)}'")
        out = out.replace("$__timeTo()", f"'{tr.rfc3339(tr.to_ms)}'")
    interval = grafana_interval(tr.from_ms, tr.to_ms, max_data_points, min_interval_ms)
    out = out.replace("$__interval_ms", str(interval))
    out = out.replace("$__interval", _interval_text(interval))
    if re.search(r"\$__(?!all\b)\w+", out):
        raise ValueError(f"a Grafana macro this helper does not know is left in: {out}")

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        if name.startswith("__"):
            return m.group(0)
        return _format(variables[name], m.group(2), dialect)

    return _VAR.sub(sub, out)
