"""Hook callables that leave a watched model picklable, and the count of hook failures.

The model's and the optimizer's hook dicts hold what ``watch()`` registers, so
``torch.save(model)``, ``copy.deepcopy(model)`` and DDP's copies pickle those values. A
bound method of the watcher would drag the watcher (its lock, the run, the sink) along and
fail (``cannot pickle '_thread.lock' object``). :class:`Hook` is a ``functools.partial``
(called in C, no extra Python frame on the hot path) that copies and pickles as an *inert*
hook: the copy, or the model loaded back, carries no live watcher and records nothing.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

__all__ = ["Hook", "HookErrors", "inert_hook"]

log = logging.getLogger("provscope.torch")


def inert_hook() -> functools.partial[None]:
    """A hook that does nothing and returns None for any arguments, built only from the
    standard library, so that a model saved while watched loads where provscope is not
    installed. ``object.__init__`` bound to an ``int`` accepts and ignores extra
    positional arguments (int overrides ``__new__``, not ``__init__``)."""
    return functools.partial(object.__init__, 0)


class Hook(functools.partial):
    """``Hook(fn, *args)``: calls ``fn(*args, *hook_args)``; copies and pickles as an
    inert hook (see :func:`inert_hook`)."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return functools.partial, (object.__init__, 0)

    def __deepcopy__(self, memo: dict[int, Any]) -> functools.partial[None]:
        return inert_hook()


class HookErrors:
    """Counts exceptions caught in hook bodies; logs the first of each kind, once."""

    __slots__ = ("count", "kinds")

    def __init__(self) -> None:
        self.count = 0
        self.kinds: set[str] = set()

    def __call__(self, kind: str, exc: BaseException) -> None:
        self.count += 1
        if kind not in self.kinds:
            self.kinds.add(kind)
            log.warning("provscope.watch: %s failed (%s: %s); counted in Watcher.stats(), "
                        "further errors of this kind are not logged", kind,
                        type(exc).__name__, exc)
