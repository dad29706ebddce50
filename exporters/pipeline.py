"""The pipeline: bounded, non-blocking buffers in front of each exporter.

The same code runs inside the node agent and, with no agent, inside the job (embedded
mode). ``submit`` never blocks: it appends to one bounded deque per exporter; when a
deque is full the oldest record is dropped and counted (OpenTelemetry's BatchProcessor
shape). One named daemon worker per exporter (``provscope-export-<name>``) sleeps on
``Event.wait(flush_interval)``, is woken early once a full batch is queued, and hands
batches to its exporter. One slow destination therefore never delays another.

The queue and its worker are ``provscope.bounded.QueueWorker``. An exporter answering
``RETRY`` gets the same batch again after an exponential backoff with full jitter
(``provscope.backoff``); shutdown keeps retrying until its deadline, then counts what is
left as dropped. Exceptions from an exporter are logged (rate-limited), counted, and never kill
the worker.

Durability marks: ``Pipeline.submit_many`` returns a mark (each target's position after
the records were queued) and ``Pipeline.durable(mark)`` says whether every one of those
records has been settled by its exporter: written, spooled on disk, or dropped and
counted (an exporter's ``SUCCESS`` or ``DROP``, or the queue's counted overflow). Each
queue is FIFO, so a position is settled once the oldest record still queued or being
exported is past it. The node agent acknowledges a job's frames with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from provscope.exporters.base import Exporter, ExportResult

from provscope.backoff import Backoff
from provscope.bounded import QueueWorker
from provscope.records import Point

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = ["BatchProcessor", "Mark", "Pipeline"]

log = logging.getLogger("provscope.pipeline")

_FIRST_BACKOFF_S = 0.1  # backoff window of the first retry of a batch answered RETRY

#: Positions in the exporters' queues after some records were submitted (``Pipeline.durable``).
Mark = tuple[tuple["BatchProcessor", int], ...]


class BatchProcessor(QueueWorker):
    """A bounded queue and one worker thread in front of one exporter.

    Args:
        exporter: the destination.
        max_queue: records held in memory; the oldest is dropped (and counted) when full.
        batch_size: most records per ``export`` call; a full batch wakes the worker.
        flush_interval_s: longest time a record waits before its batch is exported.
        max_backoff_s: cap on the delay between retries of a batch answered ``RETRY``.

    Raises:
        ValueError: a size or interval that is not > 0.
    """

    def __init__(
        self,
        exporter: Exporter,
        *,
        max_queue: int = 200_000,
        batch_size: int = 5000,
        flush_interval_s: float = 1.0,
        max_backoff_s: float = 10.0,
    ) -> None:
        super().__init__(capacity=max_queue, batch_size=batch_size,
                         interval_s=flush_interval_s,
                         thread_name=f"provscope-export-{exporter.name}")
        self.exporter = exporter
        self._backoff = Backoff(min(_FIRST_BACKOFF_S, max_backoff_s), max_backoff_s)
        self._finished = False
        self._deadline = float("inf")
        self._export_lock = threading.Lock()
        self.exported = 0
        self.failed_batches = 0
        self.retries = 0
        self.last_latency_s = 0.0
        self._last_error_log = 0.0
        self._inflight = 0  # records the worker took and has not settled yet
        self._start_worker()

    def wake(self) -> None:
        """Export what is queued now, not at the next flush interval. Never blocks."""
        self._wake.set()

    @property
    def settled(self) -> int:
        """How many of the records submitted so far are settled: exported (written or
        spooled), or dropped and counted. Records are settled in submission order except
        overflow drops, which are newer than anything in flight, so every record with a
        position below this is settled. Safe to read from any thread; may lag, never leads.
        """
        # Read in this order: a record the worker is taking is counted in the queue or in
        # _inflight (set before the pops), never in neither.
        received = self.received
        queued = len(self._queue)
        return received - queued - self._inflight

    # ------------------------------------------------------------------ worker side

    def _export(self, batch: list[Any]) -> ExportResult:
        start = time.perf_counter()
        try:
            with self._export_lock:
                result = self.exporter.export(batch)
        except Exception:  # never let an exporter kill the worker
            now = time.monotonic()
            if now - self._last_error_log > 60:
                self._last_error_log = now
                log.exception("exporter %s raised; batch of %d dropped", self.exporter.name,
                              len(batch))
            result = ExportResult.DROP
        if result is ExportResult.SUCCESS:
            self.exported += len(batch)
            self.last_latency_s = time.perf_counter() - start
        elif result is ExportResult.DROP:
            self.failed_batches += 1
            self.dropped += len(batch)
        return result

    def _run(self) -> None:
        pending: list[Any] | None = None
        queue = self._queue
        while True:
            if pending is None:
                if not queue:
                    self._idle.set()
                    if self._stopping:
                        return
                self._wait_for_work(self._batch_size)
                if not queue:
                    continue
                self._idle.clear()
                self._inflight = self._batch_size  # an upper bound while records are popped
                pending = self._take()
                self._inflight = len(pending)
            result = self._export(pending)
            if result is not ExportResult.RETRY:
                pending = None
                self._inflight = 0
                self._backoff.reset()
                continue
            self.retries += 1
            if self._stopping and time.monotonic() >= self._deadline:
                self.dropped += len(pending)
                self._drop_queued()
                self._inflight = 0
                return
            delay = self._backoff.next()
            if self._stopping:
                delay = min(delay, max(0.0, self._deadline - time.monotonic()))
            time.sleep(delay)

    # ------------------------------------------------------------------ control

    def flush(self, timeout_s: float) -> bool:
        """Export everything queued now, then flush the exporter. Blocks up to ``timeout_s``.

        Returns True when the queue drained and the exporter reported nothing left.
        """
        deadline = time.monotonic() + timeout_s
        if not self._wait_drained(deadline):
            return False
        left = max(0.0, deadline - time.monotonic())
        with self._export_lock:
            try:
                return self.exporter.flush(left)
            except Exception:
                log.exception("exporter %s flush raised", self.exporter.name)
                return False

    def shutdown(self, timeout_s: float) -> None:
        """Drain within the deadline, stop the worker, shut the exporter down. Idempotent."""
        deadline = time.monotonic() + timeout_s
        self.begin_shutdown(deadline)
        self.finish_shutdown(deadline)

    def begin_shutdown(self, deadline: float) -> None:
        """Tell the worker to drain and stop by ``deadline`` (monotonic). Never blocks."""
        if self._stopping:
            return
        # The worker gives up a little before the join does, so the records it could not
        # deliver are counted as dropped before shutdown returns.
        self._deadline = deadline - min(0.1, max(0.0, deadline - time.monotonic()) * 0.2)
        self._stop_accepting()

    def finish_shutdown(self, deadline: float) -> None:
        """Join the worker and shut the exporter down, both by ``deadline``. Idempotent."""
        if self._finished:
            return
        self._finished = True
        if not self._join(deadline) and self._queue:
            log.warning("exporter %s did not drain by the deadline; %d records dropped",
                        self.exporter.name, len(self._queue))
        try:
            self.exporter.shutdown(max(0.0, deadline - time.monotonic()))
        except Exception:
            log.exception("exporter %s shutdown raised", self.exporter.name)

    def stats(self) -> dict[str, float]:
        """Counters named as in ``provscope.catalogue.internal``."""
        out = {
            "points_received_total": float(self.received),
            "points_dropped_total": float(self.dropped),
            "batches_failed_total": float(self.failed_batches),
            "retries_total": float(self.retries),
            "queue_depth": float(len(self._queue)),
            "export_latency_seconds": self.last_latency_s,
        }
        try:
            for key, value in self.exporter.stats().items():
                out[key] = out.get(key, 0.0) + float(value) if key.endswith("dropped_total") \
                    else float(value)
        except Exception:
            log.debug("exporter %s stats raised", self.exporter.name, exc_info=True)
        out.setdefault("points_written_total", float(self.exported))
        return out


class Pipeline:
    """Routes records to exporters through one ``BatchProcessor`` each.

    ``Point`` records go to exporters whose ``accepts`` has ``"points"``; run, task,
    entity and relation records to those with ``"lineage"``.

    Args:
        exporters: destinations.
        queue_size: records held per exporter before the oldest are dropped.
        batch_size: records per export call (an exporter's ``batch_size`` attribute wins).
        flush_interval_s: longest wait before a queued record is exported.
    """

    def __init__(
        self,
        exporters: Iterable[Exporter],
        *,
        queue_size: int = 200_000,
        batch_size: int = 5000,
        flush_interval_s: float = 1.0,
    ) -> None:
        self.processors: list[BatchProcessor] = []
        self._points: list[BatchProcessor] = []
        self._lineage: list[BatchProcessor] = []
        for exporter in exporters:
            proc = BatchProcessor(
                exporter,
                max_queue=queue_size,
                batch_size=getattr(exporter, "batch_size", batch_size),
                flush_interval_s=getattr(exporter, "flush_interval_s", flush_interval_s),
            )
            self.processors.append(proc)
            if "points" in exporter.accepts:
                self._points.append(proc)
            if "lineage" in exporter.accepts:
                self._lineage.append(proc)
        self._closed = False

    @classmethod
    def from_config(cls, config: Config, *, extra: Iterable[Exporter] = ()) -> Pipeline:
        """Build the pipeline the config describes.

        Time series go to InfluxDB when ``influxdb.url`` is set, else to the embedded
        SQLite file; lineage goes to ``lineage.url`` (SQLite or PostgreSQL), else to the
        same embedded file.

        Raises:
            ConfigError: a URL or setting the exporters cannot use.
        """
        from provscope.exporters.lineage.exporter import SqlLineageExporter

        exporters: list[Exporter] = []
        if config.influxdb.url:
            from provscope.exporters.influxdb.writer import InfluxDBExporter

            exporters.append(InfluxDBExporter.from_config(config))
        else:
            from provscope.exporters.embedded import EmbeddedPointsExporter

            exporters.append(EmbeddedPointsExporter.from_config(config))
        exporters.append(SqlLineageExporter.from_config(config))
        exporters.extend(extra)
        return cls(exporters, queue_size=config.pipeline.queue_size)

    def submit(self, record: Any) -> None:
        """Queue one record for every exporter that accepts it. Never blocks or raises."""
        targets = self._points if record.kind == "point" else self._lineage
        for proc in targets:
            proc.submit(record)

    def submit_many(self, records: Sequence[Any]) -> Mark:
        """Queue many records (all points, or all lineage, or mixed). Never blocks.

        Returns:
            The mark ``durable`` takes: these records are settled once it answers True.
        """
        if not records:
            return ()
        if all(type(r) is Point for r in records):
            for proc in self._points:
                proc.submit_many(records)
            return tuple((proc, proc.received) for proc in self._points)
        points = [r for r in records if r.kind == "point"]
        lineage = [r for r in records if r.kind != "point"]
        targets = []
        if points:
            for proc in self._points:
                proc.submit_many(points)
            targets += self._points
        if lineage:
            for proc in self._lineage:
                proc.submit_many(lineage)
            targets += self._lineage
        return tuple((proc, proc.received) for proc in targets)

    def wake(self) -> None:
        """Export what is queued now instead of at the next flush interval (a job waits
        for its records to be durable). Never blocks."""
        for proc in self.processors:
            proc.wake()

    @staticmethod
    def durable(mark: Mark) -> bool:
        """True when every record submitted before ``mark`` was taken (by ``submit_many``)
        is settled in every exporter it went to: written, in the on-disk spool, or dropped
        and counted. Never blocks; safe from any thread."""
        return all(proc.settled >= position for proc, position in mark)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Export everything queued so far. Blocks up to ``timeout_s``; True when done."""
        deadline = time.monotonic() + timeout_s
        ok = True
        for proc in self.processors:
            ok = proc.flush(max(0.0, deadline - time.monotonic())) and ok
        return ok

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Drain and stop every exporter within one shared deadline. Idempotent."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        # All workers drain at once: one slow destination does not eat the others' time.
        for proc in self.processors:
            proc.begin_shutdown(deadline)
        for proc in self.processors:
            proc.finish_shutdown(deadline)

    def stats(self) -> dict[str, dict[str, float]]:
        """Self-metrics per exporter name."""
        return {proc.exporter.name: proc.stats() for proc in self.processors}

    def health_points(self, host: str, time_ns: int) -> list[Point]:
        """The ``provscope`` self-metric points, one per exporter (tag ``component``)."""
        return [
            Point("provscope", {"host": host, "component": name}, values, time_ns)
            for name, values in self.stats().items()
        ]

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
