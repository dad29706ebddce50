"""Fixture system sources for the node agent tests: a scripted psutil, NVML and amdsmi.

Fakes stand in for system libraries only (never for a database): they return the values
a real machine would, including the errors NVML raises for unsupported fields.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

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
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class FakeNvml:
    """pynvml's names for two GPUs; GPU 1 lacks ECC and NVLink (NOT_SUPPORTED)."""

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_AGGREGATE_ECC = 1
    NVML_FI_DEV_PCIE_COUNT_TX_BYTES = 197
    NVML_FI_DEV_PCIE_COUNT_RX_BYTES = 198
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX = 138
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 139
    NVMLError = NVMLError

    def __init__(self, processes=None, missing_library=False) -> None:
        self.init_calls = 0
        self.shutdown_calls = 0
        self.calls: dict[str, int] = {}
        self.processes = processes or {}
        self.missing = missing_library

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def nvmlInit(self):
        if self.missing:
            raise NVMLError(12)
        self.init_calls += 1

    def nvmlShutdown(self):
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-0000-{h}"

    def nvmlDeviceGetUtilizationRates(self, h):
        self._count("util")
        return SimpleNamespace(gpu=90 + h, memory=40)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=10 << 30, total=80 << 30, free=70 << 30)

    def nvmlDeviceGetPowerUsage(self, h):
        return 300_000  # mW

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return 5_000_000  # mJ

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 65

    def nvmlDeviceGetClockInfo(self, h, clock):
        return 1980 if clock == self.NVML_CLOCK_SM else 2619

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return 0x4

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):
        self._count("ecc")
        if h == 1:
            raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return 7 if kind == 0 else 0

    def nvmlDeviceGetPcieThroughput(self, h, counter):  # pragma: no cover - must not be used
        raise AssertionError("nvmlDeviceGetPcieThroughput blocks 20 ms and must never be called")

    def nvmlDeviceGetFieldValues(self, h, field_ids):
        self._count("fields")
        out = []
        for fid, _scope in field_ids:
            unsupported = h == 1 and fid in (138, 139)
            out.append(SimpleNamespace(
                fieldId=fid, nvmlReturn=self.NVML_ERROR_NOT_SUPPORTED if unsupported else 0,
                valueType=3, value=SimpleNamespace(ullVal=1000 * fid)))
        return out

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        self._count("processes")
        return [SimpleNamespace(pid=pid, usedGpuMemory=mem)
                for pid, mem in self.processes.get(h, [])]


class FakeAmdSmi:
    """amdsmi's names for one GPU; power info missing (raises, as on old firmware)."""

    class AmdSmiTemperatureType:
        EDGE = "edge"

    class AmdSmiTemperatureMetric:
        CURRENT = "current"

    class AmdSmiClkType:
        GFX = "gfx"
        MEM = "mem"

    def __init__(self) -> None:
        self.init_calls = 0

    def amdsmi_init(self):
        self.init_calls += 1

    def amdsmi_shut_down(self):
        pass

    def amdsmi_get_processor_handles(self):
        return ["h0"]

    def amdsmi_get_gpu_device_uuid(self, h):
        return "amd-uuid-0"

    def amdsmi_get_gpu_activity(self, h):
        return {"gfx_activity": 77, "umc_activity": 30, "mm_activity": "N/A"}

    def amdsmi_get_gpu_vram_usage(self, h):
        return {"vram_used": 1024, "vram_total": 65536}

    def amdsmi_get_power_info(self, h):
        raise RuntimeError("AMDSMI_STATUS_NOT_SUPPORTED")

    def amdsmi_get_energy_count(self, h):
        return {"energy_accumulator": 2_000_000, "counter_resolution": 15.3}

    def amdsmi_get_temp_metric(self, h, kind, metric):
        return 55

    def amdsmi_get_clock_info(self, h, clk):
        return {"clk": 2100 if clk == "gfx" else 1300}

    def amdsmi_get_gpu_process_list(self, h):
        return [{"pid": 4242, "memory_usage": {"vram_mem": 1 << 30}}]


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
def sock_path():
    """A short socket path in a fresh private directory (AF_UNIX paths are <= 107 bytes)."""
    d = tempfile.mkdtemp(prefix="ps-", dir="/tmp")
    yield Path(d) / "run" / "agent.sock"
    shutil.rmtree(d, ignore_errors=True)
