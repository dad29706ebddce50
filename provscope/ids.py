"""Identifiers: UUIDv7 strings (RFC 9562), time ordered and unique across ranks and nodes.

Python 3.11 has no ``uuid.uuid7``; this is the RFC layout: 48 bits of Unix milliseconds,
version 7, 12 bits of a per-process counter seeded randomly each millisecond (so ids made
in one process in one millisecond still sort in creation order), variant, 62 random bits.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

__all__ = ["id_time_ns", "new_id"]

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def _reset_after_fork() -> None:
    # A fork while another thread held the lock would leave it held forever in the child.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def new_id() -> str:
    """Return a new UUIDv7 as a 36-character lowercase string. Never blocks."""
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = int.from_bytes(os.urandom(2), "big") & 0x7FF  # leave room to count up
        else:
            ms = _last_ms
            _counter += 1
            if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                _last_ms += 1
                ms = _last_ms
                _counter = 0
        counter = _counter
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand
    return str(uuid.UUID(int=value))


def id_time_ns(id_: str) -> int:
    """Return the creation time (Unix ns, millisecond resolution) encoded in a UUIDv7."""
    return (uuid.UUID(id_).int >> 80) * 1_000_000
