"""Network collector: cumulative counters per interface.

Emits measurement ``net`` (tags ``host``, ``interface``): ``receive|transmit`` x
``bytes|packets|errors|drops`` ``_total``. The loopback interface is left out (it is
not network traffic and would double count local I/O).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from provscope.agent.collectors.base import specs_for

from provscope.catalogue import MetricSpec
from provscope.errors import CollectorUnavailable
from provscope.records import Point

__all__ = ["NetCollector"]

_FIELDS = (
    ("receive_bytes_total", "bytes_recv"), ("transmit_bytes_total", "bytes_sent"),
    ("receive_packets_total", "packets_recv"), ("transmit_packets_total", "packets_sent"),
    ("receive_errors_total", "errin"), ("transmit_errors_total", "errout"),
    ("receive_drops_total", "dropin"), ("transmit_drops_total", "dropout"),
)


class NetCollector:
    """Per-interface network counters.

    Args:
        host: value of the ``host`` tag.
        psutil_module: the psutil module (tests pass a fake).
        include_loopback: also report ``lo``.
    """

    name: ClassVar[str] = "net"

    def __init__(self, host: str, psutil_module: Any = None, *,
                 include_loopback: bool = False) -> None:
        if psutil_module is None:
            import psutil as psutil_module
        self._ps = psutil_module
        self._host = host
        self._loopback = include_loopback
        self._tags: dict[str, dict[str, str]] = {}

    def open(self) -> None:
        try:
            self._ps.net_io_counters(pernic=True)
        except Exception as exc:
            raise CollectorUnavailable(f"net: interface counters cannot be read ({exc})") from exc

    def collect(self, now_ns: int) -> list[Point]:
        out = []
        for nic, c in (self._ps.net_io_counters(pernic=True) or {}).items():
            if nic == "lo" and not self._loopback:
                continue
            tags = self._tags.get(nic)
            if tags is None:
                tags = self._tags[nic] = {"host": self._host, "interface": nic}
            fields = {ours: float(getattr(c, theirs)) for ours, theirs in _FIELDS}
            out.append(Point("net", tags, fields, now_ns))
        return out

    def close(self) -> None:
        pass

    def specs(self) -> Sequence[MetricSpec]:
        return specs_for(self.name)
