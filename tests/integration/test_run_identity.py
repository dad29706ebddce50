"""One job is one run: two nodes under one SLURM step (each with its own `provscope run`
and agent, lineage in a real PostgreSQL); a plain `python train.py` beside an agent gets
its process series; Ctrl-C ends a run `interrupted`."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from provscope.agent.daemon import Agent
from provscope.exporters.memory import MemoryExporter
from provscope.exporters.pipeline import Pipeline

from provscope.config import load_config
from provscope.job import identity

pytestmark = pytest.mark.integration

NODE_SCRIPT = textwrap.dedent("""
    import time
    import provscope

    with provscope.workflow("finetune", config={"lr": 0.01, "nodes": 2}) as run:
        for step in range(3):
            run.log(step=step, loss=1.0 / (step + 1))
        with run.task("train"):
            time.sleep(1.5)  # long enough for the agents to sample the process trees
        run.flush(30)
""")


@pytest.fixture
def short_dir():
    """A short private directory (AF_UNIX socket paths are <= 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="ps-id-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _cli(*args: str, sock: Path, db: Path) -> list[str]:
    return [sys.executable, "-m", "provscope.cli",
            "--set", f"agent.socket_path={sock}", "--set", "prometheus.enabled=false",
            "--set", f"embedded.path={db}", "--set", "agent.interval_s=0.2",
            "--set", "agent.collectors.nvml.enabled=false",
            "--set", "agent.collectors.amdsmi.enabled=false", *args]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in identity.LAUNCHER_VARS and not k.startswith("PROVSCOPE_")}


