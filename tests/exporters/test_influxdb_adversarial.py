"""Adversarial names, keys and values through the writer into the real InfluxDB 1.x.

Every point is either read back exactly as docs/lineprotocol.md ("Sanitisation") says,
or counted as dropped with its reason; no clean point is lost beside a bad one.
"""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
from provscope.exporters.base import ExportResult
from provscope.exporters.embedded import EmbeddedPointsExporter
from provscope.exporters.influxdb.writer import InfluxDBExporter

from provscope.records import Point

BS = "\u29f5"  # what a backslash the format cannot carry becomes
T0 = 1_700_000_000_000_000_000


def _stored(server, db: str) -> set[tuple]:
    """Every (measurement, tags, field, value, time) the server holds."""
    res = server.query("SELECT * FROM /.*/ GROUP BY *", db)
    out = set()
    for series in res["results"][0].get("series", []):
        # GROUP BY * over several measurements lists every tag key, "" where absent.
        tags = tuple(sorted((k, v) for k, v in (series.get("tags") or {}).items() if v))
        for row in series["values"]:
            for column, value in zip(series["columns"][1:], row[1:], strict=True):
                if value is not None:
                    out.add((series["name"], tags, column, value, row[0]))
    return out


def _rows(measurement: str, tags: dict, fields: dict, time_ns: int) -> set[tuple]:
    t = tuple(sorted(tags.items()))
    return {(measurement, t, k, v, time_ns) for k, v in fields.items()}


# (point as sent, what is stored: (measurement, tags, fields) or None when refused, reason)
def _cases() -> list[tuple[Point, tuple | None, str | None]]:
    c: list[tuple[Point, tuple | None, str | None]] = []

    def add(m, tags, fields, stored, reason=None):
        c.append((Point(m, tags, fields, T0 + len(c)), stored, reason))

    add("adv", {"k\\": "x"}, {"v": 1.0}, ("adv", {f"k{BS}": "x"}, {"v": 1.0}))
    add("adv", {"a\\ b": "a\\ b"}, {"v": 2.0}, ("adv", {f"a{BS} b": f"a{BS} b"}, {"v": 2.0}))
    add("adv", {"a\\=b": "a\\=b"}, {"v": 3.0}, ("adv", {f"a{BS}=b": f"a{BS}=b"}, {"v": 3.0}))
    add("adv\\\\", {"h": "1"}, {"v": 4.0}, (f"adv\\{BS}", {"h": "1"}, {"v": 4.0}))
    add("#adv", {"h": "1"}, {"v": 5.0}, ("_#adv", {"h": "1"}, {"v": 5.0}))
    add("ad\x00v", {"t": "n\x00ul"}, {"v": 6.0}, ("ad\u2400v", {"t": "n\u2400ul"}, {"v": 6.0}))
    # A field key ending in two backslashes next to the field it used to destroy.
    add("adv", {"h": "2"}, {"a\\\\": 7.0, "a": 8.0},
        ("adv", {"h": "2"}, {f"a\\{BS}": 7.0, "a": 8.0}))
    # Real newline/tab and the two literal characters: four different series.
    for value, stored in (("a\nb", "a\u240ab"), ("a\\nb", "a\\nb"), ("a\tb", "a\u2409b"),
                          ("a\\tb", "a\\tb")):
        add("nl", {"t": value}, {"v": 9.0}, ("nl", {"t": stored}, {"v": 9.0}))
    add("adv", {"time": "x"}, {"time": 10.0}, ("adv", {"time_": "x"}, {"time_": 10.0}))
    add("adv", {"h": "3"}, {"s": 'q"uo\\te\nline\x00'},
        ("adv", {"h": "3"}, {"s": 'q"uo\\te\nline\x00'}))
    add("adv", {"h": "4"}, {"big": 2**70, "ok": 1.0}, ("adv", {"h": "4"}, {"big": 2.0**70,
                                                                          "ok": 1.0}))
    # Refused, each counted with its reason.
    add("", {"h": "1"}, {"v": 1.0}, None, "invalid_name")
    add("adv", {"h": "5"}, {"v": math.nan}, None, "no_field")
    add("adv", {"h": "5"}, {"": 1.0}, None, "no_field")
    add("cpu", {"host": "h"}, {"logical_cpus": 2**70}, None, "no_field")  # int64 field
    c.append((Point("adv", {"h": "6"}, {"v": 1.0}, 2**64), None, "invalid_time"))
    return c


