"""What the framework callbacks share: a run (the current one, or one they open and close),
nested task scopes opened and closed from separate callback methods, the layer watcher,
and checkpoint files recorded once each.

Every method swallows and counts its errors (``errors``): a callback must never stop the
trainer it observes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["Session", "numeric", "unwrap_optimizer"]

log = logging.getLogger("provscope.integrations")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost ``torch.optim.Optimizer`` of framework wrappers (Lightning's
    ``LightningOptimizer``, Accelerate's ``AcceleratedOptimizer``), or None."""
    import torch

    seen = 0
    while optimizer is not None and seen < 5:
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            optimizer, seen = inner, seen + 1
            continue
        break
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def numeric(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of ``values`` (numbers and 1-element tensors) as floats."""
    out: dict[str, float] = {}
    for key, value in values.items():
        try:
            if hasattr(value, "numel") and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                out[str(key)] = float(value)
        except Exception:
            continue
    return out


class Session:
    """State of one training session seen through a framework's callbacks.

    Args:
        name: workflow name when no run is active (the callback then owns the run).
        every, layers, depth, watch: forwarded to :func:`provscope.watch` (``watch=False``
            records workflow/epoch/step records only).
        settings: provscope settings for a run the callback opens.
    """

    def __init__(self, name: str | None, *, every: int | None, layers: Any, depth: int | None,
                 watch: bool, settings: Any) -> None:
        self.name = name
        self.every = every
        self.layers = layers
        self.depth = depth
        self.watch_layers = watch
        self.settings = settings
        self.run: Any = None
        self.owned = False
        self.watcher: Any = None
        self.errors = 0
        self._scopes: list[tuple[str, Any]] = []
        self._checkpoints: set[str] = set()

    def _fail(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        if self.errors == 1:
            log.warning("provscope callback: %s failed (%s: %s); counted, not raised", what,
                        type(exc).__name__, exc)

    def start(self, default_name: str, hparams: Any = None) -> None:
        """Use the current run, or open one (rank-aware through the run itself)."""
        try:
            from provscope.job.api import current_run, workflow

            run = current_run()
            if run is None or getattr(run, "implicit", False):
                run = workflow(self.name or default_name, config=hparams,
                               settings=self.settings)
                run.__enter__()
                self.owned = True
            self.run = run
        except Exception as exc:
            self._fail("opening the workflow", exc)

    def open_task(self, name: str, kind: str, **params: Any) -> None:
        """Open a task scope nested in the open ones (closed by :meth:`close_task`)."""
        if self.run is None:
            return
        try:
            scope = self.run.task(name, kind=kind, **params)
            scope.__enter__()
            self._scopes.append((name, scope))
        except Exception as exc:
            self._fail(f"opening task {name!r}", exc)

    def close_task(self, name: str, error: BaseException | None = None) -> None:
        """Close the innermost scope called ``name`` and any opened inside it."""
        if not any(n == name for n, _ in self._scopes):
            return
        while self._scopes:
            n, scope = self._scopes.pop()
            try:
                scope.__exit__(type(error) if error else None, error, None)
            except Exception as exc:
                self._fail(f"closing task {n!r}", exc)
            if n == name:
                return

    def close_innermost(self, prefix: str) -> None:
        """Close the innermost open task whose name starts with ``prefix``."""
        for name, _ in reversed(self._scopes):
            if name.startswith(prefix):
                self.close_task(name)
                return

    def watch(self, model: Any, optimizer: Any, **kwargs: Any) -> None:
        """Start layer statistics on ``model`` (once)."""
        if self.run is None or self.watcher is not None or not self.watch_layers:
            return
        try:
            from provscope.pytorch.watch import watch

            self.watcher = watch(model, every=self.every, layers=self.layers,
                                 depth=self.depth, optimizer=unwrap_optimizer(optimizer),
                                 run=self.run, **kwargs)
        except Exception as exc:
            self._fail("watch()", exc)

    def log(self, step: int | None, values: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        try:
            scalars = numeric(values)
            if scalars:
                self.run.log(step=step, **scalars)
        except Exception as exc:
            self._fail("logging scalars", exc)

    def checkpoint(self, path: str | None, step: int | None) -> None:
        """Record a checkpoint file once (linked to the model entity when watched)."""
        if self.run is None or not path or path in self._checkpoints:
            return
        self._checkpoints.add(path)
        try:
            if self.watcher is not None:
                self.watcher.checkpoint(path, step=step)
            else:
                self.run.produce(path, kind="checkpoint", step=step)
        except Exception as exc:
            self._fail("recording a checkpoint", exc)

    def finish(self, error: BaseException | None = None) -> None:
        """Stop watching, close every open task, close the run if this session opened it."""
        if self.watcher is not None:
            try:
                self.watcher.unwatch()
            except Exception as exc:
                self._fail("unwatch()", exc)
        while self._scopes:
            self.close_task(self._scopes[-1][0], error)
        if self.run is not None and self.owned:
            try:
                self.run.__exit__(type(error) if error else None, error, None)
            except Exception as exc:
                self._fail("closing the workflow", exc)
        self.owned = False
