"""The query API of issue 11: identical frames from the embedded SQLite file and from
InfluxDB + PostgreSQL (real servers), one missing-value convention, bound parameters,
one-line errors and partial results."""

from __future__ import annotations

import time
import urllib.parse
import urllib.request
import warnings

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from provscope.exporters.embedded import EmbeddedPointsExporter
from provscope.exporters.lineage.schema import migrate
from provscope.exporters.lineage.store import SqlLineageStore
from provscope.exporters.pipeline import Pipeline

from provscope import query
from provscope.cli import main
from provscope.config import load_config
from provscope.errors import ProvscopeError
from provscope.ids import new_id
from provscope.records import EntityRecord, Point, RelationRecord, RunRecord, TaskRecord

T0 = 1_700_000_000_000_000_000
SEC = 1_000_000_000
INJECT = ["x' OR '1'='1", "' OR 1=1 --", 'train"; DROP MEASUREMENT train; --',
          "'; DROP TABLE runs; --", '" OR ""="', "\\", "%", "_"]


class Recorded:
    """Ids of the recorded runs, tasks and entities."""

    def __init__(self) -> None:
        self.run, self.old, self.live = new_id(), new_id(), new_id()
        self.train, self.epoch, self.step, self.eval = (new_id() for _ in range(4))
        self.old_task = new_id()
        self.data, self.model, self.ckpt, self.tuned = (new_id() for _ in range(4))


def _records(ids: Recorded) -> list:
    now = time.time_ns()
    return [
        RunRecord(ids.run, name="finetune", status="finished", start_ns=T0,
                  end_ns=T0 + 20 * SEC, host="n1", config={"lr": 0.1, "optim": {"name": "adam"}},
                  code={"commit": "abc1234", "dirty": False}),
        RunRecord(ids.old, name="sweep", status="failed", start_ns=T0 - 100 * SEC,
                  end_ns=T0 - 50 * SEC, host="n1", config={"lr": 0.2}),
        RunRecord(ids.live, name="sweep", status="running", start_ns=now - 5 * SEC,
                  host="n1", heartbeat_ns=now, config={"lr": 0.1}),
        TaskRecord(ids.train, ids.run, name="train", task_kind="task", host="n1", rank=0,
                   start_ns=T0, end_ns=T0 + 12 * SEC, status="finished",
                   resources={"cpu_seconds": 10.0, "peak_rss_bytes": 2 << 30,
                              "gpu_seconds": 7200.0, "gpu_energy_joules": 3.6e6,
                              "read_bytes": 1000, "write_bytes": 10}),
        TaskRecord(ids.epoch, ids.run, parent_task_id=ids.train, name="epoch 0",
                   task_kind="epoch", host="n1", rank=0, start_ns=T0 + SEC,
                   end_ns=T0 + 4 * SEC, status="finished", resources={"cpu_seconds": 3.0}),
        TaskRecord(ids.step, ids.run, parent_task_id=ids.epoch, name="step 1",
                   task_kind="step", host="n1", rank=0, start_ns=T0 + 2 * SEC,
                   end_ns=T0 + 3 * SEC, status="finished"),
        TaskRecord(ids.eval, ids.run, name="eval", task_kind="eval", host="n1", rank=0,
                   start_ns=T0 + 14 * SEC, end_ns=T0 + 16 * SEC, status="finished",
                   resources={"cpu_seconds": 1.5}, result={"accuracy": 0.9}),
        TaskRecord(ids.old_task, ids.old, name="tune", task_kind="task", host="n1",
                   start_ns=T0 - 90 * SEC, end_ns=T0 - 60 * SEC, status="failed"),
        EntityRecord(ids.data, "dataset", uri="file:///data/train.txt",
                     digest="sha256:" + "a" * 64, size_bytes=9),
        EntityRecord(ids.model, "model", name="gpt-tiny"),
        EntityRecord(ids.ckpt, "checkpoint", uri="file:///ckpt/final.pt", run_id=ids.run),
        EntityRecord(ids.tuned, "checkpoint", uri="file:///ckpt/tuned.pt", run_id=ids.old),
        RelationRecord("used", ids.train, ids.data, run_id=ids.run, role="train_data",
                       time_ns=T0),
        RelationRecord("used", ids.train, ids.model, run_id=ids.run, role="model",
                       time_ns=T0),
        RelationRecord("generated", ids.train, ids.ckpt, run_id=ids.run, time_ns=T0 + 11 * SEC),
        RelationRecord("derived", ids.ckpt, ids.model, run_id=ids.run, role="model"),
        RelationRecord("used", ids.old_task, ids.ckpt, run_id=ids.old, role="init",
                       time_ns=T0 - 80 * SEC),
        RelationRecord("generated", ids.old_task, ids.tuned, run_id=ids.old,
                       time_ns=T0 - 70 * SEC),
    ]


