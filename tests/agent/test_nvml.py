"""The NVML collector against a fake pynvml with the real library's names, return shapes
and error codes: per-device and per-field failures, decoded clock events, Xid events,
GPM, MIG, device selection by UUID and per-process memory."""

from __future__ import annotations

import logging
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from provscope.agent.collectors.nvml import NvmlCollector, decode_clock_events
from provscope.agent.collectors.nvml_devices import cuda_uuid, resolve_cuda_device
from provscope.agent.collectors.process import Watched

from provscope.errors import CollectorUnavailable

from .conftest import GPU_IS_LOST, NO_PERMISSION, NOT_SUPPORTED, NVMLError

NOW = 1_700_000_000_000_000_000
S = 10**9


def _gpus(points):
    return {p.tags.get("gpu"): p for p in points if p.measurement == "gpu"}


def _down(point) -> bool:
    """A GPU reported as not answering: up = 0 and nothing but its Xid count."""
    return point.fields["up"] == 0 and set(point.fields) <= {"up", "xid_errors_total",
                                                             "last_xid"}


_OPENED: list[NvmlCollector] = []


def _opened(nv, **kw):
    c = NvmlCollector("h", nv, **kw)
    c.open()
    _OPENED.append(c)
    return c


@pytest.fixture(autouse=True)
def _close_collectors():
    """Each collector's Xid thread ends with its test."""
    yield
    while _OPENED:
        _OPENED.pop().close()


# ------------------------------------------------------------------------- basics


def test_nvml_missing_library_makes_the_collector_unavailable(fake_nvml):
    with pytest.raises(CollectorUnavailable, match="NVML cannot start"):
        NvmlCollector("h", fake_nvml(missing_library=True)).open()


