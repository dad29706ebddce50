"""A detached agent writes where it was started, and says where (status, log, startup)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from provscope.agent.daemon import Agent

from provscope.config import load_config
from provscope.records import Point

CLI = [sys.executable, "-m", "provscope.cli", "--set", "prometheus.enabled=false",
       "--set", "agent.collectors.nvml.enabled=false",
       "--set", "agent.collectors.amdsmi.enabled=false"]

JOB = textwrap.dedent("""
    import provscope

    with provscope.workflow("beside-agent") as run:
        run.log(loss=0.25)
    print(run.run_id, run.sink_mode, flush=True)
""")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_detached_agent_with_defaults_writes_where_it_was_started(tmp_path):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    root_db = Path("/provscope.db")
    root_before = root_db.stat().st_mtime_ns if root_db.exists() else None
    out = _cli("agent", "--detach", cwd=start)
    assert out.returncode == 0, out.stderr
    db = start / "provscope.db"
    try:
        assert f"records go to: time series -> SQLite {db}; lineage -> SQLite {db}" \
            in out.stdout
        status = _cli("status", "--json", cwd=elsewhere)
        assert status.returncode == 0, status.stderr
        where = json.loads(status.stdout)["destinations"]
        assert where["time_series"] == f"SQLite {db}" and where["lineage"] == f"SQLite {db}"
        assert Path(where["spool"]).is_absolute()
        text = _cli("status", cwd=elsewhere).stdout
        assert f"series     SQLite {db}\n" in text and f"lineage    SQLite {db}\n" in text
        job = subprocess.run([sys.executable, "-c", JOB], cwd=elsewhere, capture_output=True,
                             text=True, timeout=120)
        assert job.returncode == 0, job.stderr[-2000:]
        run_id, mode = job.stdout.split()
        assert mode == "agent"
    finally:
        stopped = _cli("stop", cwd=elsewhere)
    assert stopped.returncode == 0, stopped.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("select name from runs where run_id = ?", (run_id,)).fetchall() \
            == [("beside-agent",)]
    assert not (elsewhere / "provscope.db").exists()
    assert (root_db.stat().st_mtime_ns if root_db.exists() else None) == root_before
    sock = Path(os.environ["PROVSCOPE_AGENT_SOCKET_PATH"])
    log = (sock.parent / "agent.log").read_text()
    started = log.index("agent started: pid")
    assert f"records go to: time series -> SQLite {db}" in log[started:started + 600]


def test_an_agent_anchors_relative_paths_to_its_start_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides={"prometheus.enabled": False, "embedded.path": "data/a.db",
                                 "influxdb.spool_dir": "spool"})
    (tmp_path / "data").mkdir()
    agent = Agent(cfg, collectors=[])
    monkeypatch.chdir("/")  # what --detach does before the pipeline opens its files
    with agent:
        assert agent.config.embedded.path == str(tmp_path / "data" / "a.db")
        status = agent.status()
        agent.pipeline.submit(Point("cpu", {"host": "h"}, {"usage_percent": 1.0}, 1))
    assert status["destinations"] == {
        "time_series": f"SQLite {tmp_path / 'data' / 'a.db'}",
        "lineage": f"SQLite {tmp_path / 'data' / 'a.db'}",
        "spool": str(tmp_path / "spool"),
    }
    with sqlite3.connect(tmp_path / "data" / "a.db") as conn:
        assert conn.execute("select count(*) from points").fetchone() == (1,)
    assert not Path("/data/a.db").exists()


def test_status_and_the_first_log_lines_carry_no_credentials(tmp_path, caplog, monkeypatch):
    import logging

    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides={"prometheus.enabled": False,
                                 "influxdb.url": "http://writer:pw123@127.0.0.1:9/",
                                 "influxdb.spool_dir": str(tmp_path / "spool"),
                                 "influxdb.create_database": False})
    with caplog.at_level(logging.INFO, logger="provscope.agent"), \
            Agent(cfg, collectors=[]) as agent:
        status = agent.status()
    assert status["destinations"]["time_series"] == \
        "InfluxDB http://127.0.0.1:9 (v1, database provscope)"
    text = json.dumps(status) + "\n".join(r.getMessage() for r in caplog.records)
    assert "pw123" not in text and "writer" not in text
    assert any("records go to: time series -> InfluxDB http://127.0.0.1:9" in r.getMessage()
               for r in caplog.records)
