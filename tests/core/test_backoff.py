"""The one retry rule: exponential backoff with full jitter, a cap, Retry-After honoured."""

from __future__ import annotations

import email.utils
import time

import pytest

from provscope.backoff import Backoff, backoff_delay, retry_after_seconds


def test_the_window_doubles_from_the_base_up_to_the_cap():
    top = [backoff_delay(a, base_s=0.1, cap_s=1.0, rand=lambda: 0.999999) for a in range(6)]
    assert top == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0], rel=1e-5)


def test_full_jitter_spreads_delays_over_the_whole_window():
    delays = [backoff_delay(3, base_s=0.1, cap_s=10.0) for _ in range(2000)]
    assert min(delays) >= 0.0 and max(delays) < 0.8
    # Uniform over [0, 0.8): both ends of the window are used, not only its upper half.
    assert sum(d < 0.2 for d in delays) > 300 and sum(d > 0.6 for d in delays) > 300


def test_retry_after_is_a_floor_capped_at_the_cap():
    assert backoff_delay(0, base_s=0.1, cap_s=5.0, retry_after_s=2.0, rand=lambda: 0.0) == 2.0
    assert backoff_delay(0, base_s=0.1, cap_s=5.0, retry_after_s=3600, rand=lambda: 0.5) == 5.0
    # A short Retry-After does not shorten a longer backoff.
    assert backoff_delay(4, base_s=1.0, cap_s=60, retry_after_s=0.5, rand=lambda: 0.5) == 8.0


def test_huge_attempt_numbers_stay_at_the_cap():
    assert backoff_delay(10_000, base_s=0.1, cap_s=3.0, rand=lambda: 0.5) == 1.5


def test_backoff_counts_attempts_and_resets_after_a_success():
    b = Backoff(0.01, 0.04)
    windows = []
    for _ in range(4):
        windows.append(b.attempt)
        assert 0.0 <= b.next() < 0.04
    assert windows == [0, 1, 2, 3]
    b.reset()
    assert b.attempt == 0 and b.next() < 0.01


def test_a_zero_base_or_cap_is_one_clear_error():
    with pytest.raises(ValueError, match="must be > 0 seconds"):
        Backoff(0, 1)


def test_retry_after_header_in_seconds_or_as_an_http_date():
    assert retry_after_seconds("2.5") == 2.5
    assert retry_after_seconds("-3") == 0.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_seconds(later) <= 31
