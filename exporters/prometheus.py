"""Prometheus exporter: the latest value of every series on ``/metrics`` (pull).

It keeps the last value per series in its *own* ``CollectorRegistry`` through a custom
collector (no global registry, no default process metrics) and serves it with
prometheus_client's HTTP server on ``prometheus.address:port`` (default
``127.0.0.1:9464``).

Naming follows the catalogue: ``provscope_<measurement>_<field>`` (provscope's own
health, measurement ``provscope``, is ``provscope_<field>``: one prefix), HELP from the
spec, counters as counters (their names already end in ``_total``), gauges as gauges,
base units. A gauge whose name ends in a suffix Prometheus reserves for histograms and
summaries (``_count``, ``_sum``, ``_bucket``) gets ``_value`` appended, so scrapers and
``promtool`` read it as the gauge it is.

Bounded series. Labels come only from bounded sets (``BOUNDED_LABELS``: host, gpu,
device, interface, path, component, rank, MIG instance). A run's id never becomes a label of its
series: each run active on the node holds a small ``run_slot`` number (the lowest free
one; freed when the run ends or sends nothing for ``expire_s``), its series carry
``run_slot`` and ``rank``, and ``provscope_run_info{host, rank, run_slot, run_id,
name} 1`` says which run holds the slot (one series per active run and rank). So ten
runs one after another leave the series of one run. A series of a run-scoped
measurement whose point has no rank (a process tree ``provscope run`` registered for a
command that never told its rank: a launcher, a shell, a non-Python program) gets
``rank="none"``. Layer statistics (``layer``, ``layer_param``: labels ``layer``,
``module_type``, ``param``) are exposed only when ``prometheus.layers`` is on. A
training scalar the catalogue does not know (``run.log(my_metric=...)``) is exposed as
``provscope_train_scalar{name="my_metric", ...}``, up to ``max_scalar_names`` names.

Nothing vanishes silently: every field left out (not catalogued, not a number, layer
statistics off, over a limit, of a run that has ended) is counted in
``fields_skipped_total`` (by reason in ``skipped_by_reason``) and its reason is logged
once. A series not updated for ``expire_s`` disappears from ``/metrics``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from provscope.exporters.base import ExportResult

from provscope.catalogue import MetricSpec, lookup
from provscope.records import RunRecord

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = [
    "BOUNDED_LABELS",
    "LAYER_LABELS",
    "NO_RANK",
    "RUN_INFO",
    "SCALAR_FAMILY",
    "PrometheusExporter",
    "metric_name",
]

log = logging.getLogger("provscope.exporters.prometheus")

NAMESPACE = "provscope"
_RESERVED_SUFFIXES = ("_count", "_sum", "_bucket")

#: Catalogue tags that become labels: each takes few values on one node (a MIG GPU holds
#: at most seven instances). A new catalogue tag must be classified here (a test checks).
BOUNDED_LABELS = frozenset({"host", "gpu", "gpu_uuid", "mig_uuid", "gpu_instance",
                            "compute_instance", "device", "interface", "path", "component",
                            "rank"})
#: Tags of layer statistics: labels only when ``prometheus.layers`` is on.
LAYER_LABELS = frozenset({"layer", "module_type", "param"})
#: The run's id: never a label; replaced by ``run_slot`` (see the module docstring).
RUN_TAG = "run_id"
SLOT_LABEL = "run_slot"
NO_RANK = "none"
RUN_INFO = f"{NAMESPACE}_run_info"
SCALAR_FAMILY = f"{NAMESPACE}_train_scalar"
_SCALAR_MEASUREMENT = "train"
_ENDED = frozenset({"finished", "failed", "killed", "interrupted"})
_MAX_RUNS = 256  # runs active at once on one node (the agent watches 256 processes)
_ENDED_MEMORY = 1024  # ended run ids remembered, so their late points stay out
_SWEEP_EVERY_S = 1.0


def metric_name(spec: MetricSpec) -> str:
    """The Prometheus name of a catalogued field: ``provscope_<measurement>_<field>``
    (``provscope_<field>`` for provscope's own measurement ``provscope``)."""
    if spec.measurement == NAMESPACE:
        name = f"{NAMESPACE}_{spec.field}"
    else:
        name = f"{NAMESPACE}_{spec.measurement}_{spec.field}"
    if spec.kind == "gauge" and name.endswith(_RESERVED_SUFFIXES):
        name += "_value"
    return name


def labels_of(spec: MetricSpec) -> tuple[str, ...] | None:
    """The label names of a catalogued field on ``/metrics`` (None: a tag of it is not
    known to be bounded). A run-scoped field drops ``run_id`` and gains ``run_slot``."""
    out: list[str] = []
    for tag in spec.tags:
        if tag == RUN_TAG:
            continue
        if tag not in BOUNDED_LABELS and tag not in LAYER_LABELS:
            return None
        out.append(tag)
    if RUN_TAG in spec.tags:
        if "rank" not in out:
            out.append("rank")
        out.append(SLOT_LABEL)
    return tuple(out)


class _Family:
    """One metric family: its label names and the latest value per label values."""

    __slots__ = ("help", "kind", "labels", "name", "run_scoped", "values")

    def __init__(self, name: str, kind: str, help_: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.kind = kind
        self.help = help_
        self.labels = labels
        self.run_scoped = SLOT_LABEL in labels
        # label values (in ``labels`` order) -> [value, monotonic update time, run id]
        self.values: dict[tuple[str, ...], list[Any]] = {}


@dataclass
class _Run:
    """A run active on this node: its slot, name and the (host, rank) pairs seen."""

    slot: int
    name: str
    last: float
    ranks: dict[tuple[str, str], float] = field(default_factory=dict)


_SKIP = "skip"  # plan kind: left out, with a reason


class PrometheusExporter:
    """Serves the latest point values on ``/metrics``, with a bounded number of series.

    Args:
        address: bind address (``127.0.0.1`` keeps it local to the node).
        port: TCP port; 0 picks a free one (see ``port`` after construction).
        expire_s: a series not updated for this long is dropped, seconds; a run that
            sent nothing for this long frees its slot.
        layers: expose layer statistics (labels ``layer``, ``module_type``, ``param``).
        max_series: most series held; a point that would add one more is skipped.
        max_scalar_names: most distinct names under ``provscope_train_scalar``.
        serve: start the HTTP server now (False: only ``registry`` / ``render``).

    Raises:
        OSError: the port cannot be bound.
        ValueError: ``expire_s`` is not positive.
    """

    name: ClassVar[str] = "prometheus"
    # Run records name the run and end it (its series leave /metrics at once).
    accepts: ClassVar[frozenset[str]] = frozenset({"points", "lineage"})
    batch_size = 5000
    flush_interval_s = 0.2

    def __init__(self, address: str = "127.0.0.1", port: int = 9464, *,
                 expire_s: float = 60.0, layers: bool = False, max_series: int = 20_000,
                 max_scalar_names: int = 100, serve: bool = True) -> None:
        if expire_s <= 0:
            raise ValueError(f"expire_s must be > 0, got {expire_s!r}")
        self._expire_s = expire_s
        self.layers = layers
        self.max_series = max_series
        self.max_scalar_names = max_scalar_names
        self._families: dict[str, _Family] = {}
        self._plans: dict[tuple[str, str], tuple[str, Any]] = {}
        self._scalar_names: set[str] = set()
        self._runs: dict[str, _Run] = {}
        self._names: OrderedDict[str, str] = OrderedDict()  # run id -> name (bounded)
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._series = 0
        self._last_sweep = 0.0
        self._lock = threading.Lock()
        self.received = 0
        self.skipped_by_reason: dict[str, int] = {}
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
        return cls(p.address, p.port, expire_s=p.expire_s, layers=p.layers,
                   max_series=p.max_series, max_scalar_names=p.max_scalar_names)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/metrics"

    @property
    def skipped(self) -> int:
        """Fields left out so far, all reasons together."""
        return sum(self.skipped_by_reason.values())

    @property
    def series(self) -> int:
        """Series held now (``provscope_run_info`` included)."""
        with self._lock:
            return self._series + sum(len(r.ranks) for r in self._runs.values())

    # ---------------------------------------------------------------- exporter

    def export(self, batch: Sequence[Any]) -> ExportResult:
        now = time.monotonic()
        with self._lock:
            if now - self._last_sweep >= _SWEEP_EVERY_S:
                self._sweep(now)
            for record in batch:
                if record.kind == "point":
                    self._point(record, now)
                elif record.kind == "run":
                    self._run_record(record)
        return ExportResult.SUCCESS

    def _skip(self, reason: str, what: str) -> None:
        n = self.skipped_by_reason.get(reason, 0)
        self.skipped_by_reason[reason] = n + 1
        if n == 0:
            log.info("prometheus: %s left out of /metrics (%s); such fields are counted in "
                     "provscope_fields_skipped_total", what, _REASONS[reason])

    def _plan(self, measurement: str, field_: str) -> tuple[str, Any]:
        """Where a field goes: ``("family", _Family)``, ``("scalar", None)`` or
        ``(_SKIP, reason)``; decided once per (measurement, field)."""
        key = (measurement, field_)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        spec = lookup(measurement, field_)
        if spec is None:
            plan = ("scalar", None) if measurement == _SCALAR_MEASUREMENT \
                else (_SKIP, "not_catalogued")
        elif spec.dtype == "str":
            plan = (_SKIP, "not_numeric")
        else:
            labels = labels_of(spec)
            if labels is None:
                plan = (_SKIP, "unbounded_tag")
            elif not self.layers and LAYER_LABELS.intersection(labels):
                plan = (_SKIP, "layers_off")
            else:
                name = metric_name(spec)
                fam = self._families.get(name)
                if fam is None:
                    fam = self._families[name] = _Family(name, spec.kind, spec.help, labels)
                plan = ("family", fam)
        self._plans[key] = plan
        return plan

    def _point(self, point: Any, now: float) -> None:
        tags: Mapping[str, str] = point.tags
        run: tuple[str, str] | str | None = None  # (run id, slot), or why not; once per point
        for field_, value in point.fields.items():
            kind, target = self._plan(point.measurement, field_)
            if kind == _SKIP:
                self._skip(target, f"{point.measurement}.{field_}")
                continue
            if isinstance(value, str):
                self._skip("not_numeric", f"{point.measurement}.{field_}")
                continue
            fam = self._scalar_family(field_) if kind == "scalar" else target
            if fam is None:
                continue
            owner: str | None = None
            slot = ""
            if fam.run_scoped:
                if run is None:
                    run = self._run_of(tags, now)
                if isinstance(run, str):
                    self._skip(run, f"{point.measurement}.{field_} (run "
                               f"{tags.get(RUN_TAG) or '(none)'})")
                    continue
                owner, slot = run
            key = self._key(fam.labels, tags, slot, field_ if kind == "scalar" else "")
            entry = fam.values.get(key)
            if entry is None:
                if self._series >= self.max_series:
                    self._skip("series_limit", f"{point.measurement}.{field_} (prometheus."
                               f"max_series = {self.max_series})")
                    continue
                self._series += 1
                fam.values[key] = [float(value), now, owner]
            else:
                entry[0] = float(value)
                entry[1] = now
                entry[2] = owner
            self.received += 1

    @staticmethod
    def _key(labels: tuple[str, ...], tags: Mapping[str, str], slot: str,
             name: str) -> tuple[str, ...]:
        """Label values in ``labels`` order (rank ``none`` when the point has none)."""
        out = []
        for lab in labels:
            if lab == SLOT_LABEL:
                out.append(slot)
            elif lab == "name":
                out.append(name)
            elif lab == "rank":
                out.append(tags.get("rank") or NO_RANK)
            else:
                out.append(tags.get(lab, ""))
        return tuple(out)

    def _scalar_family(self, name: str) -> _Family | None:
        if name not in self._scalar_names:
            if len(self._scalar_names) >= self.max_scalar_names:
                self._skip("scalar_names_limit", f"train.{name} (prometheus.max_scalar_names"
                           f" = {self.max_scalar_names})")
                return None
            self._scalar_names.add(name)
        fam = self._families.get(SCALAR_FAMILY)
        if fam is None:
            fam = self._families[SCALAR_FAMILY] = _Family(
                SCALAR_FAMILY, "gauge",
                "Training scalars the catalogue does not name (run.log(name=value)), by name.",
                ("host", "rank", SLOT_LABEL, "name"))
        return fam

    def _run_of(self, tags: Mapping[str, str], now: float) -> tuple[str, str] | str:
        """(run id, run_slot) of a run-scoped point, or the reason it is left out."""
        run_id = tags.get(RUN_TAG)
        if not run_id:
            return "no_run_id"
        if run_id in self._ended:
            return "run_ended"
        run = self._runs.get(run_id)
        if run is None:
            self._expire_runs(now)  # a run gone quiet gives its slot to this one
            if len(self._runs) >= _MAX_RUNS:
                return "run_limit"
            used = {r.slot for r in self._runs.values()}
            slot = next(i for i in range(len(used) + 1) if i not in used)
            run = self._runs[run_id] = _Run(slot, self._names.get(run_id, ""), now)
        run.last = now
        run.ranks[(tags.get("host", ""), tags.get("rank") or NO_RANK)] = now
        return run_id, str(run.slot)

    def _run_record(self, record: RunRecord) -> None:
        run_id = record.run_id
        if record.name:
            self._names[run_id] = record.name
            self._names.move_to_end(run_id)
            while len(self._names) > _ENDED_MEMORY:
                self._names.popitem(last=False)
            if run_id in self._runs:
                self._runs[run_id].name = record.name
        if record.end_ns is not None or record.status in _ENDED:
            self._release(run_id)
            self._ended[run_id] = None
            while len(self._ended) > _ENDED_MEMORY:
                self._ended.popitem(last=False)
        elif record.status == "running" and record.start_ns is not None:
            self._ended.pop(run_id, None)  # the same id started again (a resumed job)

    def _release(self, run_id: str) -> None:
        """Forget a run: its slot, its info series and every series it wrote."""
        if self._runs.pop(run_id, None) is None:
            return
        for fam in self._families.values():
            if not fam.run_scoped:
                continue
            gone = [k for k, v in fam.values.items() if v[2] == run_id]
            for k in gone:
                del fam.values[k]
            self._series -= len(gone)

    def _sweep(self, now: float) -> None:
        """Drop series and runs not updated for ``expire_s``."""
        self._last_sweep = now
        cutoff = now - self._expire_s
        for fam in self._families.values():
            stale = [k for k, v in fam.values.items() if v[1] < cutoff]
            for k in stale:
                del fam.values[k]
            self._series -= len(stale)
        self._expire_runs(now)

    def _expire_runs(self, now: float) -> None:
        """Release runs (and drop ranks of a run) that sent nothing for ``expire_s``."""
        cutoff = now - self._expire_s
        for run_id, run in list(self._runs.items()):
            if run.last < cutoff:
                self._release(run_id)
                continue
            for rank in [k for k, t in run.ranks.items() if t < cutoff]:
                del run.ranks[rank]

    def flush(self, timeout_s: float) -> bool:
        return True

    def shutdown(self, timeout_s: float) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            server.server_close()

    def stats(self) -> dict[str, float]:
        return {"points_written_total": float(self.received),
                "fields_skipped_total": float(self.skipped)}

    # ---------------------------------------------------------------- collector

    def collect(self) -> Iterator[Metric]:
        """Called by the registry at each scrape: one family per catalogued field, the
        scalar family, and ``provscope_run_info``."""
        with self._lock:
            self._sweep(time.monotonic())
            for fam in self._families.values():
                if not fam.values:
                    continue
                labels = list(fam.labels)
                out: CounterMetricFamily | GaugeMetricFamily
                if fam.kind == "counter":
                    out = CounterMetricFamily(fam.name, fam.help, labels=labels)
                else:
                    out = GaugeMetricFamily(fam.name, fam.help, labels=labels)
                for label_values, (value, _, _) in fam.values.items():
                    out.add_metric(list(label_values), value)
                yield out
            if self._runs:
                info = GaugeMetricFamily(
                    RUN_INFO, "Which run holds a run_slot on this node: 1 per active run "
                    "and rank (join on host, rank, run_slot).",
                    labels=["host", "rank", SLOT_LABEL, "run_id", "name"])
                for run_id, run in self._runs.items():
                    for (host, rank) in run.ranks:
                        info.add_metric([host, rank, str(run.slot), run_id, run.name], 1.0)
                yield info

    def render(self) -> bytes:
        """The ``/metrics`` text now (what a scrape would get)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


_REASONS = {
    "not_catalogued": "not in the catalogue",
    "not_numeric": "not a number",
    "unbounded_tag": "a tag of it is not a bounded label",
    "layers_off": "layer statistics are exposed only with prometheus.layers: true; they "
                  "still go to the stores",
    "series_limit": "the series limit is reached",
    "scalar_names_limit": "too many distinct training scalar names",
    "no_run_id": "a run-scoped point without run_id",
    "run_ended": "its run has ended",
    "run_limit": f"{_MAX_RUNS} runs are active at once already",
}