def test_adversarial_points_are_read_back_as_documented_or_counted_alone(
        influx_server, influx_db, tmp_path):
    cases = _cases()
    clean = [Point("clean", {"host": "n1", "gpu": str(i % 4)}, {"v": float(i)}, T0 + i)
             for i in range(3000)]
    # Each adversarial point sits between clean ones (and, at 3000+ points, the batch is
    # sent as several chunks: both paths of the writer).
    batch: list[Point] = []
    step = len(clean) // len(cases)
    for i, (point, _, _) in enumerate(cases):
        batch += [*clean[i * step:(i + 1) * step], point]
    batch += clean[len(cases) * step:]
    # The loss that diverged: a string for a float field new in the shard.
    losses = [Point("train", {"run_id": "r"}, {"loss": 1.0 / (i + 1)}, T0 + i)
              for i in range(100)]
    losses.insert(50, Point("train", {"run_id": "r"}, {"loss": "diverged"}, T0 + 1000))
    exp = InfluxDBExporter(influx_server.url, database=influx_db, spool_dir=tmp_path)
    assert exp.export(batch) is ExportResult.SUCCESS
    assert exp.export(losses) is ExportResult.SUCCESS
    stats = exp.stats()
    exp.shutdown(2)

    expected: set[tuple] = set()
    for p in clean:
        expected |= _rows(p.measurement, dict(p.tags), dict(p.fields), p.time_ns)
    for p in losses:
        if p.fields["loss"] != "diverged":
            expected |= _rows("train", {"run_id": "r"}, dict(p.fields), p.time_ns)
    refused = 0
    for point, stored, _ in cases:
        if stored is None:
            refused += 1
        else:
            expected |= _rows(*stored, point.time_ns)
    assert _stored(influx_server, influx_db) == expected

    written = len(batch) + len(losses) - refused - 1
    assert stats["points_written_total"] == written
    assert stats["points_dropped_total"] == refused + 1
    assert stats["rejected_invalid_name_total"] == 1 + 1  # empty measurement, empty key
    assert stats["rejected_invalid_time_total"] == 1
    assert stats["rejected_invalid_value_total"] == 2  # NaN, int beyond int64
    assert stats["rejected_type_conflict_total"] == 1  # 'diverged'
    assert stats["rejected_no_field_total"] == 4  # NaN, "", int64 and 'diverged' points
    assert stats["rejected_server_total"] == 0
    assert stats["points_rejected_total"] == refused + 1


def test_a_type_the_server_already_holds_costs_only_that_point(
        influx_server, influx_db, tmp_path):
    # Another process (a fresh policy) sends a string where the server stores floats (a
    # field the catalogue does not declare, so only the server knows its type): the
    # server's partial write is counted exactly and the neighbours are written.
    first = InfluxDBExporter(influx_server.url, database=influx_db, spool_dir=tmp_path / "1")
    assert first.export([Point("train", {}, {"score": 0.5}, T0)]) is ExportResult.SUCCESS
    first.shutdown(1)
    second = InfluxDBExporter(influx_server.url, database=influx_db, spool_dir=tmp_path / "2")
    batch = [Point("other", {}, {"v": float(i)}, T0 + i) for i in range(60)]
    batch.insert(30, Point("train", {}, {"score": "diverged"}, T0 + 1))
    assert second.export(batch) is ExportResult.SUCCESS
    stats = second.stats()
    second.shutdown(1)
    assert (stats["points_written_total"], stats["points_dropped_total"]) == (60, 1)
    assert stats["rejected_server_total"] == 1
    assert influx_server.count(influx_db, "other", "v") == 60
    assert influx_server.count(influx_db, "train", "score") == 1


