"""Disk I/O collector: cumulative counters per block device.

Emits measurement ``disk`` (tags ``host``, ``device``): ``read_bytes_total``,
``written_bytes_total``, ``reads_total``, ``writes_total`` and, where the platform has it,
``busy_seconds_total`` (its rate is the device's utilisation). Counters are raw and
cumulative; psutil's ``nowrap`` keeps them monotonic across 32-bit kernel wraps.
Partitions (``sda1``) are left out when their whole disk (``sda``) is listed, so bytes
are not counted twice; loop and ram devices are left out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

from provscope.agent.collectors.base import specs_for

from provscope.catalogue import MetricSpec
from provscope.errors import CollectorUnavailable
from provscope.records import Point

__all__ = ["DiskCollector"]

_SKIP = re.compile(r"^(loop|ram|zram|fd|sr)\d*")
_PARTITION = re.compile(r"^(?P<disk>(?:sd|vd|xvd|hd)[a-z]+|nvme\d+n\d+|mmcblk\d+)(?:p?\d+)$")


class DiskCollector:
    """Per-device block I/O counters.

    Args:
        host: value of the ``host`` tag.
        psutil_module: the psutil module (tests pass a fake).
    """

    name: ClassVar[str] = "disk"

    def __init__(self, host: str, psutil_module: Any = None) -> None:
        if psutil_module is None:
            import psutil as psutil_module
        self._ps = psutil_module
        self._host = host
        self._tags: dict[str, dict[str, str]] = {}

    def open(self) -> None:
        try:
            counters = self._ps.disk_io_counters(perdisk=True)
        except Exception as exc:
            raise CollectorUnavailable(f"disk: I/O counters cannot be read ({exc})") from exc
        if counters is None:
            raise CollectorUnavailable("disk: this system reports no block devices")

    def collect(self, now_ns: int) -> list[Point]:
        counters = self._ps.disk_io_counters(perdisk=True) or {}
        out = []
        for dev, c in counters.items():
            if _SKIP.match(dev):
                continue
            m = _PARTITION.match(dev)
            if m and m.group("disk") in counters:
                continue
            tags = self._tags.get(dev)
            if tags is None:
                tags = self._tags[dev] = {"host": self._host, "device": dev}
            fields = {
                "read_bytes_total": float(c.read_bytes),
                "written_bytes_total": float(c.write_bytes),
                "reads_total": float(c.read_count),
                "writes_total": float(c.write_count),
            }
            busy = getattr(c, "busy_time", None)
            if busy is not None:
                fields["busy_seconds_total"] = busy / 1000.0
            out.append(Point("disk", tags, fields, now_ns))
        return out

    def close(self) -> None:
        pass

    def specs(self) -> Sequence[MetricSpec]:
        return specs_for(self.name)
