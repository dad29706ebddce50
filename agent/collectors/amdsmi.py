"""AMD GPU collector through ``amdsmi`` (the ROCm SMI Python library), when importable.

Emits measurement ``gpu`` (tags ``host``, ``gpu``, ``gpu_uuid``) with the fields amdsmi
has: ``up``, ``utilization_percent`` (gfx activity), ``memory_utilization_percent`` (umc
activity), ``memory_used_bytes``, ``memory_total_bytes``, ``power_watts``,
``energy_joules_total``, ``temperature_celsius`` (the edge sensor, or hotspot/junction on
parts without one, such as MI300), ``memory_temperature_celsius`` (VRAM sensor),
``sm_clock_hertz`` (gfx clock), ``memory_clock_hertz``, ``ecc_corrected_errors_total``,
``ecc_uncorrected_errors_total`` and ``pcie_replay_errors_total``; and ``gpu_process``
per watched rank. Units differ between amdsmi releases (VRAM in MB, energy as
accumulator x resolution in microjoules); they are normalised here.

Failures as for NVML (``FieldGate``): ``AMDSMI_STATUS_NOT_SUPPORTED`` (or not yet
implemented) leaves a field out for good, any other error for a backoff delay. ``up`` is 1
when at least one getter answered in the sample, 0 when every one that was asked failed.
The process list is read at most every ``process_interval_s`` (5 s) and only while a job
is watched; amdsmi 6.1 and later return dicts, older releases process handles that
``amdsmi_get_gpu_process_info`` (or the PID itself) resolves. Like NVML, calls go into a
driver that can hang: the scheduler runs this collector on a lane of its own.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from provscope.agent.collectors.base import specs_for
from provscope.agent.collectors.gate import FieldGate

from provscope.catalogue import MetricSpec
from provscope.errors import CollectorUnavailable
from provscope.records import Point

__all__ = ["AmdSmiCollector"]

log = logging.getLogger("provscope.collectors.amdsmi")

_MB = 1024.0 * 1024.0
# amdsmi_status_t: NOT_SUPPORTED, NOT_YET_IMPLEMENTED
_PERMANENT = frozenset({2, 3})
# Sensors for temperature_celsius, in order: MI300-class parts have no edge sensor.
_CORE_SENSORS = ("EDGE", "HOTSPOT", "JUNCTION")


class _Unsupported(Exception):
    """A getter's answer said "not available" (amdsmi's "N/A")."""


def _status(exc: BaseException) -> int | None:
    code = getattr(exc, "err_code", None)
    if code is None and hasattr(exc, "get_error_code"):
        try:
            code = exc.get_error_code()
        except Exception:
            code = None
    return abs(code) if type(code) is int else None


class AmdSmiCollector:
    """AMD GPUs through amdsmi.

    Args:
        host: value of the ``host`` tag.
        amdsmi_module: the ``amdsmi`` module; tests pass a fake.
        pid_map: as for ``NvmlCollector``.
        process_interval_s: least time between two process-list queries, seconds.
    """

    name: ClassVar[str] = "amdsmi"
    isolated: ClassVar[bool] = True  # driver calls can hang: the scheduler gives it a lane

    def __init__(self, host: str, amdsmi_module: Any = None,
                 pid_map: Callable[[], Mapping[int, Any]] | None = None,
                 process_interval_s: float = 5.0) -> None:
        self._smi = amdsmi_module
        self._host = host
        self._pid_map = pid_map
        self._proc_every_ns = int(process_interval_s * 1e9)
        self._last_proc_ns: int | None = None
        self._devices: list[tuple[Any, dict[str, str]]] = []
        self._gate = FieldGate(log, "amdsmi")
        self._opened = False

    def open(self) -> None:
        if self._smi is None:
            try:
                import amdsmi
            except Exception as exc:  # ImportError, or the ROCm library missing
                err = CollectorUnavailable(f"amdsmi: not importable ({exc})")
                # Most nodes have no AMD GPU: that is normal, not worth a warning.
                err.quiet = True  # type: ignore[attr-defined]
                raise err from exc
            self._smi = amdsmi
        smi = self._smi
        try:
            smi.amdsmi_init()
            self._opened = True
            handles = smi.amdsmi_get_processor_handles()
        except Exception as exc:
            self.close()
            raise CollectorUnavailable(f"amdsmi: cannot start ({exc})") from exc
        if not handles:
            self.close()
            raise CollectorUnavailable("amdsmi: no AMD GPU found")
        for i, h in enumerate(handles):
            try:
                uuid = str(smi.amdsmi_get_gpu_device_uuid(h))
            except Exception:
                uuid = f"amd-{i}"
            self._devices.append((h, {"host": self._host, "gpu": str(i), "gpu_uuid": uuid}))

    def close(self) -> None:
        if self._opened:
            self._opened = False
            try:
                self._smi.amdsmi_shut_down()
            except Exception:
                log.debug("amdsmi_shut_down failed", exc_info=True)
        self._devices = []

    def specs(self) -> Sequence[MetricSpec]:
        return specs_for(self.name)

    def _get(self, idx: int, what: str, now_ns: int, fn: Callable[[], Any],
             tally: list[int]) -> Any:
        """``fn()``; None when gated off or failing. ``tally``: [answered, failed]."""
        key = (idx, what)
        if not self._gate.allowed(key, now_ns):
            return None
        try:
            value = fn()
            if value == "N/A":
                raise _Unsupported("N/A")
        except Exception as exc:
            if isinstance(exc, _Unsupported | AttributeError) or _status(exc) in _PERMANENT \
                    or "NOT_SUPPORTED" in str(exc):
                self._gate.permanent(key, f"gpu {idx} {what}")
            else:
                tally[1] += 1
                self._gate.failed(key, f"gpu {idx} {what}", exc, now_ns)
            return None
        tally[0] += 1
        self._gate.ok(key, f"gpu {idx} {what}")
        return value

    def collect(self, now_ns: int) -> list[Point]:
        out: list[Point] = []
        pid_map = self._pid_map() if self._pid_map else {}
        if pid_map:
            last = self._last_proc_ns
            if last is None or now_ns - last >= self._proc_every_ns:
                self._last_proc_ns = now_ns
            else:
                pid_map = {}  # queried recently: skip the slow call this time
        for idx, (h, tags) in enumerate(self._devices):
            tally = [0, 0]
            f = self._sample(idx, h, now_ns, tally)
            if tally[0] == 0 and tally[1] > 0:
                out.append(Point("gpu", tags, {"up": 0}, now_ns))  # nothing answered
                continue
            f["up"] = 1
            out.append(Point("gpu", tags, f, now_ns))
            if pid_map:
                out.extend(self._processes(idx, h, tags, pid_map, now_ns, tally))
        return out

    def _sample(self, idx: int, h: Any, now_ns: int, tally: list[int]) -> dict[str, Any]:
        smi = self._smi
        f: dict[str, Any] = {}
        act = self._get(idx, "activity", now_ns, lambda: smi.amdsmi_get_gpu_activity(h), tally)
        if act:
            if _num(act.get("gfx_activity")) is not None:
                f["utilization_percent"] = _num(act["gfx_activity"])
            if _num(act.get("umc_activity")) is not None:
                f["memory_utilization_percent"] = _num(act["umc_activity"])
        vram = self._get(idx, "vram", now_ns, lambda: smi.amdsmi_get_gpu_vram_usage(h), tally)
        if vram:
            if (used := _num(vram.get("vram_used"))) is not None:
                f["memory_used_bytes"] = used * _MB
            if (total := _num(vram.get("vram_total"))) is not None:
                f["memory_total_bytes"] = total * _MB
        power = self._get(idx, "power", now_ns, lambda: smi.amdsmi_get_power_info(h), tally)
        if power:
            watts = _num(power.get("current_socket_power"))
            if watts is None:
                watts = _num(power.get("average_socket_power"))
            if watts is not None:
                f["power_watts"] = watts
        energy = self._get(idx, "energy", now_ns, lambda: smi.amdsmi_get_energy_count(h), tally)
        if energy:
            acc = _num(energy.get("energy_accumulator", energy.get("power")))
            res = _num(energy.get("counter_resolution"))
            if acc is not None and res is not None:
                f["energy_joules_total"] = acc * res / 1e6
        core = self._temperature(idx, h, now_ns, _CORE_SENSORS, tally)
        if core is not None:
            f["temperature_celsius"] = core
        memory = self._temperature(idx, h, now_ns, ("VRAM",), tally)
        if memory is not None:
            f["memory_temperature_celsius"] = memory
        for ours, clk in (("sm_clock_hertz", "GFX"), ("memory_clock_hertz", "MEM")):
            info = self._get(idx, ours, now_ns, functools.partial(
                smi.amdsmi_get_clock_info, h, getattr(smi.AmdSmiClkType, clk)), tally)
            if info and (mhz := _num(info.get("clk", info.get("cur_clk")))) is not None:
                f[ours] = mhz * 1e6
        ecc = self._get(idx, "ecc", now_ns, lambda: smi.amdsmi_get_gpu_total_ecc_count(h),
                        tally)
        if ecc:
            for ours, key in (("ecc_corrected_errors_total", "correctable_count"),
                              ("ecc_uncorrected_errors_total", "uncorrectable_count")):
                if _num(ecc.get(key)) is not None:
                    f[ours] = _num(ecc[key])
        pcie = self._get(idx, "pcie", now_ns, lambda: smi.amdsmi_get_pcie_info(h), tally)
        metric = pcie.get("pcie_metric") if isinstance(pcie, Mapping) else None
        if isinstance(metric, Mapping) and _num(metric.get("pcie_replay_count")) is not None:
            f["pcie_replay_errors_total"] = _num(metric["pcie_replay_count"])
        return f

    def _temperature(self, idx: int, h: Any, now_ns: int, sensors: tuple[str, ...],
                     tally: list[int]) -> float | None:
        """The first of ``sensors`` this part has (a missing one is gated off for good)."""
        smi = self._smi
        kinds = getattr(smi, "AmdSmiTemperatureType", None)
        metric = getattr(getattr(smi, "AmdSmiTemperatureMetric", None), "CURRENT", None)
        for sensor in sensors:
            kind = getattr(kinds, sensor, None)
            if kind is None or self._gate.is_permanent((idx, f"temperature {sensor}")):
                continue
            value = _num(self._get(idx, f"temperature {sensor}", now_ns,
                                   functools.partial(smi.amdsmi_get_temp_metric, h, kind,
                                                     metric), tally))
            if value is not None and value > 0:
                return value
            if value == 0 or self._gate.is_permanent((idx, f"temperature {sensor}")):
                continue  # no such sensor on this part (0 degrees is no reading): next one
            return None  # a transient failure: the next sample asks again
        return None

    def _processes(self, idx: int, h: Any, tags: dict[str, str],
                   pid_map: Mapping[int, Any], now_ns: int, tally: list[int]) -> list[Point]:
        procs = self._get(idx, "processes", now_ns,
                          lambda: self._smi.amdsmi_get_gpu_process_list(h), tally)
        per_rank: dict[tuple[str, int | None], list[float]] = {}
        for p in procs or ():
            info = self._process_info(h, p)
            if info is None:
                continue
            pid, used = info
            w = pid_map.get(pid)
            if w is None:
                continue
            acc = per_rank.setdefault((w.run_id, w.rank), [0.0, 0])
            acc[0] += used or 0.0
            acc[1] += 1
        out = []
        for (run_id, rank), (used, count) in per_rank.items():
            ptags = {**tags, "run_id": run_id}
            if rank is not None:
                ptags["rank"] = str(rank)
            out.append(Point("gpu_process", ptags,
                             {"memory_used_bytes": used, "processes": int(count)}, now_ns))
        return out

    def _process_info(self, h: Any, p: Any) -> tuple[int, float | None] | None:
        """(pid, VRAM bytes) of one process-list entry: a dict (amdsmi 6.1+) or a process
        handle of older releases (resolved by ``amdsmi_get_gpu_process_info``; without it
        the handle is the PID)."""
        if not isinstance(p, Mapping):
            getter = getattr(self._smi, "amdsmi_get_gpu_process_info", None)
            try:
                p = getter(h, p) if getter is not None else {"pid": int(p)}
            except Exception:
                try:
                    p = {"pid": int(p)}
                except (TypeError, ValueError):
                    return None
            if not isinstance(p, Mapping):
                return None
        pid = p.get("pid")
        if type(pid) is not int:
            return None
        usage = p.get("memory_usage")
        used = _num(usage.get("vram_mem")) if isinstance(usage, Mapping) else None
        return pid, used


def _num(value: Any) -> float | None:
    """A number, or None for amdsmi's "N/A" strings and missing values."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    return None