def _points(ids: Recorded) -> list[Point]:
    out = []
    for step in range(6):
        for rank in ("0", "1"):
            tags = {"run_id": ids.run, "host": "n1", "rank": rank}
            if rank == "1":
                tags["device"] = "cuda:1"
            fields = {"step": step, "loss": 1.0 / (step + 1) + int(rank), "lr": 0.1,
                      "phase": "warmup" if step < 2 else "main", "ok": step % 2 == 0}
            if step == 3 and rank == "1":
                del fields["lr"]  # a missing value in the middle
            out.append(Point("train", tags, fields, T0 + step * 2 * SEC + int(rank)))
        for layer in ("fc1", "fc2"):
            out.append(Point("layer", {"run_id": ids.run, "host": "n1", "rank": "0",
                                       "layer": layer, "module_type": "Linear"},
                             {"step": step, "grad_norm": step * 0.5 + len(layer)},
                             T0 + step * 2 * SEC + 5))
    for i in range(25):  # node series every second, on the run's host and another
        t = T0 - 2 * SEC + i * SEC
        for host in ("n1", "n2"):
            out.append(Point("cpu", {"host": host}, {"usage_percent": float(i)}, t))
            out.append(Point("memory", {"host": host},
                             {"used_bytes": 1e9 + i, "used_percent": 50.0}, t))
            for gpu in ("0", "1"):
                out.append(Point("gpu", {"host": host, "gpu": gpu, "gpu_uuid": f"GPU-{gpu}"},
                                 {"utilization_percent": 90.0 + int(gpu),
                                  "power_watts": 300.0}, t))
    return out


def _line(p: Point) -> str:
    def esc(v: str) -> str:
        return v.replace(",", "\\,").replace(" ", "\\ ").replace("=", "\\=")

    tags = ",".join(f"{k}={esc(v)}" for k, v in sorted(p.tags.items()))
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


def _write_influx(server, db: str, points: list[Point]) -> None:
    body = "\n".join(_line(p) for p in points).encode()
    req = urllib.request.Request(f"{server.url}/write?db={db}&precision=ns", data=body,
                                 method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 204


def _influxql(server, db: str, q: str) -> dict:
    data = urllib.parse.urlencode({"db": db, "q": q}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{server.url}/query", data=data),
                                timeout=10) as resp:
        import json

        return json.loads(resp.read())


@pytest.fixture
def stores(tmp_path, influx_server, influx_db, postgres_url):
    """(embedded config, servers config, ids): the same records in the embedded file and
    in InfluxDB + PostgreSQL."""
    ids = Recorded()
    records, points = _records(ids), _points(ids)
    embedded = load_config(overrides={"embedded.path": str(tmp_path / "p.db")}, environ={})
    servers = load_config(overrides={"influxdb.url": influx_server.url,
                                     "influxdb.database": influx_db,
                                     "lineage.url": postgres_url}, environ={})
    for cfg in (embedded, servers):
        store = SqlLineageStore(cfg.lineage_url)
        store.write(records)
        store.close()
    exporter = EmbeddedPointsExporter.from_config(embedded)
    with Pipeline([exporter]) as pipeline:
        pipeline.submit_many(points)
        assert pipeline.flush(10)
    _write_influx(influx_server, influx_db, points)
    return embedded, servers, ids


def _same(fn, *args, stores, **kwargs):
    embedded, servers, _ = stores
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", query.PartialResultWarning)
        want = fn(*args, config=embedded, **kwargs)
        got = fn(*args, config=servers, **kwargs)
    pd.testing.assert_frame_equal(got, want)
    assert got.attrs.get("partial") == want.attrs.get("partial")
    return want


ALLOWED = {"Float64", "Int64", "boolean", "string", "object", "datetime64[ns, UTC]",
           "int64"}


def _convention(df: pd.DataFrame) -> None:
    """Every column of a nullable dtype; no NaN or None where pd.NA belongs."""
    for col in df.columns:
        dtype = str(df[col].dtype)
        assert dtype in ALLOWED, (col, dtype)
        if dtype == "object":
            for v in df[col]:
                assert v is not None and not (isinstance(v, float) and v != v), (col, v)
        if dtype == "Float64":
            assert not np.isnan(df[col].to_numpy(dtype=float, na_value=0.0)).any(), col


# ----------------------------------------------------------------------------- series

def test_series_is_wide_by_step_and_identical_from_both_stores(stores):
    _, _, ids = stores
    df = _same(query.series, "train", ["loss", "lr", "phase", "ok"], run_id=ids.run,
               stores=stores)
    assert df.index.name == "step" and df.index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4,
                                                             5, 5]
    assert list(df.columns) == ["run_id", "host", "rank", "device", "time", "loss", "lr",
                                "phase", "ok"]
    assert df["rank"].tolist() == ["0", "1"] * 6
    assert df.loc[3, "lr"].tolist()[0] == 0.1 and pd.isna(df.loc[3, "lr"].tolist()[1])
    assert df["loss"].tolist()[:4] == [1.0, 2.0, 0.5, 1.5]
    assert df["phase"].dtype == "string" and df["ok"].tolist()[:2] == [1.0, 1.0]
    assert pd.isna(df["device"].iloc[0]) and df["device"].iloc[1] == "cuda:1"
    assert str(df["time"].dtype) == "datetime64[ns, UTC]"
    _convention(df)
    assert df.attrs["partial"] is False and df.attrs["warnings"] == []

    # every field, by time, one rank; the step is an Int64 field (catalogue: int)
    by_time = _same(query.series, "train", run_id=ids.run, rank=0, index="time",
                    stores=stores)
    assert by_time.index.name == "time" and len(by_time) == 6
    assert list(by_time.columns) == ["run_id", "host", "rank", "loss", "lr", "ok", "phase",
                                     "step"]
    assert str(by_time["step"].dtype) == "Int64"
    _convention(by_time)


