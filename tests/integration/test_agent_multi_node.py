"""Many nodes: three agents with distinct host identities write to ONE real InfluxDB and
ONE real PostgreSQL; every host's series and lineage rows arrive."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from provscope.agent.daemon import Agent

from provscope.config import load_config
from provscope.ids import new_id
from provscope.job.agent_client import AgentClient
from provscope.records import Point, RunRecord, TaskRecord

pytestmark = pytest.mark.integration

HOSTS = ("node-a", "node-b", "node-c")


def test_three_agents_write_every_hosts_series_and_rows(influx_server, influx_db, postgres_url):
    root = Path(tempfile.mkdtemp(prefix="ps-mn-", dir="/tmp"))
    agents, runs = [], {}
    try:
        for host in HOSTS:
            cfg = load_config(environ={}, overrides={
                "host": host,
                "agent.socket_path": str(root / host / "agent.sock"),
                "agent.interval_s": 0.2,
                "agent.collectors.nvml.enabled": False,
                "agent.collectors.amdsmi.enabled": False,
                "prometheus.enabled": False,
                "influxdb.url": influx_server.url,
                "influxdb.database": influx_db,
                "influxdb.flush_interval_s": 0.2,
                "influxdb.spool_dir": str(root / host / "spool"),
                "lineage.url": postgres_url,
                "lineage.flush_interval_s": 0.2,
            })
            agent = Agent(cfg).start()
            agents.append(agent)
            client = AgentClient.try_connect(cfg, run_id=None)
            run_id, task_id = new_id(), new_id()
            runs[host] = run_id
            client.submit(RunRecord(run_id, name=f"job-{host}", host=host, status="running",
                                    start_ns=time.time_ns()))
            client.submit(TaskRecord(task_id, run_id, name="step", task_kind="step", host=host,
                                     rank=0, start_ns=time.time_ns()))
            client.submit(Point("train", {"host": host, "run_id": run_id, "rank": "0"},
                                {"loss": 0.5}, time.time_ns()))
            assert client.flush(5)
            client.shutdown(2)
        time.sleep(1.5)
    finally:
        for agent in agents:
            agent.stop(10)
        shutil.rmtree(root, ignore_errors=True)

    def tag_values(measurement: str) -> set[str]:
        res = influx_server.query(f'SHOW TAG VALUES FROM "{measurement}" WITH KEY = "host"',
                                  influx_db)
        series = res["results"][0].get("series") or [{"values": []}]
        return {v[1] for v in series[0]["values"]}

    for measurement in ("cpu", "memory", "agent", "provscope", "train"):
        assert tag_values(measurement) == set(HOSTS), measurement
    engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as conn:
        rows = conn.execute(sa.text("select host, run_id from runs")).all()
        tasks = conn.execute(sa.text("select host from tasks")).all()
    engine.dispose()
    assert {(h, r) for h, r in rows} == {(h, runs[h]) for h in HOSTS}
    assert sorted(h for (h,) in tasks) == sorted(HOSTS)
