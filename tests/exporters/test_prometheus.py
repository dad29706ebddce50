"""Prometheus exporter: catalogue names, bounded series, expiry, promtool lint, and a real
Prometheus scrape."""

from __future__ import annotations

import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from provscope.exporters.prometheus import (
    BOUNDED_LABELS,
    LAYER_LABELS,
    PrometheusExporter,
    labels_of,
    metric_name,
)

from provscope.catalogue import specs
from provscope.records import Point, RunRecord
from provscope.testing.required import require_binary, unavailable
from provscope.testing.servers import PrometheusServer, ServerUnavailable


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
    assert exporter.skipped_by_reason == {"not_catalogued": 1, "not_numeric": 1}
    assert exporter.stats()["fields_skipped_total"] == 2


def test_series_not_updated_for_expire_s_disappear(exporter):
    exporter.export(_points())
    time.sleep(0.3)
    exporter.export([Point("cpu", {"host": "n1"}, {"usage_percent": 1.0}, 2)])
    time.sleep(0.35)
    text = _scrape(exporter)
    assert "provscope_cpu_usage_percent" in text
    assert "provscope_disk_read_bytes_total" not in text


def test_promtool_finds_nothing_to_complain_about():
    promtool = require_binary("promtool", "prometheus")
    exporter = PrometheusExporter(serve=False, layers=True)
    # Every catalogued series at once, as a fully loaded agent would expose them, with
    # layer statistics on, a user scalar and a run.
    batch = []
    for s in specs():
        if s.dtype == "str":
            continue
        tags = {t: "x" for t in s.tags}
        batch.append(Point(s.measurement, tags, {s.field: 1 if s.dtype == "int" else 1.0}, 1))
    batch.append(Point("train", {"run_id": "x", "host": "x", "rank": "0"}, {"my_metric": 1.0}, 1))
    batch.append(RunRecord("x", name="finetune"))
    exporter.export(batch)
    text = exporter.render().decode()
    assert text.count("# TYPE ") > 100
    assert "provscope_run_info" in text and "provscope_train_scalar" in text
    assert "provscope_layer_grad_norm" in text and exporter.skipped == 0
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
        unavailable(exc)
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


# ---------------------------------------------------------------- bounded series

LAYERS = 64


def _samples(text: str) -> list:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _job(run_id: str, *, end: bool = True, rank: str = "0", layers: int = LAYERS,
         steps: int = 3) -> list:
    """What one run of a 64-layer model sends the agent: its start record, train points
    (catalogued and user scalars), process and per-GPU points, layer statistics for
    every layer and one parameter, then its end record."""
    out: list = [RunRecord(run_id, name="finetune", status="running", start_ns=1)]
    job = {"run_id": run_id, "host": "n1", "rank": rank}
    for step in range(steps):
        out.append(Point("train", job, {"step": step, "loss": 1.0 / (step + 1), "lr": 1e-3,
                                        "step_time_seconds": 0.1, "my_metric": 2.0,
                                        "phase": "fit"}, step))
        out.append(Point("process", job, {"rss_bytes": 1e9, "cpu_seconds_total": 1.0}, step))
        out.append(Point("gpu_process", {**job, "gpu": "0", "gpu_uuid": "GPU-1"},
                         {"memory_used_bytes": 1e9}, step))
        for i in range(layers):
            layer = {**job, "layer": f"blocks.{i}", "module_type": "Linear"}
            out.append(Point("layer", layer, {"step": step, "grad_norm": 0.5,
                                              "activation_mean": 0.1, "weight_norm": 3.0},
                             step))
            out.append(Point("layer_param", {**layer, "param": "weight"},
                             {"grad_norm": 0.4}, step))
    if end:
        out.append(RunRecord(run_id, end_ns=2, status="finished"))
    return out


def test_no_label_takes_unbounded_values():
    for spec in specs():
        labels = labels_of(spec)
        assert labels is not None, f"{spec.measurement}.{spec.field}: tag not classified"
        assert "run_id" not in labels
        assert set(labels) <= BOUNDED_LABELS | LAYER_LABELS | {"run_slot"}


def test_one_prefix_and_one_name_per_field():
    names = [metric_name(s) for s in specs()]
    assert len(set(names)) == len(names)
    assert all(n.startswith("provscope_") and not n.startswith("provscope_provscope_")
               for n in names)
    assert metric_name(next(s for s in specs() if s.measurement == "provscope"
                            and s.field == "points_dropped_total")) \
        == "provscope_points_dropped_total"


@pytest.mark.parametrize("layers", [False, True])
def test_series_count_is_independent_of_runs_and_layers(layers):
    e = PrometheusExporter(serve=False, layers=layers)
    e.export([Point("cpu", {"host": "n1"}, {"usage_percent": 5.0}, 1)])
    during, after = [], []
    for k in range(10):
        job = _job(f"run-{k}")
        e.export(job[:-1])
        text = e.render().decode()
        during.append(len(_samples(text)))
        assert f'run_id="run-{k}"' in text and 'name="finetune"' in text
        assert 'run_slot="0"' in text and 'run_slot="1"' not in text
        e.export(job[-1:])
        after.append(len(_samples(e.render().decode())))
    assert during == [during[0]] * 10 and after == [1] * 10
    text = e.render().decode()
    assert "run_id" not in text  # the last run ended: no info series left
    # Fewer layers cannot mean more series: 64 layers vs 8 layers differ by exactly the
    # layer series (none when layers are off).
    small = PrometheusExporter(serve=False, layers=layers)
    small.export([Point("cpu", {"host": "n1"}, {"usage_percent": 5.0}, 1)])
    small.export(_job("r", end=False, layers=8))
    per_layer = 4 + 1  # layer fields + layer_param fields
    assert during[0] - len(_samples(small.render().decode())) \
        == ((LAYERS - 8) * per_layer if layers else 0)


