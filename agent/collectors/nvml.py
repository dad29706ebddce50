"""NVIDIA GPU collector through NVML (PyPI ``nvidia-ml-py``, imported as ``pynvml``).

Emits measurement ``gpu`` (tags ``host``, ``gpu`` = NVML index, ``gpu_uuid``), one point
per GPU and sample: ``up`` (1 answered, 0 lost or unreachable), utilisation, memory,
power and its limit, energy, temperatures, clocks, decoded clock-event (throttle) reasons,
violation times, PCIe and NVLink counters and errors, ECC and remapped rows, Xid errors,
encoder/decoder utilisation and, on Hopper and later, GPM activity (see the catalogue,
``provscope.catalogue.system``); ``gpu_mig`` per MIG device of a GPU in MIG mode; and
``gpu_process`` (tags plus ``run_id``, ``rank``) for the watched jobs' processes.

Rules, from what NVML costs and how it fails:

- ``nvmlInit`` once in ``open``; device handles and UUIDs cached.
- One device is never the node: a GPU whose handle or UUID call fails with
  ``NO_PERMISSION`` (a container whose cgroup denies that device) is not ours and is
  left out; one that fails otherwise (``GPU_IS_LOST``) is kept with ``up = 0`` and
  looked up again with backoff. A getter raising ``GPU_IS_LOST`` in a sample marks its
  device lost the same way.
- Per device and field (``FieldGate``): ``NOT_SUPPORTED`` (or a driver without the
  function) leaves the field out for good, logged once; any other error leaves it out
  for 1, 2, 4 ... up to 300 s, then it is asked again. The field-value batch
  (``nvmlDeviceGetFieldValues``) is judged per value the same way.
- PCIe throughput comes from field-value counters, never from
  ``nvmlDeviceGetPcieThroughput`` (that call blocks about 20 ms).
- Clock-event reasons: ``nvmlDeviceGetCurrentClocksEventReasons``, or the older
  ``nvmlDeviceGetCurrentClocksThrottleReasons`` when the driver lacks the renamed call;
  emitted decoded, one 0/1 field per reason, and ``throttled`` = 1 only for the reasons
  that slow a busy GPU (power cap, thermal, hardware slowdown, power brake): an idle
  GPU (``GpuIdle``) is not throttled.
- Xid errors come from an NVML event set read on a thread of its own (``XidWatcher``).
- The running-process query (milliseconds per GPU, takes the driver lock) runs only
  while a job is watched, and at most every ``process_interval_s`` (5 s). NVML reports
  host PIDs; the agent registers jobs under their PID as the agent sees it (the peer
  credentials of the socket, see ``provscope.agent.ingest``), so a job in a container
  matches.
- No library, no driver or no accessible GPU: ``open`` raises ``CollectorUnavailable``
  and the agent runs on without this collector (one warning). A call into the driver can
  hang; the scheduler runs this collector on a lane of its own (``isolated``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from provscope.agent.collectors.base import OnceLogger, specs_for
from provscope.agent.collectors.gate import FieldGate
from provscope.agent.collectors.nvml_events import XidWatcher
from provscope.agent.collectors.nvml_gpm import GpmSampler, gpm_supported
from provscope.agent.collectors.nvml_util import nvml_const, nvml_error_code

from provscope.catalogue import MetricSpec
from provscope.errors import CollectorUnavailable
from provscope.records import Point

__all__ = ["CLOCK_EVENT_REASONS", "NvmlCollector", "decode_clock_events"]

log = logging.getLogger("provscope.collectors.nvml")

# nvmlReturn_t codes (nvml.h), by value so that a fake or an old pynvml needs no names.
_INVALID_ARGUMENT, _NOT_SUPPORTED, _NO_PERMISSION, _NOT_FOUND = 2, 3, 4, 6
_FUNCTION_NOT_FOUND, _GPU_IS_LOST, _RESET_REQUIRED, _GPU_NOT_FOUND = 13, 15, 16, 28
_PERMANENT = frozenset({_INVALID_ARGUMENT, _NOT_SUPPORTED, _FUNCTION_NOT_FOUND})
_LOST = frozenset({_GPU_IS_LOST, _RESET_REQUIRED, _GPU_NOT_FOUND})

_ALL_LINKS = 0xFFFFFFFF
# (our field, NVML field-id constant name, scope id, scale to base units, int field)
_FIELD_VALUES = (
    ("pcie_transmit_bytes_total", "NVML_FI_DEV_PCIE_COUNT_TX_BYTES", 0, 1.0, False),
    ("pcie_receive_bytes_total", "NVML_FI_DEV_PCIE_COUNT_RX_BYTES", 0, 1.0, False),
    ("nvlink_transmit_bytes_total", "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", _ALL_LINKS,
     1024.0, False),
    ("nvlink_receive_bytes_total", "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX", _ALL_LINKS,
     1024.0, False),
    ("memory_temperature_celsius", "NVML_FI_DEV_MEMORY_TEMP", 0, 1.0, False),
    ("pcie_replay_errors_total", "NVML_FI_DEV_PCIE_REPLAY_COUNTER", 0, 1.0, False),
    ("remapped_rows_correctable", "NVML_FI_DEV_REMAPPED_COR", 0, 1.0, False),
    ("remapped_rows_uncorrectable", "NVML_FI_DEV_REMAPPED_UNC", 0, 1.0, False),
    ("remapped_rows_pending", "NVML_FI_DEV_REMAPPED_PENDING", 0, 1.0, True),
    ("remapped_rows_failed", "NVML_FI_DEV_REMAPPED_FAILURE", 0, 1.0, True),
    ("nvlink_crc_flit_errors_total", "NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", 0,
     1.0, False),
    ("nvlink_crc_data_errors_total", "NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", 0,
     1.0, False),
    ("nvlink_replay_errors_total", "NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", 0, 1.0,
     False),
    ("nvlink_recovery_errors_total", "NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", 0,
     1.0, False),
)
_VALUE_MEMBER = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal",
                 6: "usVal"}

# (our field, nvmlClocksEventReason* bit, counts as throttling). Not throttling: GpuIdle
# (nothing to run), an applications-clocks or display setting (chosen), SyncBoost (held to
# the slowest GPU of its group, which shows its own reason).
CLOCK_EVENT_REASONS = (
    ("clocks_event_gpu_idle", 0x1, False),
    ("clocks_event_applications_clocks", 0x2, False),
    ("clocks_event_sw_power_cap", 0x4, True),
    ("clocks_event_hw_slowdown", 0x8, True),
    ("clocks_event_sync_boost", 0x10, False),
    ("clocks_event_sw_thermal", 0x20, True),
    ("clocks_event_hw_thermal", 0x40, True),
    ("clocks_event_hw_power_brake", 0x80, True),
    ("clocks_event_display_clocks", 0x100, False),
)
_THROTTLING_MASK = sum(bit for _, bit, throttling in CLOCK_EVENT_REASONS if throttling)
_REASON_CALLS = ("nvmlDeviceGetCurrentClocksEventReasons",
                 "nvmlDeviceGetCurrentClocksThrottleReasons")
_VIOLATIONS = (("power_violation_seconds_total", "NVML_PERF_POLICY_POWER", 0),
               ("thermal_violation_seconds_total", "NVML_PERF_POLICY_THERMAL", 1))


def decode_clock_events(mask: int) -> dict[str, int]:
    """The clock-event (throttle) bitmask as 0/1 fields, ``throttled`` and the raw mask."""
    out = {name: int(bool(mask & bit)) for name, bit, _ in CLOCK_EVENT_REASONS}
    out["throttled"] = int(bool(mask & _THROTTLING_MASK))
    out["throttle_reasons"] = int(mask)
    return out


class _DeviceLost(Exception):
    """A getter said the GPU is gone (``GPU_IS_LOST``): stop querying it this sample."""


@dataclass
class _Mig:
    handle: Any
    uuid: str
    tags: dict[str, str]
    gpu_instance: int | None
    gpm: GpmSampler | None = None


@dataclass
class _Device:
    index: int | None
    uuid: str | None
    handle: Any = None
    lost: bool = False
    gpm: GpmSampler | None = None
    migs: dict[str, _Mig] = field(default_factory=dict)
    mig_checked_ns: int | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.uuid or f"index-{self.index}"

    @property
    def label(self) -> str:
        return str(self.index) if self.index is not None else str(self.uuid)


class NvmlCollector:
    """NVIDIA GPUs through NVML.

    Args:
        host: value of the ``host`` tag.
        nvml_module: the ``pynvml`` module; tests pass a fake with the same names.
        pid_map: returns {pid: registration with ``run_id``/``rank``} for the watched
            jobs' processes (``ProcessCollector.pids_of``); None: no ``gpu_process``.
        process_interval_s: least time between two running-process queries, seconds.
        devices: which GPUs to sample. None: every GPU NVML lists (the node agent).
            A collection of UUIDs (``GPU-...`` as ``nvmlDeviceGetUUID`` and
            ``nvidia-smi -L`` print them; a ``MIG-...`` UUID selects its parent GPU):
            only those, fixed at ``open``; a UUID NVML does not know is left out with one
            warning. A callable: called at each sample with the tags of every GPU NVML
            lists (NVML index order; ``gpu_uuid`` absent while a GPU is unreachable),
            returns the positions to sample, so a job that starts using CUDA later is
            picked up (in-job telemetry). Match a job's GPUs by UUID, never by CUDA
            index: CUDA and NVML number GPUs differently under ``CUDA_VISIBLE_DEVICES``
            (``provscope.agent.collectors.nvml_devices.cuda_uuid`` turns a CUDA index
            into the NVML UUID).
        xid_events: watch Xid errors on a thread of their own (``XidWatcher``); None
            (default): yes, unless ``devices`` is a callable (a job's own sampler leaves
            Xid watching to the node agent).
        mig_refresh_s: how often the MIG devices of a GPU are listed again, seconds.

    ``open`` and ``collect`` call into the driver and may block while it is busy; the
    agent's scheduler runs this collector on a lane of its own. Thread-compatible: one
    thread samples.
    """

    name: ClassVar[str] = "nvml"
    isolated: ClassVar[bool] = True  # driver calls can hang: the scheduler gives it a lane

    def __init__(self, host: str, nvml_module: Any = None,
                 pid_map: Callable[[], Mapping[int, Any]] | None = None,
                 process_interval_s: float = 5.0, *,
                 devices: Iterable[str] | Callable[[list[dict[str, str]]], Iterable[int]]
                 | None = None,
                 xid_events: bool | None = None,
                 mig_refresh_s: float = 30.0) -> None:
        self._nv = nvml_module
        self._proc_every_ns = int(process_interval_s * 1e9)
        self._last_proc_ns: int | None = None
        self._host = host
        self._pid_map = pid_map
        self._select = devices if callable(devices) else None
        self._wanted = None if devices is None or callable(devices) else \
            list(dict.fromkeys(devices))
        self._xid_enabled = xid_events if xid_events is not None else self._select is None
        self._mig_every_ns = int(mig_refresh_s * 1e9)
        self._devices: list[_Device] = []
        self._gate = FieldGate(log, "nvml")
        self._once = OnceLogger(log)
        self._field_ids: list[tuple[str, int, int, float, bool]] = []
        self._reasons_call = 0  # index into _REASON_CALLS; driver-wide, not per device
        self._xid: XidWatcher | None = None
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
            count = int(nv.nvmlDeviceGetCount())
        except Exception as exc:
            self.close()
            raise CollectorUnavailable(f"nvml: devices cannot be counted ({exc})") from exc
        denied = 0
        devices: list[_Device] = []
        if self._wanted is None:
            for i in range(count):
                dev = _Device(index=i, uuid=None)
                if self._attach(dev, 0, at_open=True) == "denied":
                    denied += 1
                    continue
                devices.append(dev)
        else:
            for uuid in self._wanted:
                dev = _Device(index=None, uuid=uuid)
                outcome = self._attach(dev, 0, at_open=True)
                if outcome == "denied":
                    denied += 1
                elif outcome != "unknown" and all(d.uuid != dev.uuid for d in devices):
                    devices.append(dev)
        if not devices:
            self.close()
            why = f"{denied} GPU(s) not accessible to this process" if denied else \
                "NVML found no GPU" if self._wanted is None else "none of the requested GPUs found"
            raise CollectorUnavailable(f"nvml: {why}")
        self._devices = devices
        self._field_ids = [(ours, fid, scope, scale, is_int)
                           for ours, const, scope, scale, is_int in _FIELD_VALUES
                           if (fid := nvml_const(nv, const)) is not None]
        if self._xid_enabled:
            live = {d.uuid: d.handle for d in devices if d.handle is not None and d.uuid}
            if live:
                self._xid = XidWatcher(nv, live)
                self._xid.start()

    def _attach(self, dev: _Device, now_ns: int, *, at_open: bool = False) -> str:
        """Look up ``dev``'s handle (by UUID when known, else by index) and its UUID/index.

        Returns ``ok``, ``denied`` (NO_PERMISSION at open: not this process's GPU),
        ``unknown`` (a requested UUID NVML does not know) or ``lost`` (kept, ``up`` = 0,
        tried again with backoff).
        """
        nv = self._nv
        index: int | None
        try:
            if dev.uuid is not None:
                handle = nv.nvmlDeviceGetHandleByUUID(dev.uuid)
                handle, uuid = self._parent_of_mig(handle)
                index = int(nv.nvmlDeviceGetIndex(handle))
            else:
                handle = nv.nvmlDeviceGetHandleByIndex(dev.index)
                index = dev.index
                uuid = nv.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode("ascii", "replace") if isinstance(uuid, bytes) else str(uuid)
        except Exception as exc:
            code = nvml_error_code(exc)
            if at_open and code == _NO_PERMISSION:
                log.info("nvml: gpu %s is not accessible to this process (%s); left out",
                         dev.label, exc)
                return "denied"
            if at_open and code == _NOT_FOUND and dev.uuid is not None:
                log.warning("nvml: no GPU with UUID %s on this node; left out", dev.uuid)
                return "unknown"
            dev.handle = None
            dev.lost = True
            if at_open:
                # Reported with up = 0; the first sample looks it up again, then backoff.
                log.warning("nvml: gpu %s cannot be reached (%s); reported as down and "
                            "looked up again", dev.label, exc)
            else:
                self._gate.failed((dev.key, "device"), f"gpu {dev.label}", exc, now_ns)
            self._tag(dev)
            return "lost"
        dev.handle, dev.index, dev.uuid, dev.lost = handle, index, uuid, False
        self._tag(dev)
        return "ok"

    def _parent_of_mig(self, handle: Any) -> tuple[Any, str]:
        """(handle, UUID) of the GPU itself when ``handle`` is a MIG device."""
        nv = self._nv
        if hasattr(nv, "nvmlDeviceIsMigDeviceHandle"):
            is_mig = nv.nvmlDeviceIsMigDeviceHandle(handle)
            if getattr(is_mig, "value", is_mig):
                handle = nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        return handle, nv.nvmlDeviceGetUUID(handle)

    def _tag(self, dev: _Device) -> None:
        dev.tags = {"host": self._host}
        if dev.index is not None:
            dev.tags["gpu"] = str(dev.index)
        if dev.uuid is not None:
            dev.tags["gpu_uuid"] = dev.uuid

    def close(self) -> None:
        if self._xid is not None:
            self._xid.stop()
            self._xid = None
        for dev in self._devices:
            self._drop_samplers(dev)
        if self._opened:
            self._opened = False
            try:
                self._nv.nvmlShutdown()
            except Exception:
                log.debug("nvmlShutdown failed", exc_info=True)
        self._devices = []

    def specs(self) -> Sequence[MetricSpec]:
        return specs_for(self.name)

    @property
    def device_uuids(self) -> list[str]:
        """UUIDs of the GPUs this collector samples (after ``open``)."""
        return [d.uuid for d in self._devices if d.uuid]

    # ---------------------------------------------------------------- errors

    def _failed(self, dev: _Device, key: tuple[str, str], what: str, exc: Exception,
                now_ns: int) -> None:
        """Classify one getter's exception: device lost, permanent, or retry later."""
        code = nvml_error_code(exc)
        if code in _LOST:
            raise _DeviceLost(str(exc)) from exc
        if code in _PERMANENT or isinstance(exc, AttributeError):
            self._gate.permanent(key, f"gpu {dev.label} {what}")
        else:
            self._gate.failed(key, f"gpu {dev.label} {what}", exc, now_ns)

    def _get(self, dev: _Device, what: str, now_ns: int, call: str, *args: Any,
             target: Any = None) -> Any:
        """``nv.<call>(handle, *args)``; None when gated off or failing (classified)."""
        key = (dev.key, what)
        if not self._gate.allowed(key, now_ns):
            return None
        try:
            value = getattr(self._nv, call)(dev.handle if target is None else target, *args)
        except Exception as exc:
            self._failed(dev, key, what, exc, now_ns)
            return None
        self._gate.ok(key, f"gpu {dev.label} {what}")
        return value

    # ---------------------------------------------------------------- sampling

    def collect(self, now_ns: int) -> list[Point]:
        out: list[Point] = []
        pid_map = self._pid_map() if self._pid_map else {}
        if pid_map:
            last = self._last_proc_ns
            if last is None or now_ns - last >= self._proc_every_ns:
                self._last_proc_ns = now_ns
            else:
                pid_map = {}  # queried recently: skip the slow call this time
        devices = self._devices
        if self._select is not None:
            keep = set(self._select([dict(d.tags) for d in devices]))
            devices = [d for i, d in enumerate(devices) if i in keep]
        for dev in devices:
            if dev.lost and not self._revive(dev, now_ns):
                out.append(Point("gpu", dict(dev.tags), self._down(dev), now_ns))
                continue
            try:
                fields, extra = self._sample(dev, now_ns, pid_map)
            except _DeviceLost as exc:
                self._mark_lost(dev, exc, now_ns)
                out.append(Point("gpu", dict(dev.tags), self._down(dev), now_ns))
                continue
            if not fields:  # every getter failed or waits out its backoff: not answering
                out.append(Point("gpu", dev.tags, self._down(dev), now_ns))
                continue
            fields["up"] = 1
            fields.update(self._xid_fields(dev))
            out.append(Point("gpu", dev.tags, fields, now_ns))
            out.extend(extra)
        return out

    def _xid_fields(self, dev: _Device) -> dict[str, float | int]:
        if self._xid is None or dev.uuid is None:
            return {}
        xid = self._xid.read(dev.uuid)
        if xid is None:
            return {}
        return {"xid_errors_total": float(xid[0]), "last_xid": int(xid[1])}

    def _down(self, dev: _Device) -> dict[str, float | int]:
        """The fields of a GPU that does not answer: ``up`` = 0, and its Xid count (a GPU
        that fell off the bus says so with Xid 79 just before)."""
        return {"up": 0, **self._xid_fields(dev)}

    def _revive(self, dev: _Device, now_ns: int) -> bool:
        if not self._gate.allowed((dev.key, "device"), now_ns):
            return False
        if self._attach(dev, now_ns) != "ok":
            return False
        self._gate.ok((dev.key, "device"), f"gpu {dev.label}")
        return True

    def _mark_lost(self, dev: _Device, exc: Exception, now_ns: int) -> None:
        dev.lost = True
        self._drop_samplers(dev)
        self._gate.failed((dev.key, "device"), f"gpu {dev.label}", exc, now_ns)

    def _drop_samplers(self, dev: _Device) -> None:
        for sampler in [dev.gpm, *(m.gpm for m in dev.migs.values())]:
            if sampler is not None:
                sampler.close()
        dev.gpm = None
        dev.migs = {}
        dev.mig_checked_ns = None

    def _sample(self, dev: _Device, now_ns: int,
                pid_map: Mapping[int, Any]) -> tuple[dict[str, float | int], list[Point]]:
        nv = self._nv
        f: dict[str, float | int] = {}
        util = self._get(dev, "utilization", now_ns, "nvmlDeviceGetUtilizationRates")
        if util is not None:
            f["utilization_percent"] = float(util.gpu)
            f["memory_utilization_percent"] = float(util.memory)
        mem = self._get(dev, "memory", now_ns, "nvmlDeviceGetMemoryInfo")
        if mem is not None:
            f["memory_used_bytes"] = float(mem.used)
            f["memory_total_bytes"] = float(mem.total)
            free = getattr(mem, "free", None)  # nvmlMemory_t has it; a stand-in may not
            if free is not None:
                f["memory_free_bytes"] = float(free)
        power = self._get(dev, "power", now_ns, "nvmlDeviceGetPowerUsage")
        if power is not None:
            f["power_watts"] = power / 1000.0
        limit = self._get(dev, "power_limit", now_ns, "nvmlDeviceGetEnforcedPowerLimit")
        if limit is not None:
            f["power_limit_watts"] = limit / 1000.0
        energy = self._get(dev, "energy", now_ns, "nvmlDeviceGetTotalEnergyConsumption")
        if energy is not None:
            f["energy_joules_total"] = energy / 1000.0
        temp = self._get(dev, "temperature", now_ns, "nvmlDeviceGetTemperature",
                         nvml_const(nv, "NVML_TEMPERATURE_GPU", 0))
        if temp is not None:
            f["temperature_celsius"] = float(temp)
        sm = self._get(dev, "sm_clock", now_ns, "nvmlDeviceGetClockInfo",
                       nvml_const(nv, "NVML_CLOCK_SM", 1))
        if sm is not None:
            f["sm_clock_hertz"] = sm * 1e6
        memclk = self._get(dev, "mem_clock", now_ns, "nvmlDeviceGetClockInfo",
                           nvml_const(nv, "NVML_CLOCK_MEM", 2))
        if memclk is not None:
            f["memory_clock_hertz"] = memclk * 1e6
        for ours, call in (("encoder_utilization_percent", "nvmlDeviceGetEncoderUtilization"),
                           ("decoder_utilization_percent", "nvmlDeviceGetDecoderUtilization")):
            codec = self._get(dev, ours, now_ns, call)
            if codec is not None:
                f[ours] = float(codec[0])  # [utilisation %, sampling period us]
        f.update(self._clock_events(dev, now_ns))
        for ours, policy, default in _VIOLATIONS:
            v = self._get(dev, ours, now_ns, "nvmlDeviceGetViolationStatus",
                          nvml_const(nv, policy, default))
            if v is not None:
                f[ours] = float(v.violationTime) / 1e9  # nanoseconds
        for ecc_field, err_type, default in (
            ("ecc_corrected_errors_total", "NVML_MEMORY_ERROR_TYPE_CORRECTED", 0),
            ("ecc_uncorrected_errors_total", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1),
        ):
            n = self._get(dev, ecc_field, now_ns, "nvmlDeviceGetTotalEccErrors",
                          nvml_const(nv, err_type, default),
                          nvml_const(nv, "NVML_AGGREGATE_ECC", 1))
            if n is not None:
                f[ecc_field] = float(n)
        f.update(self._field_values(dev, now_ns))
        f.update(self._gpm(dev, now_ns))
        extra = self._migs(dev, now_ns)
        if pid_map:
            extra.extend(self._processes(dev, now_ns, pid_map))
        return f, extra

    def _clock_events(self, dev: _Device, now_ns: int) -> dict[str, int]:
        key = (dev.key, "clocks_event_reasons")
        if not self._gate.allowed(key, now_ns):
            return {}
        while self._reasons_call < len(_REASON_CALLS):
            call = _REASON_CALLS[self._reasons_call]
            try:
                mask = int(getattr(self._nv, call)(dev.handle))
            except Exception as exc:
                if isinstance(exc, AttributeError) or \
                        nvml_error_code(exc) == _FUNCTION_NOT_FOUND:
                    # An older driver or pynvml without the renamed call: the old name.
                    self._reasons_call += 1
                    log.info("nvml: %s not available (%s); trying the next name", call, exc)
                    continue
                self._failed(dev, key, "clocks event reasons", exc, now_ns)
                return {}
            self._gate.ok(key, f"gpu {dev.label} clocks event reasons")
            return decode_clock_events(mask)
        self._gate.permanent(key, f"gpu {dev.label} clocks event reasons")
        return {}

    def _field_values(self, dev: _Device, now_ns: int) -> dict[str, float | int]:
        wanted = [fv for fv in self._field_ids
                  if self._gate.allowed((dev.key, fv[0]), now_ns)]
        if not wanted:
            return {}
        values = self._get(dev, "field_values", now_ns, "nvmlDeviceGetFieldValues",
                           [(fid, scope) for _, fid, scope, _, _ in wanted])
        if values is None:
            return {}
        out: dict[str, float | int] = {}
        for (ours, _, _, scale, is_int), v in zip(wanted, values, strict=False):
            key = (dev.key, ours)
            ret = int(v.nvmlReturn)
            if ret in _LOST:
                raise _DeviceLost(f"field {ours}: NVML error {ret}")
            if ret in _PERMANENT:
                self._gate.permanent(key, f"gpu {dev.label} {ours}")
                continue
            if ret != 0:
                self._gate.failed(key, f"gpu {dev.label} {ours}", f"NVML error {ret}", now_ns)
                continue
            self._gate.ok(key, f"gpu {dev.label} {ours}")
            member = _VALUE_MEMBER.get(int(v.valueType), "ullVal")
            raw = getattr(v.value, member)
            out[ours] = int(raw) if is_int else float(raw) * scale
        return out

    def _gpm(self, dev: _Device, now_ns: int) -> dict[str, float]:
        key = (dev.key, "gpm")
        if not self._gate.allowed(key, now_ns):
            return {}
        try:
            if dev.gpm is None:
                if not gpm_supported(self._nv, dev.handle):
                    self._gate.permanent(key, f"gpu {dev.label} GPM metrics")
                    return {}
                dev.gpm = GpmSampler(self._nv, dev.handle)
            values = dev.gpm.read()
        except Exception as exc:
            if dev.gpm is not None:
                dev.gpm.close()  # start again from a fresh pair of samples
                dev.gpm = None
            self._failed(dev, key, "GPM metrics", exc, now_ns)
            return {}
        self._gate.ok(key, f"gpu {dev.label} GPM metrics")
        return values

    # ---------------------------------------------------------------- MIG

    def _migs(self, dev: _Device, now_ns: int) -> list[Point]:
        if dev.mig_checked_ns is None or now_ns - dev.mig_checked_ns >= self._mig_every_ns:
            dev.mig_checked_ns = now_ns
            self._list_migs(dev, now_ns)
        out = []
        for mig in dev.migs.values():
            f: dict[str, float | int] = {}
            mem = self._get(dev, f"{mig.uuid} memory", now_ns, "nvmlDeviceGetMemoryInfo",
                            target=mig.handle)
            if mem is not None:
                f["memory_used_bytes"] = float(mem.used)
                f["memory_total_bytes"] = float(mem.total)
            f.update(self._mig_gpm(dev, mig, now_ns))
            if f:
                out.append(Point("gpu_mig", mig.tags, f, now_ns))
        return out

    def _list_migs(self, dev: _Device, now_ns: int) -> None:
        nv = self._nv
        mode = self._get(dev, "mig_mode", now_ns, "nvmlDeviceGetMigMode")
        if not mode or int(mode[0]) != nvml_const(nv, "NVML_DEVICE_MIG_ENABLE", 1):
            for mig in dev.migs.values():
                if mig.gpm is not None:
                    mig.gpm.close()
            dev.migs = {}
            return
        slots = self._get(dev, "mig_count", now_ns, "nvmlDeviceGetMaxMigDeviceCount")
        found: dict[str, _Mig] = {}
        for i in range(int(slots or 0)):
            try:
                handle = nv.nvmlDeviceGetMigDeviceHandleByIndex(dev.handle, i)
            except Exception as exc:
                if nvml_error_code(exc) in _LOST:
                    raise _DeviceLost(str(exc)) from exc
                continue  # NOT_FOUND: an empty slot
            try:
                uuid = nv.nvmlDeviceGetUUID(handle)
                uuid = uuid.decode("ascii", "replace") if isinstance(uuid, bytes) else str(uuid)
                gi = int(nv.nvmlDeviceGetGpuInstanceId(handle))
                ci = int(nv.nvmlDeviceGetComputeInstanceId(handle))
            except Exception as exc:
                if nvml_error_code(exc) in _LOST:
                    raise _DeviceLost(str(exc)) from exc
                self._once(("mig", dev.key, i), "nvml: gpu %s MIG slot %d unreadable (%s)",
                           dev.label, i, exc)
                continue
            old = dev.migs.get(uuid)
            found[uuid] = old if old is not None else _Mig(
                handle, uuid, {**dev.tags, "mig_uuid": uuid, "gpu_instance": str(gi),
                               "compute_instance": str(ci)}, gi)
        for uuid, mig in dev.migs.items():
            if uuid not in found and mig.gpm is not None:
                mig.gpm.close()
        dev.migs = found

    def _mig_gpm(self, dev: _Device, mig: _Mig, now_ns: int) -> dict[str, float]:
        key = (dev.key, f"{mig.uuid} gpm")
        if mig.gpu_instance is None or not self._gate.allowed(key, now_ns) or \
                not hasattr(self._nv, "nvmlGpmMigSampleGet"):
            return {}
        try:
            if mig.gpm is None:
                if not gpm_supported(self._nv, dev.handle):
                    self._gate.permanent(key, f"gpu {dev.label} MIG GPM metrics")
                    return {}
                mig.gpm = GpmSampler(self._nv, dev.handle, gpu_instance_id=mig.gpu_instance)
            values = mig.gpm.read()
        except Exception as exc:
            if mig.gpm is not None:
                mig.gpm.close()
                mig.gpm = None
            self._failed(dev, key, f"MIG {mig.uuid} GPM metrics", exc, now_ns)
            return {}
        self._gate.ok(key, f"gpu {dev.label} MIG GPM metrics")
        return values

    # ---------------------------------------------------------------- processes

    def _processes(self, dev: _Device, now_ns: int,
                   pid_map: Mapping[int, Any]) -> list[Point]:
        procs = self._get(dev, "processes", now_ns, "nvmlDeviceGetComputeRunningProcesses")
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
            ptags = {**dev.tags, "run_id": run_id}
            if rank is not None:
                ptags["rank"] = str(rank)
            out.append(Point("gpu_process", ptags,
                             {"memory_used_bytes": used, "processes": int(count)}, now_ns))
        return out
