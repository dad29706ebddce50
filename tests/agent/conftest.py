"""Fixture system sources for the node agent tests: a scripted psutil, NVML and amdsmi.

Fakes stand in for system libraries only (never for a database): they return the values
a real machine would, including the errors NVML raises for unsupported fields.
"""

from __future__ import annotations

import ctypes
import shutil
import tempfile
import threading
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest

CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait irq softirq steal guest")
VMem = namedtuple("VMem", "total available percent used free")
Swap = namedtuple("Swap", "total used free percent sin sout")
Freq = namedtuple("Freq", "current min max")
DiskIO = namedtuple("DiskIO", "read_count write_count read_bytes write_bytes read_time "
                    "write_time busy_time")
NetIO = namedtuple("NetIO", "bytes_sent bytes_recv packets_sent packets_recv errin errout "
                   "dropin dropout")
Usage = namedtuple("Usage", "total used free percent")


class FakePsutil:
    """psutil with scripted snapshots: each call to ``cpu_times`` returns the next one."""

    def __init__(self) -> None:
        self.times = [CpuTimes(100, 0, 50, 800, 50, 0, 0, 0, 0),
                      CpuTimes(160, 0, 70, 900, 70, 0, 0, 0, 0)]
        self.calls = 0

    def cpu_times(self):
        t = self.times[min(self.calls, len(self.times) - 1)]
        self.calls += 1
        return t

    def getloadavg(self):
        return (1.5, 1.0, 0.5)

    def cpu_freq(self):
        return Freq(2400.0, 800.0, 3600.0)

    def cpu_count(self):
        return 8

    def virtual_memory(self):
        return VMem(16 << 30, 12 << 30, 25.0, 4 << 30, 10 << 30)

    def swap_memory(self):
        return Swap(2 << 30, 1 << 20, (2 << 30) - (1 << 20), 0.05, 0, 0)

    def disk_io_counters(self, perdisk=False):
        return {
            "sda": DiskIO(10, 20, 4096, 8192, 5, 6, 1500),
            "sda1": DiskIO(10, 20, 4096, 8192, 5, 6, 1500),
            "nvme0n1": DiskIO(1, 2, 512, 1024, 1, 1, 250),
            "nvme0n1p1": DiskIO(1, 2, 512, 1024, 1, 1, 250),
            "loop0": DiskIO(1, 0, 512, 0, 0, 0, 0),
        }

    def net_io_counters(self, pernic=False):
        return {"lo": NetIO(1, 1, 1, 1, 0, 0, 0, 0),
                "eth0": NetIO(1000, 2000, 10, 20, 1, 2, 3, 4)}

    def disk_usage(self, path):
        if path == "/missing":
            raise FileNotFoundError(2, "No such file or directory")
        return Usage(100 << 30, 40 << 30, 60 << 30, 40.0)


class NVMLError(Exception):
    """pynvml's NVMLError: the nvmlReturn_t code in ``value``."""

    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


# nvmlReturn_t codes (nvml.h)
NOT_SUPPORTED, NO_PERMISSION, NOT_FOUND, TIMEOUT = 3, 4, 6, 10
FUNCTION_NOT_FOUND, GPU_IS_LOST, INVALID_ARGUMENT = 13, 15, 2


class _EventSet:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.queue: list = []
        self.registered: dict = {}
        self.freed = False


