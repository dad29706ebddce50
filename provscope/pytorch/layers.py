"""Per-layer hooks of a sampled step: what they collect, and when they are attached.

On a sampled step :meth:`LayerSampler.begin` attaches forward pre/post hooks on every
watched layer (timing, activation statistics, CUDA memory delta), tensor hooks on each
layer's output and input gradients (backward timing) and, where needed,
post-accumulate-grad hooks; :meth:`LayerSampler.finish` removes them and turns what they
collected into points (provscope/pytorch/points.py). Statistics stay on the device as 0-d
tensors until then. Every hook body is wrapped: an exception is counted and never reaches
the training step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from provscope.pytorch import stats as ts
from provscope.pytorch.hooks import Hook, HookErrors
from provscope.pytorch.model import Layer
from provscope.pytorch.points import sampled_step_points

__all__ = ["LayerSampler", "StepState"]


class StepState:
    """What one sampled step collects before it is turned into points."""

    __slots__ = (
        "acts",
        "bwd0",
        "bwd1",
        "calls",
        "fwd",
        "fwd0",
        "grad_norms",
        "mem",
        "mem0",
        "snapshot",
        "snapshot_idx",
        "step",
    )

    def __init__(self, n: int, step: int) -> None:
        self.step = step
        self.acts: list[tuple[int, ts.Moments]] = []
        self.fwd0: list[Any] = [None] * n
        self.fwd: list[Any] = [None] * n  # CPU: seconds (summed); CUDA: list of event pairs
        self.bwd0: list[Any] = [None] * n
        self.bwd1: list[Any] = [None] * n
        self.calls = [0] * n
        self.mem0 = [0] * n
        self.mem: list[int | None] = [None] * n
        self.snapshot: list[torch.Tensor] | None = None
        self.snapshot_idx: list[int] = []  # parameter indices the snapshot holds
        self.grad_norms: dict[int, torch.Tensor] = {}


class LayerSampler:
    """The watched layers and their parameters, and the hooks of sampled steps.

    ``state`` is the open sampled step (None between them). ``send(points)`` receives the
    points of each finished sampled step.
    """

    def __init__(self, layers: list[Layer], *, tags: dict[str, str], device: torch.device,
                 log_params: bool, per_param: bool, log_memory: bool, hooks_allowed: bool,
                 has_optimizer: bool, snapshot_max_bytes: int, errors: HookErrors,
                 send: Callable[[list[Any]], None]) -> None:
        self.layers = layers
        self.names = [layer.name for layer in layers]
        self.device = device
        self.cuda = device.type == "cuda"
        self.log_params = log_params
        self.per_param = per_param
        self.log_memory = log_memory
        self.hooks_allowed = hooks_allowed
        self.has_optimizer = has_optimizer
        self.snapshot_max_bytes = snapshot_max_bytes
        self.errors = errors
        self.send = send
        self.layer_tags = [{**tags, "layer": layer.name, "module_type": layer.module_type}
                           for layer in layers]
        # Flat parameter list of the watched layers: index -> (layer index, name, tensor).
        self.params: list[tuple[int, str, nn.Parameter]] = [
            (i, pname, p) for i, layer in enumerate(layers) for pname, p in layer.params
        ]
        self.layer_params: list[list[int]] = [[] for _ in layers]
        for k, (i, _, _) in enumerate(self.params):
            self.layer_params[i].append(k)
        self.param_tags = [{**self.layer_tags[i], "param": pname}
                           for i, pname, _ in self.params]
        self.layer_bytes = [
            sum(self.params[k][2].numel() * self.params[k][2].element_size() for k in ks)
            for ks in self.layer_params
        ]
        self.state: StepState | None = None
        self.sampled_steps = 0
        self._snapshot_next = 0
        self._handles: list[Any] = []
        # Built once so that sampled steps only register, never allocate, hook callables.
        n = len(layers)
        self._fwd_pre = [Hook(self._on_forward_pre, i) for i in range(n)]
        self._fwd_post = [Hook(self._on_forward, i) for i in range(n)]
        self._bwd_start = [Hook(self._on_grad_output, i) for i in range(n)]
        self._bwd_end = [Hook(self._on_grad_input, i) for i in range(n)]
        self._grad_acc = [Hook(self._on_grad_accumulated, k) for k in range(len(self.params))]

    # ------------------------------------------------------------------ lifecycle

    def begin(self, step: int) -> None:
        """Open sampled step ``step``: attach the per-layer hooks."""
        state = StepState(len(self.layers), step)
        self.state = state
        if not self.has_optimizer and self.log_params and self.params:
            self.take_snapshot(state)
        handles = self._handles
        if self.hooks_allowed:
            for i, layer in enumerate(self.layers):
                handles.append(layer.module.register_forward_pre_hook(self._fwd_pre[i]))
                handles.append(layer.module.register_forward_hook(self._fwd_post[i]))
        if not self.has_optimizer:
            for k, (_, _, p) in enumerate(self.params):
                if p.requires_grad:
                    handles.append(p.register_post_accumulate_grad_hook(self._grad_acc[k]))

    def optimizer_gradients(self, watched_pos: list[int | None], grads: list[Any],
                            norms: list[torch.Tensor]) -> None:
        """Before ``optimizer.step()`` on a sampled step: keep the watched parameters'
        gradient norms (from the optimizer's norms ``norms`` of the present ``grads``) and
        copy the weights for the update ratio."""
        state = self.state
        if state is None:
            return
        it = iter(norms)
        per_pos = [next(it) if g is not None else None for g in grads]
        for k, pos in enumerate(watched_pos):
            norm = per_pos[pos] if pos is not None else None
            if norm is not None:
                state.grad_norms[k] = norm
        if self.log_params and self.params:
            self.take_snapshot(state)

    def finish(self, now_ns: int) -> None:
        """Close the open sampled step: remove its hooks and send its points."""
        state, self.state = self.state, None
        if state is None:
            return
        self.remove_hooks()
        self.sampled_steps += 1
        try:
            self.send(sampled_step_points(self, state, now_ns))
        except Exception as exc:
            self.errors("layer statistics at step end", exc)

    def take_snapshot(self, state: StepState) -> None:
        """Copy the weights of as many whole layers as fit in ``snapshot_max_bytes``,
        starting where the previous sampled step stopped, so that a model too big to copy
        at once still gets every layer's update ratio, in turn."""
        n = len(self.layers)
        budget = self.snapshot_max_bytes
        chosen: list[int] = []
        used = 0
        i = self._snapshot_next
        for _ in range(n):
            size = self.layer_bytes[i]
            if size and size <= budget - used:
                chosen.append(i)
                used += size
            elif size and chosen:
                break
            i = (i + 1) % n
        self._snapshot_next = i
        idx = [k for layer in chosen for k in self.layer_params[layer]]
        state.snapshot_idx = idx
        state.snapshot = ts.snapshot([self.params[k][2] for k in idx])

    def remove_hooks(self) -> None:
        """Remove every per-layer hook of the sampled step. Never raises."""
        for handle in self._handles:
            try:
                handle.remove()
            except Exception as exc:
                self.errors("hook removal", exc)
        self._handles.clear()

    # ------------------------------------------------------------------ hook bodies

    def _stamp(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _on_forward_pre(self, i: int, module: nn.Module, args: tuple) -> None:
        try:
            state = self.state
            if state is None:
                return
            if self.cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                state.fwd0[i] = ev
                if self.log_memory:
                    state.mem0[i] = torch.cuda.memory_allocated(self.device)
            else:
                state.fwd0[i] = time.perf_counter()
            if state.calls[i] == 0 and torch.is_grad_enabled():
                x = args[0] if args else None
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    x.register_hook(self._bwd_end[i])
                elif self.has_optimizer:
                    # No input gradient (embeddings, the first layer): the layer's backward
                    # ends when its parameters' gradients are accumulated.
                    for k in self.layer_params[i]:
                        p = self.params[k][2]
                        if p.requires_grad:
                            self._handles.append(
                                p.register_post_accumulate_grad_hook(self._grad_acc[k]))
        except Exception as exc:
            self.errors(f"forward pre-hook of layer {self.names[i]!r}", exc)

    def _on_forward(self, i: int, module: nn.Module, args: tuple, out: Any) -> None:
        try:
            state = self.state
            if state is None:
                return
            if state.fwd0[i] is None:
                # Hooks attached while this very module was starting (the watched module is
                # itself the layer): no start time for this call, statistics still count.
                pass
            elif self.cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                pairs = state.fwd[i] or []
                pairs.append((state.fwd0[i], ev))
                state.fwd[i] = pairs
                if self.log_memory:
                    delta = torch.cuda.memory_allocated(self.device) - state.mem0[i]
                    state.mem[i] = (state.mem[i] or 0) + delta
            else:
                state.fwd[i] = (state.fwd[i] or 0.0) + (time.perf_counter() - state.fwd0[i])
            state.fwd0[i] = None
            first = state.calls[i] == 0
            state.calls[i] += 1
            if not first:
                return
            x = ts.first_tensor(out)
            if x is None:
                return
            moments = ts.activation_moments(x)
            if moments is not None:
                state.acts.append((i, moments))
            if x.requires_grad and torch.is_grad_enabled():
                x.register_hook(self._bwd_start[i])
        except Exception as exc:
            self.errors(f"forward hook of layer {self.names[i]!r}", exc)

    def _on_grad_output(self, i: int, grad: torch.Tensor) -> None:
        try:
            state = self.state
            if state is not None and state.bwd0[i] is None:
                state.bwd0[i] = self._stamp()
        except Exception as exc:
            self.errors(f"backward hook of layer {self.names[i]!r}", exc)

    def _on_grad_input(self, i: int, grad: torch.Tensor) -> None:
        try:
            state = self.state
            if state is not None:
                state.bwd1[i] = self._stamp()
        except Exception as exc:
            self.errors(f"backward hook of layer {self.names[i]!r}", exc)

    def _on_grad_accumulated(self, k: int, param: torch.Tensor) -> None:
        try:
            state = self.state
            if state is None or param.grad is None:
                return
            if not self.has_optimizer:
                state.grad_norms[k] = ts.foreach_norms([param.grad])[0]
            i = self.params[k][0]
            # Layers whose input needs no gradient (embeddings, first layer): the backward
            # ends when their last parameter gradient is accumulated.
            if self.hooks_allowed:
                state.bwd1[i] = self._stamp() if state.bwd0[i] is not None else state.bwd1[i]
        except Exception as exc:
            self.errors("gradient accumulation hook", exc)