def test_series_filters_layers_time_range_and_resample_identically(stores):
    _, _, ids = stores
    layers = _same(query.series, "layer", "grad_norm", run_id=ids.run, layer="fc2",
                   stores=stores)
    assert layers["layer"].unique().tolist() == ["fc2"]
    assert layers["module_type"].unique().tolist() == ["Linear"]
    both = _same(query.series, "layer", "grad_norm", run_id=[ids.run], layer=["fc1", "fc2"],
                 start=T0 + 2 * SEC, end=T0 + 6 * SEC + 5, stores=stores)
    assert both.index.tolist() == [1, 1, 2, 2, 3, 3]
    binned = _same(query.series, "train", ["loss"], run_id=ids.run, rank="0", resample=2,
                   stores=stores)
    assert binned.index.tolist() == [0, 2, 4]
    assert binned["loss"].tolist() == pytest.approx([(1 + 0.5) / 2, (1 / 3 + 0.25) / 2,
                                                     (0.2 + 1 / 6) / 2])
    timed = _same(query.series, "cpu", "usage_percent", host="n1", index="time",
                  resample="10s", agg="max", stores=stores)
    assert timed["usage_percent"].tolist() == [1.0, 11.0, 21.0, 24.0]
    assert query.series("train", "loss", run_id="nobody", config=stores[0]).empty


def test_points_long_format_identical(stores):
    _, _, ids = stores
    df = _same(query.points, "train", run_id=ids.run, tags={"rank": "1"}, stores=stores)
    assert list(df.columns) == query.SERIES_COLUMNS
    assert set(df["field"]) == {"loss", "lr", "phase", "ok", "step"}
    assert df["tags"].iloc[0] == {"device": "cuda:1"}
    _convention(df.drop(columns=["time_ns"]))


