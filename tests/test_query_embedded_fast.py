"""The embedded store's ADBC read path gives the same frames as the sqlite3 path."""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd
import pytest
from provscope.exporters.embedded import POINTS_DDL, EmbeddedPointsExporter

from provscope import query
from provscope.config import load_config
from provscope.query import _embedded
from provscope.records import Point

T0 = 1_700_000_000_000_000_000
RUN = "01900000-0000-7000-8000-0000000fa570"


def _points() -> list[Point]:
    out = []
    # Over 2,000 numeric rows first, so that the driver types its first batch from
    # numbers only and meets text and missing values later.
    for i in range(1500):
        for host in ("n1", "n2"):
            out.append(Point("train", {"run_id": RUN, "host": host, "rank": "0"},
                             {"loss": 1.0 / (i + 1), "step": i, "lr": 0.1 + i * 1e-17},
                             T0 + i * 1000))
    for i in range(1500, 1510):
        fields = {"step": i, "phase": "1.5" if i % 2 else "warmup", "ok": i % 3 == 0}
        if i % 4:
            fields["loss"] = -0.0 if i == 1501 else float(np.nextafter(1.0, 2.0))
        out.append(Point("train", {"run_id": RUN, "host": "n1", "rank": "1", "layer": "fc1",
                                   "device": "cuda:0"}, fields, T0 + i * 1000))
    # The same series, time and field written twice: the later value wins.
    out.append(Point("train", {"run_id": RUN, "host": "n1", "rank": "0"}, {"loss": 7.25},
                     T0))
    out.append(Point("train", {"run_id": RUN, "host": "n1", "rank": "0"}, {"phase": ""},
                     T0 + 5000))
    return out


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "provscope.db"
    exporter = EmbeddedPointsExporter(str(path))
    points = _points()
    exporter.write(points[:-1])
    exporter.write(points[-1:])
    exporter.shutdown(5)
    # A row with neither a number nor text (the writer never makes one; a file may hold it).
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO points (time_ns, measurement, field, value, str_value, "
                     "run_id, host, rank, tags) VALUES (?, 'train', 'loss', NULL, NULL, ?, "
                     "'n2', '0', NULL)", (T0 + 3001, RUN))
    conn.close()
    return load_config(overrides={"embedded.path": str(path)}, environ={})


def _both(monkeypatch, call):
    """The call's result read through ADBC (checked to be used), then through sqlite3."""
    used = []
    real = _embedded._arrow

    def spy(*args):
        out = real(*args)
        used.append(out is not None)
        return out

    monkeypatch.setattr(_embedded, "_arrow", spy)
    fast = call()
    assert used and all(used), "the ADBC path fell back to sqlite3"
    monkeypatch.setattr(_embedded, "_arrow", lambda *args: None)
    return fast, call()


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert a.attrs == b.attrs
    for col in a.columns:  # exact floats, -0.0 included, and the same NA cells
        if a[col].dtype == "Float64":
            x, y = a[col].array, b[col].array
            assert np.array_equal(x._mask, y._mask)
            assert np.array_equal(x._data.view(np.int64), y._data.view(np.int64))


@pytest.mark.parametrize("kwargs", [
    {"measurement": "train"},
    {"measurement": "train", "fields": ["loss", "phase", "step"]},
    {"measurement": "train", "fields": ["phase", "ok", "loss"], "index": "time"},
    {"measurement": "train", "fields": "loss", "host": "n2"},
    {"measurement": "train", "fields": ["loss", "lr"], "layer": "fc1"},
    {"measurement": "train", "start": T0 + 1_499_000, "end": T0 + 1_505_000,
     "index": "time"},
    {"measurement": "nothing", "fields": ["loss"]},
    {"measurement": "train", "run_id": RUN, "host": ["n1", "n2"], "rank": "1",
     "index": "time"},
    {"measurement": "train", "fields": ["loss", "phase"], "run_id": RUN, "host": "n1",
     "rank": "0", "index": "time"},
])
def test_series_is_identical_through_adbc_and_sqlite3(store, monkeypatch, kwargs):
    fast, slow = _both(monkeypatch, lambda: query.series(**kwargs, config=store))
    _same(fast, slow)


