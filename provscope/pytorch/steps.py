"""Step boundaries of a watched model, and its share of the step's ``train`` record.

A step is known without user code:

* with ``optimizer=``: a step begins at the first training forward after the previous
  ``optimizer.step()`` and ends when ``optimizer.step()`` returns (step post-hook).
  Gradients are read in the step pre-hook, when they are final (gradient accumulation
  included).
* without an optimizer: every training forward of the watched module (gradients enabled,
  module in training mode) ends the previous step and begins the next one.
* loops that never call the module's ``forward`` (Lightning): ``Watcher.begin_step``.

One step counter per run. While a ``run.steps()`` loop runs it owns the counter
(``run.step``) and the step time; the clock follows it, and with an optimizer its
learning rate and gradient norm go to the step in which ``optimizer.step()`` ran (with
gradient accumulation over ``run.steps()``, the last micro-step of the optimizer step).
Otherwise the clock counts steps itself (one per optimizer step, or per training forward),
publishes them as ``run.step`` (so ``run.log`` lands in the same record) and measures the
step time: from the end of the previous step to the end of this one, the same definition
as ``run.steps()``. Its fields go to the run's step buffer (provscope/job/stepbuffer.py)
as defaults: a value the script logs itself wins. Samples are counted per training
forward (provscope/pytorch/batch.py) and divided by the step time when the record is
written.

On CUDA the global gradient norm stays on the device and crosses to the host in batches
(every ``min(every, 10)`` steps, and at each sampled step): unsampled steps never
synchronise the device. The buffer keeps the steps open until their norms are delivered.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch

from provscope.job.stepbuffer import StepBuffer
from provscope.pytorch import stats as ts
from provscope.pytorch.batch import BatchCounter
from provscope.pytorch.hooks import HookErrors
from provscope.pytorch.layers import LayerSampler

__all__ = ["StepClock"]


class StepClock:
    """The step boundary hooks' logic for one watched model (see the module docstring).

    ``step`` is the current (or next) step number; ``active`` False stops everything.
    """

    def __init__(self, *, run: Any, buffer: StepBuffer, optimizer: Any,
                 all_params: list[torch.nn.Parameter], watched_pos: list[int | None],
                 sampler: LayerSampler, batch: BatchCounter, every: int, scalars: bool,
                 cuda: bool, errors: HookErrors, start_step: int = 0) -> None:
        self.run = run
        self.buffer = buffer
        self.optimizer = optimizer
        self.sampler = sampler
        self.batch = batch
        self.every = every
        self.scalars = scalars
        self.cuda = cuda
        self.errors = errors
        self.step = start_step
        self.active = True
        self._all_params = all_params
        self._watched_pos = watched_pos
        self._pid = os.getpid()
        self._explicit = False
        self._open = False  # a step has begun and not ended
        self._next_sample = -(-start_step // every) * every  # first multiple of every
        self._boundary_t: float | None = None
        self._grad: torch.Tensor | None = None
        self._pending: list[tuple[int, torch.Tensor]] = []
        # Per-step gradient norms wait on the device and cross to the host in batches: on
        # CUDA every min(every, 10) steps (one synchronisation per batch, and dashboards lag
        # at most ten steps); on the CPU there is nothing to wait for.
        self._batch_every = min(every, 10)
        self._resolver = self.resolve  # one bound method: the buffer's key for our hold

    # ------------------------------------------------------------------ the run's counter

    def _following(self) -> bool:
        run = self.run
        return run is not None and self.buffer.loops > 0 and isinstance(run.step, int)

    def _start(self) -> None:
        run = self.run
        if self._following():
            self.step = run.step
        else:
            if run is not None:
                last = getattr(run, "step", None)
                if isinstance(last, int) and last >= self.step:  # a run.steps() loop ran
                    self.step = last + 1
                run.step = self.step
            self.buffer.advance(self.step)
        self._open = True
        if self.step >= self._next_sample and self.sampler.state is None:
            self._next_sample = (self.step // self.every + 1) * self.every
            self.sampler.begin(self.step)

    # ------------------------------------------------------------------ hooks

    def on_root_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the watched module. Never raises."""
        if self._explicit:
            return
        try:
            if not self.active or os.getpid() != self._pid:
                return
            self.begin(torch.is_grad_enabled() and module.training, args, kwargs)
        except Exception as exc:
            self.errors("root forward hook", exc)

    def begin_step(self, batch: Any = None) -> None:
        """An explicit step start (see ``Watcher.begin_step``). Never raises."""
        self._explicit = True
        try:
            if not self.active or os.getpid() != self._pid:
                return
            args: tuple[Any, ...]
            kwargs: dict[str, Any]
            if isinstance(batch, dict):
                args, kwargs = (), batch
            elif isinstance(batch, (tuple, list)):
                args, kwargs = tuple(batch), {}
            else:
                args, kwargs = (batch,), {}
            self.begin(True, args, kwargs)
        except Exception as exc:
            self.errors("begin_step", exc)

    def begin(self, training: bool, args: tuple, kwargs: dict) -> None:
        if not training:
            return  # evaluation forwards are not steps and carry no training samples
        if self.optimizer is None:
            if self._open:
                self.end()
            self._start()
        elif not self._open:
            self._start()
        if self.scalars:
            samples, tokens = self.batch.count(args, kwargs)
            if samples:
                step = self.run.step if self._following() else self.step
                self.buffer.count(step, samples, tokens)
        if self._boundary_t is None:
            self._boundary_t = time.perf_counter()

    def on_optimizer_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Optimizer step pre-hook: gradients are final. Never raises."""
        try:
            if not self.active or os.getpid() != self._pid:
                return
            grads = [p.grad for p in self._all_params]
            present = [g for g in grads if g is not None]
            norms = ts.foreach_norms(present)
            if norms and self.scalars:
                self._grad = ts.total_norm(norms)
            if self.sampler.state is not None:
                self.sampler.optimizer_gradients(self._watched_pos, grads, norms)
        except Exception as exc:
            self.errors("optimizer step pre-hook", exc)

    def on_optimizer_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Optimizer step post-hook: the step ends. Never raises."""
        try:
            if not self.active or os.getpid() != self._pid:
                return
            self.end()
        except Exception as exc:
            self.errors("optimizer step post-hook", exc)

    # ------------------------------------------------------------------ step end

    def end(self) -> None:
        """The current step ends: its scalars go to the buffer, a sampled step's points out."""
        now = time.perf_counter()
        following = self._following()
        step = self.run.step if following and self.optimizer is not None else self.step
        if self.scalars:
            self._record(step, now, following)
        self._boundary_t = now
        if self.sampler.state is not None:
            self.sampler.finish(time.time_ns())
            self.resolve()
        elif len(self._pending) >= self._batch_every:
            self.resolve()
        self.step = step + 1
        self._open = False

    def _record(self, step: int, now: float, following: bool) -> None:
        fields: dict[str, Any] = {}
        if not following and self._boundary_t is not None:
            dt = now - self._boundary_t
            if dt > 0:
                fields["step_time_seconds"] = dt
        optimizer = self.optimizer
        if optimizer is not None and optimizer.param_groups:
            lr = optimizer.param_groups[0].get("lr")
            if isinstance(lr, torch.Tensor):
                lr = float(lr)
            if isinstance(lr, (int, float)):
                fields["lr"] = float(lr)
        grad, self._grad = self._grad, None
        if grad is not None:
            if self.cuda:
                self._pending.append((step, grad))
                self.buffer.hold(self._resolver, step)
            else:
                value = float(grad)
                if math.isfinite(value):
                    fields["grad_norm"] = value
        if fields:
            self.buffer.add_default(step, fields)

    def resolve(self) -> None:
        """Copy the pending gradient norms to the host (one synchronisation) and hand them
        to the buffer; release the steps held for them. Never raises."""
        pending, self._pending = self._pending, []
        try:
            if pending:
                device = pending[0][1].device
                values = torch.stack([g.float().to(device) for _, g in pending]).cpu().tolist()
                for (step, _), value in zip(pending, values, strict=True):
                    if math.isfinite(value):
                        self.buffer.add_default(step, {"grad_norm": value})
        except Exception as exc:
            self.errors("gradient norm copy", exc)
        self.buffer.release(self._resolver)

    def stop(self) -> None:
        """End of the watch: the open step ends (without an optimizer, the last forward's
        step), a sampled step in progress is written, pending norms delivered."""
        try:
            if self.optimizer is None and self._open:
                self.end()
            if self.sampler.state is not None:
                self.sampler.finish(time.time_ns())
            self.resolve()
        except Exception as exc:
            self.errors("unwatch", exc)
        self.active = False
