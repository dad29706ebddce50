"""``provscope demo`` end to end, as a user runs it (a subprocess), on the embedded store."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from provscope import query
from provscope.config import load_config
from provscope.destinations import safe_url


def _env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVSCOPE_")}
    env["PROVSCOPE_AGENT_SOCKET_PATH"] = str(tmp_path / "no-agent.sock")
    return env


def _demo(tmp_path, *args: str, code: str | None = None,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", code] if code else [sys.executable, "-m", "provscope.cli"]
    return subprocess.run([*argv, "demo", *args], cwd=tmp_path, env=_env(tmp_path) | (env or {}),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.torch
@pytest.mark.slow
def test_demo_trains_records_and_prints_the_summary(tmp_path):
    pytest.importorskip("torch")
    proc = _demo(tmp_path, "--seconds", "3", "--out", "ckpt")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    run_id = re.search(r"^\s+run\s+(\S+)$", out, re.M).group(1)
    assert f"provscope show {run_id}" in out
    assert f"time series  SQLite {tmp_path / 'provscope.db'}\n" in out
    assert f"lineage      SQLite {tmp_path / 'provscope.db'}\n" in out  # absolute, not a URL
    assert re.search(r"^\s+final loss\s+\d+\.\d+ \(eval \d+\.\d+\)$", out, re.M)
    assert re.search(r"^\s+wall time\s+[\d.]+ s", out, re.M)
    assert (tmp_path / "ckpt" / "model.pt").stat().st_size > 10_000

    settings = load_config(environ={}, overrides={"embedded.path": str(tmp_path / "provscope.db")})
    runs = query.runs(config=settings)
    assert runs["run_id"].tolist() == [run_id] and runs["status"].tolist() == ["finished"]
    tasks = query.tasks(run_id, config=settings)
    assert {"epoch", "eval", "checkpoint"} <= set(tasks["kind"])
    tasks_line = re.search(r"^\s+tasks\s+(\d+) recorded", out, re.M).group(1)
    assert int(tasks_line) == len(tasks)
    ents = query.entities(run_id, config=settings)
    assert {"dataset", "checkpoint"} <= set(ents["kind"])
    loss = query.points("train", "loss", run_id=run_id, config=settings)
    points_line = int(re.search(r"^\s+points\s+(\d+) written", out, re.M).group(1))
    assert len(loss) >= 1 and points_line >= len(loss)


def test_demo_without_torch_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['torch'] = None; from provscope.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = _demo(tmp_path, "--seconds", "1", code=code)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "provscope: provscope demo needs PyTorch; install it with pip install 'provscope[torch]'"]


def test_demo_rejects_a_lineage_url_it_cannot_use_in_one_line(tmp_path):
    proc = _demo(tmp_path, "--lineage-url", "mysql://db/x")
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert "--lineage-url 'mysql://db/x' is not allowed" in line and "postgresql://" in line


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.integration
def test_demo_writes_to_influxdb_and_postgresql_when_given_their_urls(
        tmp_path, influx_server, influx_db, postgres_url):
    pytest.importorskip("torch")
    proc = _demo(tmp_path, "--steps", "30", "--no-progress", "--influx-url", influx_server.url,
                 "--lineage-url", postgres_url,
                 env={"PROVSCOPE_INFLUXDB_DATABASE": influx_db,
                      "PROVSCOPE_INFLUXDB_SPOOL_DIR": str(tmp_path / "spool")})
    assert proc.returncode == 0, proc.stderr
    assert f"InfluxDB {influx_server.url} (v1, database {influx_db})" in proc.stdout
    # Where data went, without the database user (URLs are shown without credentials).
    assert f"lineage      {safe_url(postgres_url)}\n" in proc.stdout
    assert "postgres@" not in proc.stdout
    run_id = re.search(r"^\s+run\s+(\S+)$", proc.stdout, re.M).group(1)
    assert not (tmp_path / "provscope.db").exists()
    assert influx_server.count(influx_db, "train", "loss") == 30
    settings = load_config(environ={}, overrides={"lineage.url": postgres_url})
    tasks = query.tasks(run_id, config=settings)
    assert {"epoch", "eval", "checkpoint"} <= set(tasks["kind"])