def test_node_series_joins_hosts_and_window_of_a_run_or_task(stores):
    _, _, ids = stores
    df = _same(query.node_series, ids.run, stores=stores)
    assert set(df["host"]) == {"n1"}  # n2 ran something else
    assert df.index.min() == pd.Timestamp(T0, tz="UTC")
    assert df.index.max() == pd.Timestamp(T0 + 20 * SEC, tz="UTC")
    assert list(df.columns) == ["host", "gpu", "gpu_uuid", *query.NODE_FIELDS]
    cpu_rows = df[df["gpu"].isna()]
    assert len(cpu_rows) == 21 and cpu_rows["memory.used_percent"].eq(50.0).all()
    assert cpu_rows["gpu.utilization_percent"].isna().all()
    assert len(df[df["gpu"] == "1"]) == 21
    assert df.attrs["hosts"] == ["n1"] and df.attrs["partial"] is False
    task = _same(query.node_series, ids.epoch, ["cpu.usage_percent"], stores=stores)
    assert task["cpu.usage_percent"].tolist() == [3.0, 4.0, 5.0, 6.0]
    with pytest.raises(ProvscopeError, match=r"measurement\.field"):
        query.node_series(ids.run, ["usage_percent"], config=stores[0])


def test_resource_summary_joins_resources_utilisation_and_final_metrics(stores):
    _, _, ids = stores
    df = _same(query.resource_summary, ids.run, stores=stores)
    assert df["level"].tolist() == ["run", "task", "task", "task", "task"]
    run, train = df.iloc[0], df.iloc[1]
    assert run["cpu_seconds"] == 11.5  # top-level tasks only: train + eval
    assert run["gpu_hours"] == 2.0 and run["energy_kwh"] == 1.0
    assert run["final_loss"] == 1.0 / 6 + 1  # the last value logged: rank 1, step 5
    assert train["path"] == "train" and df.iloc[3]["path"] == "train/epoch 0/step 1"
    assert train["final_loss"] == 1.0 / 6 + 1  # step 5 at T0 + 10 s: inside train
    assert pd.isna(df.iloc[4]["final_loss"])  # eval logged no train point
    assert df.iloc[2]["cpu_usage_percent_mean"] == 4.5  # cpu 3..6 during epoch 0
    assert run["gpu_utilization_percent_mean"] == 90.5
    _convention(df)


# ----------------------------------------------------------------------------- lineage

def test_runs_filters_and_run_prefixes_identically(stores):
    embedded, _, ids = stores
    all_runs = _same(query.runs, stores=stores)
    assert all_runs["run_id"].tolist() == [ids.live, ids.run, ids.old]
    assert all_runs.attrs["partial"] is True  # one is still running
    assert _same(query.runs, name="sweep", status="failed",
                 stores=stores)["run_id"].tolist() == [ids.old]
    assert _same(query.runs, since=T0 - SEC, until=T0 + SEC,
                 stores=stores)["run_id"].tolist() == [ids.run]
    lr = query.runs(config={"lr": 0.1}, settings=embedded)
    assert lr["run_id"].tolist() == [ids.live, ids.run]
    nested = query.runs(config={"optim.name": "adam", "lr": 0.1}, limit=5, settings=embedded)
    assert nested["run_id"].tolist() == [ids.run]
    assert query.runs(config={"lr": 0.1}, limit=1, settings=embedded)["run_id"].tolist() \
        == [ids.live]
    _convention(all_runs)

    assert query.run(ids.run[:30], config=embedded)["name"] == "finetune"
    latest = query.run("latest", config=embedded)
    assert latest["run_id"] == ids.live and latest.attrs["partial"] is True
    with pytest.raises(ProvscopeError, match="no run id starts with 'zzz'"):
        query.run("zzz", config=embedded)
    with pytest.raises(ProvscopeError, match="ambiguous"):
        query.run(ids.run[:1], config=embedded)


def test_tasks_tree_depth_and_path(stores):
    embedded, _, ids = stores
    df = _same(query.tasks, ids.run, stores=stores)
    assert df["path"].tolist() == ["train", "train/epoch 0", "train/epoch 0/step 1", "eval"]
    assert df["depth"].tolist() == [0, 1, 2, 0]
    tree = query.task_tree(ids.run, config=embedded)
    assert [t["name"] for t in tree] == ["train", "eval"]
    assert tree[0]["children"][0]["children"][0]["name"] == "step 1"
    assert tree[1]["result"] == {"accuracy": 0.9} and tree[1]["children"] == []
    assert tree[0]["error"] is None


