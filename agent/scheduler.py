"""One thread samples every collector on a fixed monotonic grid.

Each collector has its own interval (``agent.interval_s`` or its section's
``interval_s``); its sample times are ``start + k * interval`` on the monotonic clock, so
sampling never drifts. When a sample runs late (a slow collector, a stalled machine), the
missed grid points are skipped and counted, never caught up in a burst. The thread sleeps
on ``Event.wait`` until the next due collector, so ``stop`` wakes it at once.

Failure policy:

- ``open`` raising ``CollectorUnavailable``: per collector ``on_startup_error``:
  ``error`` (``start`` raises), ``ignore`` (one warning; the collector is off),
  ``retry`` (``open`` is tried again every ``retry_s``).
- ``collect`` raising ``max_failures`` times in a row: the collector is disabled with one
  log line; the others run on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from provscope.errors import CollectorUnavailable
from provscope.records import Point

__all__ = ["Scheduled", "Scheduler"]

log = logging.getLogger("provscope.scheduler")


@dataclass
class Scheduled:
    """A collector with its schedule and state (``state``: starting, active, unavailable,
    retrying, disabled, closed)."""

    collector: Any
    interval_s: float
    on_startup_error: str = "ignore"
    state: str = "starting"
    due: float = 0.0
    samples: int = 0
    errors: int = 0
    consecutive_errors: int = 0
    skipped: int = 0
    points: int = 0
    last_duration_s: float = 0.0
    reason: str = ""
    next_open: float = field(default=0.0)

    @property
    def name(self) -> str:
        return self.collector.name


class Scheduler:
    """Samples collectors on one named thread (``provscope-collect``).

    Args:
        entries: collectors with interval and startup policy.
        sink: receives each sample's points (``Pipeline.submit_many``); must not block.
        max_failures: consecutive ``collect`` exceptions before a collector is disabled.
        retry_s: delay between ``open`` attempts for ``on_startup_error="retry"``.
    """

    def __init__(
        self,
        entries: Iterable[Scheduled],
        sink: Callable[[Sequence[Point]], Any],
        *,
        max_failures: int = 5,
        retry_s: float = 60.0,
        thread_name: str = "provscope-collect",
    ) -> None:
        self.entries = list(entries)
        for e in self.entries:
            if not e.interval_s > 0:
                raise ValueError(f"{e.name}: interval_s must be > 0, got {e.interval_s!r}")
        self._sink = sink
        self._max_failures = max_failures
        self._retry_s = retry_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_name = thread_name
        self.points_total = 0
        self.collector_errors = 0

    # ---------------------------------------------------------------- lifecycle

    def _try_open(self, e: Scheduled, now: float) -> None:
        try:
            e.collector.open()
        except CollectorUnavailable as exc:
            e.reason = str(exc)
            if e.on_startup_error == "error":
                raise
            if e.on_startup_error == "retry":
                if e.state != "retrying":
                    log.warning("%s; retrying every %.0fs", exc, self._retry_s)
                e.state = "retrying"
                e.next_open = now + self._retry_s
            else:
                level = logging.INFO if getattr(exc, "quiet", False) else logging.WARNING
                log.log(level, "%s; collector off", exc)
                e.state = "unavailable"
            return
        e.state = "active"
        e.reason = ""
        e.due = now

    def start(self) -> None:
        """Open every collector (policy above) and start the thread.

        Raises:
            CollectorUnavailable: a collector with ``on_startup_error="error"`` cannot open.
        """
        now = time.monotonic()
        for e in self.entries:
            try:
                self._try_open(e, now)
            except CollectorUnavailable:
                for other in self.entries:
                    if other.state == "active":
                        _close(other)
                raise
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop sampling, join the thread within ``timeout_s``, close collectors."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        for e in self.entries:
            if e.state in ("active", "disabled"):
                _close(e)
            e.state = "closed" if e.state == "active" else e.state

    # ---------------------------------------------------------------- loop

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for e in self.entries:
                if e.state == "retrying" and now >= e.next_open:
                    self._try_open(e, now)
                if e.state == "active" and now >= e.due:
                    self._sample(e)
                    # Next grid point strictly after now; the ones in between are skipped.
                    after = time.monotonic()
                    steps = int((after - e.due) // e.interval_s) + 1
                    e.skipped += steps - 1
                    e.due += steps * e.interval_s
            dues = [e.due for e in self.entries if e.state == "active"]
            dues += [e.next_open for e in self.entries if e.state == "retrying"]
            wait = (min(dues) - time.monotonic()) if dues else 1.0
            if wait > 0:
                self._stop.wait(wait)

    def _sample(self, e: Scheduled) -> None:
        t0 = time.perf_counter()
        try:
            points = list(e.collector.collect(time.time_ns()))
        except Exception as exc:
            e.errors += 1
            e.consecutive_errors += 1
            self.collector_errors += 1
            if e.consecutive_errors >= self._max_failures:
                e.state = "disabled"
                e.reason = f"{type(exc).__name__}: {exc}"
                log.error("collector %s failed %d times in a row (last: %s); disabled",
                          e.name, e.consecutive_errors, e.reason)
            return
        finally:
            e.last_duration_s = time.perf_counter() - t0
        e.consecutive_errors = 0
        e.samples += 1
        if points:
            e.points += len(points)
            self.points_total += len(points)
            try:
                self._sink(points)
            except Exception:
                log.exception("sink raised; %d points lost", len(points))

    # ---------------------------------------------------------------- introspection

    @property
    def ticks_skipped(self) -> int:
        return sum(e.skipped for e in self.entries)

    @property
    def active(self) -> int:
        return sum(1 for e in self.entries if e.state == "active")

    def status(self) -> dict[str, dict[str, Any]]:
        """Per collector: state, interval, samples, errors, skipped ticks, last duration."""
        return {e.name: {"state": e.state, "interval_s": e.interval_s, "samples": e.samples,
                         "errors": e.errors, "skipped": e.skipped, "points": e.points,
                         "last_duration_s": round(e.last_duration_s, 6), "reason": e.reason}
                for e in self.entries}


def _close(e: Scheduled) -> None:
    try:
        e.collector.close()
    except Exception:
        log.debug("collector %s close raised", e.name, exc_info=True)
