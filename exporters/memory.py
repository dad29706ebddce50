"""An in-memory exporter: keeps every record it is given. For tests and examples."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, ClassVar

from provscope.exporters.base import ExportResult

__all__ = ["MemoryExporter"]


class MemoryExporter:
    """Collects exported records in ``self.records`` (thread-safe).

    Args:
        accepts: which records to receive: ``{"points"}``, ``{"lineage"}`` or both.
        fail_times: return ``RETRY`` for the first N export calls (to test retry paths).
    """

    name: ClassVar[str] = "memory"
    accepts: ClassVar[frozenset[str]] = frozenset({"points", "lineage"})

    def __init__(self, accepts: frozenset[str] | None = None, fail_times: int = 0) -> None:
        if accepts is not None:
            self.accepts = frozenset(accepts)  # type: ignore[misc]
        self.records: list[Any] = []
        self.batches = 0
        self._fail_times = fail_times
        self._lock = threading.Lock()
        self.shut_down = False

    def export(self, batch: Sequence[Any]) -> ExportResult:
        with self._lock:
            if self._fail_times > 0:
                self._fail_times -= 1
                return ExportResult.RETRY
            self.records.extend(batch)
            self.batches += 1
        return ExportResult.SUCCESS

    def flush(self, timeout_s: float) -> bool:
        return True

    def shutdown(self, timeout_s: float) -> None:
        self.shut_down = True

    def stats(self) -> dict[str, float]:
        return {"points_written_total": float(len(self.records))}
