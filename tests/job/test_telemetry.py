"""In-job telemetry: with no agent the job samples the node, its process tree and its GPUs
into its own pipeline, with the agent's measurement names and tags."""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time

import pytest
from provscope.exporters.memory import MemoryExporter
from provscope.exporters.pipeline import Pipeline

import provscope
from provscope import query
from provscope.catalogue.system import BY_COLLECTOR
from provscope.config import load_config
from provscope.errors import CollectorUnavailable
from provscope.job import api as client
from provscope.job import sink, telemetry
from provscope.records import Point


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """A private embedded file, no agent, no inherited run identity."""
    for name in ("PROVSCOPE_RUN_ID", "PROVSCOPE_PARENT_TASK_ID", "PROVSCOPE_RANK", "RANK",
                 "PROVSCOPE_ENABLED", "PROVSCOPE_CONFIG", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    sink.shutdown_all(1.0, forget=True)
    sink.set_factory(None)
    monkeypatch.setattr(client, "_implicit", None)

    def make(**overrides):
        base = {"embedded.path": str(tmp_path / "prov.db"),
                "agent.socket_path": str(tmp_path / "no-agent.sock"),
                "host": "node-t"}
        return load_config(environ={}, overrides={**base, **overrides})

    yield make
    sink.shutdown_all(5.0, forget=True)


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "provscope-telemetry"]


