"""Memory collector: physical memory and swap.

Emits measurement ``memory`` (tag ``host``): ``total_bytes``, ``used_bytes`` (total minus
available, the figure that matters for OOM), ``available_bytes``, ``used_percent``,
``swap_total_bytes``, ``swap_used_bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from provscope.agent.collectors.base import specs_for

from provscope.catalogue import MetricSpec
from provscope.errors import CollectorUnavailable
from provscope.records import Point

__all__ = ["MemoryCollector"]


class MemoryCollector:
    """Node memory and swap.

    Args:
        host: value of the ``host`` tag.
        psutil_module: the psutil module (tests pass a fake).
    """

    name: ClassVar[str] = "memory"

    def __init__(self, host: str, psutil_module: Any = None) -> None:
        if psutil_module is None:
            import psutil as psutil_module
        self._ps = psutil_module
        self._tags = {"host": host}

    def open(self) -> None:
        try:
            self._ps.virtual_memory()
        except Exception as exc:
            raise CollectorUnavailable(f"memory: cannot be read ({exc})") from exc

    def collect(self, now_ns: int) -> list[Point]:
        vm = self._ps.virtual_memory()
        fields: dict[str, float] = {
            "total_bytes": float(vm.total),
            "available_bytes": float(vm.available),
            "used_bytes": float(vm.total - vm.available),
            "used_percent": 100.0 * (vm.total - vm.available) / vm.total if vm.total else 0.0,
        }
        try:
            sw = self._ps.swap_memory()
            fields["swap_total_bytes"] = float(sw.total)
            fields["swap_used_bytes"] = float(sw.used)
        except (OSError, RuntimeError):
            pass
        return [Point("memory", self._tags, fields, now_ns)]

    def close(self) -> None:
        pass

    def specs(self) -> Sequence[MetricSpec]:
        return specs_for(self.name)
