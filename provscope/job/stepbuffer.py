"""One ``train`` record per step: the fields of a training step, merged from every source.

``run.log``, ``run.steps`` and ``provscope.watch`` each know part of a step (the loss, the
step time, the learning rate and gradient norm, the samples seen). They add their fields
to the run's :class:`StepBuffer` under the step number; the buffer writes one point per
step when the step is complete:

* a field for a *different* step number arrives, or the next step begins
  (:meth:`StepBuffer.advance`, called by ``run.steps`` and by a watcher that counts steps);
* :meth:`StepBuffer.complete`: ``run.flush()``, ``provscope.flush()``, the end of the run,
  ``unwatch()``.

A source whose values arrive late (a CUDA watcher copies gradient norms to the host in
batches, so as not to synchronise the device every step) *holds* the steps it still owes:
they stay open, at most :data:`MAX_WAITING` of them, until it adds its fields and
releases them. ``samples_per_second`` and ``tokens_per_second`` are derived when the
point is written, from the samples counted in the step and the step's one
``step_time_seconds``, so that every rate uses the same step time.

Cost: adding fields to the open step is one lock and one ``dict.update``; one dict and
one small object are allocated per step, none per call.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from provscope import forking

__all__ = ["MAX_WAITING", "StepBuffer", "complete_all"]

MAX_WAITING = 64  # closed steps kept open for late fields; past it the oldest is written

_live: weakref.WeakSet[StepBuffer] = weakref.WeakSet()


def complete_all() -> None:
    """Write the open step of every live buffer (at process exit, forked children too).
    Never raises."""
    for buffer in list(_live):
        with contextlib.suppress(Exception):
            buffer.complete()


class _Open:
    """One step not yet written: its fields, samples and tokens counted, last update."""

    __slots__ = ("epoch", "fields", "samples", "time_ns", "tokens")

    def __init__(self, epoch: int | None) -> None:
        self.fields: dict[str, Any] = {}
        self.samples = 0
        self.tokens = 0
        self.time_ns = 0
        self.epoch = epoch


class StepBuffer:
    """The open training step of one run (or of one watcher writing to ``emit=``).

    ``write(fields, time_ns)`` receives each finished step's fields (``step`` included)
    and the time of the step's last update. Attributes: ``epoch`` (stamped on steps that
    begin while it is set), ``loops`` (active ``run.steps()`` loops: while one runs it
    owns the step counter), ``written`` (points written), ``forced`` (steps written
    before a late source delivered, because more than :data:`MAX_WAITING` waited),
    ``errors`` (points the writer raised on).
    Never raises into the caller's step beyond what ``write`` raises.
    """

    def __init__(self, write: Callable[[dict[str, Any], int], None]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._step: int | None = None
        self._open: _Open | None = None
        self._waiting: dict[int, _Open] = {}
        self._holds: dict[Any, int] = {}  # resolver -> first step it still owes fields to
        self.epoch: int | None = None
        self.loops = 0
        self.written = 0
        self.forced = 0
        self.errors = 0
        forking.reset_in_child(self, StepBuffer._reset_after_fork)
        _live.add(self)

    # ------------------------------------------------------------------ adding

    def add(self, step: int, fields: Mapping[str, Any]) -> None:
        """Set ``fields`` on step ``step`` (later values of a field replace earlier ones)."""
        with self._lock:
            entry = self._entry(step)
            entry.fields.update(fields)
            entry.time_ns = time.time_ns()
            done = self._done
        if done:
            self._flush_done()

    def add_default(self, step: int, fields: Mapping[str, Any]) -> None:
        """Set the ``fields`` step ``step`` does not have yet: values a source infers
        (the watcher's ``lr``) never replace what the script logged itself."""
        with self._lock:
            entry = self._entry(step)
            mine = entry.fields
            for key, value in fields.items():
                if key not in mine:
                    mine[key] = value
            entry.time_ns = time.time_ns()
            done = self._done
        if done:
            self._flush_done()

    def count(self, step: int, samples: int, tokens: int = 0) -> None:
        """Add ``samples`` (and ``tokens``) seen by step ``step``: summed over the step's
        forward passes (gradient accumulation), divided by its step time when written."""
        with self._lock:
            entry = self._entry(step)
            entry.samples += samples
            entry.tokens += tokens
            done = self._done
        if done:
            self._flush_done()

    def advance(self, step: int) -> None:
        """Step ``step`` begins: every other open step is complete."""
        with self._lock:
            self._entry(step)
            done = self._done
        if done:
            self._flush_done()

    # ------------------------------------------------------------------ late sources

    def hold(self, resolver: Callable[[], None], step: int) -> None:
        """Keep step ``step`` and later ones open until ``release(resolver)``;
        :meth:`complete` calls ``resolver()`` first so that it can deliver."""
        with self._lock:
            if resolver not in self._holds:
                self._holds[resolver] = step

    def release(self, resolver: Callable[[], None]) -> None:
        """``resolver`` has delivered: write the steps that no longer wait for anyone."""
        with self._lock:
            self._holds.pop(resolver, None)
            self._drain(force=False)
            done = self._done
        if done:
            self._flush_done()

    def complete(self) -> None:
        """Write every open step now (flush, end of run): late sources deliver first."""
        with self._lock:
            resolvers = list(self._holds)
        for resolver in resolvers:
            # A late source that fails must not keep the step unwritten.
            with contextlib.suppress(Exception):
                resolver()
        with self._lock:
            self._holds.clear()
            self._close_open()
            self._drain(force=True)
            done = self._done
        if done:
            self._flush_done()

    # ------------------------------------------------------------------ internals

    _done: list[tuple[dict[str, Any], int]] | None = None

    def _entry(self, step: int) -> _Open:
        if step == self._step and self._open is not None:
            return self._open
        waiting = self._waiting.get(step) if self._waiting else None
        if waiting is not None:
            return waiting
        self._close_open()
        entry = _Open(self.epoch)
        self._step, self._open = step, entry
        return entry

    def _close_open(self) -> None:
        entry, step = self._open, self._step
        if entry is None or step is None:
            return
        self._open, self._step = None, None
        if self._holds and min(self._holds.values()) <= step:
            self._waiting[step] = entry
            if len(self._waiting) > MAX_WAITING:
                oldest = next(iter(self._waiting))
                self._finish(oldest, self._waiting.pop(oldest))
                self.forced += 1
        else:
            self._finish(step, entry)

    def _drain(self, force: bool) -> None:
        if not self._waiting:
            return
        first_held = min(self._holds.values()) if self._holds and not force else None
        for step in [s for s in self._waiting if first_held is None or s < first_held]:
            self._finish(step, self._waiting.pop(step))

    def _finish(self, step: int, entry: _Open) -> None:
        """Queue the step's point (written outside the lock by ``_flush_done``)."""
        fields = entry.fields
        if not fields and not entry.samples:
            return
        fields["step"] = step
        if entry.epoch is not None and "epoch" not in fields:
            fields["epoch"] = entry.epoch
        dt = fields.get("step_time_seconds")
        if entry.samples and isinstance(dt, (int, float)) and dt > 0:
            if "samples_per_second" not in fields:
                fields["samples_per_second"] = entry.samples / dt
            if entry.tokens and "tokens_per_second" not in fields:
                fields["tokens_per_second"] = entry.tokens / dt
        if len(fields) == 1:  # samples counted but nothing to divide them by: no point
            return
        done = self._done
        if done is None:
            done = self._done = []
        done.append((fields, entry.time_ns or time.time_ns()))

    def _flush_done(self) -> None:
        with self._lock:
            done, self._done = self._done, None
        for fields, time_ns in done or ():
            try:
                self._write(fields, time_ns)
                self.written += 1
            except Exception:  # the writer counts its own failures; never reach the step
                self.errors += 1

    def _reset_after_fork(self) -> None:
        # The open step is the parent's: a forked child (DataLoader worker) never writes it.
        self._lock = threading.Lock()
        self._step, self._open, self._done = None, None, None
        self._waiting = {}
        self._holds = {}
        self.loops = 0