def test_lineage_walks_both_ways_identically(stores):
    _, _, ids = stores
    back = _same(query.derived_from, ids.tuned, stores=stores)
    # tuned <- (used by its generator) ckpt <- (derived) model, (used) data and model
    assert back["entity_id"].tolist()[0] == ids.tuned
    pairs = {(r.entity_id, r.how, r.source_of) for r in back.itertuples()}
    assert (ids.ckpt, "used", ids.tuned) in pairs
    assert (ids.model, "derived", ids.ckpt) in pairs
    assert (ids.data, "used", ids.ckpt) in pairs
    assert set(back[back["entity_id"] == ids.ckpt]["code_commit"]) == {"abc1234"}
    fwd = _same(query.used_by, ids.data, stores=stores)
    assert {(r.entity_id, r.depth) for r in fwd.itertuples()} == {
        (ids.data, 0), (ids.ckpt, 1), (ids.tuned, 2)}
    made = _same(query.produced_by, "file:///ckpt/final.pt", stores=stores)
    assert made["task_name"].tolist() == ["train"] and made["code_commit"][0] == "abc1234"
    uses = _same(query.runs_using, "sha256:" + "a" * 64, stores=stores)
    assert uses["run_id"].tolist() == [ids.run]
    _convention(back)
    _convention(fwd)


# ----------------------------------------------------------------------------- bad input

def test_injection_attempts_are_values_never_code(stores, influx_server):
    embedded, servers, ids = stores
    before = query.series("train", "loss", run_id=ids.run, config=servers)
    for cfg in (embedded, servers):
        for text in INJECT:
            assert query.series("train", "loss", run_id=text, config=cfg).empty
            assert query.series("train", "loss", host=text, index="time", config=cfg).empty
            assert query.series("train", "loss", tags={text: "x"}, config=cfg).empty
            assert query.series(text, config=cfg).empty
            assert query.series("train", [text], run_id=ids.run, config=cfg)[text].isna().all()
            assert query.runs(name=text, config=cfg).empty
            assert query.tasks(text, config=cfg).empty
            assert query.runs_using(text, config=cfg).empty
            with pytest.raises(ProvscopeError):
                query.run(text, config=cfg)
    after = query.series("train", "loss", run_id=ids.run, config=servers)
    pd.testing.assert_frame_equal(after, before)
    assert len(query.runs(config=embedded)) == 3 and len(query.runs(config=servers)) == 3
    measurements = _influxql(influx_server, servers.influxdb.database, "SHOW MEASUREMENTS")
    names = {v[0] for v in measurements["results"][0]["series"][0]["values"]}
    assert {"train", "layer", "cpu", "memory", "gpu"} <= names


def test_partial_results_are_marked_with_one_line(stores, influx_server):
    embedded, servers, ids = stores
    with pytest.warns(query.PartialResultWarning, match="still running"):
        live = query.series("train", "loss", run_id=ids.live, config=embedded)
    assert live.attrs["partial"] is True and len(live.attrs["warnings"]) == 1
    with pytest.warns(query.PartialResultWarning, match="never written"):
        none = query.series("train", "loss", run_id=ids.old, config=embedded)
    assert none.empty and none.attrs["partial"] is True
    assert all("\n" not in w for w in live.attrs["warnings"] + none.attrs["warnings"])
    assert query.tasks(ids.live, config=embedded).attrs["partial"] is True
    with pytest.warns(query.PartialResultWarning, match="still running") as caught:
        assert query.resource_summary(ids.live, config=embedded).attrs["partial"] is True
    assert len(caught) == 1
    # InfluxDB's retention policy keeps an hour: the 2023 run's series are gone
    db = servers.influxdb.database
    _influxql(influx_server, db, f'CREATE RETENTION POLICY "hour" ON "{db}" DURATION 1h '
              "REPLICATION 1 DEFAULT")
    with pytest.warns(query.PartialResultWarning, match="expired"):
        gone = query.series("train", "loss", run_id=ids.run, config=servers)
    assert gone.empty and gone.attrs["partial"] is True
    assert "retention policy 'hour' keeps 1 h" in gone.attrs["warnings"][0]


