"""The module-level in-job API: ``workflow``, ``task``, ``log``, ``use``, ``produce``,
``flush``, ``current_run``, and the implicit run that serves them outside any workflow.

Nothing here blocks the job or raises into it (see ``provscope.job.run``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from provscope import jsonsafe
from provscope.ids import new_id
from provscope.job import capture, context
from provscope.job.run import Run, Task, _TaskScope, enabled
from provscope.job.sink import flush_all, on_exit

__all__ = ["current_run", "flush", "log", "produce", "task", "use", "workflow"]

log_ = logging.getLogger("provscope.client")

F = TypeVar("F", bound=Callable[..., Any])



_implicit: Run | None = None
_implicit_lock = threading.Lock()


def workflow(name: str, config: Any = None, *, campaign: str | None = None,
             parent_run_id: str | None = None, settings: Any = None,
             run_id: str | None = None) -> Run:
    """A new run, to use as ``with provscope.workflow("train", config=cfg) as run:``.

    Args:
        name: the workflow's name.
        config: the job's own configuration (dict, dataclass, pydantic model, argparse
            namespace); stored JSON-safe on the run row.
        campaign: free label grouping runs (a sweep, a paper).
        parent_run_id: the run this one belongs to (default: the enclosing workflow).
        settings: provscope settings: a ``Config``, a mapping of dotted overrides
            (``{"influxdb.url": ...}``), a YAML path, or None (file/env defaults).
        run_id: the run to record into (every process that names it writes into the
            same run). Default: ``provscope.job.identity``'s rule: ``PROVSCOPE_RUN_ID``,
            else the launcher's job (torchrun, SLURM step, MPI), else rank 0's id over
            torch.distributed, else a new id. A workflow inside another is a child run.

    Every rank of a job writes into the same run: its partial run record (rank 0's name,
    config, code and environment win), its tasks and its points. Creating it blocks only
    in one case: a rank other than 0, torch.distributed initialised and no launcher job
    id, waits (up to ``client.identity_wait_s``) for rank 0's run id.
    """
    try:
        return Run(name, config, settings=settings, campaign=campaign,
                   parent_run_id=parent_run_id, run_id=run_id)
    except Exception:
        log_.warning("provscope: cannot start workflow %r; recording disabled for it", name,
                     exc_info=True)
        return Run(name, disabled=True)


def current_run() -> Run | None:
    """The active run of this context/thread, else the process's innermost open workflow,
    else the implicit run if one was created; None when nothing is recording."""
    run = context.context_run()
    return run if run is not None else _implicit


def _run_or_implicit() -> Run:
    run = current_run()
    if run is not None:
        return run
    global _implicit
    with _implicit_lock:
        if _implicit is None:
            main = sys.modules.get("__main__")
            script = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv else "")
            name = Path(script).stem if script else "python"
            run = Run(name or "python", implicit=True)
            run.start()
            _install_excepthook(run)
            on_exit(_close_implicit)
            _implicit = run
        return _implicit


_uncaught: list[BaseException] = []


def _install_excepthook(run: Run) -> None:
    previous = sys.excepthook

    def hook(exc_type: Any, exc: BaseException, tb: Any) -> None:
        _uncaught.append(exc)
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def _close_implicit() -> None:
    run = _implicit
    if run is not None:
        if not _uncaught:
            run.finish("finished")
        elif any(isinstance(exc, KeyboardInterrupt) for exc in _uncaught):
            run.finish("interrupted")
        else:
            run.finish("failed")


def log(step: int | None = None, **scalars: Any) -> None:
    """``current_run().log(...)`` (implicit run outside a workflow). Never raises."""
    if enabled():
        _run_or_implicit().log(step, **scalars)


def use(path_or_uri: str | os.PathLike[str], kind: str = "dataset", **attrs: Any) -> str:
    """``current_run().use(...)`` (implicit run outside a workflow). Returns the entity id."""
    if not enabled():
        return new_id()
    return _run_or_implicit().use(path_or_uri, kind, **attrs)


def produce(path_or_uri: str | os.PathLike[str], kind: str = "checkpoint",
            step: int | None = None, **attrs: Any) -> str:
    """``current_run().produce(...)`` (implicit run outside a workflow). Returns the id."""
    if not enabled():
        return new_id()
    return _run_or_implicit().produce(path_or_uri, kind, step, **attrs)


def flush(timeout_s: float = 10.0) -> bool:
    """Write the current run's open step (its ``train`` point), then wait up to
    ``timeout_s`` until everything recorded so far is written. Blocks."""
    try:
        run = current_run()
        if run is not None:
            run.step_buffer.complete()
        return flush_all(timeout_s)
    except Exception:
        return False


# ----------------------------------------------------------------------------- @task


def _call_arguments(sig: inspect.Signature | None, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any]
    if sig is None:
        out = {f"arg{i}": v for i, v in enumerate(args)}
        out.update(kwargs)
        return out
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError:
        return {f"arg{i}": v for i, v in enumerate(args)} | kwargs
    out = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            for i, v in enumerate(value):
                out[f"{name}[{i}]"] = v
        elif name not in ("self", "cls"):
            out[name] = value
    return out


def _scope_for_call(fn_name: str, kind: str, sig: inspect.Signature | None,
                    capture_args: bool, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> _TaskScope | None:
    try:
        run = _run_or_implicit()
        params: dict[str, Any] | None = None
        paths: dict[str, Any] | None = None
        if capture_args:
            params, paths = {}, {}
            for name, value in _call_arguments(sig, args, kwargs).items():
                if capture.looks_like_path(value):
                    paths[name] = value
                else:
                    params[name] = jsonsafe.summarise(value)
        return _TaskScope(run, fn_name, kind, params or None, paths or None)
    except Exception:
        return None


def _record_return(task: Task, value: Any) -> None:
    try:
        values = value if isinstance(value, tuple) else (value,)
        paths = [v for v in values if capture.looks_like_path(v)]
        for i, path in enumerate(paths):
            task.run.produce(path, "file", role="return" if len(paths) == 1 else f"return[{i}]",
                             task_id=task.task_id)
        if not paths or len(paths) < len(values):
            task.result["return"] = jsonsafe.summarise(value)
    except Exception:
        task.run.errors += 1


class _TaskFactory:
    """What ``provscope.task(name=..., kind=...)`` returns: a decorator and a context manager."""

    def __init__(self, name: str | None, kind: str, capture_args: bool) -> None:
        self.name = name
        self.kind = kind
        self.capture_args = capture_args
        self._scope: list[_TaskScope] = []

    def __call__(self, fn: F) -> F:
        return _decorate(fn, self.name, self.kind, self.capture_args)

    def _open(self) -> _TaskScope:
        run = _run_or_implicit() if enabled() else Run(self.name or "task", disabled=True)
        scope = run.task(self.name or "task", self.kind)
        self._scope.append(scope)
        return scope

    def __enter__(self) -> Task:
        return self._open().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._scope.pop().__exit__(*exc)

    async def __aenter__(self) -> Task:
        return self._open().__enter__()

    async def __aexit__(self, *exc: Any) -> None:
        self._scope.pop().__exit__(*exc)


def task(fn: Any = None, /, *, name: str | None = None, kind: str = "task",
         capture_args: bool = True) -> Any:
    """Record each call of a function as a task: ``@provscope.task`` or
    ``@provscope.task(name="prep", kind="data")``; works on sync and async functions.

    Arguments are recorded as ``used`` (small values summarised into params; paths as
    file entities), the return value as ``generated`` (paths as entities, other values
    summarised into the result). Nesting follows the caller's context. An exception is
    recorded (status failed, error text) and re-raised unchanged. ``capture_args=False``
    records no arguments (for secrets or hot paths).

    ``provscope.task("name")`` also works as ``with provscope.task("eval"):``.
    """
    if callable(fn):
        return _decorate(fn, name, kind, capture_args)
    if isinstance(fn, str):
        name = fn
    return _TaskFactory(name, kind, capture_args)


def _decorate(fn: F, name: str | None, kind: str, capture_args: bool) -> F:
    task_name = name or str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "task"))
    try:
        sig: inspect.Signature | None = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            scope = _scope_for_call(task_name, kind, sig, capture_args, args, kwargs) \
                if enabled() else None
            if scope is None:
                return await fn(*args, **kwargs)
            with scope as t:
                result = await fn(*args, **kwargs)
                _record_return(t, result)
            return result

        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        scope = _scope_for_call(task_name, kind, sig, capture_args, args, kwargs) \
            if enabled() else None
        if scope is None:
            return fn(*args, **kwargs)
        with scope as t:
            result = fn(*args, **kwargs)
            _record_return(t, result)
        return result

    return wrapper  # type: ignore[return-value]


def _reset_implicit_after_fork() -> None:
    global _implicit_lock
    _implicit_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_implicit_after_fork)
