"""Points the stores refuse are visible: `provscope status`, the agent's health series
(measurement ``provscope``) and ``/metrics``, each with exact counts by reason."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.request

from provscope.agent.daemon import Agent

from provscope.config import load_config
from provscope.job.agent_client import AgentClient
from provscope.records import Point


def _wait(pred, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_rejections_show_in_status_health_series_and_metrics(sock_path, tmp_path):
    db = tmp_path / "e.db"
    cfg = load_config(overrides={
        "agent.socket_path": str(sock_path), "agent.interval_s": 0.1,
        "embedded.path": str(db), "prometheus.enabled": True, "prometheus.port": 0,
        "agent.collectors.nvml.enabled": False, "agent.collectors.amdsmi.enabled": False,
    }, environ={})
    with Agent(cfg) as agent:
        client = AgentClient.try_connect(cfg, run_id="run-1", rank=0)
        tags = {"host": "h", "run_id": "run-1", "rank": "0"}
        client.submit(Point("train", tags, {"loss": 1.0, "step": 1}, 1))
        client.submit(Point("train", tags, {"loss": "diverged", "step": 2}, 2))  # value
        client.submit(Point("train", tags, {"loss": math.nan}, 3))  # point: no field left
        client.submit(Point("", tags, {"loss": 1.0}, 4))  # point: empty measurement
        assert client.flush(5)
        client.shutdown(2)
        want = {"points_rejected_total": 2, "fields_rejected_total": 2,
                "rejected_type_conflict_total": 1, "rejected_invalid_value_total": 1,
                "rejected_no_field_total": 1, "rejected_invalid_name_total": 1}

        def embedded_stats():
            return agent.status()["exporters"]["embedded"]

        assert _wait(lambda: all(embedded_stats().get(k) == v for k, v in want.items())), \
            embedded_stats()
        cli = subprocess.run(
            [sys.executable, "-m", "provscope.cli", "--set", f"agent.socket_path={sock_path}",
             "status"], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        line = next(x for x in cli.stdout.splitlines() if x.startswith("rejected"))
        assert "embedded: 2 points, 2 values" in line
        for reason in ("invalid_name 1", "invalid_value 1", "no_field 1", "type_conflict 1"):
            assert reason in line
        as_json = json.loads(subprocess.run(
            [sys.executable, "-m", "provscope.cli", "--set", f"agent.socket_path={sock_path}",
             "status", "--json"], capture_output=True, text=True, timeout=60).stdout)
        assert as_json["exporters"]["embedded"]["rejected_type_conflict_total"] == 1

        def metrics() -> str:
            with urllib.request.urlopen(agent.prometheus.url, timeout=5) as r:
                return r.read().decode()

        expected = ['provscope_rejected_type_conflict_total{component="embedded"',
                    'provscope_points_rejected_total{component="embedded"']
        assert _wait(lambda: all(e in metrics() for e in expected)), metrics()
        text = metrics()
        line = next(x for x in text.splitlines()
                    if x.startswith('provscope_points_rejected_total{component="embedded"'))
        assert line.endswith(" 2.0")
    # The health series in the store itself (measurement provscope, component embedded).
    import sqlite3

    with sqlite3.connect(db) as conn:
        (value,) = conn.execute(
            "SELECT value FROM points WHERE measurement = 'provscope' AND "
            "field = 'rejected_type_conflict_total' AND tags LIKE '%embedded%' "
            "ORDER BY time_ns DESC LIMIT 1").fetchone()
    assert value == 1.0
