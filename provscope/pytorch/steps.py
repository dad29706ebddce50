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

On CUDA the global gradient norm and the step time stay on the device and cross to the
host in batches (every ``min(every, 10)`` steps, and at each sampled step): unsampled
steps never synchronise the device. The step time there is the device time between CUDA
events recorded at the step ends; after a sampled step it starts at the step's first
forward instead, so the sampled step's blocking copy never lands in the next step. On the
CPU a sampled step's own statistics work is counted in the sampled step. The buffer keeps
the steps open until their values are delivered. The device is read from the gradients at
each step, so a model moved to a GPU after ``watch()`` is measured there.

A GradScaler that finds Inf/NaN gradients skips ``optimizer.step()``, so no optimizer hook
fires: with ``watch(..., scaler=scaler)`` the clock wraps that scaler's ``step`` and ends
such a step itself, with ``optimizer_step_skipped`` = 1. Nothing happens during CUDA graph
capture. Whatever fails while a step ends, the step counter still advances.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

import torch

from provscope.job.run import on_device
from provscope.job.stepbuffer import StepBuffer
from provscope.pytorch import stats as ts
from provscope.pytorch.batch import BatchCounter
from provscope.pytorch.hooks import HookErrors
from provscope.pytorch.layers import LayerSampler, capturing

__all__ = ["ScalerStep", "StepClock"]


