"""The agent daemon and its commands: node lock, status, stop deadline, `provscope run`."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from provscope.agent.daemon import Agent, AgentAlreadyRunning, pidfile_path
from provscope.exporters.memory import MemoryExporter
from provscope.exporters.pipeline import Pipeline

from provscope import wire as fr
from provscope.config import load_config
from provscope.job.agent_client import AgentClient
from provscope.records import Point
from provscope.wire import request


def _config(sock_path, tmp_path, **kw):
    over = {"agent.socket_path": str(sock_path), "prometheus.enabled": False,
            "agent.interval_s": 0.1, "embedded.path": str(tmp_path / "e.db"),
            "agent.collectors.nvml.enabled": False, "agent.collectors.amdsmi.enabled": False}
    over.update(kw)
    return load_config(overrides=over, environ={})


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_agent_samples_ingests_and_a_second_agent_refuses(sock_path, tmp_path):
    sink = MemoryExporter()
    cfg = _config(sock_path, tmp_path)
    with Agent(cfg, pipeline=Pipeline([sink], flush_interval_s=0.1)) as agent:
        assert pidfile_path(sock_path).read_text().strip() == str(os.getpid())
        with pytest.raises(AgentAlreadyRunning) as err:
            Agent(cfg).start()
        assert f"pid {os.getpid()}" in str(err.value) and str(sock_path) in str(err.value)
        client = AgentClient.try_connect(cfg, run_id="run-1", rank=0)
        client.submit(Point("train", {"host": "h", "run_id": "run-1"}, {"loss": 1.0}, 5))
        assert client.flush(5)
        measurements = lambda: {r.measurement for r in sink.records}  # noqa: E731
        assert _wait(lambda: {"cpu", "memory", "agent", "provscope", "train",
                              "process"} <= measurements())
        status = request(sock_path, fr.STATUS, None)
        assert status["pid"] == os.getpid() and status["socket"] == str(sock_path)
        assert status["collectors"]["cpu"]["state"] == "active"
        assert status["watched"] == [{"pid": os.getpid(), "run_id": "run-1", "rank": 0}]
        client.shutdown(2)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 5
    assert not sock_path.exists() and not pidfile_path(sock_path).exists()
    assert sink.shut_down
    proc = [r for r in sink.records if r.measurement == "process"]
    assert proc[-1].tags == {"host": agent.host, "run_id": "run-1", "rank": "0"}


def test_a_dead_agents_pid_file_does_not_block_a_new_agent(sock_path, tmp_path):
    sock_path.parent.mkdir(mode=0o700)
    pidfile_path(sock_path).write_text("999999\n")  # left by a crashed agent, no lock held
    with Agent(_config(sock_path, tmp_path), pipeline=Pipeline([MemoryExporter()])):
        assert pidfile_path(sock_path).read_text().strip() == str(os.getpid())


def _cli(*args, sock_path, tmp_path, pre=()):
    base = [sys.executable, "-m", "provscope.cli",
            "--set", f"agent.socket_path={sock_path}", "--set", "prometheus.enabled=false",
            "--set", f"embedded.path={tmp_path / 'e.db'}",
            "--set", "agent.collectors.nvml.enabled=false",
            "--set", "agent.collectors.amdsmi.enabled=false"]
    return base + list(pre) + list(args)  # later --set flags win


def test_foreground_agent_flushes_and_exits_on_sigterm(sock_path, tmp_path):
    proc = subprocess.Popen(_cli("agent", "--interval", "0.2", "--host", "node-a",
                                 sock_path=sock_path, tmp_path=tmp_path),
                            stderr=subprocess.PIPE, text=True)
    try:
        assert _wait(lambda: sock_path.exists(), 30)
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert time.monotonic() - t0 < 10
    finally:
        proc.kill()
        proc.wait()
    assert not sock_path.exists()
    db = sqlite3.connect(tmp_path / "e.db")
    hosts = {h for (h,) in db.execute("select distinct host from points where measurement='cpu'")}
    assert hosts == {"node-a"}


def test_detached_agent_status_and_stop(sock_path, tmp_path):
    out = subprocess.run(_cli("agent", "--detach", sock_path=sock_path, tmp_path=tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "provscope agent started: pid" in out.stdout
    try:
        st = subprocess.run(_cli("status", "--json", sock_path=sock_path, tmp_path=tmp_path),
                            capture_output=True, text=True, timeout=30)
        status = json.loads(st.stdout)
        assert status["socket"] == str(sock_path)
        assert set(status["collectors"]) >= {"cpu", "memory", "disk", "net", "process"}
        again = subprocess.run(_cli("agent", sock_path=sock_path, tmp_path=tmp_path),
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 1
        assert f"an agent already runs on this node (pid {status['pid']}" in again.stderr
    finally:
        stop = subprocess.run(_cli("stop", sock_path=sock_path, tmp_path=tmp_path),
                              capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert not sock_path.exists()
    none = subprocess.run(_cli("status", sock_path=sock_path, tmp_path=tmp_path),
                          capture_output=True, text=True, timeout=30)
    assert none.returncode == 1 and "no agent answers" in none.stderr


_JOB = """
import os, sys, time, signal
open(sys.argv[1], "w").write(os.environ["PROVSCOPE_RUN_ID"] + " " +
                             os.environ["PROVSCOPE_PARENT_TASK_ID"])
signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))
data = bytearray(40_000_000)
x = sum(range(2_000_000))
if sys.argv[2] == "wait":
    time.sleep(30)
sys.exit(3)
"""


def test_run_records_the_command_and_passes_its_exit_code_through(sock_path, tmp_path):
    marker = tmp_path / "env.txt"
    out = subprocess.run(_cli("run", "--name", "train-x", "--", sys.executable, "-c", _JOB,
                              str(marker), "exit", sock_path=sock_path, tmp_path=tmp_path),
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 3, out.stderr
    run_id, parent_task = marker.read_text().split()
    db = sqlite3.connect(tmp_path / "e.db")
    db.row_factory = sqlite3.Row
    run = db.execute("select * from runs where run_id=?", (run_id,)).fetchone()
    assert run["name"] == "train-x" and run["status"] == "failed"
    assert sys.executable in run["command"]
    task = db.execute("select * from tasks where task_id=?", (parent_task,)).fetchone()
    assert task["kind"] == "command" and task["run_id"] == run_id
    assert json.loads(task["result"])["exit_code"] == 3
    assert task["end_ns"] > task["start_ns"]
    resources = json.loads(task["resources"])
    assert resources["cpu_seconds"] > 0.02
    assert resources["peak_rss_bytes"] > 40_000_000
    assert json.loads(task["params"])["cwd"] == str(tmp_path)


def test_run_forwards_sigterm_to_the_command(sock_path, tmp_path):
    marker = tmp_path / "env.txt"
    proc = subprocess.Popen(_cli("run", "--", sys.executable, "-c", _JOB, str(marker), "wait",
                                 sock_path=sock_path, tmp_path=tmp_path),
                            stderr=subprocess.PIPE, text=True)
    try:
        assert _wait(lambda: marker.exists() and marker.read_text(), 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 7
    finally:
        proc.kill()
        proc.wait()


def test_run_without_a_command_says_how_to_use_it(sock_path, tmp_path):
    out = subprocess.run(_cli("run", sock_path=sock_path, tmp_path=tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "run needs a command after --" in out.stderr


_RANK = """
import os, sys, time
from provscope.job.agent_client import AgentClient
from provscope.config import load_config
from provscope.records import Point
client = AgentClient.try_connect(load_config())
assert client is not None, "no agent"
rank = os.environ["RANK"]
client.submit(Point("train", {"host": "h", "run_id": os.environ["PROVSCOPE_RUN_ID"],
                              "rank": rank}, {"loss": 1.0}, time.time_ns()))
client.flush(5)
time.sleep(2.5)  # long enough for the process collector to sample this rank
client.shutdown(2)
"""

_LAUNCHER = """
import os, subprocess, sys
procs = [subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=dict(os.environ, RANK=str(r)))
         for r in range(2)]
sys.exit(max(p.wait() for p in procs))
"""


def test_run_tags_each_ranks_process_tree_with_its_rank(sock_path, tmp_path):
    out = subprocess.run(_cli("run", "--", sys.executable, "-c", _LAUNCHER, _RANK,
                              sock_path=sock_path, tmp_path=tmp_path,
                              pre=("--set", "agent.interval_s=0.2")),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    db = sqlite3.connect(tmp_path / "e.db")
    [(run_id,)] = db.execute("select run_id from runs").fetchall()
    ranks = {r for (r,) in db.execute(
        "select distinct rank from points where measurement='process' and run_id=?", (run_id,))}
    assert {"0", "1"} <= {str(r) for r in ranks if r is not None}
    train = {str(r) for (r,) in db.execute(
        "select rank from points where measurement='train' and run_id=?", (run_id,))}
    assert train == {"0", "1"}


def test_agent_flags_map_onto_settings(sock_path):
    from provscope.cli import build_parser
    from provscope.commands.agent import _config

    args = build_parser().parse_args([
        "agent", "--interval", "2.5", "--influx-url", "http://i:8086", "--lineage-url",
        "postgresql://u@db/l", "--no-prometheus", "--host", "node-7", "--socket",
        str(sock_path)])
    cfg = _config(args)
    assert cfg.agent.interval_s == 2.5 and cfg.influxdb.url == "http://i:8086"
    assert cfg.lineage.url == "postgresql://u@db/l" and cfg.prometheus.enabled is False
    assert cfg.host_name == "node-7" and cfg.agent.socket_path == str(sock_path)


def test_a_required_collector_that_cannot_open_stops_the_start_and_frees_the_lock(
        sock_path, tmp_path, monkeypatch):
    from provscope.errors import CollectorUnavailable

    monkeypatch.setitem(sys.modules, "pynvml", None)  # as on a node without nvidia-ml-py

    cfg = _config(sock_path, tmp_path, **{"agent.collectors.nvml.enabled": True,
                                          "agent.collectors.nvml.on_startup_error": "error"})
    with pytest.raises(CollectorUnavailable, match="nvml"):
        Agent(cfg, pipeline=Pipeline([MemoryExporter()])).start()
    assert not pidfile_path(sock_path).exists() and not sock_path.exists()
    with Agent(_config(sock_path, tmp_path), pipeline=Pipeline([MemoryExporter()])):
        pass  # the node is free again


def test_a_job_that_learns_its_run_later_is_watched_from_then_on(sock_path, tmp_path):
    cfg = _config(sock_path, tmp_path)
    with Agent(cfg, pipeline=Pipeline([MemoryExporter()])) as agent:
        client = AgentClient.try_connect(cfg)  # no run yet: nothing to tag a tree with
        assert client.flush(2) and _wait(lambda: agent.ingest.connections == 1)
        assert agent.watch.snapshot() == []
        client.set_identity(run_id="late-run", rank=1)
        assert _wait(lambda: [(w.run_id, w.rank) for w in agent.watch.snapshot()]
                     == [("late-run", 1)])
        client.shutdown(1)


def test_run_still_runs_the_command_when_no_agent_can_start(sock_path, tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        out = subprocess.run(_cli("run", "--name", "no-agent", "--", sys.executable, "-c",
                                  "import sys; sys.exit(5)", sock_path=sock_path,
                                  tmp_path=tmp_path,
                                  pre=("--set", "prometheus.enabled=true",
                                       "--set", f"prometheus.port={port}")),
                             capture_output=True, text=True, timeout=120)
        agent = subprocess.run(_cli("agent", sock_path=sock_path, tmp_path=tmp_path,
                                    pre=("--set", "prometheus.enabled=true",
                                         "--set", f"prometheus.port={port}")),
                               capture_output=True, text=True, timeout=60)
    finally:
        busy.close()
    assert out.returncode == 5
    assert "running without node telemetry" in out.stderr
    assert "Traceback" not in out.stderr
    db = sqlite3.connect(tmp_path / "e.db")
    assert db.execute("select name, status from runs").fetchall() == [("no-agent", "failed")]
    assert agent.returncode == 1
    assert agent.stderr.strip().splitlines()[-1].startswith("provscope: agent cannot start:")
    assert "Traceback" not in agent.stderr
