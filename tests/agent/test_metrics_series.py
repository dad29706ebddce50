"""The agent's /metrics scraped by a real Prometheus: the series count does not grow with
the number of runs or layers (10 runs of a 64-layer model leave the series of one)."""

from __future__ import annotations

import time

import pytest
from provscope.agent.daemon import Agent

from provscope.config import load_config
from provscope.records import Point, RunRecord
from provscope.testing.required import unavailable
from provscope.testing.servers import PrometheusServer, ServerUnavailable

LAYERS = 64


def _job(run_id: str) -> tuple[list, RunRecord]:
    """(what one run of a 64-layer model sends while it runs, its end record)."""
    job = {"run_id": run_id, "host": "n1", "rank": "0"}
    out: list = [RunRecord(run_id, name="finetune", status="running", start_ns=1)]
    for step in range(2):
        out.append(Point("train", job, {"step": step, "loss": 0.5, "lr": 1e-3,
                                        "step_time_seconds": 0.1, "my_metric": 1.0}, step))
        out.append(Point("process", job, {"rss_bytes": 1e9, "threads": 4}, step))
        for i in range(LAYERS):
            out.append(Point("layer", {**job, "layer": f"blocks.{i}", "module_type": "Linear"},
                             {"step": step, "grad_norm": 0.5, "weight_norm": 2.0}, step))
    return out, RunRecord(run_id, end_ns=2, status="finished")


def _until(pred, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.integration
def test_ten_runs_of_a_64_layer_model_leave_the_series_count_of_one(sock_path, tmp_path):
    # Layer statistics on: the case with the most series (off is covered in
    # tests/exporters/test_prometheus.py).
    layers = True
    cfg = load_config(overrides={
        "agent.socket_path": str(sock_path), "embedded.path": str(tmp_path / "e.db"),
        "prometheus.enabled": True, "prometheus.port": 0, "prometheus.layers": layers,
    }, environ={})
    with Agent(cfg, collectors=[]) as agent:
        try:
            prom = PrometheusServer([f"127.0.0.1:{agent.prometheus.port}"], interval_s=0.5)
        except ServerUnavailable as exc:
            unavailable(exc)
        pipeline = agent.pipeline
        pipeline.submit(Point("cpu", {"host": "n1"}, {"usage_percent": 5.0}, 1))
        prom.start()
        try:
            def query(q: str) -> list:
                return prom.api("query", query=q)["data"]["result"]

            def scraped_with(run_id: str) -> list | None:
                # The first scrape after the run's points: its info series is there.
                if not query(f'provscope_run_info{{run_id="{run_id}"}}'):
                    return None
                return query('{__name__=~"provscope_.+"}')

            during, after = [], []
            for k in range(10):
                run_id = f"run-{k}"
                points, end = _job(run_id)
                pipeline.submit_many(points)
                assert pipeline.flush(10)
                series = _until(lambda r=run_id: scraped_with(r), f"a scrape of {run_id}")
                during.append(len(series))
                assert {s["metric"].get("run_id") for s in series} == {None, run_id}
                assert all(s["metric"].get("run_slot") in (None, "0") for s in series)
                assert {s["metric"].get("name") for s in series
                        if s["metric"]["__name__"] == "provscope_run_info"} == {"finetune"}
                pipeline.submit(end)
                assert pipeline.flush(10)
                _until(lambda r=run_id: not query(f'provscope_run_info{{run_id="{r}"}}'),
                       f"{run_id} to leave /metrics")
                after.append(len(query('{__name__=~"provscope_.+"}')))
        finally:
            prom.close()
    assert during == [during[0]] * 10, during
    assert after == [1] * 10, after  # only the node's cpu series outlives the runs
    layer_series = LAYERS * 3  # step, grad_norm, weight_norm per layer
    # cpu, info, 5 train fields (4 catalogued + the scalar family), 2 process fields
    assert during[0] == 1 + 1 + 5 + 2 + layer_series


def test_provscope_status_counts_the_fields_metrics_leaves_out(sock_path, tmp_path, capsys,
                                                               monkeypatch):
    import argparse

    from provscope.commands.agent import run_status

    monkeypatch.delenv("PROVSCOPE_CONFIG", raising=False)
    cfg = load_config(overrides={
        "agent.socket_path": str(sock_path), "embedded.path": str(tmp_path / "e.db"),
        "prometheus.enabled": True, "prometheus.port": 0,
    }, environ={})
    with Agent(cfg, collectors=[]) as agent:
        agent.pipeline.submit_many([
            Point("cpu", {"host": "n1"}, {"usage_percent": 1.0, "mystery": 2.0}, 1),
            Point("train", {"run_id": "r", "host": "n1", "rank": "0"}, {"phase": "fit"}, 1),
        ])
        assert agent.pipeline.flush(5)
        args = argparse.Namespace(config=None, overrides=[], socket=str(sock_path),
                                  json=False)
        assert run_status(args) == 0
        url = agent.prometheus.url
    out = capsys.readouterr().out
    assert f"metrics    {url}  (2 fields not exposed)" in out