def test_nvml_without_nvidia_ml_py_installed_is_unavailable_not_a_crash(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(CollectorUnavailable, match="nvidia-ml-py"):
        NvmlCollector("h").open()


def test_fields_in_base_units_and_unsupported_ones_never_asked_again(fake_nvml, caplog):
    nv = fake_nvml()
    with caplog.at_level(logging.INFO, logger="provscope.collectors.nvml"):
        c = _opened(nv)
        for i in range(5):
            points = c.collect(NOW + i * S)
    assert nv.init_calls == 1
    gpu0, gpu1 = _gpus(points)["0"], _gpus(points)["1"]
    assert gpu0.tags == {"host": "h", "gpu": "0", "gpu_uuid": "GPU-0000-0"}
    f = gpu0.fields
    assert f["up"] == 1 and gpu1.fields["up"] == 1
    assert f["power_watts"] == 300.0 and f["power_limit_watts"] == 700.0
    assert f["energy_joules_total"] == 5000.0
    assert f["sm_clock_hertz"] == 1.98e9
    assert f["memory_free_bytes"] == float(70 << 30)
    assert f["encoder_utilization_percent"] == 3.0 and f["decoder_utilization_percent"] == 5.0
    assert f["power_violation_seconds_total"] == 2.0  # 2e9 ns
    assert f["thermal_violation_seconds_total"] == 4.0
    assert f["ecc_corrected_errors_total"] == 7.0
    assert f["nvlink_transmit_bytes_total"] == 138_000 * 1024.0  # KiB counter
    assert f["memory_temperature_celsius"] == 82_000.0
    assert f["pcie_replay_errors_total"] == 94_000.0
    assert f["remapped_rows_pending"] == 0 and type(f["remapped_rows_pending"]) is int
    assert f["nvlink_crc_flit_errors_total"] == 38_000.0
    # GPU 1: MIG mode (no device utilisation), no ECC, no NVLink.
    assert "utilization_percent" not in gpu1.fields
    assert "ecc_corrected_errors_total" not in gpu1.fields
    assert "nvlink_receive_bytes_total" not in gpu1.fields
    assert "nvlink_replay_errors_total" not in gpu1.fields
    assert gpu1.fields["pcie_receive_bytes_total"] == 198_000.0
    # NOT_SUPPORTED is permanent: never asked again, and said once.
    assert nv.calls["ecc"] == 5 * 2 + 2
    gpu1_requests = [ids for h, ids in nv.field_requests if h == 1]
    assert 138 in gpu1_requests[0] and all(138 not in ids for ids in gpu1_requests[1:])
    messages = [r.getMessage() for r in caplog.records]
    assert sum("gpu 1 ecc_corrected_errors_total not supported" in m for m in messages) == 1
    assert sum("gpu 1 nvlink_transmit_bytes_total not supported" in m for m in messages) == 1
    assert "processes" not in nv.calls  # no job watched: the slow query is not made
    c.close()
    assert nv.shutdown_calls == 1


# ------------------------------------------------------------------------- devices


def test_a_gpu_the_cgroup_denies_is_left_out_and_the_others_are_sampled(fake_nvml, caplog):
    nv = fake_nvml()
    nv.fail[(0, "nvmlDeviceGetHandleByIndex")] = [NVMLError(NO_PERMISSION)]
    with caplog.at_level(logging.INFO, logger="provscope.collectors.nvml"):
        c = _opened(nv)
    assert set(_gpus(c.collect(NOW))) == {"1"}
    assert c.device_uuids == ["GPU-0000-1"]
    assert any("gpu 0 is not accessible" in r.getMessage() for r in caplog.records)


def test_no_accessible_gpu_makes_the_collector_unavailable(fake_nvml):
    nv = fake_nvml()
    for h in (0, 1):
        nv.fail[(h, "nvmlDeviceGetHandleByIndex")] = [NVMLError(NO_PERMISSION)]
    with pytest.raises(CollectorUnavailable, match=r"2 GPU\(s\) not accessible"):
        NvmlCollector("h", nv).open()


def test_a_gpu_lost_at_open_is_kept_with_up_0_and_found_again_later(fake_nvml):
    nv = fake_nvml()
    nv.fail[(1, "nvmlDeviceGetUUID")] = [NVMLError(GPU_IS_LOST)] * 3
    c = _opened(nv)
    first = _gpus(c.collect(NOW))
    assert first["0"].fields["up"] == 1
    assert _down(first["1"])
    assert first["1"].tags == {"host": "h", "gpu": "1"}  # no UUID known yet
    # Looked up at open and at the first sample (both fail), then after 1 s (fails), then
    # after 2 s more.
    assert _down(_gpus(c.collect(NOW + 1 * S))["1"])
    assert _down(_gpus(c.collect(NOW + 2 * S))["1"])
    assert nv.calls["nvmlDeviceGetUUID"] == 1 + 3  # gpu 0 at open; gpu 1 at 0, 0 and 1 s
    back = _gpus(c.collect(NOW + 3 * S))["1"]
    assert back.fields["up"] == 1 and back.fields["power_watts"] == 300.0
    assert back.tags["gpu_uuid"] == "GPU-0000-1"


def test_a_gpu_lost_while_sampling_reports_up_0_then_comes_back(fake_nvml, caplog):
    nv = fake_nvml()
    c = _opened(nv)
    c.collect(NOW)
    nv.lost.add(1)
    with caplog.at_level(logging.INFO, logger="provscope.collectors.nvml"):
        lost = _gpus(c.collect(NOW + 1 * S))
        assert _down(lost["1"])
        assert lost["1"].tags["gpu_uuid"] == "GPU-0000-1"
        assert lost["0"].fields["up"] == 1 and "power_watts" in lost["0"].fields
        calls = dict(nv.calls)
        c.collect(NOW + 1 * S + S // 2)  # inside the backoff: gpu 1 is not touched
        assert nv.calls.get("nvmlDeviceGetHandleByUUID", 0) == \
            calls.get("nvmlDeviceGetHandleByUUID", 0)
        nv.lost.clear()
        back = _gpus(c.collect(NOW + 2 * S))
    assert back["1"].fields["up"] == 1 and back["1"].fields["power_watts"] == 300.0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("gpu 1 failed" in m for m in messages) == 1
    assert sum("gpu 1 answers again" in m for m in messages) == 1


def test_gpu_is_lost_in_the_field_value_batch_marks_the_device_lost(fake_nvml):
    nv = fake_nvml()
    c = _opened(nv)
    nv.field_errors[(0, 197)] = [GPU_IS_LOST]
    assert _down(_gpus(c.collect(NOW))["0"])


def test_a_transient_field_error_is_retried_with_backoff_not_dropped(fake_nvml):
    nv = fake_nvml()
    c = _opened(nv)
    nv.field_errors[(0, 197)] = [999, 999]  # NVML_ERROR_UNKNOWN twice
    nv.fail[(0, "nvmlDeviceGetPowerUsage")] = [NVMLError(999)]
    seen = []
    for t in (0, 1, 2, 3, 4):  # seconds
        f = _gpus(c.collect(NOW + t * S))["0"].fields
        seen.append(("pcie_transmit_bytes_total" in f, "power_watts" in f))
    # pcie: fails at 0, retried at 1 (fails), then after 2 s more: back at 3.
    # power: fails at 0, back at 1.
    assert seen == [(False, False), (False, True), (False, True), (True, True), (True, True)]
    assert all("pcie_receive_bytes_total" in _gpus(c.collect(NOW + 5 * S))["0"].fields
               for _ in range(1))


def test_gpus_selected_by_uuid_keep_their_nvml_index(fake_nvml, caplog):
    nv = fake_nvml()
    c = _opened(nv, devices=["GPU-0000-1"])
    assert set(_gpus(c.collect(NOW))) == {"1"}
    assert nv.event_sets[0].registered.keys() == {1}  # Xid events of that GPU only
    c.close()
    # A MIG UUID selects its parent GPU; an unknown UUID is left out with one warning.
    with caplog.at_level(logging.WARNING, logger="provscope.collectors.nvml"):
        c = _opened(fake_nvml(), devices=["MIG-0000-101", "GPU-ffff"])
    assert [p.tags["gpu_uuid"] for p in c.collect(NOW) if p.measurement == "gpu"] == \
        ["GPU-0000-1"]
    assert any("no GPU with UUID GPU-ffff" in r.getMessage() for r in caplog.records)
    with pytest.raises(CollectorUnavailable, match="none of the requested GPUs"):
        NvmlCollector("h", fake_nvml(), devices=["GPU-ffff"]).open()


def test_a_selection_callable_is_asked_at_each_sample_and_skips_xid(fake_nvml):
    nv = fake_nvml()
    chosen: set[int] = set()
    c = _opened(nv, devices=lambda tags: {i for i in chosen if i < len(tags)})
    assert c.collect(NOW) == []
    chosen.add(1)
    assert set(_gpus(c.collect(NOW + S))) == {"1"}
    assert nv.event_sets == []  # a job's own sampler leaves Xid events to the agent


# ------------------------------------------------------------------------- clock events


def test_clock_events_are_decoded_and_an_idle_gpu_is_not_throttled(fake_nvml):
    gpus = _gpus(_opened(fake_nvml()).collect(NOW))
    idle, capped = gpus["1"].fields, gpus["0"].fields
    assert idle["throttle_reasons"] == 0x1 and idle["clocks_event_gpu_idle"] == 1
    assert idle["throttled"] == 0
    assert capped["clocks_event_sw_power_cap"] == 1 and capped["throttled"] == 1
    assert capped["clocks_event_gpu_idle"] == 0


@pytest.mark.parametrize(("mask", "throttled"), [
    (0x0, 0), (0x1, 0), (0x2, 0), (0x10, 0), (0x100, 0), (0x1 | 0x2 | 0x100, 0),
    (0x4, 1), (0x8, 1), (0x20, 1), (0x40, 1), (0x80, 1), (0x1 | 0x40, 1),
])
def test_only_reasons_that_slow_a_busy_gpu_count_as_throttled(mask, throttled):
    decoded = decode_clock_events(mask)
    assert decoded["throttled"] == throttled
    assert sum(v for k, v in decoded.items() if k.startswith("clocks_event_")) == \
        bin(mask).count("1")


def test_a_driver_without_the_renamed_call_uses_the_throttle_reasons_call(fake_nvml):
    nv = fake_nvml(old_driver=True)
    c = _opened(nv)
    for t in range(3):
        gpus = _gpus(c.collect(NOW + t * S))
    assert gpus["0"].fields["clocks_event_sw_power_cap"] == 1
    assert gpus["1"].fields["throttled"] == 0
    assert nv.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 3 * 2


# ------------------------------------------------------------------------- Xid, GPM, MIG


def test_xid_events_are_counted_per_gpu_on_their_own_thread(fake_nvml):
    nv = fake_nvml()
    c = _opened(nv)
    assert any(t.name == "provscope-nvml-xid" for t in threading.enumerate())
    first = _gpus(c.collect(NOW))
    assert first["0"].fields["xid_errors_total"] == 0.0 and first["0"].fields["last_xid"] == 0
    nv.inject_xid(0, 79)
    nv.inject_xid(0, 48)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        gpus = _gpus(c.collect(NOW + S))
        if gpus["0"].fields["xid_errors_total"] == 2.0:
            break
        time.sleep(0.01)
    assert gpus["0"].fields["last_xid"] == 48
    assert gpus["1"].fields["xid_errors_total"] == 0.0
    thread = c._xid._thread
    t0 = time.monotonic()
    c.close()
    assert time.monotonic() - t0 < 2.0  # the wait times out every 0.5 s
    assert nv.event_sets[0].freed
    assert not thread.is_alive()


def test_gpm_metrics_come_from_two_samples_and_buffers_are_freed(fake_nvml):
    nv = fake_nvml()
    c = _opened(nv)
    first = _gpus(c.collect(NOW))["0"].fields
    assert "sm_active_percent" not in first  # the first sample only primes
    for t in (1, 2):
        f = _gpus(c.collect(NOW + t * S))["0"].fields
        assert f["sm_active_percent"] == 14.0 and f["tensor_active_percent"] == 35.0
        assert f["gr_engine_active_percent"] == 7.0 and f["dram_active_percent"] == 70.0
    c.close()
    assert nv.gpm_freed == 2 * 2 + 2 * 2  # two buffers per GPU and per MIG instance


def test_mig_instances_report_memory_and_activity(fake_nvml):
    c = _opened(fake_nvml())
    c.collect(NOW)
    migs = {p.tags["mig_uuid"]: p for p in c.collect(NOW + S) if p.measurement == "gpu_mig"}
    assert set(migs) == {"MIG-0000-100", "MIG-0000-101"}
    m = migs["MIG-0000-101"]
    assert m.tags == {"host": "h", "gpu": "1", "gpu_uuid": "GPU-0000-1",
                      "mig_uuid": "MIG-0000-101", "gpu_instance": "2", "compute_instance": "0"}
    assert m.fields["memory_used_bytes"] == float(1 << 30)
    assert m.fields["memory_total_bytes"] == float(10 << 30)
    assert m.fields["sm_active_percent"] == 14.0


# ------------------------------------------------------------------------- processes


def test_nvml_maps_per_process_gpu_memory_to_the_jobs_ranks(fake_nvml):
    nv = fake_nvml(processes={0: [(100, 1 << 30), (101, 2 << 30), (999, 5 << 30)],
                              1: [(102, 3 << 30)]})
    pids = {100: Watched(100, "r", 0), 101: Watched(100, "r", 0), 102: Watched(102, "r", 1)}
    c = NvmlCollector("h", nv, pid_map=lambda: pids)
    c.open()
    procs = [p for p in c.collect(NOW) if p.measurement == "gpu_process"]
    by_rank = {(p.tags["gpu"], p.tags["rank"]): p.fields for p in procs}
    assert by_rank == {("0", "0"): {"memory_used_bytes": float(3 << 30), "processes": 2},
                       ("1", "1"): {"memory_used_bytes": float(3 << 30), "processes": 1}}
    assert all(p.tags["run_id"] == "r" for p in procs)


def test_nvml_queries_running_processes_at_most_every_process_interval(fake_nvml):
    nv = fake_nvml(processes={0: [(100, 1 << 30)]})
    c = NvmlCollector("h", nv, pid_map=lambda: {100: Watched(100, "r", 0)},
                      process_interval_s=5.0)
    c.open()
    emitted = []
    for second in range(11):
        points = c.collect(NOW + second * S)
        emitted.append(any(p.measurement == "gpu_process" for p in points))
    assert emitted == [True, False, False, False, False, True, False, False, False, False, True]
    assert nv.calls["processes"] == 3 * 2  # two GPUs per query


def test_not_supported_codes_are_permanent_per_device_not_per_node(fake_nvml):
    nv = fake_nvml()
    nv.fail[(0, "nvmlDeviceGetEncoderUtilization")] = [NVMLError(NOT_SUPPORTED)]
    c = _opened(nv)
    for t in range(3):
        gpus = _gpus(c.collect(NOW + t * S))
    assert "encoder_utilization_percent" not in gpus["0"].fields
    assert gpus["1"].fields["encoder_utilization_percent"] == 3.0
    assert nv.calls["nvmlDeviceGetEncoderUtilization"] == 1 + 3


# ------------------------------------------------------------------------- CUDA -> NVML


def _torch(uuids, *, initialised=True, current=0):
    """torch.cuda as capture and the resolver read it: uuid as CUDA prints it (no prefix)."""
    props = [SimpleNamespace(**({"uuid": u} if u is not None else {})) for u in uuids]
    return SimpleNamespace(cuda=SimpleNamespace(
        is_initialized=lambda: initialised, current_device=lambda: current,
        get_device_properties=lambda i: props[i]))


@pytest.mark.parametrize(("torch_uuids", "visible", "cuda_index", "nvml_handle"), [
    (["0000-1"], "1", 0, 1),            # torch knows the device: its UUID wins
    (["0000-101"], "MIG-0000-101", 0, 101),  # a MIG instance by its UUID
    ([None], "GPU-0000-1", 0, 1),       # older torch without uuid: the variable's UUID
    ([None], "GPU-0000-1,GPU-0000-0", 1, 0),
    ([None], "1,0", 0, 1),              # integers are NVML (PCI bus) indices
    ([None], "GPU-0000", 0, None),      # an ambiguous prefix: cannot tell
    ([None], "", 0, None),              # no visible device
    ([None], "0,-1,1", 1, None),        # CUDA stops at -1
    ([None], None, 1, 1),               # unset: same index
])
def test_cuda_device_resolves_to_the_nvml_device_by_uuid(fake_nvml, torch_uuids, visible,
                                                         cuda_index, nvml_handle):
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    torch = _torch(torch_uuids * (cuda_index + 1))
    got = resolve_cuda_device(fake_nvml(), cuda_index, torch=torch, environ=environ)
    assert got == nvml_handle
    if nvml_handle is not None:
        expected = f"MIG-0000-{got}" if got >= 100 else f"GPU-0000-{got}"
        assert cuda_uuid(fake_nvml(), cuda_index, torch=torch, environ=environ) == expected


def test_task_energy_reads_the_gpu_the_job_runs_on_not_the_cuda_index(fake_nvml,
                                                                     monkeypatch):
    from provscope.job.capture import _Gpu

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # CUDA device 0 is NVML GPU 1
    monkeypatch.setitem(sys.modules, "torch", _torch(["0000-1"]))
    assert _Gpu(fake_nvml()).energy_mj() == 6_000_000.0  # GPU 1's counter, not GPU 0's
    monkeypatch.setitem(sys.modules, "torch", _torch([None]))  # torch without uuid
    assert _Gpu(fake_nvml()).energy_mj() == 6_000_000.0
    # A MIG instance: NVML has energy for the whole GPU only.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-0000-100")
    assert _Gpu(fake_nvml()).energy_mj() == 6_000_000.0
    monkeypatch.setitem(sys.modules, "torch", _torch([None], initialised=False))
    assert _Gpu(fake_nvml()).energy_mj() is None  # CUDA not in use: nothing read


def test_a_gpu_whose_every_getter_fails_is_down_and_keeps_its_xid_count(fake_nvml):
    nv = fake_nvml()
    c = _opened(nv)
    c.collect(NOW)
    names = [n for n in dir(nv) if n.startswith("nvmlDeviceGet") and n not in (
        "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetHandleByUUID", "nvmlDeviceGetCount",
        "nvmlDeviceGetUUID", "nvmlDeviceGetIndex")]
    for name in names:
        nv.fail[(0, name)] = [NVMLError(999)] * 5  # NVML_ERROR_UNKNOWN from everything
    nv.fail[(0, "nvmlGpmSampleGet")] = [NVMLError(999)] * 5
    nv.inject_xid(0, 79)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        gpu0 = _gpus(c.collect(NOW + S))["0"]
        if gpu0.fields.get("last_xid") == 79:
            break
        time.sleep(0.01)
    assert _down(gpu0) and gpu0.fields["xid_errors_total"] == 1.0
    assert _gpus(c.collect(NOW + S))["1"].fields["up"] == 1
