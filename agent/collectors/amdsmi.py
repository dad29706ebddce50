"""AMD GPU collector through ``amdsmi`` (the ROCm SMI Python library), when importable.

Emits measurement ``gpu`` (tags ``host``, ``gpu``, ``gpu_uuid``) with the fields amdsmi
has: ``utilization_percent`` (gfx activity), ``memory_utilization_percent`` (umc
activity), ``memory_used_bytes``, ``memory_total_bytes``, ``power_watts``,
``energy_joules_total``, ``temperature_celsius`` (edge), ``sm_clock_hertz`` (gfx clock),
``memory_clock_hertz``; and ``gpu_process`` per watched rank. Units differ between
amdsmi releases (VRAM in MB, energy as accumulator x resolution in microjoules); they are
normalised here. Each failing getter is left out and logged once, as for NVML.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from provscope.agent.collectors.base import OnceLogger, specs_for

from provscope.catalogue import MetricSpec
from provscope.errors import CollectorUnavailable
from provscope.records import Point

__all__ = ["AmdSmiCollector"]

log = logging.getLogger("provscope.collectors.amdsmi")

_MB = 1024.0 * 1024.0


class AmdSmiCollector:
    """AMD GPUs through amdsmi.

    Args:
        host: value of the ``host`` tag.
        amdsmi_module: the ``amdsmi`` module; tests pass a fake.
        pid_map: as for ``NvmlCollector``.
    """

    name: ClassVar[str] = "amdsmi"

    def __init__(self, host: str, amdsmi_module: Any = None,
                 pid_map: Callable[[], Mapping[int, Any]] | None = None) -> None:
        self._smi = amdsmi_module
        self._host = host
        self._pid_map = pid_map
        self._devices: list[tuple[Any, dict[str, str]]] = []
        self._bad: set[tuple[int, str]] = set()
        self._once = OnceLogger(log)
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

    def _get(self, idx: int, what: str, fn: Callable[[], Any]) -> Any:
        if (idx, what) in self._bad:
            return None
        try:
            return fn()
        except Exception as exc:
            self._bad.add((idx, what))
            self._once((idx, what), "amdsmi: gpu %d %s unavailable (%s); left out",
                       idx, what, exc)
            return None

    def collect(self, now_ns: int) -> list[Point]:
        smi = self._smi
        out: list[Point] = []
        pid_map = self._pid_map() if self._pid_map else {}
        for idx, (h, tags) in enumerate(self._devices):
            f: dict[str, float] = {}
            act = self._get(idx, "activity", lambda h=h: smi.amdsmi_get_gpu_activity(h))
            if act:
                if _num(act.get("gfx_activity")) is not None:
                    f["utilization_percent"] = _num(act["gfx_activity"])
                if _num(act.get("umc_activity")) is not None:
                    f["memory_utilization_percent"] = _num(act["umc_activity"])
            vram = self._get(idx, "vram", lambda h=h: smi.amdsmi_get_gpu_vram_usage(h))
            if vram:
                if _num(vram.get("vram_used")) is not None:
                    f["memory_used_bytes"] = _num(vram["vram_used"]) * _MB
                if _num(vram.get("vram_total")) is not None:
                    f["memory_total_bytes"] = _num(vram["vram_total"]) * _MB
            power = self._get(idx, "power", lambda h=h: smi.amdsmi_get_power_info(h))
            if power:
                watts = _num(power.get("current_socket_power"))
                if watts is None:
                    watts = _num(power.get("average_socket_power"))
                if watts is not None:
                    f["power_watts"] = watts
            energy = self._get(idx, "energy", lambda h=h: smi.amdsmi_get_energy_count(h))
            if energy:
                acc = _num(energy.get("energy_accumulator", energy.get("power")))
                res = _num(energy.get("counter_resolution"))
                if acc is not None and res is not None:
                    f["energy_joules_total"] = acc * res / 1e6
            temp = self._get(idx, "temperature", lambda h=h: smi.amdsmi_get_temp_metric(
                h, smi.AmdSmiTemperatureType.EDGE, smi.AmdSmiTemperatureMetric.CURRENT))
            if _num(temp) is not None:
                f["temperature_celsius"] = _num(temp)
            for ours, clk in (("sm_clock_hertz", "GFX"), ("memory_clock_hertz", "MEM")):
                info = self._get(idx, ours, lambda h=h, clk=clk: smi.amdsmi_get_clock_info(
                    h, getattr(smi.AmdSmiClkType, clk)))
                if info and _num(info.get("clk", info.get("cur_clk"))) is not None:
                    f[ours] = _num(info.get("clk", info.get("cur_clk"))) * 1e6
            if f:
                out.append(Point("gpu", tags, f, now_ns))
            if pid_map:
                out.extend(self._processes(idx, h, tags, pid_map, now_ns))
        return out

    def _processes(self, idx: int, h: Any, tags: dict[str, str],
                   pid_map: Mapping[int, Any], now_ns: int) -> list[Point]:
        procs = self._get(idx, "processes", lambda: self._smi.amdsmi_get_gpu_process_list(h))
        per_rank: dict[tuple[str, int | None], list[float]] = {}
        for p in procs or ():
            pid = p.get("pid") if isinstance(p, Mapping) else None
            w = pid_map.get(pid) if pid is not None else None
            if w is None:
                continue
            acc = per_rank.setdefault((w.run_id, w.rank), [0.0, 0])
            usage = p.get("memory_usage") or {}
            used = _num(usage.get("vram_mem")) if isinstance(usage, Mapping) else None
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


def _num(value: Any) -> float | None:
    """A number, or None for amdsmi's "N/A" strings and missing values."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    return None
