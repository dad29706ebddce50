"""The writer against a real InfluxDB 1.x: exact read-back, outages, spool replay."""

from __future__ import annotations

import threading
import time

from provscope.exporters.base import ExportResult
from provscope.exporters.influxdb.writer import InfluxDBExporter
from provscope.exporters.pipeline import Pipeline

from provscope.records import Point
from provscope.testing.servers import free_port


def _select_all(server, db: str) -> list[dict]:
    """Every series of every measurement (regex FROM: no identifier quoting needed)."""
    res = server.query("SELECT * FROM /.*/ GROUP BY *", db)
    return res["results"][0].get("series", [])


def test_adversarial_strings_are_read_back_exactly(influx_server, influx_db, tmp_path):
    measurement = "cpu load,ü🔥=x"
    tags = {"host name,=": 'a "quoted" v=1, x🔥', "path": "C:\\dir\\file", "日本": "é è"}
    fields = {
        "val ue,=é": 1.5,
        "msg": 'he said "hi", \\ and \\"x\\" 🔥\nsecond line',
        "flag": True,
        "count": 42,
        "quote\"key": "trailing backslash \\",
    }
    exp = InfluxDBExporter(influx_server.url, database=influx_db, spool_dir=tmp_path)
    assert exp.export([Point(measurement, tags, fields, 1_700_000_000_123_456_789)]) \
        is ExportResult.SUCCESS
    exp.shutdown(2)
    (series,) = _select_all(influx_server, influx_db)
    assert series["name"] == measurement
    assert series["tags"] == tags
    row = dict(zip(series["columns"], series["values"][0], strict=True))
    assert row.pop("time") == 1_700_000_000_123_456_789
    assert row == {**fields, "count": 42.0}  # ints are written as floats by default


def test_newline_and_trailing_backslash_in_tags_read_back_as_documented(
        influx_server, influx_db, tmp_path):
    exp = InfluxDBExporter(influx_server.url, database=influx_db, spool_dir=tmp_path)
    exp.export([Point("m", {"t": "new\nline"}, {"v": 1.0}, 1),
                Point("m", {"t": "ends with\\"}, {"v": 2.0}, 2)])
    exp.shutdown(1)
    tags = sorted(s["tags"]["t"] for s in _select_all(influx_server, influx_db))
    assert tags == ["ends with\u29f5", "new\u240aline"]  # docs/lineprotocol.md


def test_v1_write_without_auth_creates_the_database_and_counts_points(influx_server, tmp_path):
    db = f"fresh_{free_port()}"
    exp = InfluxDBExporter(influx_server.url, database=db, spool_dir=tmp_path)
    points = [Point("gpu", {"host": "n1", "gpu": str(i % 2)}, {"utilization_percent": float(i)},
                    1_700_000_000_000_000_000 + i) for i in range(5000)]
    assert exp.export(points) is ExportResult.SUCCESS
    assert influx_server.count(db, "gpu", "utilization_percent") == 5000
    assert exp.stats()["points_written_total"] == 5000
    exp.shutdown(1)


def test_points_survive_an_outage_mid_stream_exact_count(influx_own, tmp_path):
    influx_own.create_database("train")
    exp = InfluxDBExporter(influx_own.url, database="train", spool_dir=tmp_path,
                           batch_size=200, flush_interval_s=0.05, max_retries=1,
                           retry_backoff_s=0.05, max_backoff_s=0.5, timeout_s=2)
    pipeline = Pipeline([exp])
    t0 = 1_700_000_000_000_000_000
    sent = 0
    done = threading.Event()

    def produce():  # a steady stream until after the server is back
        nonlocal sent
        while not done.is_set():
            for _ in range(100):
                pipeline.submit(Point("train", {"host": "n1"}, {"loss": sent / 7}, t0 + sent))
                sent += 1
            time.sleep(0.02)

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.4)
    influx_own.stop()  # mid-stream
    time.sleep(1.5)
    influx_own.start()
    time.sleep(0.3)
    done.set()
    producer.join()
    assert pipeline.flush(30)
    stats = pipeline.stats()["influxdb"]
    pipeline.shutdown(5)
    assert stats["points_spooled_total"] > 0  # the outage really was hit
    assert stats["points_dropped_total"] == 0
    assert influx_own.count("train", "train", "loss") == sent


def test_a_new_exporter_replays_the_spool_an_earlier_one_left(influx_own, tmp_path):
    influx_own.create_database("db")
    influx_own.stop()
    first = InfluxDBExporter(influx_own.url, database="db", spool_dir=tmp_path,
                             max_retries=0, timeout_s=1)
    for k in range(3):
        batch = [Point("m", {}, {"v": float(i)}, 1_700_000_000_000_000_000 + k * 100 + i)
                 for i in range(100)]
        assert first.export(batch) is ExportResult.SUCCESS
    assert first.stats()["points_spooled_total"] == 300
    first.shutdown(0.2)  # the process ends with the server still down
    influx_own.start()
    second = InfluxDBExporter(influx_own.url, database="db", spool_dir=tmp_path)
    assert second.spool is not None and second.spool.pending_count == 300
    assert second.flush(10)
    assert second.stats()["points_replayed_total"] == 300
    assert influx_own.count("db", "m", "v") == 300
    second.shutdown(1)