def test_two_nodes_of_one_slurm_step_each_under_provscope_run_make_one_run(
        short_dir, postgres_url):
    script = short_dir / "train.py"
    script.write_text(NODE_SCRIPT)
    db = short_dir / "points.db"
    job = str(uuid.uuid4().int % 10**8)
    procs = []
    for rank, host in enumerate(("node-a", "node-b")):
        env = {**_clean_env(), "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0",
               "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": str(rank)}
        cmd = _cli("run", "--host", host, "--lineage-url", postgres_url, "--",
                   sys.executable, str(script), sock=short_dir / host / "agent.sock", db=db)
        procs.append(subprocess.Popen(cmd, env=env, cwd=short_dir, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]

    run_id = identity.derived_run_id(f"slurm:{job}.0")
    engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as conn:
        runs = conn.execute(sa.text("SELECT * FROM runs")).mappings().all()
        tasks = conn.execute(sa.text("SELECT * FROM tasks")).mappings().all()
    engine.dispose()
    [run] = runs
    assert (run["run_id"], run["name"], run["config"], run["origin"], run["status"]) == \
        (run_id, "finetune", {"lr": 0.01, "nodes": 2}, "job", "finished")
    assert run["host"] == "node-a"  # rank 0's
    assert {t["run_id"] for t in tasks} == {run_id}
    commands = [t for t in tasks if t["kind"] == "command"]
    assert sorted(t["host"] for t in commands) == ["node-a", "node-b"]
    assert all(t["status"] == "finished" for t in commands)
    train = sorted((t["rank"], t["host"]) for t in tasks if t["name"] == "train")
    assert train == [(0, "node-a"), (1, "node-b")]
    by_host = {t["host"]: t["task_id"] for t in commands}
    assert {t["parent_task_id"] for t in tasks if t["name"] == "train"} == set(by_host.values())

    points = sqlite3.connect(db)
    loss = points.execute("SELECT DISTINCT run_id, host, rank FROM points "
                          "WHERE measurement = 'train'").fetchall()
    assert sorted(loss) == [(run_id, "node-a", "0"), (run_id, "node-b", "1")]
    process = {r for (r,) in points.execute(
        "SELECT DISTINCT run_id FROM points WHERE measurement = 'process'")}
    assert process == {run_id}


SOLO_SCRIPT = textwrap.dedent("""
    import time
    import provscope

    with provscope.workflow("solo") as run:
        print(run.run_id, flush=True)
        time.sleep(1.5)
""")


def test_a_plain_python_job_beside_an_agent_gets_process_series_with_its_run(short_dir):
    sock = short_dir / "run" / "agent.sock"
    cfg = load_config(environ={}, overrides={
        "agent.socket_path": str(sock), "prometheus.enabled": False, "agent.interval_s": 0.2,
        "embedded.path": str(short_dir / "e.db"), "agent.collectors.nvml.enabled": False,
        "agent.collectors.amdsmi.enabled": False})
    memory = MemoryExporter()
    with Agent(cfg, pipeline=Pipeline([memory], flush_interval_s=0.1)) as agent:
        env = {**_clean_env(), "PROVSCOPE_AGENT_SOCKET_PATH": str(sock)}
        out = subprocess.run([sys.executable, "-c", SOLO_SCRIPT], env=env, cwd=short_dir,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        run_id = out.stdout.strip()
        agent.pipeline.flush(5)
    tagged = {(p.tags.get("run_id"), p.tags.get("rank")) for p in memory.records
              if getattr(p, "measurement", None) == "process"}
    assert (run_id, "0") in tagged
    runs = [r for r in memory.records if getattr(r, "kind", None) == "run"]
    assert {r.run_id for r in runs} == {run_id}


CTRL_C_SCRIPT = textwrap.dedent("""
    import pathlib, sys, time
    import provscope

    with provscope.workflow("long", config={"epochs": 100}) as run:
        with run.task("train"):
            pathlib.Path(sys.argv[1]).write_text(run.run_id)
            time.sleep(60)
""")


def test_ctrl_c_on_provscope_run_marks_the_run_and_its_tasks_interrupted(short_dir):
    script = short_dir / "long.py"
    script.write_text(CTRL_C_SCRIPT)
    ready, db = short_dir / "ready", short_dir / "e.db"
    proc = subprocess.Popen(
        _cli("run", "--", sys.executable, str(script), str(ready),
             sock=short_dir / "run" / "agent.sock", db=db),
        env=_clean_env(), cwd=short_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate(timeout=10)[1][-3000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    rows = sqlite3.connect(db)
    [(name, status)] = rows.execute("SELECT name, status FROM runs").fetchall()
    assert (name, status) == ("long", "interrupted")
    tasks = dict(rows.execute("SELECT kind, status FROM tasks").fetchall())
    assert tasks == {"command": "interrupted", "task": "interrupted"}


IMPLICIT_SCRIPT = textwrap.dedent("""
    import os, signal, time
    import provscope

    provscope.log(loss=1.0)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
""")


def test_ctrl_c_ends_the_implicit_run_interrupted(short_dir):
    db = short_dir / "e.db"
    env = {**_clean_env(), "PROVSCOPE_EMBEDDED_PATH": str(db),
           "PROVSCOPE_AGENT_SOCKET_PATH": str(short_dir / "none.sock")}
    out = subprocess.run([sys.executable, "-c", IMPLICIT_SCRIPT], env=env, cwd=short_dir,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGINT, out.stderr[-3000:]
    [(status, origin)] = sqlite3.connect(db).execute(
        "SELECT status, origin FROM runs").fetchall()
    assert (status, origin) == ("interrupted", "implicit")


def test_provscope_run_joins_a_run_id_already_in_its_environment(short_dir):
    db = short_dir / "e.db"
    env = {**_clean_env(), "PROVSCOPE_RUN_ID": "outer-run"}
    for host in ("node-a", "node-b"):  # e.g. a job script that names the run itself
        out = subprocess.run(
            _cli("run", "--host", host, "--", sys.executable, "-c", "pass",
                 sock=short_dir / host / "agent.sock", db=db),
            env=env, cwd=short_dir, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
    rows = sqlite3.connect(db)
    assert rows.execute("SELECT run_id, origin FROM runs").fetchall() == [("outer-run",
                                                                           "launcher")]
    hosts = rows.execute("SELECT host FROM tasks WHERE run_id = 'outer-run' "
                         "AND kind = 'command' ORDER BY host").fetchall()
    assert hosts == [("node-a",), ("node-b",)]
