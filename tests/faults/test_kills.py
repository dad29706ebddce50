"""Kills: the job killed (SIGKILL: its run and open tasks end ``lost`` through the
heartbeat timeout; SIGTERM: they end ``killed``), and the node agent killed with SIGKILL
and restarted (the job runs on unaffected, the agent's spool is replayed, and the job
sends again what the killed agent had not made durable: nothing is lost)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from provscope import query
from provscope.config import load_config
from tests.faults.harness import Agent, influx_steps, job, result, wait_line, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration]

HEARTBEAT = {"PROVSCOPE_CLIENT_HEARTBEAT_S": "0.2", "PROVSCOPE_LINEAGE_LOST_AFTER_S": "1.5"}

VICTIM = """
    import time
    import provscope

    with provscope.workflow("victim") as run:
        with run.task("train", kind="task"):
            for epoch in run.epochs(3):
                run.log(step=epoch, loss=1.0)
                run.flush()
                print("READY", run.run_id, flush=True)
                time.sleep(600)
"""


def _stored(db: str, run_id: str) -> tuple[str, list[str]]:
    """The run's status and its tasks' statuses as stored (no read-time rule applied)."""
    engine = sa.create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            run = conn.execute(sa.text("SELECT status FROM runs WHERE run_id = :r"),
                               {"r": run_id}).scalar()
            tasks = conn.execute(sa.text("SELECT status FROM tasks WHERE run_id = :r "
                                         "ORDER BY start_ns"), {"r": run_id}).scalars().all()
    finally:
        engine.dispose()
    return run, list(tasks)


def _heartbeat(db: str, run_id: str) -> int:
    engine = sa.create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT heartbeat_ns FROM runs WHERE run_id = :r"),
                                {"r": run_id}).scalar() or 0
    finally:
        engine.dispose()


def test_job_sigkill_with_agent_ends_lost_in_the_store(tmp_path):
    agent = Agent(tmp_path, **HEARTBEAT).start()
    db = str(tmp_path / "provscope.db")
    try:
        proc = job(tmp_path, VICTIM, **HEARTBEAT)
        run_id = wait_line(proc, "READY").split()[1]
        wait_until(lambda: _stored(db, run_id)[0] == "running", 10, "the run row")
        first = _heartbeat(db, run_id)
        wait_until(lambda: _heartbeat(db, run_id) > first, 10, "a newer heartbeat")
        assert _stored(db, run_id) == ("running", ["running", "running"])  # task + epoch 0
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        killed = time.monotonic()
        # The agent's reaper writes it: the stored rows, not a reading rule.
        wait_until(lambda: _stored(db, run_id)[0] == "lost", 15, "the run marked lost")
        took = time.monotonic() - killed
        status = agent.status()
    finally:
        assert agent.stop() == 0, agent.log()
    assert _stored(db, run_id) == ("lost", ["lost", "lost"])
    assert took < 1.5 * 1.25 + 2.0, took  # lost_after_s, one reaper round, margin
    assert status["pid"] == agent.proc.pid
    row = query.runs(run_id=run_id, config=load_config(overrides={"embedded.path": db}))
    assert row["end_ns"].iloc[0] == row["heartbeat_ns"].iloc[0]  # ended at its last sign


def test_job_sigkill_without_agent_reads_lost(tmp_path, monkeypatch):
    for key, value in HEARTBEAT.items():
        monkeypatch.setenv(key, value)
    proc = job(tmp_path, VICTIM)
    run_id = wait_line(proc, "READY").split()[1]
    config = load_config()
    assert query.runs(run_id=run_id, config=config)["status"].tolist() == ["running"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    wait_until(lambda: query.runs(run_id=run_id, config=config)["status"].tolist()
               == ["lost"], 10, "the run read as lost")
    assert query.tasks(run_id, config=config)["status"].tolist() == ["lost", "lost"]
    assert query.runs(status="lost", config=config)["run_id"].tolist() == [run_id]
    assert query.runs(status="running", config=config).empty
    # Nothing wrote it: the stored row still says running; every reader applies the rule.
    assert _stored(str(tmp_path / "provscope.db"), run_id) == ("running", ["running"] * 2)
    out = subprocess.run([sys.executable, "-c", "import sys; from provscope.cli import main; "
                          "sys.exit(main(['runs']))"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(row for row in out.stdout.splitlines() if run_id[:8] in row)
    assert " lost " in f" {line} ", line


def test_job_sigterm_ends_killed_and_dies_of_the_signal(tmp_path):
    proc = job(tmp_path, VICTIM)
    run_id = wait_line(proc, "READY").split()[1]
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == -signal.SIGTERM  # the exit the job would have had
    assert time.monotonic() - sent < 5.0
    assert _stored(str(tmp_path / "provscope.db"), run_id) == ("killed", ["killed", "killed"])


def test_job_own_sigterm_handler_is_left_alone(tmp_path):
    body = """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))
        import provscope
        with provscope.workflow("own-handler") as run:
            print("READY", run.run_id, flush=True)
            time.sleep(600)
    """
    proc = job(tmp_path, body)
    run_id = wait_line(proc, "READY").split()[1]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 3
    # Its handler raised SystemExit inside the workflow: the run ended failed, as written.
    assert _stored(str(tmp_path / "provscope.db"), run_id)[0] == "failed"


STEPS_JOB = """
    import json, os, time
    import provscope

    rate, seconds = int(os.environ["F_RATE"]), float(os.environ["F_SECONDS"])
    with provscope.workflow("agent-killed") as run:
        print("RUN", run.run_id, flush=True)
        worst, step, start = 0.0, 0, time.monotonic()
        while time.monotonic() - start < seconds:
            t0 = time.perf_counter()
            run.log(step=step, loss=1.0 / (step + 1))
            worst = max(worst, time.perf_counter() - t0)
            step += 1
            time.sleep(max(0.0, start + step / rate - time.monotonic()))
        flushed = run.flush(30.0)
        client = run._sink.stats()["backend"]
    print(json.dumps({"run_id": run.run_id, "steps": step, "worst_step_s": worst,
                      "flushed": flushed, "errors": run.errors, "client": client}))
