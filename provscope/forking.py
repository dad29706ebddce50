"""Resetting per-process state in a forked child (DataLoader workers, multiprocessing).

A forked child inherits the parent's objects but not its threads, and shares its sockets
and connection pools. Objects that hold such state register a reset here; the child runs
every reset once, right after the fork, before any user code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

__all__ = ["reset_in_child"]

T = TypeVar("T")

log = logging.getLogger("provscope.forking")
_lock = threading.Lock()
_resets: list[tuple[weakref.ref, Callable[[object], None]]] = []


def reset_in_child(obj: T, reset: Callable[[T], None]) -> None:
    """Call ``reset(obj)`` in every child forked after this call while ``obj`` lives.

    ``obj`` is held weakly; ``reset`` must not hold it (pass an unbound method or a
    function of the object). Never blocks on anything but a short lock; never raises.
    """
    with _lock:
        _resets[:] = [(ref, fn) for ref, fn in _resets if ref() is not None]
        _resets.append((weakref.ref(obj), reset))  # type: ignore[arg-type]


def _run_resets() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    for ref, fn in list(_resets):
        obj = ref()
        if obj is not None:
            with contextlib.suppress(Exception):
                fn(obj)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_run_resets)
