"""The pipeline: routing, batching, bounded queues with counted drops, retry, shutdown."""

from __future__ import annotations

import threading
import time

from provscope.exporters.base import ExportResult
from provscope.exporters.memory import MemoryExporter
from provscope.exporters.pipeline import BatchProcessor, Pipeline

from provscope.records import Point, TaskRecord


def _points(n: int) -> list[Point]:
    return [Point("m", {"host": "h"}, {"v": float(i)}, i) for i in range(n)]


def test_points_and_lineage_are_routed_to_the_exporters_that_accept_them():
    points = MemoryExporter(accepts=frozenset({"points"}))
    lineage = MemoryExporter(accepts=frozenset({"lineage"}))
    with Pipeline([points, lineage], flush_interval_s=0.05) as pipe:
        pipe.submit(Point("m", {}, {"v": 1.0}, 1))
        pipe.submit(TaskRecord("t", "r"))
        pipe.submit_many([Point("m", {}, {"v": 2.0}, 2), TaskRecord("t2", "r")])
        assert pipe.flush(5)
    assert [type(r).__name__ for r in points.records] == ["Point", "Point"]
    assert [r.task_id for r in lineage.records] == ["t", "t2"]
    assert points.shut_down and lineage.shut_down


def test_a_full_batch_is_exported_before_the_flush_interval():
    sink = MemoryExporter()
    proc = BatchProcessor(sink, batch_size=100, flush_interval_s=60)
    proc.submit_many(_points(100))
    deadline = time.monotonic() + 5
    while not sink.records and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(sink.records) == 100
    proc.shutdown(5)


def test_full_queue_drops_oldest_and_counts_every_drop():
    gate = threading.Event()

    class Blocked(MemoryExporter):
        def export(self, batch):
            gate.wait(10)
            return super().export(batch)

    sink = Blocked()
    proc = BatchProcessor(sink, max_queue=100, batch_size=10, flush_interval_s=0.01)
    proc.submit_many(_points(10))
    time.sleep(0.1)  # the worker now holds the first 10 inside export
    proc.submit_many(_points(250))
    for p in _points(5):
        proc.submit(p)
    gate.set()
    proc.shutdown(5)
    stats = proc.stats()
    assert stats["points_received_total"] == 265
    assert stats["points_dropped_total"] == 155  # 255 queued behind a full queue of 100
    assert len(sink.records) + stats["points_dropped_total"] == 265
    # the newest survive: the last five submitted are the last five exported
    assert [p.time_ns for p in sink.records[-5:]] == [0, 1, 2, 3, 4]


def test_retry_redelivers_the_same_batch_until_success():
    sink = MemoryExporter(fail_times=3)
    proc = BatchProcessor(sink, batch_size=50, flush_interval_s=0.01, max_backoff_s=0.05)
    proc.submit_many(_points(50))
    assert proc.flush(10)
    assert [p.time_ns for p in sink.records] == list(range(50))
    assert proc.stats()["retries_total"] == 3
    proc.shutdown(1)


def test_an_exporter_that_raises_does_not_kill_the_worker():
    class Flaky(MemoryExporter):
        calls = 0

        def export(self, batch):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("boom")
            return super().export(batch)

    sink = Flaky()
    proc = BatchProcessor(sink, batch_size=10, flush_interval_s=0.01)
    proc.submit_many(_points(10))
    time.sleep(0.2)
    proc.submit_many(_points(10))
    assert proc.flush(5)
    assert len(sink.records) == 10
    assert proc.stats()["points_dropped_total"] == 10
    assert proc.stats()["batches_failed_total"] == 1
    proc.shutdown(1)


def test_shutdown_gives_up_at_the_deadline_and_counts_what_is_left():
    class Never(MemoryExporter):
        def export(self, batch):
            return ExportResult.RETRY

    proc = BatchProcessor(Never(), batch_size=10, flush_interval_s=0.01, max_backoff_s=0.05)
    proc.submit_many(_points(35))
    start = time.monotonic()
    proc.shutdown(0.5)
    assert time.monotonic() - start < 2.0
    assert proc.stats()["points_dropped_total"] == 35
    assert not proc.submit(_points(1)[0])
    assert proc.stats()["points_dropped_total"] == 36


def test_submit_never_blocks_while_the_exporter_is_stuck():
    gate = threading.Event()

    class Stuck(MemoryExporter):
        def export(self, batch):
            gate.wait(10)
            return ExportResult.SUCCESS

    proc = BatchProcessor(Stuck(), max_queue=1000, batch_size=10, flush_interval_s=0.01)
    start = time.perf_counter()
    for p in _points(20000):
        proc.submit(p)
    assert time.perf_counter() - start < 1.0
    gate.set()
    proc.shutdown(2)


def test_health_points_carry_the_counters_per_component():
    sink = MemoryExporter()
    with Pipeline([sink], flush_interval_s=0.01) as pipe:
        pipe.submit_many(_points(7))
        pipe.flush(5)
        health = pipe.health_points("h1", 99)
    assert len(health) == 1
    assert health[0].tags == {"host": "h1", "component": "memory"}
    assert health[0].fields["points_received_total"] == 7
    assert health[0].fields["points_written_total"] == 7