def test_a_whole_batch_type_conflict_from_the_server_costs_only_the_conflicting_line(
        influx_server, influx_db, tmp_path, monkeypatch):
    # Without the policy's type check (as another client would send), one batch holds a
    # float field and a string for it: InfluxDB refuses the whole batch ("field type
    # conflict", no line named). The writer halves it down to the refused line.
    exp = InfluxDBExporter(influx_server.url, database=influx_db, spool_dir=tmp_path)
    monkeypatch.setattr(exp.policy, "expect", lambda *args: True)
    batch = [Point("m", {"h": "x"}, {"w": float(i)}, T0 + i) for i in range(50)]
    batch[20] = Point("m", {"h": "x"}, {"w": "text"}, T0 + 20)
    assert exp.export(batch) is ExportResult.SUCCESS
    stats = exp.stats()
    exp.shutdown(1)
    assert influx_server.count(influx_db, "m", "w") == 49
    assert (stats["points_written_total"], stats["points_dropped_total"]) == (49, 1)
    assert stats["rejected_server_total"] == 1


@pytest.mark.parametrize("value", [True, "x", 1.5])
def test_catalogue_types_win_over_the_first_value(influx_server, influx_db, tmp_path, value):
    # cpu.logical_cpus is declared int: any other type is refused, the int written.
    exp = InfluxDBExporter(influx_server.url, database=influx_db, spool_dir=tmp_path)
    exp.export([Point("cpu", {"host": "h"}, {"logical_cpus": value}, T0),
                Point("cpu", {"host": "h"}, {"logical_cpus": 8}, T0 + 1)])
    stats = exp.stats()
    exp.shutdown(1)
    assert stats["rejected_type_conflict_total"] == 1
    res = influx_server.query('SELECT "logical_cpus" FROM "cpu"', influx_db)
    assert res["results"][0]["series"][0]["values"] == [[T0 + 1, 8]]


def test_the_embedded_store_stores_and_counts_the_same(tmp_path):
    cases = _cases()
    losses = [Point("train", {"run_id": "r"}, {"loss": 1.0 / (i + 1)}, T0 + i)
              for i in range(100)]
    losses.insert(50, Point("train", {"run_id": "r"}, {"loss": "diverged"}, T0 + 1000))
    exp = EmbeddedPointsExporter(str(tmp_path / "p.db"))
    assert exp.export([p for p, _, _ in cases]) is ExportResult.SUCCESS
    assert exp.export(losses) is ExportResult.SUCCESS
    stats = exp.stats()
    exp.shutdown(1)
    expected: set[tuple] = set()
    for point, stored, _ in cases:
        if stored is not None:
            expected |= _rows(*stored, point.time_ns)
    for p in losses:
        if p.fields["loss"] != "diverged":
            expected |= _rows("train", {"run_id": "r"}, dict(p.fields), p.time_ns)
    with sqlite3.connect(tmp_path / "p.db") as conn:
        rows = conn.execute("SELECT measurement, run_id, host, rank, tags, field, value, "
                            "str_value, time_ns FROM points").fetchall()
    got = set()
    for m, run_id, host, rank, extra, field, value, text, t in rows:
        tags = dict(json.loads(extra)) if extra else {}
        tags.update({k: v for k, v in (("run_id", run_id), ("host", host), ("rank", rank))
                     if v is not None})
        got.add((m, tuple(sorted(tags.items())), field, text if text is not None else value, t))
    assert got == expected
    refused = sum(stored is None for _, stored, _ in cases)
    assert stats["points_dropped_total"] == refused + 1
    for reason, n in (("invalid_name", 2), ("invalid_time", 1), ("invalid_value", 2),
                      ("type_conflict", 1), ("no_field", 4)):
        assert stats[f"rejected_{reason}_total"] == n, reason
