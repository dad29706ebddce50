"""Which run and which task are current: context variables plus a process-wide fallback.

``contextvars`` give each thread and each asyncio task its own current run and task:
asyncio tasks copy the context of the code that created them, so ``await``-ed and
``asyncio.gather``-ed coroutines nest under the task that started them. A plain
``threading.Thread`` starts with an empty context; there the process-wide fallback
answers: the innermost workflow still open in the process, and in it the innermost task
open in the thread that opened the workflow. ``wrap(fn)`` carries the caller's exact
context into a thread or executor instead.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from provscope.job.api import Run

__all__ = [
    "UNSET",
    "active_runs",
    "context_run",
    "context_task",
    "pop_run",
    "push_run",
    "reset_after_fork",
    "run_var",
    "task_var",
    "wrap",
]

F = TypeVar("F", bound=Callable[..., Any])


class _Unset:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


#: "This context never set a value": fall back to the process-wide answer.
UNSET: Any = _Unset()

run_var: contextvars.ContextVar[Any] = contextvars.ContextVar("provscope_run", default=UNSET)
task_var: contextvars.ContextVar[Any] = contextvars.ContextVar("provscope_task", default=UNSET)

# Open workflows of this process, innermost last (the fallback for fresh threads).
_runs: list[Run] = []
_lock = threading.Lock()


def push_run(run: Run) -> None:
    with _lock:
        _runs.append(run)


def pop_run(run: Run) -> None:
    with _lock:
        for i in range(len(_runs) - 1, -1, -1):
            if _runs[i] is run:
                del _runs[i]
                break


def active_runs() -> list[Run]:
    """Open workflows of this process, outermost first."""
    return list(_runs)


def context_run() -> Run | None:
    """The run of this context, else the innermost open workflow of the process."""
    run = run_var.get()
    if run is not UNSET and run is not None:
        return run
    runs = _runs
    return runs[-1] if runs else None


def context_task(run: Run) -> str | None:
    """The current task id for ``run`` in this context (fallback: the run's main thread)."""
    value = task_var.get()
    if value is not UNSET and run_var.get() is run:
        return value
    return run.fallback_task_id()


def wrap(fn: F) -> F:
    """Return ``fn`` bound to the caller's current run and task.

    Use it for threads and executors: ``Thread(target=provscope.wrap(work))`` or
    ``pool.submit(provscope.wrap(work), x)``; tasks opened inside ``work`` then get the
    caller's task as parent. Each call runs in its own copy of the captured context.
    """
    ctx = contextvars.copy_context()

    def bound(*args: Any, **kwargs: Any) -> Any:
        return ctx.copy().run(fn, *args, **kwargs)

    bound.__wrapped__ = fn  # type: ignore[attr-defined]
    bound.__name__ = getattr(fn, "__name__", "wrapped")
    bound.__doc__ = getattr(fn, "__doc__", None)
    return bound  # type: ignore[return-value]


def reset_after_fork() -> None:
    """In a forked child: new lock (the parent's may have been held mid-fork)."""
    global _lock
    _lock = threading.Lock()
