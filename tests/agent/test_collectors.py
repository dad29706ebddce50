"""Collectors: values from fixture sources, the catalogue contract, NVML/amdsmi policies."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import psutil
import pytest
from provscope.agent.collectors.amdsmi import AmdSmiCollector
from provscope.agent.collectors.base import Collector
from provscope.agent.collectors.cpu import CpuCollector
from provscope.agent.collectors.disk import DiskCollector
from provscope.agent.collectors.filesystem import FilesystemCollector
from provscope.agent.collectors.health import HealthCollector
from provscope.agent.collectors.memory import MemoryCollector
from provscope.agent.collectors.net import NetCollector
from provscope.agent.collectors.nvml import NvmlCollector
from provscope.agent.collectors.process import ProcessCollector, Watched, WatchList
from provscope.exporters.influxdb.sanitize import REASONS
from provscope.exporters.memory import MemoryExporter
from provscope.exporters.pipeline import Pipeline

from provscope.errors import CollectorUnavailable

NOW = 1_700_000_000_000_000_000


def _all_collectors(ps, nvml, amd):
    watch = WatchList()
    watch.add(4242, "run-1", 0)
    proc = ProcessCollector("h", watch)
    pipeline = Pipeline([MemoryExporter()])
    stats = {"uptime_seconds": 1.0, "points_collected_total": 5.0, "ingest_points_total": 0.0,
             "ingest_records_total": 0.0, "ingest_frames_total": 0.0,
             "ingest_frames_rejected_total": 0.0, "ingest_points_rejected_total": 0.0,
             "ingest_connections": 0,
             "collector_errors_total": 0.0, "ticks_skipped_total": 0.0, "collectors_active": 9,
             "collect_overruns_total": 0.0,
             "points_total": 10.0}
    return [
        CpuCollector("h", ps), MemoryCollector("h", ps), DiskCollector("h", ps),
        NetCollector("h", ps), FilesystemCollector("h", ["/"], ps),
        NvmlCollector("h", nvml, pid_map=lambda: {4242: Watched(4242, "run-1", 0)}),
        AmdSmiCollector("h", amd, pid_map=lambda: {4242: Watched(4242, "run-1", 0)}),
        HealthCollector("h", pipeline, lambda: stats), proc,
    ], pipeline


def test_every_collector_emits_exactly_its_declared_specs(fake_psutil, fake_nvml, fake_amdsmi):
    nvml = fake_nvml(processes={0: [(4242, 2 << 30)]})
    collectors, pipeline = _all_collectors(fake_psutil, nvml, fake_amdsmi)
    try:
        for c in collectors:
            assert isinstance(c, Collector)
            c.open()
            points = list(c.collect(NOW)) + list(c.collect(NOW + 10**9))
            declared = {(s.measurement, s.field): s for s in c.specs()}
            emitted = set()
            for p in points:
                for field, value in p.fields.items():
                    spec = declared.get((p.measurement, field))
                    assert spec is not None, f"{c.name}: {p.measurement}.{field} not declared"
                    assert set(p.tags) <= set(spec.tags), f"{c.name}: tags {set(p.tags)}"
                    assert p.time_ns in (NOW, NOW + 10**9)
                    if spec.dtype == "int":
                        assert type(value) is int, f"{p.measurement}.{field} must be int"
                    else:
                        assert isinstance(value, float), f"{p.measurement}.{field}: {value!r}"
                    emitted.add((p.measurement, field))
            if c.name == "process":
                continue  # pid 4242 is not a real process here; see the process tests
            if c.name == "amdsmi":
                # The NVML-only fields (clock events, NVLink, Xid, GPM, ...) stay out.
                amd = {"up", "utilization_percent", "memory_utilization_percent",
                       "memory_used_bytes", "memory_total_bytes", "power_watts",
                       "energy_joules_total", "temperature_celsius",
                       "memory_temperature_celsius", "sm_clock_hertz", "memory_clock_hertz",
                       "ecc_corrected_errors_total", "ecc_uncorrected_errors_total",
                       "pcie_replay_errors_total"}
                assert emitted == {("gpu", f) for f in amd} | {
                    ("gpu_process", "memory_used_bytes"), ("gpu_process", "processes")}
                c.close()
                continue
            expected = set(declared)
            if c.name == "health":  # only an exporter with an on-disk spool reports these
                expected -= {("provscope", f) for f in
                             ("points_spooled_total", "points_replayed_total", "spool_bytes")}
                # and only one that leaves fields out (the Prometheus exporter) this one
                expected -= {("provscope", "fields_skipped_total")}
                # and only a store with a sanitisation policy (InfluxDB, embedded) these
                expected -= {("provscope", f) for f in (
                    "points_rejected_total", "fields_rejected_total",
                    *(f"rejected_{r}_total" for r in REASONS))}
            assert emitted == expected, f"{c.name}: missing {expected - emitted}"
            c.close()
    finally:
        pipeline.shutdown(1)


def test_cpu_percentages_come_from_deltas_of_cumulative_times(fake_psutil):
    cpu = CpuCollector("h", fake_psutil)
    cpu.open()
    [p] = cpu.collect(NOW)
    # deltas: user 60, system 20, idle 100, iowait 20 -> total 200
    assert p.fields["user_percent"] == pytest.approx(30.0)
    assert p.fields["idle_percent"] == pytest.approx(50.0)
    assert p.fields["usage_percent"] == pytest.approx(40.0)
    assert p.fields["frequency_hertz"] == 2.4e9
    assert p.fields["load1"] == 1.5
    assert p.tags == {"host": "h"}


def test_disk_skips_partitions_and_loop_devices_and_reports_busy_seconds(fake_psutil):
    points = DiskCollector("h", fake_psutil).collect(NOW)
    assert sorted(p.tags["device"] for p in points) == ["nvme0n1", "sda"]
    sda = next(p for p in points if p.tags["device"] == "sda")
    assert sda.fields["busy_seconds_total"] == 1.5
    assert sda.fields["written_bytes_total"] == 8192.0


def test_net_leaves_loopback_out_by_default(fake_psutil):
    points = NetCollector("h", fake_psutil).collect(NOW)
    assert [p.tags["interface"] for p in points] == ["eth0"]
    assert points[0].fields["receive_bytes_total"] == 2000.0
    assert points[0].fields["transmit_drops_total"] == 4.0


def test_filesystem_skips_a_missing_path_and_logs_it_once(fake_psutil, caplog):
    fs = FilesystemCollector("h", ["/", "/missing"], fake_psutil)
    with caplog.at_level(logging.INFO, logger="provscope.collectors.filesystem"):
        for _ in range(3):
            points = fs.collect(NOW)
    assert [p.tags["path"] for p in points] == ["/"]
    assert sum("/missing" in r.getMessage() for r in caplog.records) == 1
    assert fs.add_path("/data") and "/data" in fs.paths


def test_real_machine_collectors_sample_in_well_under_a_millisecond_each():
    for c in (CpuCollector("h"), MemoryCollector("h"), DiskCollector("h"), NetCollector("h"),
              FilesystemCollector("h", ["/"])):
        c.open()
        c.collect(time.time_ns())
        t0 = time.perf_counter()
        points = c.collect(time.time_ns())
        took = time.perf_counter() - t0
        assert points or c.name in ("disk", "net"), c.name
        assert took < 0.05, f"{c.name} took {took:.4f}s"
        c.close()


# ------------------------------------------------------------------------------- AMD


def test_amdsmi_normalises_units_and_leaves_missing_getters_out(fake_amdsmi):
    c = AmdSmiCollector("h", fake_amdsmi)
    c.open()
    for t in range(3):
        gpus = {p.tags["gpu"]: p for p in c.collect(NOW + t * 10**9) if p.measurement == "gpu"}
    gpu = gpus["0"]
    assert gpu.fields["up"] == 1
    assert gpu.fields["memory_total_bytes"] == 65536 * 1024.0 * 1024.0
    assert gpu.fields["energy_joules_total"] == pytest.approx(2_000_000 * 15.3 / 1e6)
    assert gpu.fields["sm_clock_hertz"] == 2.1e9
    assert gpu.fields["ecc_corrected_errors_total"] == 3.0
    assert gpu.fields["pcie_replay_errors_total"] == 12.0
    assert gpu.fields["memory_temperature_celsius"] == 80.0
    assert "power_watts" not in gpu.fields  # NOT_SUPPORTED on this firmware: never asked again
    assert fake_amdsmi.calls["amdsmi_get_power_info"] == 1 + 3  # gpu 0 once, gpu 1 each time
    assert gpu.tags["gpu_uuid"] == "amd-uuid-0"
    assert gpus["1"].fields["power_watts"] == 650.0


def test_amdsmi_reads_hotspot_where_the_edge_sensor_is_missing(fake_amdsmi):
    c = AmdSmiCollector("h", fake_amdsmi)
    c.open()
    for t in range(3):
        gpus = {p.tags["gpu"]: p for p in c.collect(NOW + t * 10**9) if p.measurement == "gpu"}
    assert gpus["0"].fields["temperature_celsius"] == 55.0  # edge
    assert gpus["1"].fields["temperature_celsius"] == 71.0  # MI300: hotspot/junction
    # The missing edge sensor is asked once: 3 samples x (core + VRAM) + 1 failed edge.
    assert fake_amdsmi.calls["amdsmi_get_temp_metric"] == 3 * 2 * 2 + 1


@pytest.mark.parametrize("old_api", [False, True])
def test_amdsmi_process_lists_of_old_and_new_releases_map_to_ranks(fake_amdsmi_factory,
                                                                   old_api):
    smi = fake_amdsmi_factory(old_process_api=old_api)
    pids = {4242: Watched(4242, "r", 0), 4243: Watched(4243, "r", 1)}
    c = AmdSmiCollector("h", smi, pid_map=lambda: pids)
    c.open()
    procs = {p.tags["rank"]: p.fields for p in c.collect(NOW) if p.measurement == "gpu_process"}
    assert procs == {"0": {"memory_used_bytes": float(1 << 30), "processes": 1},
                     "1": {"memory_used_bytes": float(2 << 30), "processes": 1}}
    # At most every 5 s, like NVML.
    for t in range(1, 11):
        c.collect(NOW + t * 10**9)
    assert smi.calls["amdsmi_get_gpu_process_list"] == 3 * 2


def test_amdsmi_errors_are_retried_and_a_gpu_that_answers_nothing_is_down(fake_amdsmi):
    from .conftest import AmdSmiLibraryException

    c = AmdSmiCollector("h", fake_amdsmi)
    c.open()
    c.collect(NOW)
    names = [n for n in dir(fake_amdsmi) if n.startswith("amdsmi_get_")
             and n not in ("amdsmi_get_processor_handles", "amdsmi_get_gpu_device_uuid")]
    for name in names:
        fake_amdsmi.fail[("h1", name)] = [AmdSmiLibraryException(8)] * 3  # TIMEOUT
    gpus = {p.tags["gpu"]: p for p in c.collect(NOW + 10**9) if p.measurement == "gpu"}
    assert gpus["1"].fields == {"up": 0} and gpus["0"].fields["up"] == 1
    for name in names:
        fake_amdsmi.fail[("h1", name)] = []
    gpus = {p.tags["gpu"]: p for p in c.collect(NOW + 3 * 10**9) if p.measurement == "gpu"}
    assert gpus["1"].fields["up"] == 1 and gpus["1"].fields["utilization_percent"] == 77.0


def test_amdsmi_not_importable_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    with pytest.raises(CollectorUnavailable, match="amdsmi"):
        AmdSmiCollector("h").open()


# ------------------------------------------------------------------------------- process

_TREE = """
import multiprocessing as mp, sys, time
def work(n):
    x = 0
    for i in range(n):
        x += i
    time.sleep(3)
