"""The collector contract and the helpers every collector shares.

A collector is a small object with one job: turn one system source into ``Point``s.

- ``name`` (ClassVar): also the config section (``agent.collectors.<name>``) and the
  registry key.
- ``open()``: acquire resources (``nvmlInit``, handles, priming deltas). Raises
  ``CollectorUnavailable`` when the source cannot be used on this machine.
- ``collect(now_ns)``: fast, never sleeps or blocks; keeps its own previous snapshot for
  deltas; returns the points of one sample, all stamped ``now_ns``.
- ``close()``: release resources; safe to call twice or without ``open()``.
- ``specs()``: the ``MetricSpec``s of everything it can emit (from the catalogue).

System sources (the psutil module, a procfs root, the NVML module) are constructor
arguments so tests feed fixtures instead of the real machine.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

from provscope.catalogue import MetricSpec, by_measurement
from provscope.catalogue.system import BY_COLLECTOR
from provscope.records import Point

__all__ = ["Collector", "OnceLogger", "specs_for"]


@runtime_checkable
class Collector(Protocol):
    """What the scheduler needs of a collector (see the module docstring)."""

    name: ClassVar[str]

    def open(self) -> None:
        """Acquire resources. Raises ``CollectorUnavailable``."""
        ...

    def collect(self, now_ns: int) -> Iterable[Point]:
        """One sample, stamped ``now_ns`` (Unix ns). Never sleeps."""
        ...

    def close(self) -> None:
        """Release resources. Idempotent."""
        ...

    def specs(self) -> Sequence[MetricSpec]:
        """Every field this collector may emit."""
        ...


def specs_for(collector_name: str) -> list[MetricSpec]:
    """The catalogue specs of the measurements a collector emits."""
    out: list[MetricSpec] = []
    for meas in BY_COLLECTOR[collector_name]:
        out.extend(by_measurement(meas))
    return out


class OnceLogger:
    """Logs each distinct key once (an unsupported field is normal, not news every tick)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._seen: set[Any] = set()

    def __call__(self, key: Any, msg: str, *args: Any, level: int = logging.INFO) -> None:
        if key in self._seen:
            return
        self._seen.add(key)
        self._log.log(level, msg, *args)
