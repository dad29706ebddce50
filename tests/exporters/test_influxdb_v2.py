"""The v2 write path (``/api/v2/write`` with org, bucket and token) against a real server:
VictoriaMetrics, which takes InfluxDB's v2 write API; read back through its export API."""

from __future__ import annotations

import uuid

from provscope.exporters.base import ExportResult
from provscope.exporters.influxdb.writer import InfluxDBExporter
from provscope.exporters.pipeline import Pipeline

from provscope.records import Point

T0 = 1_700_000_000_000_000_000  # whole milliseconds: VictoriaMetrics stores ms


def _series(server, measurement: str) -> dict[tuple, list[tuple[int, float]]]:
    """{(metric name, labels without db): [(time ms, value), ...]} of one measurement."""
    out: dict[tuple, list[tuple[int, float]]] = {}
    for s in server.export('{__name__=~"' + measurement + '_.*"}'):
        labels = {k: v for k, v in s["metric"].items() if k not in ("__name__", "db")}
        key = (s["metric"]["__name__"], tuple(sorted(labels.items())))
        out[key] = sorted(zip(s["timestamps"], s["values"], strict=True))
    return out


def test_v2_writes_arrive_with_tags_fields_and_times(victoria_server, tmp_path):
    m = "v2_" + uuid.uuid4().hex[:8]
    exp = InfluxDBExporter(victoria_server.url, api="v2", org="lab", bucket="train",
                           token="secret-token", spool_dir=tmp_path)
    points = [Point(m, {"host": "n1", "gpu": str(i % 2)},
                    {"util": float(i), "mem": i * 1.5}, T0 + i * 1_000_000)
              for i in range(500)]
    assert exp.export(points) is ExportResult.SUCCESS
    stats = exp.stats()
    exp.shutdown(2)
    assert stats["points_written_total"] == 500 and stats["points_dropped_total"] == 0
    got = _series(victoria_server, m)
    for gpu in ("0", "1"):
        labels = (("gpu", gpu), ("host", "n1"))
        want = [(T0 // 1_000_000 + i, float(i)) for i in range(500) if str(i % 2) == gpu]
        assert got[(f"{m}_util", labels)] == want
        assert got[(f"{m}_mem", labels)] == [(t, i * 1.5) for t, i in want]


def test_v2_through_the_pipeline_with_adversarial_names(victoria_server, tmp_path):
    # The sanitisation policy applies on the v2 path as on v1: the stored names are the
    # ones docs/lineprotocol.md gives, refused points are counted, neighbours arrive.
    m = "v2adv_" + uuid.uuid4().hex[:8]
    exp = InfluxDBExporter(victoria_server.url, api="v2", org="lab", bucket="b",
                           token="t", spool_dir=tmp_path, batch_size=100,
                           flush_interval_s=0.05)
    pipeline = Pipeline([exp])
    for i in range(300):
        pipeline.submit(Point(m, {"host": "n1"}, {"v": float(i)}, T0 + i * 1_000_000))
        if i == 150:
            pipeline.submit(Point(m, {"host": "a\nb"}, {"v": 1.0}, T0))  # stored: a\u240ab
            pipeline.submit(Point(m, {"host": "n1"}, {"v": float("nan")}, T0))  # refused
            pipeline.submit(Point(m, {"host": "n1"}, {"v": "text"}, T0))  # type conflict
    assert pipeline.flush(10)
    stats = pipeline.stats()["influxdb"]
    pipeline.shutdown(5)
    got = _series(victoria_server, m)
    assert got[(f"{m}_v", (("host", "n1"),))] == \
        [(T0 // 1_000_000 + i, float(i)) for i in range(300)]
    assert got[(f"{m}_v", (("host", "a\u240ab"),))] == [(T0 // 1_000_000, 1.0)]
    assert stats["points_written_total"] == 301
    assert stats["points_dropped_total"] == 2
    assert stats["rejected_invalid_value_total"] == 1
    assert stats["rejected_type_conflict_total"] == 1


def test_v1_write_to_the_same_server(victoria_server, tmp_path):
    # The 1.x endpoint of a server that is not InfluxDB: CREATE DATABASE is answered
    # but not needed; the points arrive with the db label.
    m = "v1vm_" + uuid.uuid4().hex[:8]
    exp = InfluxDBExporter(victoria_server.url, api="v1", database="train", spool_dir=tmp_path)
    assert exp.export([Point(m, {"host": "n1"}, {"v": 2.5}, T0)]) is ExportResult.SUCCESS
    exp.shutdown(2)
    (series,) = victoria_server.export('{__name__="' + m + '_v"}')
    assert series["metric"] == {"__name__": f"{m}_v", "db": "train", "host": "n1"}
    assert series["values"] == [2.5]
