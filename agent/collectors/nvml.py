"""NVIDIA GPU collector through NVML (PyPI ``nvidia-ml-py``, imported as ``pynvml``).

Emits measurement ``gpu`` (tags ``host``, ``gpu`` = index, ``gpu_uuid``):
``utilization_percent``, ``memory_utilization_percent``, ``memory_used_bytes``,
``memory_total_bytes``, ``power_watts``, ``energy_joules_total``, ``temperature_celsius``,
``sm_clock_hertz``, ``memory_clock_hertz``, ``throttle_reasons`` (bitmask),
``pcie_transmit|receive_bytes_total`` and ``nvlink_transmit|receive_bytes_total`` (field
values), ``ecc_corrected|uncorrected_errors_total``; and ``gpu_process`` (tags plus
``run_id``, ``rank``): ``memory_used_bytes``, ``processes`` of the watched jobs' processes.

Rules, from what NVML costs and how it fails:

- ``nvmlInit`` once in ``open``; device handles and UUIDs cached.
- PCIe throughput comes from ``nvmlDeviceGetFieldValues`` counters, never from
  ``nvmlDeviceGetPcieThroughput`` (that call blocks about 20 ms).
- Every getter is wrapped (gpustat style): ``NVML_ERROR_NOT_SUPPORTED`` leaves the field
  out from then on, logged once; any other error leaves it out of this sample only.
- The running-process query (milliseconds per GPU, takes the driver lock) runs only
  while a job is watched, and at most every ``process_interval_s`` (5 s).
- No library, no driver or no GPU: ``open`` raises ``CollectorUnavailable`` and the
  agent runs on without this collector (one warning).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from provscope.agent.collectors.base import OnceLogger, specs_for

from provscope.catalogue import MetricSpec
from provscope.errors import CollectorUnavailable
from provscope.records import Point

__all__ = ["NvmlCollector"]

log = logging.getLogger("provscope.collectors.nvml")

_ALL_LINKS = 0xFFFFFFFF
# (our field, NVML field-id constant name, scope id, scale to base units)
_FIELD_VALUES = (
    ("pcie_transmit_bytes_total", "NVML_FI_DEV_PCIE_COUNT_TX_BYTES", 0, 1.0),
    ("pcie_receive_bytes_total", "NVML_FI_DEV_PCIE_COUNT_RX_BYTES", 0, 1.0),
    ("nvlink_transmit_bytes_total", "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", _ALL_LINKS, 1024.0),
    ("nvlink_receive_bytes_total", "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX", _ALL_LINKS, 1024.0),
)
_VALUE_MEMBER = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal",
                 6: "usVal"}


class NvmlCollector:
    """NVIDIA GPUs through NVML.

    Args:
        host: value of the ``host`` tag.
        nvml_module: the ``pynvml`` module; tests pass a fake with the same names.
        pid_map: returns {pid: registration with ``run_id``/``rank``} for the watched
            jobs' processes (``ProcessCollector.pids_of``); None: no ``gpu_process``.
        process_interval_s: least time between two running-process queries, seconds.
    """

    name: ClassVar[str] = "nvml"

    def __init__(self, host: str, nvml_module: Any = None,
                 pid_map: Callable[[], Mapping[int, Any]] | None = None,
                 process_interval_s: float = 5.0) -> None:
        self._nv = nvml_module
        self._proc_every_ns = int(process_interval_s * 1e9)
        self._last_proc_ns: int | None = None
        self._host = host
        self._pid_map = pid_map
        self._devices: list[tuple[Any, dict[str, str]]] = []
        self._unsupported: set[tuple[int, str]] = set()
        self._once = OnceLogger(log)
        self._field_ids: list[tuple[str, int, int, float]] = []
        self._opened = False

    # ---------------------------------------------------------------- lifecycle

    def open(self) -> None:
        if self._nv is None:
            try:
                import pynvml
            except ImportError as exc:
                raise CollectorUnavailable(
                    "nvml: nvidia-ml-py is not installed (pip install 'provscope[gpu]')"
                ) from exc
            self._nv = pynvml
        nv = self._nv
        try:
            nv.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            raise CollectorUnavailable(f"nvml: NVML cannot start ({exc})") from exc
        self._opened = True
        try:
            count = nv.nvmlDeviceGetCount()
            devices = []
            for i in range(count):
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                uuid = nv.nvmlDeviceGetUUID(handle)
                if isinstance(uuid, bytes):
                    uuid = uuid.decode("ascii", "replace")
                devices.append((handle, {"host": self._host, "gpu": str(i),
                                         "gpu_uuid": str(uuid)}))
        except Exception as exc:
            self.close()
            raise CollectorUnavailable(f"nvml: devices cannot be listed ({exc})") from exc
        if not devices:
            self.close()
            raise CollectorUnavailable("nvml: NVML found no GPU")
        self._devices = devices
        self._field_ids = [(ours, getattr(nv, const), scope, scale)
                           for ours, const, scope, scale in _FIELD_VALUES if hasattr(nv, const)]

    def close(self) -> None:
        if self._opened:
            self._opened = False
            try:
                self._nv.nvmlShutdown()
            except Exception:
                log.debug("nvmlShutdown failed", exc_info=True)
        self._devices = []

    def specs(self) -> Sequence[MetricSpec]:
        return specs_for(self.name)

    # ---------------------------------------------------------------- sampling

    def _get(self, idx: int, field: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call one NVML getter; None when unsupported (remembered) or failing (this time)."""
        if (idx, field) in self._unsupported:
            return None
        try:
            return fn(*args)
        except Exception as exc:
            if self._is_not_supported(exc):
                self._unsupported.add((idx, field))
                self._once((idx, field), "nvml: gpu %d does not support %s; left out", idx, field)
            else:
                self._once(("err", idx, field), "nvml: gpu %d %s failed (%s); left out",
                           idx, field, exc, level=logging.WARNING)
            return None

    def _is_not_supported(self, exc: Exception) -> bool:
        code = getattr(self._nv, "NVML_ERROR_NOT_SUPPORTED", 3)
        return getattr(exc, "value", None) == code or isinstance(exc, AttributeError)

    def collect(self, now_ns: int) -> list[Point]:
        nv = self._nv
        out: list[Point] = []
        pid_map = self._pid_map() if self._pid_map else {}
        if pid_map:
            last = self._last_proc_ns
            if last is None or now_ns - last >= self._proc_every_ns:
                self._last_proc_ns = now_ns
            else:
                pid_map = {}  # queried recently: skip the slow call this time
        for idx, (h, tags) in enumerate(self._devices):
            f: dict[str, float | int] = {}
            util = self._get(idx, "utilization", nv.nvmlDeviceGetUtilizationRates, h)
            if util is not None:
                f["utilization_percent"] = float(util.gpu)
                f["memory_utilization_percent"] = float(util.memory)
            mem = self._get(idx, "memory", nv.nvmlDeviceGetMemoryInfo, h)
            if mem is not None:
                f["memory_used_bytes"] = float(mem.used)
                f["memory_total_bytes"] = float(mem.total)
            power = self._get(idx, "power", nv.nvmlDeviceGetPowerUsage, h)
            if power is not None:
                f["power_watts"] = power / 1000.0
            energy = self._get(idx, "energy", nv.nvmlDeviceGetTotalEnergyConsumption, h)
            if energy is not None:
                f["energy_joules_total"] = energy / 1000.0
            temp = self._get(idx, "temperature", nv.nvmlDeviceGetTemperature, h,
                             nv.NVML_TEMPERATURE_GPU)
            if temp is not None:
                f["temperature_celsius"] = float(temp)
            sm = self._get(idx, "sm_clock", nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM)
            if sm is not None:
                f["sm_clock_hertz"] = sm * 1e6
            memclk = self._get(idx, "mem_clock", nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_MEM)
            if memclk is not None:
                f["memory_clock_hertz"] = memclk * 1e6
            reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
                getattr(nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
            if reasons_fn is not None:
                reasons = self._get(idx, "throttle", reasons_fn, h)
                if reasons is not None:
                    f["throttle_reasons"] = int(reasons)
            for ecc_field, err_type in (
                ("ecc_corrected_errors_total", "NVML_MEMORY_ERROR_TYPE_CORRECTED"),
                ("ecc_uncorrected_errors_total", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED"),
            ):
                n = self._get(idx, ecc_field, nv.nvmlDeviceGetTotalEccErrors, h,
                              getattr(nv, err_type), nv.NVML_AGGREGATE_ECC)
                if n is not None:
                    f[ecc_field] = float(n)
            f.update(self._field_values(idx, h))
            if f:
                out.append(Point("gpu", tags, f, now_ns))
            if pid_map:
                out.extend(self._processes(idx, h, tags, pid_map, now_ns))
        return out

    def _field_values(self, idx: int, h: Any) -> dict[str, float]:
        wanted = [fv for fv in self._field_ids if (idx, fv[0]) not in self._unsupported]
        if not wanted:
            return {}
        values = self._get(idx, "field_values", self._nv.nvmlDeviceGetFieldValues, h,
                           [(fid, scope) for _, fid, scope, _ in wanted])
        if values is None:
            return {}
        out = {}
        for (ours, _, _, scale), v in zip(wanted, values, strict=False):
            if v.nvmlReturn != 0:
                self._unsupported.add((idx, ours))
                self._once((idx, ours), "nvml: gpu %d does not support %s; left out", idx, ours)
                continue
            member = _VALUE_MEMBER.get(int(v.valueType), "ullVal")
            out[ours] = float(getattr(v.value, member)) * scale
        return out

    def _processes(self, idx: int, h: Any, tags: dict[str, str],
                   pid_map: Mapping[int, Any], now_ns: int) -> list[Point]:
        procs = self._get(idx, "processes", self._nv.nvmlDeviceGetComputeRunningProcesses, h)
        if not procs:
            return []
        per_rank: dict[tuple[str, int | None], list[float]] = {}
        for p in procs:
            w = pid_map.get(p.pid)
            if w is None:
                continue
            acc = per_rank.setdefault((w.run_id, w.rank), [0.0, 0])
            used = getattr(p, "usedGpuMemory", None)
            if used is not None:  # None when the driver cannot tell (e.g. some MIG modes)
                acc[0] += float(used)
            acc[1] += 1
        out = []
        for (run_id, rank), (used, count) in per_rank.items():
            ptags = {**tags, "run_id": run_id}
            if rank is not None:
                ptags["rank"] = str(rank)
            out.append(Point("gpu_process", ptags,
                             {"memory_used_bytes": used, "processes": int(count)}, now_ns))
        return out