if __name__ == "__main__":
    mp.set_start_method("fork")
    ps = [mp.Process(target=work, args=(3_000_000,)) for _ in range(2)]
    [p.start() for p in ps]
    print("ready", flush=True)
    data = bytearray(30_000_000)
    sys.stdin.readline()
"""


def test_process_tree_includes_workers_and_keeps_cpu_of_exited_children():
    child = subprocess.Popen([sys.executable, "-c", _TREE], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        watch = WatchList()
        watch.add(child.pid, "run-x", 3)
        c = ProcessCollector("h", watch)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            [p] = c.collect(time.time_ns())
            if p.fields["processes"] == 3 and p.fields["cpu_seconds_total"] > 0.1:
                break
            time.sleep(0.1)
        assert p.tags == {"host": "h", "run_id": "run-x", "rank": "3"}
        assert p.fields["processes"] == 3
        assert p.fields["rss_bytes"] > 30_000_000
        assert p.fields["threads"] >= 3 and p.fields["open_files"] >= 3
        before = p.fields["cpu_seconds_total"]
        for worker in psutil.Process(child.pid).children():
            worker.kill()
        time.sleep(0.3)
        [after] = c.collect(time.time_ns())
        assert after.fields["processes"] == 1
        assert after.fields["cpu_seconds_total"] >= before  # exited workers keep counting
        assert set(c.pids_of()) == {child.pid}
    finally:
        child.kill()
        child.wait()
    assert c.collect(time.time_ns()) == []
    assert len(watch) == 0  # an exited root is forgotten


def test_a_registered_rank_is_not_counted_again_in_its_launchers_tree():
    launcher = subprocess.Popen([sys.executable, "-c",
                                 "import subprocess,sys,time;"
                                 "p=subprocess.Popen([sys.executable,'-c','import time;"
                                 "time.sleep(30)']);print(p.pid,flush=True);time.sleep(30)"],
                                stdout=subprocess.PIPE, text=True)
    try:
        rank_pid = int(launcher.stdout.readline())
        watch = WatchList()
        watch.add(launcher.pid, "r", None)
        watch.add(rank_pid, "r", 0)
        points = ProcessCollector("h", watch).collect(time.time_ns())
        by_rank = {p.tags.get("rank"): p.fields["processes"] for p in points}
        assert by_rank == {None: 1, "0": 1}
    finally:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            p.kill()
        launcher.kill()
        launcher.wait()


def test_children_map_reads_the_hierarchy_from_a_procfs_tree(tmp_path):
    from provscope.agent.collectors.process import children_map

    stats = {
        1: "1 (systemd) S 0 1 1 0",
        10: "10 (torchrun) S 1 10 10 0",
        11: "11 (python) R 10 10 10 0",
        12: "12 (pt_data_worker (0)) S 11 10 10 0",  # comm with a space and parentheses
        13: "13 (weird) name)) S 11 10 10 0",
    }
    for pid, line in stats.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(line + "\n")
    (tmp_path / "self").mkdir()  # not a pid
    (tmp_path / "99").mkdir()  # exited between listing and reading: no stat file
    m = children_map(tmp_path)
    assert {k: sorted(v) for k, v in m.items()} == {0: [1], 1: [10], 10: [11], 11: [12, 13]}
    assert children_map(tmp_path / "missing") is None