class ScalerStep(functools.partial):
    """``scaler.step`` while watched: calls the scaler's own ``step`` and tells the clock
    when it skipped the optimizer step. Pickles and copies as the scaler's plain method,
    so a saved scaler carries no watcher."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        scaler = self.args[0]
        return functools.partial, (type(scaler).step, scaler)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        scaler = self.args[0]
        return functools.partial(type(scaler).step, memo.get(id(scaler), scaler))


class StepClock:
    """The step boundary hooks' logic for one watched model (see the module docstring).

    ``step`` is the current (or next) step number; ``active`` False stops everything.
    """

    def __init__(self, *, run: Any, buffer: StepBuffer, optimizer: Any,
                 all_params: list[torch.nn.Parameter], watched_pos: list[int | None],
                 sampler: LayerSampler, batch: BatchCounter, every: int, scalars: bool,
                 cuda: bool, errors: HookErrors, start_step: int = 0,
                 scaler: Any = None) -> None:
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
        self._pending: list[tuple[int, torch.Tensor, str]] = []  # (step, value, field)
        # CUDA step times: (step, begin event, end event) until the next batch copy.
        self._pending_times: list[tuple[int, Any, Any]] = []
        self._start_ev: Any = None  # recorded at the step's first forward (CUDA)
        self._end_ev: Any = None  # recorded at the previous step's end (CUDA)
        self._after_sample = False
        self._held_steps = 0  # steps waiting for device values
        self.optimizer_steps = 0  # optimizer.step() calls seen (post-hooks)
        self._skipped = False
        self.scaler = scaler
        self._scaler_step: Any = None
        if scaler is not None:
            self._scaler_step = ScalerStep(self._scaler_step_call, scaler)
            scaler.step = self._scaler_step
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
        if self.cuda:
            self._start_ev = _event()
        if self.step >= self._next_sample and self.sampler.state is None:
            self._next_sample = (self.step // self.every + 1) * self.every
            self.sampler.begin(self.step)

    # ------------------------------------------------------------------ hooks

    def on_root_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the watched module. Never raises."""
        if self._explicit:
            return
        try:
            if not self.active or os.getpid() != self._pid or (self.cuda and capturing()):
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
            if present:
                self.cuda = ts.local(present[0]).device.type == "cuda"
                if self.cuda and capturing():
                    return
            norms = ts.param_norms(present)
            if norms and self.scalars:
                self._grad = ts.total_norm(norms)
            if self.sampler.state is not None:
                self.sampler.optimizer_gradients(self._watched_pos, grads, norms)
        except Exception as exc:
            self.errors("optimizer step pre-hook", exc)

    def on_optimizer_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Optimizer step post-hook: the step ends. Never raises."""
        self.optimizer_steps += 1
        try:
            if not self.active or os.getpid() != self._pid or (self.cuda and capturing()):
                return
            self.end()
        except Exception as exc:
            self.errors("optimizer step post-hook", exc)

    def _scaler_step_call(self, scaler: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        """``scaler.step(optimizer)``: the scaler's own step; a skipped optimizer step of
        the watched optimizer ends the step as skipped. Exceptions of the scaler's step
        are the user's and propagate; provscope's own never do."""
        before = self.optimizer_steps
        out = type(scaler).step(scaler, optimizer, *args, **kwargs)
        try:
            if (optimizer is self.optimizer and self.optimizer_steps == before and self.active
                    and os.getpid() == self._pid and self._open):
                self._skipped = True
                self.end()
        except Exception as exc:
            self.errors("GradScaler step", exc)
        return out

    # ------------------------------------------------------------------ step end

    def end(self) -> None:
        """The current step ends: a sampled step's points go out, then its scalars go to
        the buffer. The step counter advances whatever fails on the way."""
        following = self._following()
        step = self.run.step if following and self.optimizer is not None else self.step
        sampled = self.sampler.state is not None
        try:
            end_ev = _event() if self.cuda else None
            if sampled:
                self.sampler.finish(time.time_ns())  # blocks once on the device copy
            now = time.perf_counter()
            if self.scalars:
                self._record(step, now, following, end_ev)
            self._boundary_t = now
            self._end_ev = end_ev
            if sampled or self._held_steps >= self._batch_every:
                self.resolve()
        finally:
            self._after_sample = sampled
            self._skipped = False
            self.step = step + 1
            self._open = False

    def _record(self, step: int, now: float, following: bool, end_ev: Any) -> None:
        fields: dict[str, Any] = {}
        if not following:
            if end_ev is not None:
                begin = self._start_ev if self._after_sample or self._end_ev is None \
                    else self._end_ev
                if begin is not None:
                    self._pending_times.append((step, begin, end_ev))
                    self.buffer.hold(self._resolver, step)
            elif self._boundary_t is not None:
                dt = now - self._boundary_t
                if dt > 0:
                    fields["step_time_seconds"] = dt
        if self.scaler is not None:
            fields["optimizer_step_skipped"] = 1.0 if self._skipped else 0.0
        optimizer = self.optimizer
        if optimizer is not None and optimizer.param_groups:
            lr = optimizer.param_groups[0].get("lr")
            if isinstance(lr, torch.Tensor):
                if on_device(lr):
                    self._pending.append((step, lr, "lr"))
                    self.buffer.hold(self._resolver, step)
                    lr = None
                else:
                    lr = float(lr)
            if isinstance(lr, (int, float)):
                fields["lr"] = float(lr)
        grad, self._grad = self._grad, None
        if grad is not None:
            if on_device(grad):
                self._pending.append((step, grad, "grad_norm"))
                self.buffer.hold(self._resolver, step)
            else:
                value = float(grad)
                if math.isfinite(value):
                    fields["grad_norm"] = value
        if fields:
            self.buffer.add_default(step, fields)
        if (self._pending and self._pending[-1][0] == step) or \
                (self._pending_times and self._pending_times[-1][0] == step):
            self._held_steps += 1

    def resolve(self) -> None:
        """Copy the pending device values (gradient norms, tensor learning rates, step
        times) to the host (one synchronisation) and hand them to the buffer; release the
        steps held for them. Never raises."""
        pending, self._pending = self._pending, []
        times, self._pending_times = self._pending_times, []
        self._held_steps = 0
        try:
            if pending:
                device = pending[0][1].device
                values = torch.stack([v.detach().float().to(device).reshape(())
                                      for _, v, _ in pending]).cpu().tolist()
                for (step, _, name), value in zip(pending, values, strict=True):
                    if math.isfinite(value):
                        self.buffer.add_default(step, {name: value})
            if times:
                times[-1][2].synchronize()
                for step, begin, end in times:
                    seconds = begin.elapsed_time(end) / 1000.0
                    if seconds > 0:
                        self.buffer.add_default(step, {"step_time_seconds": seconds})
        except Exception as exc:
            self.errors("device value copy", exc)
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
        scaler = self.scaler
        if scaler is not None and scaler.__dict__.get("step") is self._scaler_step:
            del scaler.step  # the scaler's own method again


def _event() -> Any:
    """A timing CUDA event recorded now on the current stream."""
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev
