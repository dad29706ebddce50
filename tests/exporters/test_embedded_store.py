"""EmbeddedPointsExporter: points in the SQLite file, next to the lineage tables."""

from __future__ import annotations

import math
import sqlite3

from provscope.exporters.base import ExportResult
from provscope.exporters.embedded import EmbeddedPointsExporter
from provscope.exporters.pipeline import Pipeline

from provscope import query
from provscope.config import load_config
from provscope.ids import new_id
from provscope.records import Point, RunRecord, TaskRecord

T0 = 1_700_000_000_000_000_000


def test_points_and_lineage_share_the_default_file(tmp_path):
    config = load_config(overrides={"embedded.path": str(tmp_path / "sub" / "provscope.db")},
                         environ={})
    pipeline = Pipeline.from_config(config)
    assert {p.exporter.name for p in pipeline.processors} == {"embedded", "lineage"}
    run_id = new_id()
    for i in range(2000):
        pipeline.submit(Point("train", {"run_id": run_id, "host": "h", "rank": "0"},
                              {"loss": 1.0, "step": i}, T0 + i))
        if i % 100 == 0:
            tid = new_id()
            pipeline.submit(TaskRecord(tid, run_id, name="step", start_ns=T0 + i,
                                       status="running"))
            pipeline.submit(TaskRecord(tid, run_id, end_ns=T0 + i + 1, status="finished"))
    pipeline.submit(RunRecord(run_id, name="shared", start_ns=T0))
    assert pipeline.flush(30)
    pipeline.shutdown(5)
    with sqlite3.connect(tmp_path / "sub" / "provscope.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*) FROM points").fetchone()[0] == 4000
        assert conn.execute("SELECT count(*) FROM tasks WHERE status = 'finished'"
                            ).fetchone()[0] == 20
    assert len(query.points("train", "step", run_id=run_id, config=config)) == 2000
    assert query.runs(config=config)["task_count"].tolist() == [20]


def test_values_are_stored_by_type_and_non_finite_ones_skipped(tmp_path):
    exporter = EmbeddedPointsExporter(str(tmp_path / "p.db"))
    batch = [Point("m", {"host": "h", "gpu": "0"},
                   {"f": 1.5, "i": 7, "b": True, "s": "text", "nan": math.nan,
                    "inf": math.inf}, T0)]
    assert exporter.export(batch) is ExportResult.SUCCESS
    assert exporter.stats()["points_written_total"] == 4.0
    exporter.shutdown(1)
    with sqlite3.connect(tmp_path / "p.db") as conn:
        rows = conn.execute("SELECT field, value, str_value, host, rank, tags FROM points "
                            "ORDER BY field").fetchall()
    assert rows == [("b", 1.0, None, "h", None, '{"gpu":"0"}'),
                    ("f", 1.5, None, "h", None, '{"gpu":"0"}'),
                    ("i", 7.0, None, "h", None, '{"gpu":"0"}'),
                    ("s", None, "text", "h", None, '{"gpu":"0"}')]


def test_locked_file_answers_retry_and_writes_after_release(tmp_path):
    path = tmp_path / "p.db"
    exporter = EmbeddedPointsExporter(str(path), busy_timeout_ms=100)
    point = Point("m", {"host": "h"}, {"v": 1.0}, T0)
    assert exporter.export([point]) is ExportResult.SUCCESS
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    assert exporter.export([point]) is ExportResult.RETRY
    assert "locked" in exporter.last_error
    holder.execute("COMMIT")
    holder.close()
    assert exporter.export([point]) is ExportResult.SUCCESS
    exporter.shutdown(1)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM points").fetchone()[0] == 2


def test_unwritable_path_answers_retry_never_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    exporter = EmbeddedPointsExporter(str(blocker / "p.db"))
    assert exporter.export([Point("m", {}, {"v": 1.0}, T0)]) is ExportResult.RETRY
    assert exporter.last_error
    exporter.shutdown(1)
    assert exporter.export([Point("m", {}, {"v": 1.0}, T0)]) is ExportResult.DROP
