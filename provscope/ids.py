"""Identifiers: UUIDv7 strings (RFC 9562), time ordered and unique across ranks and nodes,
for runs and tasks; content-derived UUIDv5 strings for entities.

Python 3.11 has no ``uuid.uuid7``; this is the RFC layout: 48 bits of Unix milliseconds,
version 7, 12 bits of a per-process counter seeded randomly each millisecond (so ids made
in one process in one millisecond still sort in creation order), variant, 62 random bits.

Entities are keyed by content: ``entity_key`` names what identifies one (its digest, else
its URI, with size and modification time for a local path that was not hashed) and
``content_id`` turns that key into a UUIDv5, so every process, run and node that records
the same bytes gets the same entity id without asking anyone.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

__all__ = ["ENTITY_NAMESPACE", "content_id", "entity_key", "id_time_ns", "new_id"]

_lock = threading.Lock()

# The UUIDv5 namespace of entity ids. Changing it would change every entity id: never.
ENTITY_NAMESPACE = uuid.UUID("5b0c3c52-8f0e-4c36-9d3a-51d2c7e4a0f1")
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


def entity_key(*, digest: str | None = None, uri: str | None = None,
               size_bytes: int | None = None, mtime_ns: int | None = None) -> str | None:
    """What identifies an entity, as a string; None when nothing does (then the caller
    mints a new id).

    - a digest (``"sha256:<hex>"``): the content itself, wherever it lies;
    - a local ``file:`` URI that was not hashed (too big, a directory) but exists: the URI
      with its size and modification time, so a file changed in place is a new entity;
    - any other URI (``s3://...``, a path that does not exist yet): the URI alone.
    """
    if digest:
        return f"digest:{digest}"
    if not uri:
        return None
    if uri.startswith("file:") and size_bytes is not None and mtime_ns is not None:
        return f"stat:{uri}|{int(size_bytes)}|{int(mtime_ns)}"
    return f"uri:{uri}"


def content_id(key: str) -> str:
    """The entity id of a key from ``entity_key`` (or another namespaced key such as
    ``"model:sha256:<hex>"``): a UUIDv5, the same in every process. Never blocks."""
    return str(uuid.uuid5(ENTITY_NAMESPACE, key))