def _wait_for_first_sample(cfg) -> None:
    """Collectors open on the sampling thread; a job shorter than that gets the final
    sample only. Wait for the start sample so that both are there to compare."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got = sink.get_sink(cfg).stats().get("telemetry") or {}
        if all(c["samples"] for name, c in got.get("collectors", {}).items() if name != "nvml"):
            return
        time.sleep(0.02)
    raise AssertionError("the sampler took no first sample within 10 s")


def test_a_short_job_with_no_agent_records_node_and_process_series(settings):
    cfg = settings()
    with provscope.workflow("short", settings=cfg) as run:
        run.log(step=0, loss=1.0)
        assert run.sink_mode == "embedded"
        assert len(_sampler_threads()) == 1
        sum(i * i for i in range(200_000))  # some CPU time of its own
        _wait_for_first_sample(cfg)
    sink.shutdown_all(10.0, forget=True)  # stops the sampler (final sample) and drains
    assert not _sampler_threads()

    for measurement, field in (("cpu", "logical_cpus"), ("memory", "used_bytes")):
        rows = query.points(measurement, field, config=cfg)
        assert len(rows) >= 2, measurement  # one sample at start, one at shutdown
        assert set(rows["host"]) == {"node-t"}
        assert (rows["value"] > 0).all()
    proc = query.points("process", config=cfg)
    assert set(proc["run_id"]) == {run.run_id}
    assert set(proc["rank"]) == {"0"} and set(proc["host"]) == {"node-t"}
    cpu = proc[proc["field"] == "cpu_seconds_total"]["value"]
    assert len(cpu) >= 2 and cpu.iloc[-1] > 0 and cpu.is_monotonic_increasing
    assert (proc[proc["field"] == "processes"]["value"] >= 1).all()
    assert (proc[proc["field"] == "rss_bytes"]["value"] > 0).all()
    # the catalogue's measurement names: what the agent's collectors declare
    for name in ("cpu", "memory", "disk", "net", "process"):
        for meas in BY_COLLECTOR[name]:
            assert not query.points(meas, config=cfg).empty, meas


def test_the_setting_turns_it_off(settings):
    cfg = settings(**{"client.telemetry": False})
    with provscope.workflow("quiet", settings=cfg) as run:
        run.log(step=0, loss=1.0)
        assert not _sampler_threads()
    sink.shutdown_all(10.0, forget=True)
    assert not query.points("train", "loss", config=cfg).empty
    for meas in ("cpu", "memory", "process", "disk", "net"):
        assert query.points(meas, config=cfg).empty, meas


def test_the_collector_list_selects_collectors(settings):
    cfg = settings(**{"client.telemetry_collectors": ["memory"]})
    with provscope.workflow("mem-only", settings=cfg) as run:
        run.log(step=0, loss=1.0)
    sink.shutdown_all(10.0, forget=True)
    assert not query.points("memory", config=cfg).empty
    assert query.points("cpu", config=cfg).empty and query.points("process", config=cfg).empty


def _child_counts(queue) -> None:
    run = provscope.current_run()
    run.log(worker_items=3.0)  # no step: written at once, starting the child's own pipeline
    queue.put((len(_sampler_threads()), sink.all_sinks()[0].mode))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_no_sampler_in_a_forked_child(settings):
    cfg = settings()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with provscope.workflow("forks", settings=cfg) as run:
        run.log(step=0, loss=1.0)
        assert len(_sampler_threads()) == 1
        proc = ctx.Process(target=_child_counts, args=(queue,))
        proc.start()
        threads, mode = queue.get(timeout=60)
        proc.join(60)
    assert proc.exitcode == 0
    assert mode == "embedded"  # the child records through a pipeline of its own...
    assert threads == 0  # ...but samples nothing: the parent's tree covers it
    sink.shutdown_all(10.0, forget=True)
    assert not query.points("train", "worker_items", config=cfg).empty


class _Exploding:
    name = "cpu"

    def __init__(self) -> None:
        self.calls = 0

    def open(self) -> None:
        pass

    def collect(self, now_ns: int):
        self.calls += 1
        raise RuntimeError("sensor exploded")

    def close(self) -> None:
        pass

    def specs(self):
        return []


class _Steady:
    name = "memory"

    def open(self) -> None:
        pass

    def collect(self, now_ns: int):
        return [Point("memory", {"host": "h"}, {"used_bytes": 1.0}, now_ns)]

    def close(self) -> None:
        pass

    def specs(self):
        return []


class _Unopenable(_Steady):
    name = "nvml"

    def open(self) -> None:
        raise CollectorUnavailable("nvml: no GPU here")


def test_a_collector_that_raises_is_disabled_and_counted_and_never_reaches_the_job(settings):
    cfg = settings(**{"client.telemetry_interval_s": 0.1})
    exporter = MemoryExporter()
    pipeline = Pipeline([exporter], flush_interval_s=0.05)
    bad = _Exploding()
    tel = telemetry.JobTelemetry(cfg, pipeline.submit_many, pipeline,
                                 collectors=[bad, _Steady(), _Unopenable()]).start()
    deadline = time.monotonic() + 10
    while tel.stats()["disabled"] != ["cpu"] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the others sample on
    tel.stop()
    pipeline.flush(5.0)
    stats = tel.stats()
    assert stats["disabled"] == ["cpu"]
    assert bad.calls == telemetry.MAX_FAILURES  # disabled: never called again
    assert stats["collector_errors"] == telemetry.MAX_FAILURES
    assert stats["collectors"]["cpu"]["state"] == "disabled"
    assert stats["collectors"]["nvml"]["state"] == "unavailable"
    assert stats["collectors"]["memory"]["samples"] >= 3
    assert len(exporter.records) == stats["points"] >= 3
    pipeline.shutdown(5.0)


def test_sink_stats_report_the_sampler(settings):
    cfg = settings()
    with provscope.workflow("stats", settings=cfg) as run:
        run.log(step=0, loss=1.0)
        time.sleep(0.2)
        got = sink.get_sink(cfg).stats()["telemetry"]
    assert got["collector_errors"] == 0 and not got["disabled"]
    assert got["collectors"]["process"]["state"] == "active"


def test_starting_never_blocks_on_a_slow_collector(settings):
    cfg = settings()
    opened = threading.Event()

    class Slow(_Steady):
        def open(self) -> None:
            time.sleep(1.0)  # nvmlInit on a big node
            opened.set()

    pipeline = Pipeline([MemoryExporter()])
    t0 = time.perf_counter()
    tel = telemetry.JobTelemetry(cfg, pipeline.submit_many, pipeline,
                                 collectors=[Slow()]).start()
    assert time.perf_counter() - t0 < 0.5
    assert opened.wait(10)
    tel.stop()
    pipeline.shutdown(5.0)


# ----------------------------------------------------------------------------- GPUs

_GPUS = [{"host": "h", "gpu": str(i), "gpu_uuid": f"GPU-{i}aaa-{i}bbb"} for i in range(4)]


def test_gpus_of_the_job_from_torch_first_then_cuda_visible_devices():
    no_torch = lambda: None  # noqa: E731
    # torch holds memory on these devices: they win over the environment
    assert telemetry.job_gpus(_GPUS, {"CUDA_VISIBLE_DEVICES": "0,1"},
                              lambda: {"GPU-2aaa-2bbb"}) == {2}
    assert telemetry.job_gpus(_GPUS, {"CUDA_VISIBLE_DEVICES": "1,3"}, no_torch) == {1, 3}
    assert telemetry.job_gpus(_GPUS, {"CUDA_VISIBLE_DEVICES": "GPU-3aaa"}, no_torch) == {3}
    assert telemetry.job_gpus(_GPUS, {"CUDA_VISIBLE_DEVICES": "2,-1,3"}, no_torch) == {2}
    assert telemetry.job_gpus(_GPUS, {"CUDA_VISIBLE_DEVICES": ""}, no_torch) == set()
    assert telemetry.job_gpus(_GPUS, {"CUDA_VISIBLE_DEVICES": "7"}, no_torch) == set()
    assert telemetry.job_gpus(_GPUS, {}, no_torch) == set()  # no GPU in use: none


class _FakeNvml:
    """The pynvml names NvmlCollector calls, for four GPUs."""

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_AGGREGATE_ECC = 1
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1

    class _Util:
        gpu, memory = 50, 20

    class _Mem:
        used, total = 1 << 30, 16 << 30

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return 4

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h}aaa-{h}bbb"

    def nvmlDeviceGetUtilizationRates(self, h):
        return self._Util()

    def nvmlDeviceGetMemoryInfo(self, h):
        return self._Mem()

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return []

    def __getattr__(self, name):
        def unsupported(*a):
            raise AttributeError(name)
        return unsupported


def test_the_nvml_collector_reads_only_the_jobs_gpus(monkeypatch):
    from provscope.agent.collectors.nvml import NvmlCollector

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-2aaa,1")
    monkeypatch.setattr(telemetry, "_torch_device_uuids", lambda: None)
    nv = NvmlCollector(socket.gethostname(), nvml_module=_FakeNvml(),
                       devices=lambda tags: telemetry.job_gpus(tags, None, lambda: None))
    nv.open()
    points = nv.collect(time.time_ns())
    assert sorted((p.tags["gpu"], p.tags["gpu_uuid"]) for p in points) == [
        ("1", "GPU-1aaa-1bbb"), ("2", "GPU-2aaa-2bbb")]
    assert all(p.measurement == "gpu" and p.fields["utilization_percent"] == 50.0
               for p in points)
    agent_wide = NvmlCollector("h", nvml_module=_FakeNvml())
    agent_wide.open()
    assert len(agent_wide.collect(time.time_ns())) == 4  # the agent reads them all


def test_the_job_walks_its_own_tree_only_and_finds_grandchildren():
    import subprocess
    import sys

    from provscope.agent.collectors.process import children_map, tree_children_map

    # a child that starts a grandchild, both alive while we look
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
            "print(p.pid, flush=True); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        mine = tree_children_map([os.getpid()])
        if mine is None:
            pytest.skip("this kernel has no /proc/<pid>/task/<tid>/children files")
        assert child.pid in mine[os.getpid()] and mine[child.pid] == [grandchild]
        # only the tree below the roots is read, and it agrees with the whole-node scan
        assert tree_children_map([child.pid]) == {child.pid: [grandchild], grandchild: []}
        assert children_map()[child.pid] == [grandchild]
    finally:
        child.kill()
        child.wait()
        subprocess.run(["kill", str(grandchild)], check=False)
