"""Health collector: the agent's own state as time series.

Emits measurement ``provscope`` (tags ``host``, ``component`` = exporter name; from
``Pipeline.health_points``: queue depth, received/written/dropped/spooled points,
retries, export latency) and measurement ``agent`` (tag ``host``): uptime, points per
second handed to the pipeline, ingest counters, collector errors, skipped ticks. Only
fields the catalogue declares are emitted, whatever extra counters an exporter reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from provscope.agent.collectors.base import specs_for

from provscope.catalogue import MetricSpec, lookup
from provscope.records import Point

__all__ = ["HealthCollector"]


class HealthCollector:
    """Self-metrics of the agent.

    Args:
        host: value of the ``host`` tag.
        pipeline: the agent's ``Pipeline`` (``health_points``); None: only ``agent``.
        agent_stats: returns the ``agent`` measurement's fields (cumulative counters and
            gauges named as in the catalogue); ``points_per_second`` is derived here from
            ``points_total`` (all points handed to the pipeline), which is not emitted.
    """

    name: ClassVar[str] = "health"

    def __init__(self, host: str, pipeline: Any = None,
                 agent_stats: Callable[[], Mapping[str, float]] | None = None) -> None:
        self._host = host
        self._pipeline = pipeline
        self._agent_stats = agent_stats
        self._prev: tuple[int, float] | None = None
        self.last_rate = 0.0

    def open(self) -> None:
        pass

    def collect(self, now_ns: int) -> list[Point]:
        out: list[Point] = []
        if self._pipeline is not None:
            for p in self._pipeline.health_points(self._host, now_ns):
                fields = {k: v for k, v in p.fields.items() if lookup("provscope", k)}
                if fields:
                    out.append(Point("provscope", p.tags, fields, now_ns))
        if self._agent_stats is not None:
            stats = dict(self._agent_stats())
            total = float(stats.pop("points_total", 0.0))
            fields = {k: v for k, v in stats.items() if lookup("agent", k)}
            if self._prev is not None and now_ns > self._prev[0]:
                dt = (now_ns - self._prev[0]) / 1e9
                self.last_rate = max(0.0, total - self._prev[1]) / dt
                fields["points_per_second"] = self.last_rate
            self._prev = (now_ns, total)
            out.append(Point("agent", {"host": self._host}, fields, now_ns))
        return out

    def close(self) -> None:
        pass

    def specs(self) -> Sequence[MetricSpec]:
        return specs_for(self.name)