"""


def test_agent_sigkill_and_restart(influx_own, tmp_path):
    rate, db = 100, "faults_agent_kill"
    agent = Agent(tmp_path, PROVSCOPE_INFLUXDB_URL=influx_own.url,
                  PROVSCOPE_INFLUXDB_DATABASE=db, PROVSCOPE_AGENT_INTERVAL_S="1").start()
    try:
        proc = job(tmp_path, STEPS_JOB, F_RATE=str(rate), F_SECONDS="9")
        run_id = wait_line(proc, "RUN").split()[1]
        time.sleep(1.5)
        influx_own.stop()  # the agent spools from here on
        time.sleep(2.0)
        before = agent.status()["exporters"]["influxdb"]
        agent.kill()
        time.sleep(1.0)
        agent.start()  # a new process on the same socket and spool
        time.sleep(0.5)
        influx_own.start()
        out = result(proc, timeout_s=120)
        steps = out["steps"]
        wait_until(lambda: agent.status()["exporters"]["influxdb"]["spool_bytes"] == 0
                   and len(influx_steps(influx_own, db, run_id)) >= steps - rate,
                   60, "the spool replayed")
        time.sleep(1.0)
        after = agent.status()["exporters"]["influxdb"]
    finally:
        assert agent.stop() == 0, agent.log()
    assert out["errors"] == 0 and out["flushed"]
    assert out["worst_step_s"] < 0.100, out  # no training step stalled
    # Every step's train point arrived exactly once (InfluxDB keeps one point per series
    # and time, so a frame sent to both agents is stored once), in step order.
    arrived = influx_steps(influx_own, db, run_id)
    assert arrived == list(range(steps)), sorted(set(range(steps)) - set(arrived))
    client = out["client"]
    # Nothing was dropped anywhere: the job's client dropped nothing and had every frame
    # acknowledged by an agent (the killed one or its successor) before it exited.
    assert client["points_dropped_total"] == 0, client
    assert client["points_unacknowledged_total"] == 0, client
    assert client["resend_window_records"] == 0, client
    assert client["points_acknowledged_total"] == client["points_written_total"], client
    # The kill found frames not yet durable in the killed agent (its queue, the socket);
    # the job sent them again to its successor.
    assert client["reconnects_total"] >= 1 and client["points_resent_total"] > 0, client
    assert after["points_dropped_total"] == 0, after
    # What the killed agent had spooled was replayed by its successor.
    spooled_before = int(before["points_spooled_total"])
    assert spooled_before > 0 and after["points_replayed_total"] >= 1, (before, after)
    print(f"agent SIGKILL: {steps} steps, 0 lost; {int(client['points_resent_total'])} "
          f"records sent again to the new agent, {spooled_before} points the killed agent "
          f"had spooled all replayed by its successor; worst step "
          f"{out['worst_step_s'] * 1e3:.1f} ms")