def test_runs_that_never_end_free_their_slot_after_expire_s():
    e = PrometheusExporter(serve=False, expire_s=0.3)
    e.export(_job("a", end=False, layers=2))
    first = len(_samples(e.render().decode()))
    time.sleep(0.45)  # "a" is superseded: nothing for expire_s
    e.export(_job("b", end=False, layers=2))
    text = e.render().decode()
    assert len(_samples(text)) == first
    assert 'run_id="b"' in text and 'run_id="a"' not in text and 'run_slot="0"' in text


def test_runs_active_at_once_get_their_own_slot_and_info():
    e = PrometheusExporter(serve=False)
    e.export(_job("a", end=False, layers=0) + _job("b", end=False, layers=0, rank="1"))
    info = {s.labels["run_id"]: s.labels for s in _samples(e.render().decode())
            if s.name == "provscope_run_info"}
    assert info["a"]["run_slot"] == "0" and info["b"]["run_slot"] == "1"
    assert info["b"]["rank"] == "1" and info["a"]["name"] == "finetune"
    losses = {s.labels["run_slot"]: s.value for s in _samples(e.render().decode())
              if s.name == "provscope_train_loss"}
    assert set(losses) == {"0", "1"}
    e.export([RunRecord("a", end_ns=5, status="finished")])
    e.export(_job("c", end=False, layers=0))  # takes the slot "a" freed
    info = {s.labels["run_id"]: s.labels["run_slot"] for s in _samples(e.render().decode())
            if s.name == "provscope_run_info"}
    assert info == {"b": "1", "c": "0"}
    # A late point of the ended run is counted, not written under another run's slot.
    e.export([Point("process", {"run_id": "a", "host": "n1", "rank": "0"},
                    {"rss_bytes": 1.0}, 9)])
    assert e.skipped_by_reason["run_ended"] == 1


def test_rank_is_the_same_label_on_every_series_of_a_run():
    e = PrometheusExporter(serve=False)
    e.export([
        Point("train", {"run_id": "r", "host": "n1", "rank": "0"}, {"loss": 1.0}, 1),
        Point("process", {"run_id": "r", "host": "n1", "rank": "0"}, {"rss_bytes": 1.0}, 1),
        # A tree registered without a rank (a launcher above the ranks).
        Point("process", {"run_id": "r", "host": "n1"}, {"rss_bytes": 2.0}, 1),
    ])
    ranks = {(s.name, s.labels["rank"]) for s in _samples(e.render().decode())
             if "rank" in s.labels}
    assert ("provscope_train_loss", "0") in ranks
    assert ("provscope_process_rss_bytes", "0") in ranks
    assert ("provscope_process_rss_bytes", "none") in ranks
    assert all(r for _, r in ranks)  # never rank=""


def test_uncatalogued_scalars_share_one_family_and_the_rest_is_counted():
    e = PrometheusExporter(serve=False, max_scalar_names=2)
    e.export([Point("train", {"run_id": "r", "host": "n1", "rank": "0"},
                    {"my_metric": 1.5, "other": 2.5, "third": 3.5}, 1)])
    got = {s.labels["name"]: s.value for s in _samples(e.render().decode())
           if s.name == "provscope_train_scalar"}
    assert got == {"my_metric": 1.5, "other": 2.5}
    assert e.skipped_by_reason == {"scalar_names_limit": 1}


def test_layer_statistics_only_when_asked():
    off = PrometheusExporter(serve=False)
    off.export(_job("r", end=False, layers=3, steps=1))
    text = off.render().decode()
    assert "provscope_layer_" not in text and "layer=" not in text
    assert off.skipped_by_reason["layers_off"] == 3 * 5
    on = PrometheusExporter(serve=False, layers=True)
    on.export(_job("r", end=False, layers=3, steps=1))
    grads = [s for s in _samples(on.render().decode()) if s.name == "provscope_layer_grad_norm"]
    assert len(grads) == 3
    assert set(grads[0].labels) == {"host", "rank", "run_slot", "layer", "module_type"}


def test_the_series_limit_holds_and_counts():
    e = PrometheusExporter(serve=False, max_series=100)
    e.export([Point("disk", {"host": "n1", "device": f"d{i}"}, {"read_bytes_total": 1.0}, 1)
              for i in range(150)])
    assert e.series == 100 and e.skipped_by_reason == {"series_limit": 50}


def test_skipped_fields_reach_the_self_metrics_on_metrics():
    from provscope.agent.collectors.health import HealthCollector
    from provscope.exporters.pipeline import Pipeline

    e = PrometheusExporter(serve=False)
    pipeline = Pipeline([e], flush_interval_s=0.05)
    try:
        pipeline.submit_many([Point("cpu", {"host": "n1"}, {"mystery": 1.0}, 1)])
        assert pipeline.flush(5)
        pipeline.submit_many(HealthCollector("n1", pipeline).collect(2))
        assert pipeline.flush(5)
        got = [s for s in _samples(e.render().decode())
               if s.name == "provscope_fields_skipped_total"]
        assert [(s.labels, s.value) for s in got] == \
            [({"component": "prometheus", "host": "n1"}, 1.0)]
    finally:
        pipeline.shutdown(2)