class FakeNvml:
    """pynvml's names, return shapes and error codes for two GPUs.

    GPU 0 is a Hopper-class part: every field, GPM, Xid events. GPU 1 is in MIG mode with
    two MIG devices (utilisation NOT_SUPPORTED on the parent, as NVML documents for MIG)
    and lacks ECC and NVLink (NOT_SUPPORTED). Scripted failures:

    - ``fail[(handle, "nvmlX")] = [exc, ...]``: the next calls of that getter raise these;
    - ``lost``: handles whose every call raises GPU_IS_LOST;
    - ``field_errors[(handle, field_id)] = [code, ...]``: per-value nvmlReturn codes;
    - ``old_driver=True``: the driver lacks ``nvmlDeviceGetCurrentClocksEventReasons``
      (pynvml raises FUNCTION_NOT_FOUND, as ``_nvmlGetFunctionPointer`` does);
    - ``hang``: a threading.Event; while it is clear, ``nvmlDeviceGetUtilizationRates``
      blocks (a stuck driver call).
    """

    NVML_ERROR_NOT_SUPPORTED = NOT_SUPPORTED
    NVML_ERROR_TIMEOUT = TIMEOUT
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_AGGREGATE_ECC = 1
    NVML_PERF_POLICY_POWER = 0
    NVML_PERF_POLICY_THERMAL = 1
    NVML_DEVICE_MIG_DISABLE = 0
    NVML_DEVICE_MIG_ENABLE = 1
    NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL = 38
    NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL = 45
    NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL = 52
    NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL = 59
    NVML_FI_DEV_MEMORY_TEMP = 82
    NVML_FI_DEV_PCIE_REPLAY_COUNTER = 94
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX = 138
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 139
    NVML_FI_DEV_REMAPPED_COR = 142
    NVML_FI_DEV_REMAPPED_UNC = 143
    NVML_FI_DEV_REMAPPED_PENDING = 144
    NVML_FI_DEV_REMAPPED_FAILURE = 145
    NVML_FI_DEV_PCIE_COUNT_TX_BYTES = 197
    NVML_FI_DEV_PCIE_COUNT_RX_BYTES = 198
    nvmlEventTypeXidCriticalError = 0x8
    nvmlEventTypeSingleBitEccError = 0x1
    NVML_GPM_METRIC_GRAPHICS_UTIL = 1
    NVML_GPM_METRIC_SM_UTIL = 2
    NVML_GPM_METRIC_SM_OCCUPANCY = 3
    NVML_GPM_METRIC_ANY_TENSOR_UTIL = 5
    NVML_GPM_METRIC_DRAM_BW_UTIL = 10
    NVML_GPM_METRICS_GET_VERSION = 1
    # The real ctypes structures: the collector fills them as it would for the library.
    c_nvmlGpmMetricsGet_t = pynvml.c_nvmlGpmMetricsGet_t
    NVMLError = NVMLError

    _NVLINK_FIELDS = (38, 45, 52, 59, 138, 139)
    _UINT_FIELDS = (82, 94, 142, 143, 144, 145)  # these come back as uiVal
    _MIGS = {1: [(100, 1, 0), (101, 2, 0)]}  # parent: [(handle, GI id, CI id)]

    def __init__(self, processes=None, missing_library=False, *, old_driver=False,
                 count=2) -> None:
        self.init_calls = 0
        self.shutdown_calls = 0
        self.calls: dict[str, int] = {}
        self.processes = processes or {}
        self.missing = missing_library
        self.old_driver = old_driver
        self.count = count
        self.fail: dict[tuple, list] = {}
        self.lost: set = set()
        self.field_errors: dict[tuple, list] = {}
        self.hang: threading.Event | None = None
        self.clock_reasons = {0: 0x4, 1: 0x1}  # gpu 0: power cap; gpu 1: idle
        self.event_sets: list[_EventSet] = []
        self.field_requests: list[tuple[int, list[int]]] = []
        self._gpm_seq = 0
        self._gpm_taken: dict[int, int] = {}
        self._gpm_keep: list = []
        self.gpm_freed = 0

    # -------------------------------------------------------------- plumbing

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def _enter(self, name, h):
        self._count(name)
        if h in self.lost or (h >= 100 and self._parent(h) in self.lost):
            raise NVMLError(GPU_IS_LOST)
        queued = self.fail.get((h, name))
        if queued:
            raise queued.pop(0)

    def _parent(self, mig):
        return next(p for p, migs in self._MIGS.items() for m, _, _ in migs if m == mig)

    # -------------------------------------------------------------- system

    def nvmlInit(self):
        if self.missing:
            raise NVMLError(12)  # NVML_ERROR_LIBRARY_NOT_FOUND
        self.init_calls += 1

    def nvmlShutdown(self):
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        self._enter("nvmlDeviceGetHandleByIndex", i)
        if not 0 <= i < self.count:
            raise NVMLError(INVALID_ARGUMENT)
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for h in range(self.count):
            if uuid == f"GPU-0000-{h}":
                self._enter("nvmlDeviceGetHandleByUUID", h)
                return h
        for parent, migs in self._MIGS.items():
            for m, _, _ in migs:
                if parent < self.count and uuid == f"MIG-0000-{m}":
                    return m
        raise NVMLError(NOT_FOUND)

    def nvmlDeviceGetIndex(self, h):
        self._enter("nvmlDeviceGetIndex", h)
        return h

    def nvmlDeviceGetUUID(self, h):
        self._enter("nvmlDeviceGetUUID", h)
        return f"MIG-0000-{h}" if h >= 100 else f"GPU-0000-{h}"

    def nvmlDeviceIsMigDeviceHandle(self, h):
        return ctypes.c_uint(1 if h >= 100 else 0)  # pynvml returns the c_uint itself

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, m):
        return self._parent(m)

    # -------------------------------------------------------------- getters

    def nvmlDeviceGetUtilizationRates(self, h):
        self._enter("nvmlDeviceGetUtilizationRates", h)
        if self.hang is not None:
            self.hang.wait()
        if h in self._MIGS:
            raise NVMLError(NOT_SUPPORTED)  # "not currently supported" on MIG-enabled GPUs
        return SimpleNamespace(gpu=90 + h, memory=40)

    def nvmlDeviceGetMemoryInfo(self, h):
        self._enter("nvmlDeviceGetMemoryInfo", h)
        if h >= 100:
            return SimpleNamespace(used=1 << 30, total=10 << 30, free=9 << 30)
        return SimpleNamespace(used=10 << 30, total=80 << 30, free=70 << 30)

    def nvmlDeviceGetPowerUsage(self, h):
        self._enter("nvmlDeviceGetPowerUsage", h)
        return 300_000  # mW

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        self._enter("nvmlDeviceGetEnforcedPowerLimit", h)
        return 700_000  # mW

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        self._enter("nvmlDeviceGetTotalEnergyConsumption", h)
        if h >= 100:
            raise NVMLError(NOT_SUPPORTED)  # board counters exist on the whole GPU only
        return 5_000_000 + 1_000_000 * h  # mJ

    def nvmlDeviceGetTemperature(self, h, sensor):
        self._enter("nvmlDeviceGetTemperature", h)
        return 65

    def nvmlDeviceGetClockInfo(self, h, clock):
        self._enter("nvmlDeviceGetClockInfo", h)
        return 1980 if clock == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetEncoderUtilization(self, h):
        self._enter("nvmlDeviceGetEncoderUtilization", h)
        return [3, 167000]  # [percent, sampling period in us]

    def nvmlDeviceGetDecoderUtilization(self, h):
        self._enter("nvmlDeviceGetDecoderUtilization", h)
        return [5, 167000]

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        if self.old_driver:
            raise NVMLError(FUNCTION_NOT_FOUND)
        self._enter("nvmlDeviceGetCurrentClocksEventReasons", h)
        return self.clock_reasons[h]

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
        self._enter("nvmlDeviceGetCurrentClocksThrottleReasons", h)
        return self.clock_reasons[h]

    def nvmlDeviceGetViolationStatus(self, h, policy):
        self._enter("nvmlDeviceGetViolationStatus", h)
        return SimpleNamespace(referenceTime=10**15, violationTime=(policy + 1) * 2 * 10**9)

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):
        self._enter("nvmlDeviceGetTotalEccErrors", h)
        self._count("ecc")
        if h == 1:
            raise NVMLError(NOT_SUPPORTED)
        return 7 if kind == 0 else 0

    def nvmlDeviceGetPcieThroughput(self, h, counter):  # pragma: no cover - must not be used
        raise AssertionError("nvmlDeviceGetPcieThroughput blocks 20 ms and must never be called")

    def nvmlDeviceGetFieldValues(self, h, field_ids):
        self._enter("nvmlDeviceGetFieldValues", h)
        self._count("fields")
        self.field_requests.append((h, [fid for fid, _ in field_ids]))
        out = []
        for fid, _scope in field_ids:
            ret = 0
            if h == 1 and fid in self._NVLINK_FIELDS:
                ret = NOT_SUPPORTED
            queued = self.field_errors.get((h, fid))
            if queued:
                ret = queued.pop(0)
            vtype, member = (1, "uiVal") if fid in self._UINT_FIELDS else (3, "ullVal")
            value = {144: 0, 145: 0}.get(fid, 1000 * fid)
            out.append(SimpleNamespace(fieldId=fid, scopeId=_scope, nvmlReturn=ret,
                                       valueType=vtype,
                                       value=SimpleNamespace(**{member: value})))
        return out

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        self._enter("nvmlDeviceGetComputeRunningProcesses", h)
        self._count("processes")
        return [SimpleNamespace(pid=pid, usedGpuMemory=mem)
                for pid, mem in self.processes.get(h, [])]

    # -------------------------------------------------------------- MIG

    def nvmlDeviceGetMigMode(self, h):
        self._enter("nvmlDeviceGetMigMode", h)
        return [1, 1] if h in self._MIGS else [0, 0]

    def nvmlDeviceGetMaxMigDeviceCount(self, h):
        self._enter("nvmlDeviceGetMaxMigDeviceCount", h)
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, i):
        self._enter("nvmlDeviceGetMigDeviceHandleByIndex", h)
        migs = self._MIGS.get(h, [])
        if i >= len(migs):
            raise NVMLError(NOT_FOUND)  # an empty slot
        return migs[i][0]

    def nvmlDeviceGetGpuInstanceId(self, m):
        return next(gi for migs in self._MIGS.values() for h, gi, _ in migs if h == m)

    def nvmlDeviceGetComputeInstanceId(self, m):
        return next(ci for migs in self._MIGS.values() for h, _, ci in migs if h == m)

    # -------------------------------------------------------------- GPM

    def nvmlGpmQueryDeviceSupport(self, h):
        self._enter("nvmlGpmQueryDeviceSupport", h)
        return SimpleNamespace(version=1, isSupportedDevice=1)

    def nvmlGpmSampleAlloc(self):
        buf = ctypes.c_int(len(self._gpm_keep))
        self._gpm_keep.append(buf)
        return ctypes.cast(ctypes.pointer(buf), pynvml.c_nvmlGpmSample_t)

    def nvmlGpmSampleFree(self, sample):
        self.gpm_freed += 1

    def _take(self, sample):
        self._gpm_seq += 1
        self._gpm_taken[ctypes.addressof(sample.contents)] = self._gpm_seq

    def nvmlGpmSampleGet(self, h, sample):
        self._enter("nvmlGpmSampleGet", h)
        self._take(sample)
        return sample

    def nvmlGpmMigSampleGet(self, h, gpu_instance_id, sample):
        self._enter("nvmlGpmMigSampleGet", h)
        self._take(sample)
        return sample

    def nvmlGpmMetricsGet(self, req):
        # NVML computes metrics between two samples taken in order: anything else is a
        # caller's error.
        t1 = self._gpm_taken.get(ctypes.addressof(req.sample1.contents))
        t2 = self._gpm_taken.get(ctypes.addressof(req.sample2.contents))
        if t1 is None or t2 is None or t1 >= t2 or req.version != 1:
            raise NVMLError(INVALID_ARGUMENT)
        for i in range(req.numMetrics):
            req.metrics[i].value = 7.0 * req.metrics[i].metricId
            req.metrics[i].nvmlReturn = 0
        return req

    # -------------------------------------------------------------- events

    def nvmlEventSetCreate(self):
        es = _EventSet()
        self.event_sets.append(es)
        return es

    def nvmlDeviceGetSupportedEventTypes(self, h):
        self._enter("nvmlDeviceGetSupportedEventTypes", h)
        return 0x8 | 0x1 | 0x2

    def nvmlDeviceRegisterEvents(self, h, types, es):
        self._enter("nvmlDeviceRegisterEvents", h)
        es.registered[h] = types

    def nvmlEventSetWait(self, es, timeout_ms):
        with es.cond:
            if not es.queue:
                es.cond.wait(timeout_ms / 1000.0)
            if not es.queue:
                raise NVMLError(TIMEOUT)
            return es.queue.pop(0)

    def nvmlEventSetFree(self, es):
        es.freed = True

    def inject_xid(self, h, xid):
        """The driver reports Xid ``xid`` on GPU ``h`` (c_nvmlEventData_t's fields)."""
        for es in self.event_sets:
            if h in es.registered:
                with es.cond:
                    es.queue.append(SimpleNamespace(
                        device=h, eventType=self.nvmlEventTypeXidCriticalError,
                        eventData=xid, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF))
                    es.cond.notify_all()


