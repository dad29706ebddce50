"""End to end through ``Pipeline.from_config``: the embedded SQLite default, and real
InfluxDB + PostgreSQL servers."""

from __future__ import annotations

import os

import pytest

import provscope
from provscope import query
from provscope.config import load_config
from provscope.job import api as client
from provscope.job import sink


@pytest.fixture(autouse=True)
def fresh_sinks(monkeypatch):
    for name in ("PROVSCOPE_RUN_ID", "PROVSCOPE_PARENT_TASK_ID", "PROVSCOPE_RANK", "RANK",
                 "PROVSCOPE_ENABLED", "PROVSCOPE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    sink.shutdown_all(1.0, forget=True)
    sink.set_factory(None)
    monkeypatch.setattr(client, "_implicit", None)
    yield
    sink.shutdown_all(5.0, forget=True)


def _short_training(settings, data_path, ckpt_path) -> provscope.Run:
    @provscope.task(kind="data")
    def prepare(path, limit=10):
        return len(open(path).read()[:limit])

    with provscope.workflow("e2e", config={"lr": 0.01}, campaign="tests",
                            settings=settings) as run:
        run.use(data_path, kind="dataset")
        prepare(data_path)
        for _epoch in run.epochs(2):
            for _step, _ in run.steps(range(3), task_every=2):
                run.log(loss=0.5, lr=0.01)
            with run.task("eval", kind="eval"):
                run.log(eval_loss=0.4)
        ckpt_path.write_bytes(b"weights")
        run.produce(ckpt_path, kind="checkpoint")
    assert run.flush(20), "records were not all written"
    return run


def _check_lineage(run, settings) -> None:
    runs = query.runs(config=settings)
    row = runs[runs["run_id"] == run.run_id].iloc[0]
    assert row["status"] == "finished" and row["campaign"] == "tests"
    assert row["config"] == {"lr": 0.01}
    tasks = query.tasks(run.run_id, config=settings)
    kinds = tasks.groupby("kind").size().to_dict()
    assert kinds == {"data": 1, "epoch": 2, "eval": 2, "step": 3}
    assert (tasks["status"] == "finished").all() and tasks["end_ns"].notna().all()
    ents = query.entities(run.run_id, config=settings)
    # The corpus, used as a dataset and as prepare()'s argument, is one entity (keyed by
    # its bytes), described by its first record; each use has its relation and role.
    assert sorted(ents["kind"]) == ["checkpoint", "dataset"]
    assert ents["digest"].str.startswith("sha256:").all()
    rels = query.relations(run.run_id, config=settings)
    corpus = ents[ents["kind"] == "dataset"]["entity_id"].iloc[0]
    used = rels[(rels["relation"] == "used") & (rels["object_id"] == corpus)]
    assert sorted(used["role"]) == ["dataset", "path"]


def test_embedded_default_round_trip_through_the_query_api(tmp_path):
    settings = load_config(environ={}, overrides={
        "embedded.path": str(tmp_path / "provscope.db"),
        "agent.socket_path": str(tmp_path / "none.sock"),
    })
    data = tmp_path / "corpus.txt"
    data.write_text("hello world")
    run = _short_training(settings, data, tmp_path / "ckpt.pt")
    assert run.sink_mode == "embedded"
    _check_lineage(run, settings)
    loss = query.points("train", "loss", run_id=run.run_id, config=settings)
    assert len(loss) == 6 and set(loss["rank"]) == {"0"}
    steps = query.points("train", "step", run_id=run.run_id, config=settings)
    assert sorted(set(steps["value"])) == [0, 1, 2, 3, 4, 5]


@pytest.mark.integration
def test_influxdb_and_postgresql_receive_points_and_lineage(influx_server, influx_db,
                                                           postgres_url, tmp_path):
    settings = load_config(environ={}, overrides={
        "influxdb.url": influx_server.url,
        "influxdb.database": influx_db,
        "influxdb.spool_dir": str(tmp_path / "spool"),
        "lineage.url": postgres_url,
        "agent.socket_path": str(tmp_path / "none.sock"),
    })
    data = tmp_path / "corpus.txt"
    data.write_text("hello world")
    run = _short_training(settings, data, tmp_path / "ckpt.pt")
    res = influx_server.query(
        f"SELECT \"loss\" FROM \"train\" WHERE \"run_id\" = '{run.run_id}'", influx_db)
    assert len(res["results"][0]["series"][0]["values"]) == 6
    res = influx_server.query(
        f"SELECT \"step\", \"step_time_seconds\" FROM \"train\" WHERE \"run_id\" = "
        f"'{run.run_id}' AND \"step_time_seconds\" >= 0", influx_db)
    assert [v[1] for v in res["results"][0]["series"][0]["values"]] == [0, 1, 2, 3, 4, 5]
    assert influx_server.count(influx_db, "train", "eval_loss") == 2
    rows = query.sql("SELECT kind, count(*) AS n FROM tasks WHERE run_id = :r GROUP BY kind",
                     {"r": run.run_id}, config=settings)
    assert dict(zip(rows["kind"], rows["n"], strict=True)) == {
        "data": 1, "epoch": 2, "eval": 2, "step": 3}
    _check_lineage(run, settings)


def test_a_listening_agent_takes_the_records_of_a_job_with_default_stores(tmp_path):
    import tempfile
    import time

    from provscope.agent.ingest import IngestServer

    from provscope.records import Point, TaskRecord

    sock_dir = tempfile.mkdtemp(prefix="psc-", dir="/tmp")  # AF_UNIX paths are short
    points: list = []
    lineage: list = []
    server = IngestServer(os.path.join(sock_dir, "agent.sock"), on_points=points.extend,
                          on_records=lineage.extend)
    server.start()
    try:
        # A job that names no store of its own: the agent takes its records (a job
        # that names one is tested in tests/job/test_destination.py).
        settings = load_config(environ={}, overrides={"agent.socket_path": str(server.path)})
        with provscope.workflow("via-agent", settings=settings) as run, run.task("work"):
            run.log(step=1, loss=0.5)
        assert run.flush(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (not points or len(lineage) < 4):
            time.sleep(0.02)
    finally:
        server.stop()
    assert run.sink_mode == "agent"
    assert [p.fields["loss"] for p in points if isinstance(p, Point)] == [0.5]
    assert {r.name for r in lineage if isinstance(r, TaskRecord)} == {"work"}
    assert os.getcwd() == str(tmp_path) and not (tmp_path / "provscope.db").exists()


def test_implicit_run_of_a_plain_script_is_closed_and_flushed_at_exit(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "prep.py"
    script.write_text(
        "import provscope\n"
        "@provscope.task(kind='data')\n"
        "def tokenize(n):\n"
        "    return n * 2\n"
        "tokenize(21)\n"
        "provscope.log(step=0, loss=1.5)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVSCOPE_")}
    env |= {"PROVSCOPE_EMBEDDED_PATH": str(tmp_path / "p.db"),
            "PROVSCOPE_AGENT_SOCKET_PATH": str(tmp_path / "none.sock")}
    subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=60)
    settings = load_config(environ={}, overrides={"embedded.path": str(tmp_path / "p.db")})
    runs = query.runs(config=settings)
    assert runs["name"].tolist() == ["prep"] and runs["status"].tolist() == ["finished"]
    run_id = runs["run_id"][0]
    tasks = query.tasks(run_id, config=settings)
    assert tasks["name"].tolist() == ["tokenize"] and tasks["result"][0] == {"return": 42}
    assert query.points("train", "loss", run_id=run_id, config=settings)["value"].tolist() == [1.5]


def test_implicit_run_of_a_crashing_script_is_recorded_failed(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "crash.py"
    script.write_text(
        "import provscope\n"
        "@provscope.task\n"
        "def step():\n"
        "    raise ValueError('nan loss')\n"
        "step()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVSCOPE_")}
    env |= {"PROVSCOPE_EMBEDDED_PATH": str(tmp_path / "p.db"),
            "PROVSCOPE_AGENT_SOCKET_PATH": str(tmp_path / "none.sock")}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.rstrip().endswith("ValueError: nan loss")
    settings = load_config(environ={}, overrides={"embedded.path": str(tmp_path / "p.db")})
    runs = query.runs(config=settings)
    assert runs["status"].tolist() == ["failed"]
    tasks = query.tasks(runs["run_id"][0], config=settings)
    assert tasks["status"].tolist() == ["failed"]
    assert tasks["error"][0] == "ValueError: nan loss"
