"""The exporter contract: three verbs, one failure policy.

An exporter receives batches from the pipeline's worker thread (never concurrently: the
pipeline holds one worker per exporter) and returns an ``ExportResult``:

- ``SUCCESS``: the batch is delivered, or durably accepted (written to the spool).
- ``RETRY``: nothing was delivered and trying again later may work; the pipeline offers
  the same batch again after a backoff.
- ``DROP``: the batch can never be delivered (the server rejected it); the exporter has
  counted it and logged once.

``export`` never raises: an exception escaping it is logged, counted as a dropped batch
and the worker carries on. ``flush`` and ``shutdown`` take a deadline in seconds.

``accepts`` tells the pipeline which records to route to the exporter: ``"points"``
(``Point``), ``"lineage"`` (run/task/entity/relation records), or both.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = ["ExportResult", "Exporter"]


class ExportResult(enum.Enum):
    SUCCESS = "success"
    RETRY = "retry"
    DROP = "drop"


@runtime_checkable
class Exporter(Protocol):
    """What the pipeline needs of a destination."""

    name: ClassVar[str]
    accepts: ClassVar[frozenset[str]]

    def export(self, batch: Sequence[Any]) -> ExportResult:
        """Deliver one batch. Blocks for at most the exporter's own timeouts; never raises."""
        ...

    def flush(self, timeout_s: float) -> bool:
        """Deliver anything the exporter holds (spool included). True when nothing is left."""
        ...

    def shutdown(self, timeout_s: float) -> None:
        """Flush within the deadline and release resources. A second call is a no-op."""
        ...

    def stats(self) -> dict[str, float]:
        """Self-metrics: counters named as in ``provscope.catalogue.internal``."""
        ...