class AmdSmiLibraryException(Exception):
    """amdsmi's library error: the amdsmi_status_t in ``err_code``."""

    def __init__(self, err_code: int) -> None:
        super().__init__(err_code)
        self.err_code = err_code

    def get_error_code(self):
        return self.err_code


class FakeAmdSmi:
    """amdsmi 7.x's names and return shapes for two GPUs.

    GPU 0 (MI250-class) has an edge sensor but old firmware without power info; GPU 1
    (MI300-class) has no edge sensor (AMDSMI_STATUS_NOT_SUPPORTED), only hotspot/junction.
    ``old_process_api=True``: the process list holds process handles, resolved with
    ``amdsmi_get_gpu_process_info`` (amdsmi before 6.1).
    """

    class AmdSmiTemperatureType:
        EDGE = 0
        HOTSPOT = 1
        JUNCTION = 1
        VRAM = 2

    class AmdSmiTemperatureMetric:
        CURRENT = 0

    class AmdSmiClkType:
        GFX = "gfx"
        MEM = "mem"

    def __init__(self, old_process_api: bool = False) -> None:
        self.init_calls = 0
        self.calls: dict[str, int] = {}
        self.old_process_api = old_process_api
        self.processes = {"h0": [(4242, 1 << 30)], "h1": [(4243, 2 << 30)]}
        self.fail: dict[tuple, list] = {}
        if old_process_api:
            self.amdsmi_get_gpu_process_info = self._process_info

    def _enter(self, name, h):
        self.calls[name] = self.calls.get(name, 0) + 1
        queued = self.fail.get((h, name))
        if queued:
            raise queued.pop(0)

    def amdsmi_init(self):
        self.init_calls += 1

    def amdsmi_shut_down(self):
        pass

    def amdsmi_get_processor_handles(self):
        return ["h0", "h1"]

    def amdsmi_get_gpu_device_uuid(self, h):
        return f"amd-uuid-{h[1]}"

    def amdsmi_get_gpu_activity(self, h):
        self._enter("amdsmi_get_gpu_activity", h)
        return {"gfx_activity": 77, "umc_activity": 30, "mm_activity": "N/A"}

    def amdsmi_get_gpu_vram_usage(self, h):
        self._enter("amdsmi_get_gpu_vram_usage", h)
        return {"vram_used": 1024, "vram_total": 65536}

    def amdsmi_get_power_info(self, h):
        self._enter("amdsmi_get_power_info", h)
        if h == "h0":
            raise AmdSmiLibraryException(2)  # AMDSMI_STATUS_NOT_SUPPORTED
        return {"socket_power": 650, "current_socket_power": 650,
                "average_socket_power": "N/A", "gfx_voltage": 900, "soc_voltage": 800,
                "mem_voltage": 1100, "power_limit": 750}

    def amdsmi_get_energy_count(self, h):
        self._enter("amdsmi_get_energy_count", h)
        return {"energy_accumulator": 2_000_000, "counter_resolution": 15.3, "timestamp": 1}

    def amdsmi_get_temp_metric(self, h, kind, metric):
        self._enter("amdsmi_get_temp_metric", h)
        if h == "h1" and kind == self.AmdSmiTemperatureType.EDGE:
            raise AmdSmiLibraryException(2)  # MI300: no edge sensor
        return {0: 55, 1: 71, 2: 80}[kind]

    def amdsmi_get_clock_info(self, h, clk):
        self._enter("amdsmi_get_clock_info", h)
        return {"clk": 2100 if clk == "gfx" else 1300, "min_clk": 500, "max_clk": 2100,
                "clk_locked": 0, "clk_deep_sleep": 0}

    def amdsmi_get_gpu_total_ecc_count(self, h):
        self._enter("amdsmi_get_gpu_total_ecc_count", h)
        return {"correctable_count": 3, "uncorrectable_count": 0, "deferred_count": 0}

    def amdsmi_get_pcie_info(self, h):
        self._enter("amdsmi_get_pcie_info", h)
        return {"pcie_static": {"max_pcie_width": 16, "max_pcie_speed": 32000,
                                "pcie_interface_version": 5, "slot_type": "OAM"},
                "pcie_metric": {"pcie_width": 16, "pcie_speed": 32000,
                                "pcie_bandwidth": "N/A", "pcie_replay_count": 12,
                                "pcie_l0_to_recovery_count": 0,
                                "pcie_replay_roll_over_count": 0,
                                "pcie_nak_sent_count": 0, "pcie_nak_received_count": 0,
                                "pcie_lc_perf_other_end_recovery_count": "N/A"}}

    def amdsmi_get_gpu_process_list(self, h):
        self._enter("amdsmi_get_gpu_process_list", h)
        if self.old_process_api:
            return [pid for pid, _ in self.processes.get(h, [])]  # handles
        return [{"name": "python", "pid": pid, "mem": mem,
                 "engine_usage": {"gfx": 0, "enc": 0},
                 "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": mem},
                 "cu_occupancy": "N/A"} for pid, mem in self.processes.get(h, [])]

    def _process_info(self, h, handle):
        mem = dict(self.processes[h])[handle]
        return {"name": "python", "pid": handle, "mem": mem,
                "engine_usage": {"gfx": 0, "enc": 0},
                "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": mem}}


@pytest.fixture
def fake_psutil() -> FakePsutil:
    return FakePsutil()


@pytest.fixture
def fake_nvml():
    """Factory: ``fake_nvml(processes={gpu: [(pid, bytes)]}, missing_library=False)``."""
    return FakeNvml


@pytest.fixture
def fake_amdsmi() -> FakeAmdSmi:
    return FakeAmdSmi()


@pytest.fixture
def fake_amdsmi_factory():
    """Factory: ``fake_amdsmi_factory(old_process_api=False)``."""
    return FakeAmdSmi


@pytest.fixture
def sock_path():
    """A short socket path in a fresh private directory (AF_UNIX paths are <= 107 bytes)."""
    d = tempfile.mkdtemp(prefix="ps-", dir="/tmp")
    yield Path(d) / "run" / "agent.sock"
    shutil.rmtree(d, ignore_errors=True)
