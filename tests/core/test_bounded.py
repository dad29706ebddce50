"""The bounded queue worker shared by the pipeline and the agent client."""

from __future__ import annotations

import threading
import time

import pytest

from provscope.bounded import QueueWorker


class Collect(QueueWorker):
    """Hands every batch to a list; wakes on a full batch or every interval."""

    def __init__(self, **kw) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        super().__init__(thread_name="provscope-test-worker", **kw)

    def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                if self._stopping:
                    return
            self._wait_for_work(self._batch_size)
            if not self._queue:
                continue
            self._idle.clear()
            batch = self._take()
            self.gate.wait()
            self.batches.append(batch)


def test_full_queue_drops_the_oldest_and_counts_them():
    # Batches of 100 never fill a queue of 5 and the interval is long: the worker stays
    # asleep, so the queue alone decides what is kept.
    q = Collect(capacity=5, batch_size=100, interval_s=30)
    assert all(q.submit(i) for i in range(5))
    assert q.submit(5) is False
    assert q.submit_many([6, 7, 8]) == 3
    assert list(q._queue) == [4, 5, 6, 7, 8]
    assert q.received == 9 and q.dropped == 4 and q.queue_depth == 5
    assert q._wait_drained(time.monotonic() + 5)
    assert q.batches == [[4, 5, 6, 7, 8]]


def test_a_full_batch_wakes_the_worker_before_the_interval():
    q = Collect(capacity=1000, batch_size=10, interval_s=30)
    q.submit_many(list(range(10)))
    deadline = time.monotonic() + 5
    while not q.batches and time.monotonic() < deadline:
        time.sleep(0.005)
    assert q.batches == [list(range(10))]


def test_the_worker_is_one_named_daemon_thread_started_on_first_use():
    q = Collect(capacity=10, batch_size=5, interval_s=0.01)
    assert q._thread is None
    q.submit(1)
    q.submit(2)
    names = [t.name for t in threading.enumerate() if t is q._thread]
    assert names == ["provscope-test-worker"] and q._thread.daemon


def test_after_stop_submits_are_counted_as_dropped_and_the_worker_ends():
    q = Collect(capacity=10, batch_size=5, interval_s=0.01)
    q.submit(1)
    assert q._wait_drained(time.monotonic() + 5)
    q._stop_accepting()
    assert q._join(time.monotonic() + 5)
    assert q.submit(2) is False and q.submit_many([3, 4]) == 2
    assert q.dropped == 3 and q.received == 1


def test_drain_wait_gives_up_at_its_deadline_and_drop_queued_counts_the_rest():
    q = Collect(capacity=10, batch_size=5, interval_s=0.01)
    q.gate.clear()
    q.submit_many([1, 2])
    time.sleep(0.05)
    q.submit_many([3, 4, 5])
    start = time.monotonic()
    assert not q._wait_drained(start + 0.2)
    assert 0.15 <= time.monotonic() - start < 2
    assert q._drop_queued() == 3 and q.dropped == 3 and q.queue_depth == 0
    q.gate.set()


def test_sizes_must_be_positive():
    with pytest.raises(ValueError, match="must all be > 0"):
        Collect(capacity=0, batch_size=1, interval_s=1)
