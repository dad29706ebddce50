"""Outages: a PostgreSQL restarted mid-run and a locked SQLite file lose no lineage row."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa
from provscope.exporters.base import ExportResult
from provscope.exporters.lineage.exporter import SqlLineageExporter
from provscope.exporters.pipeline import Pipeline

from provscope.ids import new_id
from provscope.records import RunRecord, TaskRecord
from provscope.testing.required import unavailable
from provscope.testing.servers import PostgresServer, ServerUnavailable


def _task_pair(run_id: str, i: int) -> tuple[TaskRecord, TaskRecord]:
    tid = new_id()
    return (TaskRecord(tid, run_id, name=f"step {i}", task_kind="step", start_ns=i,
                       status="running"),
            TaskRecord(tid, run_id, end_ns=i + 1, status="finished"))


def _counts(url: str) -> tuple[int, int]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            total = conn.execute(sa.text("SELECT count(*) FROM tasks")).scalar_one()
            done = conn.execute(sa.text(
                "SELECT count(*) FROM tasks WHERE status = 'finished' AND start_ns IS NOT NULL"
                " AND end_ns IS NOT NULL")).scalar_one()
    finally:
        engine.dispose()
    return total, done


@pytest.fixture
def own_postgres():
    try:
        server = PostgresServer()
    except ServerUnavailable as exc:  # pragma: no cover - depends on the machine
        unavailable(exc)
    server.start()
    yield server
    server.close()


@pytest.mark.integration
def test_postgres_restarted_mid_run_loses_no_rows(own_postgres):
    url = own_postgres.create_database("lineage")
    exporter = SqlLineageExporter(url, batch_size=200, flush_interval_s=0.05)
    pipeline = Pipeline([exporter], queue_size=100_000)
    run_id = new_id()
    pipeline.submit(RunRecord(run_id, name="restart", status="running"))
    n = 3000
    stop_at, start_at = 1000, 2000
    for i in range(n):
        if i == stop_at:
            pipeline.flush(10)
            own_postgres.stop()  # fast shutdown: open connections are killed
        if i == start_at:
            time.sleep(0.5)  # the pipeline keeps retrying against a dead server meanwhile
            own_postgres.start()
        pipeline.submit_many(_task_pair(run_id, i))
        if i % 100 == 0:
            time.sleep(0.01)  # a job streaming records, not one burst
    assert pipeline.flush(60), pipeline.stats()
    stats = pipeline.stats()["lineage"]
    pipeline.shutdown(5)
    assert stats["points_dropped_total"] == 0
    assert stats["retries_total"] >= 1  # the outage was seen
    assert _counts(url) == (n, n)


def test_locked_sqlite_file_holds_records_until_the_lock_is_released(tmp_path):
    path = tmp_path / "lineage.db"
    url = f"sqlite:///{path}"
    exporter = SqlLineageExporter(url, batch_size=100, flush_interval_s=0.05,
                                  busy_timeout_ms=100)
    run_id = new_id()
    assert exporter.export([RunRecord(run_id, name="locked")]) is ExportResult.SUCCESS

    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    pipeline = Pipeline([exporter])
    for i in range(500):
        pipeline.submit_many(_task_pair(run_id, i))
    assert not pipeline.flush(1.0)  # cannot drain while the file is locked
    assert exporter.last_error and "locked" in exporter.last_error
    assert holder.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0
    holder.execute("COMMIT")
    holder.close()

    assert pipeline.flush(30)
    pipeline.shutdown(5)
    assert _counts(url) == (500, 500)
    assert pipeline.stats()["lineage"]["points_dropped_total"] == 0


def test_unreachable_postgres_answers_retry_with_a_clear_message():
    from provscope.testing.servers import free_port

    exporter = SqlLineageExporter(f"postgresql://postgres@127.0.0.1:{free_port()}/nope",
                                  busy_timeout_ms=1000)
    started = time.monotonic()
    assert exporter.export([RunRecord(new_id())]) is ExportResult.RETRY
    assert time.monotonic() - started < 5
    assert "OperationalError" in exporter.last_error
    assert "refused" in exporter.last_error or "connect" in exporter.last_error
    exporter.shutdown(1)


def test_concurrent_writers_to_one_sqlite_file_all_land(tmp_path):
    # The embedded file is shared by several writers (points, lineage, several ranks).
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    exporters = [SqlLineageExporter(url, busy_timeout_ms=5000) for _ in range(3)]
    run_id = new_id()
    results: list[ExportResult] = []

    def write(exp: SqlLineageExporter, k: int) -> None:
        for j in range(10):
            batch = [r for i in range(50) for r in _task_pair(run_id, k * 1000 + j * 50 + i)]
            results.append(exp.export(batch))

    threads = [threading.Thread(target=write, args=(e, k)) for k, e in enumerate(exporters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.count(ExportResult.SUCCESS) == 30
    assert _counts(url) == (1500, 1500)
    for e in exporters:
        e.shutdown(1)


@pytest.mark.integration
def test_postgres_outage_spools_batches_to_disk_and_replays_them(own_postgres, tmp_path):
    url = own_postgres.create_database("spooled")
    exporter = SqlLineageExporter(url, batch_size=100, flush_interval_s=0.05,
                                  busy_timeout_ms=1000, spool_dir=tmp_path / "spool")
    pipeline = Pipeline([exporter], queue_size=1000)  # far smaller than the outage's records
    run_id = new_id()
    pipeline.submit(RunRecord(run_id, name="spooled"))
    assert pipeline.flush(10)
    own_postgres.stop()
    n = 2000
    for i in range(n):
        pipeline.submit_many(_task_pair(run_id, i))
        if i % 200 == 0:
            time.sleep(0.02)
    time.sleep(0.5)
    stats = pipeline.stats()["lineage"]
    assert stats["points_spooled_total"] > 1000  # the memory queue alone could not hold them
    assert stats["spool_bytes"] > 0
    own_postgres.start()
    assert pipeline.flush(60)
    stats = pipeline.stats()["lineage"]
    pipeline.shutdown(5)
    assert stats["points_dropped_total"] == 0
    assert stats["points_replayed_total"] == stats["points_spooled_total"]
    assert _counts(url) == (n, n)


def test_spooled_batches_left_by_a_stopped_process_are_replayed_by_the_next(tmp_path):
    db = tmp_path / "lineage.db"
    url = f"sqlite:///{db}"
    run_id = new_id()
    first = SqlLineageExporter(url, busy_timeout_ms=50, spool_dir=tmp_path / "spool")
    first.export([RunRecord(run_id, name="before")])
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    batch = [r for i in range(10) for r in _task_pair(run_id, i)]
    assert first.export(batch) is ExportResult.SUCCESS  # accepted by the spool
    assert first.stats()["points_spooled_total"] == 20
    first.shutdown(0.2)  # still locked: the batch stays on disk
    holder.execute("COMMIT")
    holder.close()

    second = SqlLineageExporter(url, spool_dir=tmp_path / "spool")
    assert second.flush(10)
    assert second.stats()["points_replayed_total"] == 20
    second.shutdown(1)
    assert _counts(url) == (10, 10)


def test_flush_returns_at_once_when_no_database_server_answers(tmp_path):
    from provscope.testing.servers import free_port

    url = f"postgresql://postgres@127.0.0.1:{free_port()}/none"  # nothing listens here
    exporter = SqlLineageExporter(url, spool_dir=tmp_path / "spool")
    run_id = new_id()
    batch = [r for i in range(10) for r in _task_pair(run_id, i)]
    assert exporter.export(batch) is ExportResult.SUCCESS  # durably spooled
    start = time.monotonic()
    assert not exporter.flush(10)
    exporter.shutdown(10)
    assert time.monotonic() - start < 3.0
    stats = exporter.stats()
    assert stats["points_spooled_total"] == 20
    assert stats["points_dropped_total"] == 0
