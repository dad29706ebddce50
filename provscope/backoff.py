"""Retry delays: exponential backoff with full jitter, a cap, and ``Retry-After`` honoured.

One rule for every component that retries (the pipeline's workers, the InfluxDB writer,
the lineage exporter's replay, the job's reconnects to the agent):

    delay = uniform(0, min(cap, base * 2 ** attempt))

"Full jitter": many processes that lost the same server at the same moment (every rank
of a job, every agent of a cluster) spread their retries over the whole window instead
of coming back in lockstep. A server's ``Retry-After`` is a floor (capped at ``cap`` so
a hostile or mistaken header cannot park a worker for an hour).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable

__all__ = ["Backoff", "backoff_delay", "retry_after_seconds"]


def backoff_delay(attempt: int, *, base_s: float, cap_s: float,
                  retry_after_s: float | None = None,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry).

    Args:
        attempt: retries already made after the first failure (0, 1, 2, ...).
        base_s: the window of the first retry, seconds.
        cap_s: the longest window (and the longest ``Retry-After`` honoured), seconds.
        retry_after_s: the server's ``Retry-After``, seconds; the delay is at least this
            (capped at ``cap_s``).
        rand: uniform [0, 1) source (tests pass a fixed one).
    """
    window = min(cap_s, base_s * 2.0 ** min(attempt, 62))
    delay = window * rand()
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, cap_s))
    return delay


class Backoff:
    """The attempt counter of one retrying loop: ``next()`` after a failure, ``reset()``
    after a success. Not thread-safe (each retrying loop owns one)."""

    __slots__ = ("attempt", "base_s", "cap_s")

    def __init__(self, base_s: float, cap_s: float) -> None:
        if base_s <= 0 or cap_s <= 0:
            raise ValueError(f"backoff base and cap must be > 0 seconds, got {base_s}, {cap_s}")
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0

    def next(self, retry_after_s: float | None = None) -> float:
        """The delay before the next try, seconds; counts one more attempt."""
        delay = backoff_delay(self.attempt, base_s=self.base_s, cap_s=self.cap_s,
                              retry_after_s=retry_after_s)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """A try succeeded: the next failure starts again from ``base_s``."""
        self.attempt = 0


def retry_after_seconds(value: str | None) -> float | None:
    """An HTTP ``Retry-After`` header (seconds or an HTTP date) in seconds from now.

    None when absent or unparsable; never negative.
    """
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        with contextlib.suppress(TypeError, ValueError):
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    return None
