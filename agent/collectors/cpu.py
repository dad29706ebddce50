"""CPU collector: per-mode share of CPU time, load averages, clock frequency.

Emits measurement ``cpu`` (tag ``host``): ``usage_percent``, ``<mode>_percent`` for the
modes the platform reports (user, nice, system, idle, iowait, irq, softirq, steal, guest),
``load1/5/15``, ``frequency_hertz``, ``logical_cpus``. Percentages are deltas of the cumulative
CPU times between two samples, so the first sample after ``open()`` already has a
baseline (``open`` takes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from provscope.agent.collectors.base import specs_for

from provscope.catalogue import MetricSpec
from provscope.catalogue.system import CPU_MODES
from provscope.errors import CollectorUnavailable
from provscope.records import Point

__all__ = ["CpuCollector"]


class CpuCollector:
    """Whole-node CPU usage.

    Args:
        host: value of the ``host`` tag.
        psutil_module: the psutil module (tests pass a fake with the same functions).
    """

    name: ClassVar[str] = "cpu"

    def __init__(self, host: str, psutil_module: Any = None) -> None:
        if psutil_module is None:
            import psutil as psutil_module
        self._ps = psutil_module
        self._tags = {"host": host}
        self._prev: Any = None

    def open(self) -> None:
        try:
            self._prev = self._ps.cpu_times()
        except Exception as exc:  # no /proc/stat, no permission
            raise CollectorUnavailable(f"cpu: cpu times cannot be read ({exc})") from exc

    def collect(self, now_ns: int) -> list[Point]:
        ps = self._ps
        cur = ps.cpu_times()
        fields: dict[str, float | int] = {}
        prev = self._prev
        self._prev = cur
        if prev is not None:
            deltas = {m: max(0.0, getattr(cur, m) - getattr(prev, m))
                      for m in CPU_MODES if hasattr(cur, m)}
            # Linux counts guest time inside user time too; leave it out of the total.
            total = sum(v for m, v in deltas.items() if m not in ("guest",))
            if total > 0:
                for mode, delta in deltas.items():
                    fields[f"{mode}_percent"] = 100.0 * delta / total
                idle = deltas.get("idle", 0.0) + deltas.get("iowait", 0.0)
                fields["usage_percent"] = 100.0 * (total - idle) / total
        try:
            l1, l5, l15 = ps.getloadavg()
            fields.update(load1=float(l1), load5=float(l5), load15=float(l15))
        except (AttributeError, OSError):
            pass
        try:
            freq = ps.cpu_freq()
            if freq is not None and freq.current:
                fields["frequency_hertz"] = float(freq.current) * 1e6
        except (AttributeError, OSError, NotImplementedError):
            pass
        count = ps.cpu_count()
        if count:
            fields["logical_cpus"] = int(count)
        return [Point("cpu", self._tags, fields, now_ns)] if fields else []

    def close(self) -> None:
        self._prev = None

    def specs(self) -> Sequence[MetricSpec]:
        return specs_for(self.name)
