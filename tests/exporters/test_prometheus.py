"""Prometheus exporter: catalogue names, expiry, promtool lint, and a real Prometheus scrape."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request

import pytest
from provscope.exporters.prometheus import PrometheusExporter

from provscope.records import Point
from provscope.testing.servers import PrometheusServer, ServerUnavailable

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _points(t=1):
    return [
        Point("cpu", {"host": "n1"}, {"usage_percent": 12.5, "logical_cpus": 8}, t),
        Point("disk", {"host": "n1", "device": "sda"}, {"read_bytes_total": 4096.0}, t),
        Point("gpu", {"host": "n1", "gpu": "0", "gpu_uuid": "GPU-1"},
              {"energy_joules_total": 10.0, "temperature_celsius": 60.0}, t),
        # Unbounded or unknown labels and fields never reach /metrics.
        Point("cpu", {"host": "n1", "step": "123"}, {"usage_percent": 13.0, "mystery": 1.0}, t),
        Point("train", {"host": "n1", "run_id": "r", "rank": "0"}, {"phase": "fit"}, t),
    ]


@pytest.fixture
def exporter():
    e = PrometheusExporter("127.0.0.1", 0, expire_s=0.5)
    yield e
    e.shutdown(1)


def _scrape(e: PrometheusExporter) -> str:
    with urllib.request.urlopen(e.url, timeout=5) as r:
        return r.read().decode()


def test_names_help_types_and_labels_come_from_the_catalogue(exporter):
    exporter.export(_points())
    text = _scrape(exporter)
    assert "# TYPE provscope_disk_read_bytes_total counter" in text
    assert 'provscope_disk_read_bytes_total{device="sda",host="n1"} 4096.0' in text
    assert "# HELP provscope_gpu_energy_joules_total Energy the board consumed" in text
    assert "# TYPE provscope_cpu_usage_percent gauge" in text
    assert 'provscope_cpu_usage_percent{host="n1"} 13.0' in text  # latest value wins
    assert "step=" not in text and "mystery" not in text and "phase" not in text
    assert "_created" not in text and "python_gc" not in text  # own registry only
    assert exporter.skipped == 2


def test_series_not_updated_for_expire_s_disappear(exporter):
    exporter.export(_points())
    time.sleep(0.3)
    exporter.export([Point("cpu", {"host": "n1"}, {"usage_percent": 1.0}, 2)])
    time.sleep(0.35)
    text = _scrape(exporter)
    assert "provscope_cpu_usage_percent" in text
    assert "provscope_disk_read_bytes_total" not in text


def test_promtool_finds_nothing_to_complain_about(exporter):
    promtool = shutil.which("promtool")
    if not promtool:
        if IN_CI:
            pytest.fail("promtool missing in CI")
        pytest.skip("promtool not installed")
    from provscope.catalogue import specs

    # Every catalogued series at once, as a fully loaded agent would expose them.
    batch = []
    for s in specs():
        if s.dtype == "str":
            continue
        tags = {t: "x" for t in s.tags}
        batch.append(Point(s.measurement, tags, {s.field: 1 if s.dtype == "int" else 1.0}, 1))
    exporter.export(batch)
    text = _scrape(exporter)
    assert text.count("# TYPE ") > 100
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), \
        proc.stdout + proc.stderr


@pytest.mark.integration
def test_a_real_prometheus_scrapes_the_agents_metrics(exporter):
    try:
        # An int interval: the config must say "1s"; Prometheus rejects "1.0s".
        prom = PrometheusServer([f"127.0.0.1:{exporter.port}"], interval_s=1)
    except ServerUnavailable as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    exporter._expire_s = 600
    exporter.export(_points())
    prom.start()
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline:
            targets = prom.api("targets")["data"]["activeTargets"]
            health = targets[0]["health"] if targets else None
            if health == "up":
                break
            time.sleep(0.5)
        assert health == "up"
        while time.monotonic() < deadline:
            result = prom.api("query", query="provscope_disk_read_bytes_total")["data"]["result"]
            if result:
                break
            time.sleep(0.5)
        assert result[0]["metric"]["device"] == "sda"
        assert result[0]["metric"]["host"] == "n1"
        assert float(result[0]["value"][1]) == 4096.0
    finally:
        prom.close()
