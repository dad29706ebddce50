"""provscope.query: the same DataFrames from the embedded file, InfluxDB and PostgreSQL."""

from __future__ import annotations

import urllib.request

import pandas as pd
import pytest
from provscope.exporters.embedded import EmbeddedPointsExporter
from provscope.exporters.lineage.store import SqlLineageStore
from provscope.exporters.pipeline import Pipeline

from provscope import query
from provscope.config import load_config
from provscope.errors import ProvscopeError
from provscope.ids import new_id
from provscope.records import EntityRecord, Point, RelationRecord, RunRecord, TaskRecord

T0 = 1_700_000_000_000_000_000
SEC = 1_000_000_000


def _points(run_id: str) -> list[Point]:
    out = []
    for i in range(5):
        for rank in ("0", "1"):
            out.append(Point("train", {"run_id": run_id, "host": "n1", "rank": rank,
                                       "device": "cpu"},
                             {"loss": 1.0 / (i + 1), "step": i, "ok": i % 2 == 0,
                              "phase": "warmup" if i < 2 else "main"},
                             T0 + i * SEC))
    out.append(Point("cpu", {"host": "n1"}, {"usage_percent": 50.0}, T0))
    return out


def _line(p: Point) -> str:
    tags = ",".join(f"{k}={v}" for k, v in sorted(p.tags.items()))
    fields = []
    for k, v in p.fields.items():
        if isinstance(v, bool):
            fields.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, int):
            fields.append(f"{k}={v}i")
        elif isinstance(v, str):
            fields.append(f'{k}="{v}"')
        else:
            fields.append(f"{k}={v!r}")
    return f"{p.measurement},{tags} {','.join(fields)} {p.time_ns}"


@pytest.fixture
def embedded(tmp_path):
    config = load_config(overrides={"embedded.path": str(tmp_path / "provscope.db")},
                         environ={})
    return config


def _write_embedded(config, points) -> None:
    exporter = EmbeddedPointsExporter.from_config(config)
    with Pipeline([exporter]) as pipeline:
        pipeline.submit_many(points)
        assert pipeline.flush(10)


def test_embedded_points_round_trip_through_series(embedded):
    run_id = new_id()
    _write_embedded(embedded, _points(run_id))
    df = query.points("train", "loss", run_id=run_id, config=embedded)
    assert list(df.columns) == query.SERIES_COLUMNS
    assert len(df) == 10
    assert df["time"].dt.tz is not None
    assert df[df["rank"] == "0"]["value"].tolist() == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    assert df["tags"][0] == {"device": "cpu"}

    all_fields = query.points("train", run_id=run_id, tags={"rank": 1}, config=embedded)
    assert set(all_fields["field"]) == {"loss", "step", "ok", "phase"}
    assert len(all_fields) == 20
    phase = all_fields[all_fields["field"] == "phase"]
    assert phase["str_value"].tolist() == ["warmup", "warmup", "main", "main", "main"]
    assert phase["value"].isna().all()
    ok = all_fields[all_fields["field"] == "ok"]["value"].tolist()
    assert ok == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_series_filters_time_range_and_other_tags(embedded):
    run_id = new_id()
    _write_embedded(embedded, _points(run_id))
    window = query.points("train", "step", start=T0 + SEC, end=pd.Timestamp(T0 + 3 * SEC,
                                                                              tz="UTC"),
                          tags={"rank": "0"}, config=embedded)
    assert window["value"].tolist() == [1.0, 2.0, 3.0]
    assert query.points("train", "step", tags={"device": "gpu"}, config=embedded).empty
    assert len(query.points("train", "step", tags={"device": "cpu"}, config=embedded)) == 10
    assert query.points("cpu", config=embedded)["host"].tolist() == ["n1"]
    assert query.points("train", run_id="other", config=embedded).empty


