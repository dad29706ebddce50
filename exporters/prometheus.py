"""Prometheus exporter: the latest value of every series on ``/metrics`` (pull).

It keeps the last value per series in its *own* ``CollectorRegistry`` through a custom
collector (no global registry, no default process metrics) and serves it with
prometheus_client's HTTP server on ``prometheus.address:port`` (default
``127.0.0.1:9464``).

Naming follows the catalogue: ``provscope_<measurement>_<field>``, HELP from the spec,
counters as counters (their names already end in ``_total``), gauges as gauges, base
units. A gauge whose name ends in a suffix Prometheus reserves for histograms and
summaries (``_count``, ``_sum``, ``_bucket``) gets ``_value`` appended, so scrapers and
``promtool`` read it as the gauge it is. Only the tags a spec declares become labels
(bounded cardinality); a point field the catalogue does not know, or a string field, is
left out and counted. A series not updated for ``expire_s`` disappears from ``/metrics``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from provscope.exporters.base import ExportResult

from provscope.catalogue import MetricSpec, lookup

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = ["PrometheusExporter", "metric_name"]

log = logging.getLogger("provscope.exporters.prometheus")

NAMESPACE = "provscope"
_RESERVED_SUFFIXES = ("_count", "_sum", "_bucket")


def metric_name(spec: MetricSpec) -> str:
    """The Prometheus name of a catalogued field: ``provscope_<measurement>_<field>``."""
    name = f"{NAMESPACE}_{spec.measurement}_{spec.field}"
    if spec.kind == "gauge" and name.endswith(_RESERVED_SUFFIXES):
        name += "_value"
    return name


class _Series:
    __slots__ = ("name", "spec", "values")

    def __init__(self, spec: MetricSpec) -> None:
        self.spec = spec
        self.name = metric_name(spec)
        # label values (in spec.tags order) -> (value, monotonic time of the update)
        self.values: dict[tuple[str, ...], tuple[float, float]] = {}


class PrometheusExporter:
    """Serves the latest point values on ``/metrics``.

    Args:
        address: bind address (``127.0.0.1`` keeps it local to the node).
        port: TCP port; 0 picks a free one (see ``port`` after construction).
        expire_s: a series not updated for this long is dropped, seconds.
        serve: start the HTTP server now (False: only ``registry`` / ``render``).

    Raises:
        OSError: the port cannot be bound.
    """

    name: ClassVar[str] = "prometheus"
    accepts: ClassVar[frozenset[str]] = frozenset({"points"})
    batch_size = 5000
    flush_interval_s = 0.2

    def __init__(self, address: str = "127.0.0.1", port: int = 9464, *,
                 expire_s: float = 60.0, serve: bool = True) -> None:
        if expire_s <= 0:
            raise ValueError(f"expire_s must be > 0, got {expire_s!r}")
        self._expire_s = expire_s
        self._series: dict[str, _Series] = {}
        self._lock = threading.Lock()
        self.received = 0
        self.skipped = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.address = address
        self.port = port
        if serve:
            from prometheus_client import start_http_server

            self._server, self._thread = start_http_server(port, address, self.registry)
            self.port = self._server.server_port

    @classmethod
    def from_config(cls, config: Config) -> PrometheusExporter:
        p = config.prometheus
        return cls(p.address, p.port, expire_s=p.expire_s)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/metrics"

    # ---------------------------------------------------------------- exporter

    def export(self, batch: Sequence[Any]) -> ExportResult:
        now = time.monotonic()
        with self._lock:
            series = self._series
            for point in batch:
                if point.kind != "point":
                    continue
                for field, value in point.fields.items():
                    name = f"{point.measurement}_{field}"
                    s = series.get(name)
                    if s is None:
                        spec = lookup(point.measurement, field)
                        if spec is None or spec.dtype == "str":
                            self.skipped += 1
                            continue
                        s = series[name] = _Series(spec)
                    if isinstance(value, str):
                        self.skipped += 1
                        continue
                    tags = point.tags
                    labels = tuple(tags.get(t, "") for t in s.spec.tags)
                    s.values[labels] = (float(value), now)
                    self.received += 1
        return ExportResult.SUCCESS

    def flush(self, timeout_s: float) -> bool:
        return True

    def shutdown(self, timeout_s: float) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            server.server_close()

    def stats(self) -> dict[str, float]:
        return {"points_written_total": float(self.received)}

    # ---------------------------------------------------------------- collector

    def collect(self) -> Iterator[Metric]:
        """Called by the registry at each scrape: one family per catalogued field."""
        cutoff = time.monotonic() - self._expire_s
        with self._lock:
            for name, s in list(self._series.items()):
                stale = [k for k, (_, t) in s.values.items() if t < cutoff]
                for k in stale:
                    del s.values[k]
                if not s.values:
                    del self._series[name]
                    continue
                full = s.name
                labels = list(s.spec.tags)
                if s.spec.kind == "counter":
                    fam: Metric = CounterMetricFamily(full, s.spec.help, labels=labels)
                else:
                    fam = GaugeMetricFamily(full, s.spec.help, labels=labels)
                for label_values, (value, _) in s.values.items():
                    fam.add_metric(list(label_values), value)
                yield fam

    def render(self) -> bytes:
        """The ``/metrics`` text now (what a scrape would get)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
