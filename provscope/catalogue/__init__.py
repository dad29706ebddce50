"""The metric catalogue: the one place that names every measurement, field, unit and tag.

Collectors, the Prometheus exporter's HELP text, the dashboards' units and the docs all
read from here, so they cannot disagree. Each component's specs live in one module of
this package (``system``: node collectors; ``training``: job scalars and layer statistics;
``internal``: provscope's own health); this module gathers them.

Naming (see docs/ARCHITECTURE.md): snake_case fields in base units with the unit as a
suffix (``_bytes``, ``_seconds``, ``_percent``, ``_celsius``, ``_watts``, ``_joules``,
``_hertz``); counters end in ``_total`` and stay raw and cumulative. Tags have bounded
cardinality; the training step is a field, never a tag.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CATALOGUE",
    "GRAFANA_UNITS",
    "MetricSpec",
    "by_measurement",
    "lookup",
    "specs",
]

Kind = Literal["gauge", "counter"]
DType = Literal["float", "int", "bool", "str"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One field of one measurement.

    Args:
        measurement: InfluxDB measurement (``gpu``).
        field: field key in base units (``memory_used_bytes``).
        kind: ``gauge`` or ``counter`` (raw cumulative; query the rate).
        unit: base unit word (``bytes``, ``seconds``, ``percent``, ``celsius``, ``watts``,
            ``joules``, ``hertz``, ``ratio``, ``count``, ``points``, ``1`` for unitless).
        help: one sentence for Prometheus HELP, dashboards and docs.
        tags: the tag keys this series carries.
        dtype: how the value is written; ``float`` unless the value is a true integer id.
    """

    measurement: str
    field: str
    kind: Kind
    unit: str
    help: str
    tags: tuple[str, ...] = ("host",)
    dtype: DType = "float"

    @property
    def grafana_unit(self) -> str:
        """The Grafana unit id for this spec's unit (``bytes``, ``s``, ``percent``, ...)."""
        return GRAFANA_UNITS.get(self.unit, "short")


GRAFANA_UNITS = {
    "bytes": "bytes",
    "bytes_per_second": "Bps",
    "seconds": "s",
    "percent": "percent",
    "ratio": "percentunit",
    "celsius": "celsius",
    "watts": "watt",
    "joules": "joule",
    "hertz": "hertz",
    "count": "short",
    "points": "short",
    "1": "none",
}

_REGISTRY: dict[tuple[str, str], MetricSpec] = {}


def _register(items: Iterable[MetricSpec]) -> None:
    for spec in items:
        key = (spec.measurement, spec.field)
        if key in _REGISTRY and _REGISTRY[key] != spec:
            raise ValueError(f"metric {key} declared twice with different specs")
        _REGISTRY[key] = spec


def lookup(measurement: str, field: str) -> MetricSpec | None:
    """Return the spec of ``measurement.field``, or None when it is not catalogued."""
    return _REGISTRY.get((measurement, field))


def by_measurement(measurement: str) -> list[MetricSpec]:
    """Every spec of one measurement, in declaration order."""
    return [s for s in _REGISTRY.values() if s.measurement == measurement]


def specs() -> list[MetricSpec]:
    """Every spec, in declaration order."""
    return list(_REGISTRY.values())


from provscope.catalogue import internal, system, training  # noqa: E402

for _module in (system, training, internal):
    _register(_module.SPECS)

CATALOGUE: dict[tuple[str, str], MetricSpec] = _REGISTRY
