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

Lanes: a collector that calls into a driver that can hang (NVML, amdsmi: their class has
``isolated = True``) runs on a thread of its own (``provscope-collect-<name>``) with the
same grid and skip rule, so a hung call stalls only that collector. Its ``collect`` has a
deadline (``deadline_s``, default one interval): the main thread notices one that runs
past it and counts an overrun (``overruns``, one warning per episode); points a late
collect returns are dropped and counted (``late_points``), since their time stamp is
stale. A lane still stuck at ``stop`` is left to exit with the process: its collector is
not closed under the hung call.

``start(background=True)`` opens the collectors on the sampling thread instead of the
caller's (``nvmlInit`` can take seconds; a training job must not wait for it);
``stop(final_sample=True)`` takes one last sample of every active collector after the
thread has stopped, so a short job still gets its end values.
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
    isolated: bool | None = None  # None: the collector's ``isolated`` class attribute
    deadline_s: float | None = None  # None: one interval
    overruns: int = 0
    late_points: int = 0
    busy_since: float | None = None  # monotonic start of the collect in flight
    overrun_noted: bool = False

    @property
    def in_lane(self) -> bool:
        if self.isolated is not None:
            return self.isolated
        return bool(getattr(self.collector, "isolated", False))

    @property
    def deadline(self) -> float:
        return self.deadline_s if self.deadline_s is not None else self.interval_s

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
        unavailable_level: log level of "collector off" for ``on_startup_error="ignore"``
            (the job's own sampler uses INFO: a CPU-only node without NVML is normal).
    """

    def __init__(
        self,
        entries: Iterable[Scheduled],
        sink: Callable[[Sequence[Point]], Any],
        *,
        max_failures: int = 5,
        retry_s: float = 60.0,
        thread_name: str = "provscope-collect",
        unavailable_level: int = logging.WARNING,
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
        self._unavailable_level = unavailable_level
        self._main = [e for e in self.entries if not e.in_lane]
        self._laned = [e for e in self.entries if e.in_lane]
        self._lanes: list[threading.Thread] = []
        self._counts = threading.Lock()  # lanes and the main thread add to the totals
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
                level = logging.INFO if getattr(exc, "quiet", False) else \
                    self._unavailable_level
                log.log(level, "%s; collector off", exc)
                e.state = "unavailable"
            return
        e.state = "active"
        e.reason = ""
        e.due = now

    def start(self, *, background: bool = False) -> None:
        """Open every collector (policy above) and start the thread.

        Args:
            background: open the collectors on the sampling thread, so this call returns
                at once; ``on_startup_error="error"`` then acts as ``"ignore"``.

        Raises:
            CollectorUnavailable: a collector with ``on_startup_error="error"`` cannot open
                (only when ``background`` is False).
        """
        if background:
            self._thread = threading.Thread(target=self._open_and_run,
                                            name=self._thread_name, daemon=True)
        else:
            self._open_all(time.monotonic())
            self._thread = threading.Thread(target=self._run, name=self._thread_name,
                                            daemon=True)
        self._thread.start()
        for e in self._laned:
            lane = threading.Thread(target=self._lane, args=(e, background),
                                    name=f"{self._thread_name}-{e.name}", daemon=True)
            self._lanes.append(lane)
            lane.start()

    def _open_all(self, now: float) -> None:
        for e in self.entries:
            try:
                self._try_open(e, now)
            except CollectorUnavailable:
                for other in self.entries:
                    if other.state == "active":
                        _close(other)
                raise

    def _open_and_run(self) -> None:
        for e in self._main:
            if self._stop.is_set():
                return
            self._open_in_background(e)
        self._run()

    def _open_in_background(self, e: Scheduled) -> None:
        if e.on_startup_error == "error":
            e.on_startup_error = "ignore"
        try:
            self._try_open(e, time.monotonic())
        except Exception as exc:  # an open that breaks the contract: that one is off
            e.state, e.reason = "unavailable", f"{type(exc).__name__}: {exc}"
            with self._counts:
                self.collector_errors += 1
            log.warning("%s: cannot open (%s); collector off", e.name, e.reason)

    def _lane(self, e: Scheduled, open_first: bool) -> None:
        if open_first and not self._stop.is_set():
            self._open_in_background(e)  # a slow nvmlInit delays only this collector
        self._loop([e], watch=False)

    def stop(self, timeout_s: float = 5.0, *, final_sample: bool = False) -> None:
        """Stop sampling, join the thread within ``timeout_s``, close collectors.

        ``final_sample``: after the thread has stopped, sample every active collector once
        more on the calling thread (skipped when the thread did not stop in time).
        """
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        stopped = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            stopped = not self._thread.is_alive()
        stuck: set[str] = set()
        for e, lane in zip(self._laned, self._lanes, strict=False):
            lane.join(max(0.0, deadline - time.monotonic()))
            if lane.is_alive():
                stuck.add(e.name)
                log.warning("collector %s is stuck in collect; left to exit with the "
                            "process, not closed", e.name)
        if final_sample and stopped:
            for e in self.entries:
                if e.state == "active" and e.name not in stuck:
                    self._sample(e)
        for e in self.entries:
            if e.state in ("active", "disabled") and e.name not in stuck:
                _close(e)
            e.state = "closed" if e.state == "active" else e.state

    # ---------------------------------------------------------------- loop

    def _run(self) -> None:
        self._loop(self._main, watch=True)

    def _loop(self, entries: list[Scheduled], *, watch: bool) -> None:
        """Sample ``entries`` on their grids until stop; ``watch``: also look after the
        lanes' deadlines (the main thread does)."""
        while not self._stop.is_set():
            now = time.monotonic()
            for e in entries:
                if e.state == "retrying" and now >= e.next_open:
                    self._try_open(e, now)
                if e.state == "active" and now >= e.due:
                    self._sample(e)
                    # Next grid point strictly after now; the ones in between are skipped.
                    after = time.monotonic()
                    steps = int((after - e.due) // e.interval_s) + 1
                    e.skipped += steps - 1
                    e.due += steps * e.interval_s
            dues = [e.due for e in entries if e.state == "active"]
            dues += [e.next_open for e in entries if e.state == "retrying"]
            if watch:
                dues += self._watch_lanes(time.monotonic())
            wait = (min(dues) - time.monotonic()) if dues else 1.0
            if wait > 0:
                self._stop.wait(wait)

    def _watch_lanes(self, now: float) -> list[float]:
        """Count lanes whose collect runs past its deadline; the times to look again."""
        wake = []
        for e in self._laned:
            since = e.busy_since
            if since is None or e.overrun_noted:
                continue
            if now - since >= e.deadline:
                e.overrun_noted = True
                e.overruns += 1
                log.warning("collector %s: collect running for %.1fs, past its %.1fs "
                            "deadline; the other collectors go on", e.name, now - since,
                            e.deadline)
            else:
                wake.append(since + e.deadline)
        return wake

    def _sample(self, e: Scheduled) -> None:
        t0 = time.perf_counter()
        started = time.monotonic()
        e.overrun_noted = False
        e.busy_since = started
        try:
            points = list(e.collector.collect(time.time_ns()))
        except Exception as exc:
            e.errors += 1
            e.consecutive_errors += 1
            with self._counts:
                self.collector_errors += 1
            if e.consecutive_errors >= self._max_failures:
                e.state = "disabled"
                e.reason = f"{type(exc).__name__}: {exc}"
                log.error("collector %s failed %d times in a row (last: %s); disabled",
                          e.name, e.consecutive_errors, e.reason)
            return
        finally:
            e.busy_since = None
            e.last_duration_s = time.perf_counter() - t0
        e.consecutive_errors = 0
        e.samples += 1
        if e.in_lane and time.monotonic() - started > e.deadline:
            if not e.overrun_noted:
                e.overruns += 1
            e.late_points += len(points)  # stamped at the start: stale by now
            return
        if points:
            e.points += len(points)
            with self._counts:
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

    @property
    def overruns(self) -> int:
        """Collects that ran past their deadline (lanes only)."""
        return sum(e.overruns for e in self.entries)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per collector: state, interval, samples, errors, skipped ticks, last duration;
        for a lane also its overruns, dropped late points and how long the collect in
        flight has run (``busy_s``, 0 when idle)."""
        now = time.monotonic()
        out: dict[str, dict[str, Any]] = {}
        for e in self.entries:
            row = {"state": e.state, "interval_s": e.interval_s, "samples": e.samples,
                   "errors": e.errors, "skipped": e.skipped, "points": e.points,
                   "last_duration_s": round(e.last_duration_s, 6), "reason": e.reason}
            if e.in_lane:
                since = e.busy_since
                row.update(lane=True, overruns=e.overruns, late_points=e.late_points,
                           busy_s=round(now - since, 3) if since is not None else 0.0)
            out[e.name] = row
        return out


def _close(e: Scheduled) -> None:
    try:
        e.collector.close()
    except Exception:
        log.debug("collector %s close raised", e.name, exc_info=True)
