"""Per-layer hooks of a sampled step: what they collect, and when they are attached.

On a sampled step :meth:`LayerSampler.begin` attaches a forward pre-hook and a forward
hook on every watched layer; they time the layer's forward pass, hand the layer's output
to :class:`~provscope.pytorch.stats.ActivationStats` (copied into the batched workspace)
and put one pre-hook on the autograd node that produces the output (the layer's backward
starts there) and one on the node of its input (its backward ends there); a node shared
by two layers, as in every chain of layers, carries one hook for both. Layers whose input
needs no gradient end their backward when their parameters' gradients are accumulated.
:meth:`LayerSampler.finish` removes the forward hooks (autograd nodes die with the graph)
and turns what was collected into points (provscope/pytorch/points.py).

Activation checkpointing reruns a layer's forward inside the backward pass: the rerun is
neither timed nor counted again, and with reentrant checkpointing, whose first forward
runs without gradients, the rerun is where the backward hooks go. During CUDA graph
capture the hooks do nothing (recording an event or copying would break the capture).
Every hook body is wrapped: an exception is counted and never reaches the training step.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from provscope.pytorch import stats as ts
from provscope.pytorch.hooks import Hook, HookErrors
from provscope.pytorch.model import Layer
from provscope.pytorch.points import sampled_step_points

__all__ = ["LayerSampler", "StepState"]

_graph_task_id = torch._C._current_graph_task_id  # -1 outside a backward pass


_KEYS: OrderedDict[int, Any] = OrderedDict()


def _reserve_key() -> int:
    """A hook-dict key no other hook will ever use (PyTorch's own handle counter)."""
    return RemovableHandle(_KEYS).id


def capturing() -> bool:
    """True while the current CUDA stream is capturing a graph."""
    try:
        return torch.cuda.is_current_stream_capturing()
    except Exception:
        return False


class StepState:
    """What one sampled step collects before it is turned into points."""

    __slots__ = (
        "bwd0",
        "bwd1",
        "devices",
        "fwd",
        "fwd0",
        "grad_norms",
        "hooked",
        "marks",
        "mem",
        "mem0",
        "seen",
        "snapshot",
        "snapshot_idx",
        "step",
    )

    def __init__(self, n: int, step: int) -> None:
        self.step = step
        self.fwd0: list[Any] = [None] * n
        self.fwd: list[Any] = [None] * n  # CPU: seconds (summed); CUDA: list of event pairs
        self.bwd0: list[Any] = [None] * n
        self.bwd1: list[Any] = [None] * n
        self.seen = [False] * n  # statistics taken (first forward of the step)
        self.hooked = [False] * n  # backward marks placed
        self.mem0 = [0] * n
        self.mem: list[int | None] = [None] * n
        self.snapshot: list[torch.Tensor] | None = None
        self.snapshot_idx: list[int] = []  # parameter indices the snapshot holds
        self.grad_norms: dict[int, torch.Tensor] = {}
        # id(autograd node) -> (node, [(layer, is_start), ...]): one pre-hook per node.
        self.marks: dict[int, tuple[Any, list[tuple[int, bool]]]] = {}
        self.devices: set[torch.device] = set()


class LayerSampler:
    """The watched layers and their parameters, and the hooks of sampled steps.

    ``state`` is the open sampled step (None between them). ``send(points)`` receives the
    points of each finished sampled step. The device (and so CPU or CUDA timing) is read
    from the parameters at the start of each sampled step, so a model moved after
    ``watch()`` is timed where it runs.
    """

    def __init__(self, layers: list[Layer], *, tags: dict[str, str], device: torch.device,
                 log_params: bool, per_param: bool, log_memory: bool | None,
                 hooks_allowed: bool, has_optimizer: bool, snapshot_max_bytes: int,
                 errors: HookErrors, send: Callable[[list[Any]], None]) -> None:
        self.layers = layers
        self.names = [layer.name for layer in layers]
        self.device = device
        self.cuda = device.type == "cuda"
        self.log_params = log_params
        self.per_param = per_param
        self.log_memory_setting = log_memory
        self.log_memory = bool(log_memory) and self.cuda if log_memory is not None else self.cuda
        self.hooks_allowed = hooks_allowed
        self.has_optimizer = has_optimizer
        self.snapshot_max_bytes = snapshot_max_bytes
        self.errors = errors
        self.send = send
        self.acts = ts.ActivationStats()
        self.capture_skips = 0
        self.layer_tags = [{**tags, "layer": layer.name, "module_type": layer.module_type}
                           for layer in layers]
        # Flat parameter list of the watched layers: index -> (layer index, name, tensor).
        self.params: list[tuple[int, str, nn.Parameter]] = [
            (i, pname, p) for i, layer in enumerate(layers) for pname, p in layer.params
        ]
        self.layer_params: list[list[int]] = [[] for _ in layers]
        for k, (i, _, _) in enumerate(self.params):
            self.layer_params[i].append(k)
        # Weights with statistics: trainable floating-point ones (a frozen or quantised
        # weight has no update, and an integer one no meaningful norm).
        self.stat_params = [k for k, (_, _, p) in enumerate(self.params)
                            if p.requires_grad and p.is_floating_point()]
        self.param_tags = [{**self.layer_tags[i], "param": pname}
                           for i, pname, _ in self.params]
        stat = set(self.stat_params)
        self.layer_bytes = [
            sum(self.params[k][2].numel() * self.params[k][2].element_size()
                for k in ks if k in stat)
            for ks in self.layer_params
        ]
        self.hooked_layers = [i for i, layer in enumerate(layers)
                              if hooks_allowed and layer.hookable]
        self.state: StepState | None = None
        self.sampled_steps = 0
        self._snapshot_next = 0
        self._handles: list[Any] = []
        # Forward hooks are put into the modules' hook dicts under keys reserved once, and
        # taken out again, on sampled steps only: no handle object per hook and step, and
        # unsampled steps keep PyTorch's fast path of modules without hooks.
        self._keys = {i: (_reserve_key(), _reserve_key()) for i in self.hooked_layers}
        self._inserted: list[int] = []
        # Built once so that sampled steps only register, never allocate, hook callables.
        n = len(layers)
        self._fwd_pre = [Hook(self._on_forward_pre, i) for i in range(n)]
        self._fwd_post = [Hook(self._on_forward, i) for i in range(n)]
        self._grad_acc = [Hook(self._on_grad_accumulated, k) for k in range(len(self.params))]
        # For blocks compiled with module.compile(), called around their compiled call.
        self.call_pre = [Hook(self._on_call_pre, i) for i in range(n)]
        self.call_post = self._fwd_post

    # ------------------------------------------------------------------ lifecycle

    def _locate(self) -> None:
        """Read the device from the parameters (the model may have moved since)."""
        first = next((p for _, _, p in self.params), None)
        device = ts.local(first).device if first is not None else self.device
        if device != self.device:
            self.device = device
            self.cuda = device.type == "cuda"
            setting = self.log_memory_setting
            self.log_memory = self.cuda if setting is None else bool(setting) and self.cuda

    def begin(self, step: int) -> None:
        """Open sampled step ``step``: attach the per-layer forward hooks."""
        self._locate()
        if self.cuda and capturing():
            self.capture_skips += 1
            return
        state = StepState(len(self.layers), step)
        self.state = state
        if not self.has_optimizer and self.log_params and self.stat_params:
            self.take_snapshot(state)
        handles = self._handles
        layers = self.layers
        keys = self._keys
        fwd_pre, fwd_post = self._fwd_pre, self._fwd_post
        for i in self.hooked_layers:
            module = layers[i].module
            pre_key, post_key = keys[i]
            module._forward_pre_hooks[pre_key] = fwd_pre[i]
            module._forward_hooks[post_key] = fwd_post[i]
        self._inserted = self.hooked_layers
        if not self.has_optimizer:
            for k in self.stat_params:
                handles.append(self.params[k][2].register_post_accumulate_grad_hook(
                    self._grad_acc[k]))

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
        if self.log_params and self.stat_params:
            self.take_snapshot(state)

    def finish(self, now_ns: int) -> None:
        """Close the open sampled step: remove its hooks and send its points (blocks once
        on the device copy of the statistics)."""
        state, self.state = self.state, None
        if state is None:
            return
        self.remove_hooks()
        self.sampled_steps += 1
        try:
            self.send(sampled_step_points(self, state, now_ns))
        except Exception as exc:
            self.acts.discard()
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
        stat = set(self.stat_params)
        idx = [k for layer in chosen for k in self.layer_params[layer] if k in stat]
        state.snapshot_idx = idx
        state.snapshot = ts.snapshot([self.params[k][2] for k in idx])

    def remove_hooks(self) -> None:
        """Remove every per-layer hook of the sampled step. Never raises."""
        inserted, self._inserted = self._inserted, []
        layers, keys = self.layers, self._keys
        for i in inserted:
            module = layers[i].module
            pre_key, post_key = keys[i]
            module._forward_pre_hooks.pop(pre_key, None)
            module._forward_hooks.pop(post_key, None)
        for handle in self._handles:
            try:
                handle.remove()
            except Exception as exc:
                self.errors("hook removal", exc)
        self._handles.clear()

    # ------------------------------------------------------------------ hook bodies

    def _stamp(self, device: torch.device | None = None) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            if device is not None and device.type == "cuda":
                ev.record(torch.cuda.current_stream(device))
            else:
                ev.record()
            return ev
        return time.perf_counter()

    def _on_forward_pre(self, i: int, module: nn.Module, args: tuple) -> None:
        state = self.state
        if state is None or _graph_task_id() != -1:
            return  # between sampled steps, or a checkpointed forward rerun in backward
        try:
            if self.cuda:
                if capturing():
                    return
                x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                device = x.device if x is not None else self.device
                state.devices.add(device)
                state.fwd0[i] = self._stamp(device)
                if self.log_memory:
                    state.mem0[i] = torch.cuda.memory_allocated(device)
            else:
                state.fwd0[i] = time.perf_counter()
        except Exception as exc:
            self.errors(f"forward pre-hook of layer {self.names[i]!r}", exc)

    def _on_call_pre(self, i: int, module: Any, args: tuple, kwargs: dict) -> None:
        self._on_forward_pre(i, module, args)

    def _on_forward(self, i: int, module: nn.Module, args: tuple, out: Any) -> None:
        state = self.state
        if state is None:
            return
        try:
            rerun = _graph_task_id() != -1  # activation checkpointing, inside backward
            t0 = state.fwd0[i]
            if t0 is not None and not rerun:
                if self.cuda:
                    if capturing():
                        return
                    x = ts.first_tensor(out)
                    ev = self._stamp(x.device if x is not None else None)
                    pairs = state.fwd[i] or []
                    pairs.append((t0, ev))
                    state.fwd[i] = pairs
                    if self.log_memory:
                        device = x.device if x is not None else self.device
                        delta = torch.cuda.memory_allocated(device) - state.mem0[i]
                        state.mem[i] = (state.mem[i] or 0) + delta
                else:
                    state.fwd[i] = (state.fwd[i] or 0.0) + (time.perf_counter() - t0)
                state.fwd0[i] = None
            if state.hooked[i] and state.seen[i]:
                return
            x = ts.first_tensor(out)
            if x is None:
                return
            if not state.seen[i] and not rerun:
                state.seen[i] = True
                self.acts.add(i, x)
            if not state.hooked[i] and x.requires_grad and torch.is_grad_enabled():
                state.hooked[i] = True
                self._mark(state, x.grad_fn, i, True)
                inp = args[0] if args else None
                node = inp.grad_fn if isinstance(inp, torch.Tensor) else None
                if node is not None:
                    self._mark(state, node, i, False)
                elif self.has_optimizer:
                    # No input gradient (embeddings, the first layer): the layer's backward
                    # ends when its parameters' gradients are accumulated.
                    for k in self.layer_params[i]:
                        p = self.params[k][2]
                        if p.requires_grad:
                            self._handles.append(
                                p.register_post_accumulate_grad_hook(self._grad_acc[k]))
        except Exception as exc:
            self.errors(f"forward hook of layer {self.names[i]!r}", exc)

    def _mark(self, state: StepState, node: Any, i: int, start: bool) -> None:
        """Layer ``i``'s backward starts (or ends) when autograd reaches ``node``."""
        if node is None:
            return
        key = id(node)
        entry = state.marks.get(key)
        if entry is None:
            state.marks[key] = (node, [(i, start)])
            node.register_prehook(Hook(self._on_node, key))
        else:
            entry[1].append((i, start))

    def _on_node(self, key: int, grad_outputs: Any) -> None:
        try:
            state = self.state
            if state is None:
                return
            entry = state.marks.get(key)
            if entry is None:
                return
            stamp = self._stamp()
            for i, start in entry[1]:
                if start:
                    if state.bwd0[i] is None:
                        state.bwd0[i] = stamp
                else:
                    state.bwd1[i] = stamp
        except Exception as exc:
            self.errors("backward hook", exc)

    def _on_grad_accumulated(self, k: int, param: torch.Tensor) -> None:
        try:
            state = self.state
            if state is None or param.grad is None:
                return
            if not self.has_optimizer:
                state.grad_norms[k] = ts.param_norms([param.grad])[0]
            i = self.params[k][0]
            # Layers whose input needs no gradient (embeddings, first layer): the backward
            # ends when their last parameter gradient is accumulated.
            if state.bwd0[i] is not None:
                state.bwd1[i] = self._stamp()
        except Exception as exc:
            self.errors("gradient accumulation hook", exc)
