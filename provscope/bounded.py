"""A bounded queue drained by one named daemon worker: the shape of every buffer in provscope.

The pipeline's ``BatchProcessor`` (one per exporter) and the job's ``AgentClient`` both
take records from the training loop without ever blocking it, and hand them to a slow
destination (a server, a socket) from a thread of their own. This class is that shared
part; each subclass writes only its worker loop (``_run``): what to do with a batch, and
how to retry.

- ``submit``/``submit_many`` append to a deque bounded at ``capacity``; when it is full
  the oldest records are dropped and counted (``dropped``). They never block and never
  raise; after ``_stop_accepting`` they count what they are given as dropped.
- The worker is woken early once a full batch is queued; otherwise it wakes every
  ``interval_s`` (``_wait_for_work``).
- ``_wait_drained`` is what ``flush`` waits on: queue empty and the worker idle.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["QueueWorker"]


class QueueWorker:
    """A bounded deque of records, its counters, and one lazily started worker thread.

    Args:
        capacity: records held; the oldest is dropped (and counted) when full.
        batch_size: most records per ``_take``; a full batch wakes the worker.
        interval_s: longest the worker sleeps while fewer than a batch are queued.
        thread_name: the worker's name (``provscope-...``), as seen in ``py-spy`` and
            ``threading.enumerate()``.

    Raises:
        ValueError: a size or interval that is not > 0.
    """

    def __init__(self, *, capacity: int, batch_size: int, interval_s: float,
                 thread_name: str) -> None:
        if capacity <= 0 or batch_size <= 0 or interval_s <= 0:
            raise ValueError(f"queue capacity ({capacity}), batch size ({batch_size}) and "
                             f"interval ({interval_s} s) must all be > 0")
        self._max_queue = capacity
        self._batch_size = batch_size
        self._interval = interval_s
        self._thread_name = thread_name
        self._reset_queue()

    def _reset_queue(self) -> None:
        """Empty queue, zero counters, no worker (also a forked child's fresh start)."""
        self._queue: deque[Any] = deque(maxlen=self._max_queue)
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()  # a fresh one: the parent may have held it
        self.received = 0
        self.dropped = 0

    # ------------------------------------------------------------------ producer side

    def submit(self, record: Any) -> bool:
        """Queue one record. Never blocks or raises. False when a record was dropped."""
        if self._stopping:
            self.dropped += 1
            return False
        queue = self._queue
        full = len(queue) >= self._max_queue
        if full:
            self.dropped += 1
        queue.append(record)  # a full deque(maxlen) drops its oldest item here
        self.received += 1
        if self._thread is None:
            self._start_worker()
        if len(queue) >= self._batch_size and not self._wake.is_set():
            self._wake.set()
        return not full

    def submit_many(self, records: Sequence[Any]) -> int:
        """Queue many records. Never blocks or raises. Returns how many were dropped."""
        n = len(records)
        if self._stopping:
            self.dropped += n
            return n
        queue = self._queue
        overflow = max(0, len(queue) + n - self._max_queue)
        queue.extend(records)
        self.received += n
        self.dropped += overflow
        if self._thread is None:
            self._start_worker()
        if len(queue) >= self._batch_size and not self._wake.is_set():
            self._wake.set()
        return overflow

    @property
    def queue_depth(self) -> int:
        """Records queued now."""
        return len(self._queue)

    # ------------------------------------------------------------------ worker side

    def _run(self) -> None:  # pragma: no cover - every subclass has its own loop
        raise NotImplementedError

    def _start_worker(self) -> None:
        with self._thread_lock:
            if self._thread is not None:
                return
            thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
            thread.start()
            self._thread = thread

    def _wait_for_work(self, min_records: int) -> None:
        """Sleep until ``min_records`` are queued (or stop was asked), at most ``interval_s``."""
        if len(self._queue) < min_records and not self._stopping:
            self._wake.wait(self._interval)
        self._wake.clear()

    def _take(self) -> list[Any]:
        """Pop up to ``batch_size`` of the oldest records (the worker thread only)."""
        queue = self._queue
        pop = queue.popleft
        batch = []
        try:
            for _ in range(min(self._batch_size, len(queue))):
                batch.append(pop())
        except IndexError:  # a shutdown past its deadline emptied the queue meanwhile
            pass
        return batch

    # ------------------------------------------------------------------ control

    def _wait_drained(self, deadline: float,
                      busy: Callable[[], bool] | None = None) -> bool:
        """Wake the worker and wait (until ``deadline``, monotonic) for an empty queue and
        an idle worker (and ``busy()`` False). True when drained."""
        if self._thread is None:
            return not self._queue
        queue, idle = self._queue, self._idle
        while time.monotonic() < deadline:
            self._wake.set()
            if not queue and (busy is None or not busy()) and idle.wait(0.01) \
                    and not queue and (busy is None or not busy()):
                return True
            time.sleep(0.002)
        return False

    def _stop_accepting(self) -> None:
        """From now on ``submit`` counts records as dropped; the worker is woken to finish."""
        self._stopping = True
        self._wake.set()

    def _join(self, deadline: float) -> bool:
        """Wait for the worker to end, until ``deadline`` (monotonic). True when it ended."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(max(0.0, deadline - time.monotonic()))
        return not thread.is_alive()

    def _drop_queued(self) -> int:
        """Count everything still queued as dropped and forget it; returns how many."""
        left = len(self._queue)
        self.dropped += left
        self._queue.clear()
        return left
