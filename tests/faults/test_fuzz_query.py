"""Fuzzing the query API's parameters (run ids, names, statuses, time ranges, tag
filters) against a recorded run in the embedded store and in InfluxDB: each call gives a
DataFrame holding only what was asked for, or a ``ProvscopeError``; never another
exception, and no input changes the stores or reads another run (no SQL or InfluxQL
injection)."""

from __future__ import annotations

import warnings

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

import provscope
from provscope import query
from provscope.config import load_config
from provscope.errors import ProvscopeError
from provscope.job import sink
from tests.faults.fuzzing import fuzz_settings

pytestmark = [pytest.mark.faults]

INJECT = ["' OR '1'='1", "'; DROP TABLE runs; --", '" OR 1=1 --', "x' OR run_id LIKE '%",
          "/.*/", "a\\", "'", '"', "\\'", "%", "_", "\n", "\x00", "' or \"\"='",
          "1; DROP MEASUREMENT train", "train\" WHERE 1=1 --"]
words = st.one_of(st.sampled_from(INJECT), st.text(max_size=30))
times = st.one_of(st.none(), st.integers(-(2**64), 2**64), st.floats(allow_nan=True),
                  st.booleans(), words, st.datetimes(), st.sampled_from(
                      ["2024-01-01", "yesterday", "2024-13-45", "now", "1e30"]))


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """One finished run (a task, an entity, 20 train points) in the embedded file; the
    stores' row counts before fuzzing."""
    with provscope.workflow("fuzz-target") as run, run.task("t", kind="task"):
        run.use(str(tmp_path / "nothing.txt"), kind="dataset")
        for step in range(20):
            run.log(step=step, loss=1.0)
    sink.shutdown_all(forget=True)
    config = load_config()
    return run.run_id, config


def _counts(config) -> dict[str, int]:
    engine = sa.create_engine(config.lineage_url)
    with engine.connect() as conn:
        out = {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar()
               for t in ("runs", "tasks", "entities", "relations", "points")}
    engine.dispose()
    return out


def _call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ProvscopeError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
        return None


def _wide(measurement, field, rid, start, end, tags, config) -> None:
    """The wide ``series`` with the same parameters (and as host/rank/layer filters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", query.PartialResultWarning)
        df = _call(query.series, measurement, field, run_id=rid, start=start, end=end,
                   tags=tags, index="time", config=config)
        if df is not None and not df.empty:
            assert df.attrs["measurement"] == measurement
            if rid is not None:
                assert set(df["run_id"]) == {rid}
        df = _call(query.series, measurement, field, host=rid, rank=rid, layer=rid,
                   index="time", config=config)
        if df is not None and not df.empty and rid is not None:
            assert set(df["host"]) == {rid} and set(df["rank"]) == {rid}


def test_query_parameters_embedded(recorded, long_run):
    run_id, config = recorded
    before = _counts(config)
    assert before["runs"] == 1 and before["points"] > 0

    @fuzz_settings(600, long_run)
    @given(name=st.one_of(st.none(), words), status=st.one_of(st.none(), words),
           rid=st.one_of(st.none(), words, st.just(run_id)), since=times,
           limit=st.one_of(st.none(), st.integers(0, 5)), measurement=words,
           field=st.one_of(st.none(), words), start=times, end=times,
           tags=st.one_of(st.none(), st.dictionaries(words, words, max_size=2)))
    def run(name, status, rid, since, limit, measurement, field, start, end, tags) -> None:
        df = _call(query.runs, name=name, status=status, run_id=rid, since=since,
                   limit=limit, config=config)
        if df is not None:
            assert set(df["run_id"]) <= {run_id}
            if rid is not None and rid != run_id:
                assert df.empty  # an id never matches another run
        if rid is not None:
            for fn in (query.tasks, query.entities, query.relations):
                df = _call(fn, rid, config=config)
                if df is not None and rid != run_id:
                    assert df.empty, (fn, rid)
            _call(query.resolve_run_id, rid, config=config)
        df = _call(query.points, measurement, field, rid, start, end, tags, config=config)
        if df is not None and not df.empty:
            assert set(df["measurement"]) == {measurement}
            if rid is not None:
                assert set(df["run_id"]) == {rid}
        _wide(measurement, field, rid, start, end, tags, config)

    run()
    assert _counts(config) == before


def test_series_parameters_influxdb(influx_server, influx_db, long_run):
    config = load_config(overrides={"influxdb.url": influx_server.url,
                                    "influxdb.database": influx_db})
    with provscope.workflow("fuzz-influx", settings=config) as run:
        for step in range(20):
            run.log(step=step, loss=1.0)
    sink.shutdown_all(forget=True)
    assert influx_server.count(influx_db, "train", "loss") == 20

    @fuzz_settings(300, long_run)
    @given(measurement=st.one_of(words, st.just("train")), field=st.one_of(st.none(), words),
           rid=st.one_of(st.none(), words), start=times, end=times,
           tags=st.one_of(st.none(), st.dictionaries(words, words, max_size=2)))
    def fuzz(measurement, field, rid, start, end, tags) -> None:
        df = _call(query.points, measurement, field, rid, start, end, tags, config=config)
        if df is not None and not df.empty:
            assert set(df["measurement"]) == {measurement}
            if rid is not None:
                assert set(df["run_id"]) == {rid}
        _wide(measurement, field, rid, start, end, tags, config)

    fuzz()
    # Nothing was dropped or deleted through a parameter.
    assert influx_server.count(influx_db, "train", "loss") == 20