def test_series_from_influxdb_matches_the_embedded_frame(embedded, influx_server, influx_db):
    run_id = new_id()
    points = _points(run_id)
    _write_embedded(embedded, points)
    body = "\n".join(_line(p) for p in points).encode()
    req = urllib.request.Request(f"{influx_server.url}/write?db={influx_db}&precision=ns",
                                 data=body, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 204
    influx = load_config(overrides={"influxdb.url": influx_server.url,
                                    "influxdb.database": influx_db}, environ={})

    for kwargs in ({"field": "loss", "run_id": run_id}, {"run_id": run_id},
                   {"field": "step", "start": T0 + SEC, "end": T0 + 2 * SEC,
                    "tags": {"rank": "1"}}):
        want = query.points("train", config=embedded, **kwargs)
        got = query.points("train", config=influx, **kwargs)
        assert not want.empty
        pd.testing.assert_frame_equal(got, want)


def test_influxdb_errors_are_one_line_provscope_errors(influx_server):
    config = load_config(overrides={"influxdb.url": influx_server.url,
                                    "influxdb.database": "no_such_db_x"}, environ={})
    with pytest.raises(ProvscopeError, match="database not found"):
        query.points("train", config=config)
    gone = load_config(overrides={"influxdb.url": "http://127.0.0.1:9"}, environ={})
    with pytest.raises(ProvscopeError, match="unreachable"):
        query.points("train", config=gone)


@pytest.fixture(params=["sqlite", "postgresql"])
def lineage(request, tmp_path):
    """(config, run_id) of a recorded run with nested tasks and entities."""
    if request.param == "sqlite":
        config = load_config(overrides={"embedded.path": str(tmp_path / "p.db")}, environ={})
    else:
        config = load_config(overrides={"lineage.url": request.getfixturevalue("postgres_url")},
                             environ={})
    store = SqlLineageStore(config.lineage_url)
    run_id, train, step, data, ckpt = new_id(), new_id(), new_id(), new_id(), new_id()
    store.write([
        RunRecord(run_id, name="finetune", status="finished", start_ns=T0, end_ns=T0 + 9 * SEC,
                  host="n1", config={"lr": 0.1}),
        RunRecord(new_id(), name="older", status="failed", start_ns=T0 - SEC),
        TaskRecord(train, run_id, name="train", task_kind="task", start_ns=T0,
                   end_ns=T0 + 5 * SEC, status="finished", resources={"cpu_seconds": 4.0}),
        TaskRecord(step, run_id, parent_task_id=train, name="step", task_kind="step",
                   start_ns=T0 + SEC, status="running"),
        EntityRecord(data, "dataset", uri="file:///data.txt", digest="sha256:ab", size_bytes=9),
        EntityRecord(ckpt, "checkpoint", uri="file:///ckpt.pt", run_id=run_id),
        RelationRecord("used", train, data, role="train_data"),
        RelationRecord("generated", train, ckpt, run_id=run_id),
    ])
    store.close()
    return config, run_id


def test_lineage_frames_read_the_same_from_sqlite_and_postgresql(lineage):
    config, run_id = lineage
    runs = query.runs(config=config)
    assert runs["name"].tolist() == ["finetune", "older"]  # most recent first
    assert runs["task_count"].tolist() == [2, 0]
    assert runs["duration_s"][0] == 9.0
    assert runs["config"][0] == {"lr": 0.1}
    assert str(runs["start_time"].dtype) == "datetime64[ns, UTC]"
    assert query.runs(limit=1, config=config)["name"].tolist() == ["finetune"]
    assert query.runs(status="failed", config=config)["name"].tolist() == ["older"]
    assert query.runs(run_id=run_id, config=config)["name"].tolist() == ["finetune"]

    tasks = query.tasks(run_id, config=config)
    assert tasks["name"].tolist() == ["train", "step"]
    assert tasks["duration_s"][0] == 5.0 and pd.isna(tasks["duration_s"][1])
    assert tasks["cpu_seconds"][0] == 4.0
    assert tasks["parent_task_id"][1] == tasks["task_id"][0]

    ents = query.entities(run_id, config=config)
    assert sorted(ents["kind"]) == ["checkpoint", "dataset"]  # via relation and via run_id
    rels = query.relations(run_id, config=config)
    assert sorted(zip(rels["relation"], rels["role"], strict=True)) == [
        ("generated", ""), ("used", "train_data")]

    cost = query.sql("SELECT name, cpu_seconds FROM tasks WHERE cpu_seconds > :c", {"c": 1},
                     config=config)
    assert cost.to_dict(orient="records") == [{"name": "train", "cpu_seconds": 4.0}]


def test_run_id_prefix_resolves_or_fails_with_one_line(lineage):
    config, run_id = lineage
    assert query.resolve_run_id(run_id[:20], config=config) == run_id
    with pytest.raises(ProvscopeError, match="no run id starts with 'zzz'"):
        query.resolve_run_id("zzz", config=config)
    with pytest.raises(ProvscopeError, match="ambiguous"):
        query.resolve_run_id("0", config=config)  # UUIDv7s of today share the first digits


def test_missing_embedded_file_gives_empty_frames_with_columns(tmp_path):
    config = load_config(overrides={"embedded.path": str(tmp_path / "none.db")}, environ={})
    runs = query.runs(config=config)
    assert runs.empty and {"run_id", "task_count", "duration_s"} <= set(runs.columns)
    assert query.tasks("x", config=config).empty
    assert list(query.points("train", config=config).columns) == query.SERIES_COLUMNS
    assert not (tmp_path / "none.db").exists()  # reading never creates the file