def test_points_is_identical_and_text_that_looks_like_a_number_stays_text(store, monkeypatch):
    sqls = []
    real = _embedded._fetch
    monkeypatch.setattr(_embedded, "_fetch",
                        lambda conn, sql, params: sqls.append(sql) or real(conn, sql, params))
    fast, slow = _both(monkeypatch, lambda: query.points("train", run_id=RUN, config=store))
    # numbers, then the rows without one with their text
    assert len(sqls) == 2 and sqls[1].endswith("AND value IS NULL")
    _same(fast, slow)
    phase = fast[fast["field"] == "phase"]
    assert set(phase["str_value"]) == {"1.5", "warmup", ""}
    assert phase["value"].isna().all()
    loss = fast[(fast["field"] == "loss") & (fast["host"] == "n1") & (fast["rank"] == "0")]
    assert loss["value"].iloc[0] == 7.25  # the later of the two writes
    assert not (fast["time_ns"] == T0 + 3001).any()  # a cell with no value is no point
    wide = query.series("train", "loss", host="n2", index="time", config=store)
    assert pd.isna(wide.loc[pd.Timestamp(T0 + 3001, tz="UTC"), "loss"])


def test_a_column_the_driver_cannot_type_falls_back_to_sqlite3(tmp_path, monkeypatch):
    # Text where the table declares REAL (another writer's file): the driver refuses the
    # column, and the read is the sqlite3 path's.
    path = tmp_path / "odd.db"
    with sqlite3.connect(path) as conn:
        for ddl in POINTS_DDL:
            conn.execute(ddl)
        conn.executemany("INSERT INTO points (time_ns, measurement, field, value, run_id) "
                         "VALUES (?, 'm', 'f', ?, 'r')",
                         [(i, float(i)) for i in range(1100)] + [(2000, "abc")])
    conn.close()
    assert _embedded._arrow(path, "CASE field WHEN ? THEN 0 END", "measurement = ?",
                            ["f", "m"], {}) is None
    config = load_config(overrides={"embedded.path": str(path)}, environ={})
    got = query.points("m", config=config)
    monkeypatch.setattr(_embedded, "_arrow", lambda *args: None)
    pd.testing.assert_frame_equal(got, query.points("m", config=config), check_exact=True)


def test_text_before_the_first_number_is_read_with_flags(tmp_path, monkeypatch):
    # More text-only rows than the driver's first batch: it types value as int64 and
    # refuses the first number; the read is retried with placeholders and NULL flags.
    path = tmp_path / "text-first.db"
    n = 131_072 + 10
    with sqlite3.connect(path) as conn:
        for ddl in POINTS_DDL:
            conn.execute(ddl)
        conn.executemany("INSERT INTO points (time_ns, measurement, field, value, str_value,"
                         " run_id, host) VALUES (?, 'm', ?, ?, ?, 'r', 'h')",
                         [(i, "note", None, str(i % 3)) for i in range(n)]
                         + [(i, "x", i * 0.5, None) for i in range(n, n + 5)])
    conn.close()
    config = load_config(overrides={"embedded.path": str(path)}, environ={})
    sqls = []
    real = _embedded._fetch
    monkeypatch.setattr(_embedded, "_fetch",
                        lambda conn, sql, params: sqls.append(sql) or real(conn, sql, params))
    fast, slow = _both(monkeypatch, lambda: query.points("m", config=config))
    assert len(sqls) == 2 and "ifnull(value, 0.0)" in sqls[1]  # numbers, then flags
    _same(fast, slow)
    assert fast["str_value"].iloc[:3].tolist() == ["0", "1", "2"]
    assert fast["value"].iloc[-5:].tolist() == [n * 0.5 + i * 0.5 for i in range(5)]


def test_rows_that_change_between_the_two_reads_are_read_again_with_flags(store, monkeypatch):
    # A writer adding rows between the numbers and the text read: here the second read
    # comes back one row short; the rows are then read once more, with NULL flags.
    sqls = []
    real = _embedded._fetch

    def fetch(conn, sql, params):
        sqls.append(sql)
        table = real(conn, sql, params)
        return table.slice(1) if sql.endswith("AND value IS NULL") else table

    monkeypatch.setattr(_embedded, "_fetch", fetch)
    fast, slow = _both(monkeypatch, lambda: query.points("train", run_id=RUN, config=store))
    assert len(sqls) == 3 and "ifnull(value, 0.0)" in sqls[2]
    _same(fast, slow)