def test_unreachable_stores_and_bad_arguments_are_one_line(tmp_path):
    down = load_config(overrides={"lineage.url": "postgresql://u:secret@127.0.0.1:9/x"},
                       environ={})
    with pytest.raises(ProvscopeError, match="unreachable") as err:
        query.runs(config=down)
    assert "secret" not in str(err.value) and "\n" not in str(err.value)
    cfg = load_config(overrides={"embedded.path": str(tmp_path / "p.db")}, environ={})
    for kwargs, match in (({"index": "row"}, "index='row'"), ({"agg": "avg"}, "agg='avg'"),
                          ({"fields": [1]}, "fields=")):
        with pytest.raises(ProvscopeError, match=match):
            query.series("train", config=cfg, **kwargs)
    with pytest.raises(ProvscopeError, match="resample='10s' is not allowed with index='step'"):
        query.series("train", resample="10s", config=cfg)
    with pytest.raises(ProvscopeError, match="no runs recorded"):
        query.run(config=cfg)
    exporter = EmbeddedPointsExporter.from_config(cfg)
    with Pipeline([exporter]) as pipeline:
        pipeline.submit_many([Point("cpu", {"host": "n1"}, {"usage_percent": 1.0}, T0)])
        assert pipeline.flush(10)
    with pytest.raises(ProvscopeError, match="no numeric 'step' field; allowed: index='time'"):
        query.series("cpu", index="step", config=cfg)
    assert query.series("cpu", config=cfg)["usage_percent"].tolist() == [1.0]


def test_older_lineage_schema_reads_with_one_line(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    migrate(engine, target=4)  # before heartbeat_ns
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO runs (run_id, name, status, start_ns) "
                             "VALUES ('r-old', 'legacy', 'finished', 1)"))
    engine.dispose()
    cfg = load_config(overrides={"lineage.url": url}, environ={})
    with pytest.warns(query.PartialResultWarning, match="schema version 4, older"):
        df = query.runs(config=cfg)
    assert df["name"].tolist() == ["legacy"] and pd.isna(df["heartbeat_ns"][0])
    assert df.attrs["partial"] is True and len(df.attrs["warnings"]) == 1


def test_show_defaults_to_the_latest_run(tmp_path, capsys):
    path = tmp_path / "provscope.db"
    store = SqlLineageStore(f"sqlite:///{path}")
    first, second = new_id(), new_id()
    store.write([RunRecord(first, name="first", status="finished", start_ns=T0),
                 RunRecord(second, name="second", status="finished", start_ns=T0 + SEC)])
    store.close()
    assert main(["--set", f"embedded.path={path}", "show"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[1:] == [second, "second"]
    assert main(["--set", f"embedded.path={path}", "show", first[:30]]) == 0
    assert first in capsys.readouterr().out


def test_text_that_looks_like_a_number_stays_text(tmp_path):
    cfg = load_config(overrides={"embedded.path": str(tmp_path / "p.db")}, environ={})
    exporter = EmbeddedPointsExporter.from_config(cfg)
    with Pipeline([exporter]) as pipeline:
        pipeline.submit_many([Point("train", {"run_id": "r"}, {"step": 1, "version": "1.5"},
                                    T0)])
        assert pipeline.flush(10)
    df = query.series("train", run_id="r", config=cfg)
    assert df["version"].dtype == "string" and df["version"].tolist() == ["1.5"]


def test_benchmark_script_prints_both_figures(influx_server):
    """benchmarks/query.py at a small size: its frames agree and both figures print."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "query.py"
    out = subprocess.run([sys.executable, str(script), "--points", "5000", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300, cwd=script.parent,
                         check=True).stdout
    figures = {f["metric"]: f for f in map(json.loads, out.strip().splitlines())}
    assert set(figures) == {"embedded_points_per_s", "influx_points_per_s"}
    for f in figures.values():
        assert f["points"] == 5000 and f["value"] > 0 and f["baseline_value"] > 0


def test_a_run_without_status_or_host_reads_without_errors(tmp_path):
    cfg = load_config(overrides={"embedded.path": str(tmp_path / "p.db")}, environ={})
    run_id = new_id()
    store = SqlLineageStore(cfg.lineage_url)
    store.write([RunRecord(run_id, start_ns=T0)])  # nothing else known
    store.close()
    exporter = EmbeddedPointsExporter.from_config(cfg)
    with Pipeline([exporter]) as pipeline:
        pipeline.submit_many([Point("train", {"run_id": run_id}, {"step": 1, "loss": 2.0},
                                    T0)])
        assert pipeline.flush(10)
    assert query.series("train", "loss", run_id=run_id, config=cfg)["loss"].tolist() == [2.0]
    assert pd.isna(query.run(run_id, config=cfg)["status"])
    assert query.tasks(run_id, config=cfg).empty
    summary = query.resource_summary(run_id, config=cfg)
    assert summary["final_loss"].tolist() == [2.0]
    with pytest.warns(query.PartialResultWarning, match="no host recorded"):
        assert query.node_series(run_id, config=cfg).empty
