"""Where a job's records go when a node agent listens, and what a job says about it.

A real agent (its own embedded SQLite store) listens on the test's default socket (the
autouse fixture in tests/conftest.py makes that socket private to the test).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from provscope.agent.daemon import Agent

import provscope
from provscope import query
from provscope.config import load_config
from provscope.job import api as client
from provscope.job import sink
from provscope.wire import default_socket_path, socket_path


@pytest.fixture(autouse=True)
def fresh_sinks(monkeypatch):
    sink.shutdown_all(1.0, forget=True)
    sink.set_factory(None)
    monkeypatch.setattr(client, "_implicit", None)
    yield
    sink.shutdown_all(5.0, forget=True)


@pytest.fixture
def agent(tmp_path):
    """A node agent on the default socket, writing to <tmp>/agent/provscope.db."""
    home = tmp_path / "agent"
    home.mkdir()
    cfg = load_config(overrides={"prometheus.enabled": False, "embedded.path": "provscope.db"})
    old = os.getcwd()
    os.chdir(home)  # the agent's relative path means its own start directory
    try:
        node = Agent(cfg, collectors=[]).start()
    finally:
        os.chdir(old)
    assert node.socket_path == socket_path(load_config())  # the job's default socket
    yield node
    node.stop(5)


def _runs(db: Path) -> list[tuple[str, str]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("select run_id, name from runs").fetchall()
        except sqlite3.OperationalError:  # no tables: nothing was ever written there
            return []


def _wait(pred, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def _train(name: str, settings=None) -> provscope.Run:
    with provscope.workflow(name, settings=settings) as run, run.task("work"):
        run.log(step=1, loss=0.5)
    assert run.flush(20)
    return run


def _watched(agent: Agent, run_id: str) -> bool:
    return any(w.pid == os.getpid() and w.run_id == run_id for w in agent.watch.snapshot())


def test_the_default_socket_is_private_to_each_test():
    assert str(default_socket_path()).startswith(os.environ["XDG_RUNTIME_DIR"])
    assert os.environ["PROVSCOPE_AGENT_SOCKET_PATH"].startswith(os.environ["XDG_RUNTIME_DIR"])


def test_a_job_with_default_settings_sends_its_records_to_the_agent(agent, tmp_path):
    run = _train("via-agent")
    assert run.sink_mode == "agent"
    agent.pipeline.flush(10)
    assert _wait(lambda: (run.run_id, "via-agent") in _runs(tmp_path / "agent" / "provscope.db"))
    assert not (tmp_path / "provscope.db").exists()  # the job's own default file unused


def test_a_job_that_names_its_own_file_keeps_its_records_and_is_still_watched(agent, tmp_path):
    own = tmp_path / "job" / "mine.db"
    own.parent.mkdir()
    run = _train("own-file", settings={"embedded.path": str(own)})
    assert run.sink_mode == "embedded"
    assert _runs(own) == [(run.run_id, "own-file")]
    agent.pipeline.flush(10)
    assert _runs(tmp_path / "agent" / "provscope.db") == []
    # The agent still watches the job's process tree (its node telemetry).
    assert _wait(lambda: _watched(agent, run.run_id))
    assert f"SQLite {own}" in run._sink.where and str(agent.socket_path) in run._sink.where


def test_a_destination_from_the_environment_counts_too(agent, tmp_path, monkeypatch):
    monkeypatch.setenv("PROVSCOPE_EMBEDDED_PATH", "env.db")  # relative: the job's directory
    run = _train("own-env")
    assert run.sink_mode == "embedded"
    assert _runs(tmp_path / "env.db") == [(run.run_id, "own-env")]
    assert _runs(tmp_path / "agent" / "provscope.db") == []


def test_a_job_naming_the_agents_own_store_uses_the_agent(agent, tmp_path):
    same = str(tmp_path / "agent" / "provscope.db")
    run = _train("same-store", settings={"embedded.path": same})
    assert run.sink_mode == "agent"


def test_client_destination_forces_either_way(agent, tmp_path):
    forced = _train("forced-agent", settings={"embedded.path": str(tmp_path / "x.db"),
                                              "client.destination": "agent"})
    assert forced.sink_mode == "agent" and not (tmp_path / "x.db").exists()
    sink.shutdown_all(5.0, forget=True)
    own = _train("forced-own", settings={"client.destination": "own"})
    assert own.sink_mode == "embedded"
    assert _runs(tmp_path / "provscope.db") == [(own.run_id, "forced-own")]
    assert _wait(lambda: _watched(agent, own.run_id))


@pytest.mark.integration
def test_a_job_with_its_own_servers_writes_there_beside_an_agent(
        agent, tmp_path, influx_server, influx_db, postgres_url):
    settings = {"influxdb.url": influx_server.url, "influxdb.database": influx_db,
                "influxdb.flush_interval_s": 0.1, "lineage.url": postgres_url,
                "lineage.flush_interval_s": 0.1}
    run = _train("own-servers", settings=settings)
    assert run.sink_mode == "embedded"
    assert influx_server.count(influx_db, "train", "loss") == 1
    runs = query.runs(config=load_config(overrides=settings))
    assert list(runs["run_id"]) == [run.run_id]
    agent.pipeline.flush(10)
    assert _runs(tmp_path / "agent" / "provscope.db") == []
    assert "InfluxDB http://127.0.0.1:" in run._sink.where
    assert "postgresql://127.0.0.1:" in run._sink.where and "postgres@" not in run._sink.where


def test_the_first_line_at_info_says_where_records_go(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="provscope.client"):
        run = _train("says-where", settings={"embedded.path": "rel/p.db"})
    lines = [r.getMessage() for r in caplog.records if "go to" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"(pid {os.getpid()}) go to time series -> SQLite {tmp_path / 'rel' / 'p.db'}" \
        in lines[0]
    assert run.sink_mode == "embedded"


def test_the_first_line_names_the_agent_and_where_it_writes(agent, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="provscope.client"):
        _train("says-agent")
    line = next(r.getMessage() for r in caplog.records if "go to" in r.getMessage())
    assert f"the node agent on {agent.socket_path}" in line
    assert f"SQLite {tmp_path / 'agent' / 'provscope.db'}" in line


# ----------------------------------------------------------------------------- bad input


def test_a_typo_in_settings_is_one_line_and_the_valid_settings_are_kept(tmp_path, caplog):
    settings = {"embedded.path": str(tmp_path / "kept.db"), "client.no_agnt": "drop",
                "torch.every": 0}
    with caplog.at_level(logging.ERROR, logger="provscope.client"):
        run = _train("typo", settings=settings)
        _train("typo-again", settings=settings)  # the same mistake is not repeated
    assert run.config.embedded.path == str(tmp_path / "kept.db")
    assert _runs(tmp_path / "kept.db")[0] == (run.run_id, "typo")
    lines = [r.getMessage() for r in caplog.records if r.name == "provscope.client"]
    assert len(lines) == 2, lines
    unknown = next(line for line in lines if "client.no_agnt" in line)
    assert unknown.startswith("provscope: workflow(settings=...): unknown key 'client.no_agnt'")
    assert "did you mean 'client.no_agent'?" in unknown
    bad = next(line for line in lines if "torch.every" in line)
    assert "workflow(settings=...): torch.every = 0 is not allowed" in bad
    assert "greater than or equal to 1" in bad


def test_a_bad_environment_value_names_the_variable(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PROVSCOPE_CLIENT_NO_AGENT", "maybe")
    with caplog.at_level(logging.ERROR, logger="provscope.client"):
        run = _train("env-typo", settings={"embedded.path": str(tmp_path / "e.db")})
    assert run.config.embedded.path == str(tmp_path / "e.db")
    lines = [r.getMessage() for r in caplog.records if r.name == "provscope.client"]
    assert len(lines) == 1
    assert "PROVSCOPE_CLIENT_NO_AGENT: client.no_agent = 'maybe' is not allowed; " \
        "allowed: 'embedded' or 'drop'" in lines[0]


def test_a_bad_yaml_setting_names_the_file(tmp_path, caplog):
    path = tmp_path / "job.yaml"
    path.write_text(f"embedded:\n  path: {tmp_path / 'y.db'}\ntorch:\n  evry: 3\n")
    with caplog.at_level(logging.ERROR, logger="provscope.client"):
        run = _train("yaml-typo", settings=str(path))
    assert run.config.embedded.path == str(tmp_path / "y.db")
    lines = [r.getMessage() for r in caplog.records if r.name == "provscope.client"]
    assert len(lines) == 1 and f"{path}: unknown key 'torch.evry'" in lines[0]


UNKNOWN_VAR_SCRIPT = textwrap.dedent("""
    import provscope

    for name in ("a", "b"):
        with provscope.workflow(name) as run:
            run.log(loss=1.0)
    print("done", flush=True)
""")


def test_an_unknown_provscope_variable_is_reported_once_and_the_job_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVSCOPE_")}
    env["PROVSCOPE_EMBEDED_PATH"] = str(tmp_path / "typo.db")
    proc = subprocess.run([sys.executable, "-c", UNKNOWN_VAR_SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "done"
    mentions = [line for line in proc.stderr.splitlines() if "PROVSCOPE_EMBEDED_PATH" in line]
    assert len(mentions) == 1, proc.stderr
    assert "did you mean PROVSCOPE_EMBEDDED_PATH?" in mentions[0]
    assert not (tmp_path / "typo.db").exists()  # never applied
    assert (tmp_path / "provscope.db").exists()
