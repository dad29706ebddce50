"""Model- and layer-level PyTorch instrumentation: ``provscope.watch(model)``.

Step boundary (how a "step" is known without user code):

* with ``optimizer=``: a step ends when ``optimizer.step()`` returns (optimizer step
  post-hook). Gradient norms are read in the step pre-hook, when gradients are final
  (gradient accumulation included); weights are snapshotted there on sampled steps for the
  update ratio ``||W_after - W_before|| / ||W_after||``.
* without an optimizer: every call of the root module's ``forward`` with gradients enabled
  and the module in training mode starts a new step (a cheap forward pre-hook on the root,
  the only hook that stays attached). Gradient norms come from post-accumulate-grad hooks;
  the update ratio compares the weights at the start of the sampled step with those at the
  start of the next step.

On a sampled step (``step % every == 0``) the root pre-hook attaches per-layer hooks:
forward pre/post hooks (timing, activation statistics, CUDA memory delta) and tensor
hooks on each layer's output and input gradients (backward timing). They are removed when
the step ends. Statistics are reduced on the device, stacked, and moved to the host once
per sampled step; CUDA timings use events resolved at step end; CPU timings use
``time.perf_counter``. Points are built in one pass and handed to ``run.emit``.

Every hook body is wrapped: an exception is counted (``Watcher.stats()["hook_errors"]``),
logged once per kind, and never reaches the training step.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from provscope import jsonsafe
from provscope.errors import ConfigError
from provscope.pytorch import stats as ts
from provscope.pytorch.model import (
    Layer,
    architecture_digest,
    describe_model,
    model_entity_id,
    select_layers,
    unwrap,
)
from provscope.records import EntityRecord, Point, RelationRecord

__all__ = ["Watcher", "unwatch", "watch", "watched"]

log = logging.getLogger("provscope.torch")

_WATCHERS: weakref.WeakKeyDictionary[nn.Module, Watcher] = weakref.WeakKeyDictionary()
_WATCHERS_LOCK = threading.Lock()


def _host_default() -> str:
    import socket

    return socket.gethostname()


def _current_run() -> Any:
    """The active run; outside any workflow the implicit run, as for ``provscope.log``;
    None when provscope is disabled (``PROVSCOPE_ENABLED=0``) or unavailable."""
    try:
        from provscope.job import api as client
    except ImportError:
        return None
    try:
        if not client.enabled():
            return None
        run = client.current_run()
        return run if run is not None else client._run_or_implicit()
    except Exception:  # monitoring never raises into the job
        return None


def _dist_rank() -> int | None:
    """The process's rank (the one detector: ``provscope.job.identity.env_rank``)."""
    try:
        from provscope.job.identity import env_rank

        return env_rank()
    except Exception:
        return None


class _StepState:
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
    )

    def __init__(self, n: int) -> None:
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


class Watcher:
    """Layer statistics and training scalars for one model; build it with :func:`watch`.

    A context manager: leaving the block (or :meth:`unwatch`) removes every hook and emits
    what is pending. Attributes: ``model_entity_id`` (the lineage entity of the model, or
    None), ``layers`` (watched layer names), ``step`` (current step index), ``active``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        emit: Callable[[Any], Any],
        run: Any = None,
        run_id: str | None = None,
        host: str | None = None,
        rank: int | None = None,
        every: int = 10,
        layers: Sequence[str] | str | None = None,
        depth: int | None = None,
        max_layers: int = 512,
        log_params: bool = True,
        per_param: bool = False,
        log_memory: bool | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        batch_size: int | None = None,
        seq_len: int | None = None,
        scalars: bool = True,
        snapshot_max_bytes: int = 256 * 2**20,
        start_step: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"watch(): model is a {type(model).__name__}, not a torch.nn.Module")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigError(f"watch(every=...): {every!r} is not an integer >= 1")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"watch(optimizer=...): a {type(optimizer).__name__} is not a torch.optim.Optimizer"
            )
        self._emit = emit
        self._run = run
        self.root = model
        self.inner, self.compiled_reason = unwrap(model)
        self._layers: list[Layer] = select_layers(self.inner, layers, depth, max_layers)
        self.layers = [layer.name for layer in self._layers]
        self.every = every
        self.log_params = log_params
        self.per_param = per_param
        self.scalars = scalars
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.seq_len = seq_len
        self._fixed_batch = batch_size is not None
        self._fixed_seq = seq_len is not None
        self.step = start_step
        self.active = True
        self.model_entity_id: str | None = None
        self.hook_errors = 0
        self.sampled_steps = 0
        self.points_emitted = 0
        self.emit_errors = 0
        self._error_kinds: set[str] = set()
        self._lock = threading.Lock()
        self._pid = os.getpid()

        device = next((p.device for p in self.inner.parameters()), torch.device("cpu"))
        self._cuda = device.type == "cuda"
        self._device = device
        self.log_memory = self._cuda if log_memory is None else bool(log_memory and self._cuda)
        self._hooks_allowed = self.compiled_reason is None
        # Per-step gradient norms wait on the device and cross to the host in batches: on
        # CUDA every min(every, 10) steps (one synchronisation per batch, and dashboards lag
        # at most ten steps); on the CPU there is nothing to wait for.
        self._train_batch = min(every, 10) if self._cuda else 1

        rank = rank if rank is not None else _dist_rank()
        base = {"run_id": str(run_id or ""), "host": str(host or _host_default()),
                "rank": str(rank if rank is not None else 0)}
        self._base_tags = base
        self._layer_tags = [
            {**base, "layer": layer.name, "module_type": layer.module_type}
            for layer in self._layers
        ]
        # Flat parameter list of the watched layers: index -> (layer index, name, tensor).
        self._params: list[tuple[int, str, nn.Parameter]] = [
            (i, pname, p) for i, layer in enumerate(self._layers) for pname, p in layer.params
        ]
        self._layer_params: list[list[int]] = [[] for _ in self._layers]
        for k, (i, _, _) in enumerate(self._params):
            self._layer_params[i].append(k)
        self.snapshot_max_bytes = snapshot_max_bytes
        self._layer_bytes = [
            sum(self._params[k][2].numel() * self._params[k][2].element_size() for k in ks)
            for ks in self._layer_params
        ]
        self._snapshot_next = 0
        self._param_tags = [
            {**self._layer_tags[i], "param": pname} for i, pname, _ in self._params
        ]
        self._all_params: list[nn.Parameter] = (
            [p for group in optimizer.param_groups for p in group["params"]]
            if optimizer is not None else [p for p in self.inner.parameters() if p.requires_grad]
        )
        pos = {id(p): k for k, p in enumerate(self._all_params)}
        self._watched_pos = [pos.get(id(p)) for _, _, p in self._params]

        self._permanent: list[Any] = []
        self._explicit = False
        self._step_handles: list[Any] = []
        self._state: _StepState | None = None
        self._in_step = False
        self._boundary_t: float | None = None
        self._pending_train: list[tuple[int, int, dict[str, Any], torch.Tensor | None]] = []
        self._step_grad_norm: torch.Tensor | None = None
        self._build_closures()
        self._attach_permanent()
        if self.compiled_reason:
            log.info("provscope.watch: %s", self.compiled_reason)

    # ------------------------------------------------------------------ setup

    def _build_closures(self) -> None:
        # Built once so that sampled steps only register, never allocate, hook functions.
        self._fwd_pre = [partial(self._on_forward_pre, i) for i in range(len(self._layers))]
        self._fwd_post = [partial(self._on_forward, i) for i in range(len(self._layers))]
        self._bwd_start = [partial(self._on_grad_output, i) for i in range(len(self._layers))]
        self._bwd_end = [partial(self._on_grad_input, i) for i in range(len(self._layers))]
        self._grad_acc = [partial(self._on_grad_accumulated, k) for k in range(len(self._params))]

    def _attach_permanent(self) -> None:
        self._permanent.append(
            self.root.register_forward_pre_hook(self._on_root_forward, with_kwargs=True)
        )
        if self.optimizer is not None:
            self._permanent.append(self.optimizer.register_step_pre_hook(self._on_opt_pre))
            self._permanent.append(self.optimizer.register_step_post_hook(self._on_opt_post))

    # ------------------------------------------------------------------ errors

    def _error(self, kind: str, exc: BaseException) -> None:
        self.hook_errors += 1
        if kind not in self._error_kinds:
            self._error_kinds.add(kind)
            log.warning("provscope.watch: %s failed (%s: %s); counted in Watcher.stats(), "
                        "further errors of this kind are not logged", kind,
                        type(exc).__name__, exc)

    # ------------------------------------------------------------------ root / optimizer hooks

    def _on_root_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._explicit:
            return
        try:
            if not self.active or os.getpid() != self._pid:
                return
            self._begin(torch.is_grad_enabled() and module.training, args, kwargs)
        except Exception as exc:
            self._error("root forward hook", exc)

    def begin_step(self, batch: Any = None) -> None:
        """Mark the start of a training step, for loops that never call the watched module's
        ``forward`` (Lightning calls ``training_step``). After the first call the root
        forward hook no longer marks steps. ``batch`` (a tensor, tuple/list or dict) gives
        the batch size and sequence length. Never raises; does not block."""
        self._explicit = True
        try:
            if not self.active or os.getpid() != self._pid:
                return
            if isinstance(batch, dict):
                args, kwargs = (), batch
            elif isinstance(batch, (tuple, list)):
                args, kwargs = tuple(batch), {}
            else:
                args, kwargs = (batch,), {}
            self._begin(True, args, kwargs)
        except Exception as exc:
            self._error("begin_step", exc)

    def _begin(self, training: bool, args: tuple, kwargs: dict) -> None:
        if training and (not self._fixed_batch or not self._fixed_seq):
            self._infer_shape(args, kwargs)
        if self.optimizer is None:
            if not training:
                return
            if self._in_step:
                self._end_step()
            self._in_step = True
        if self._state is None:
            self._sync_step()
        if training and self._state is None and self.step % self.every == 0:
            self._begin_sampled()
        if self._boundary_t is None:
            self._boundary_t = time.perf_counter()

    def _sync_step(self) -> None:
        # The run's loop helper (run.steps()) knows the user's step number; follow it so
        # layer points and the user's own train points agree on "step".
        run_step = getattr(self._run, "step", None) if self._run is not None else None
        if isinstance(run_step, int) and run_step >= 0:
            self.step = run_step

    def _infer_shape(self, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            x = next((v for k, v in kwargs.items()
                      if isinstance(v, torch.Tensor) and k in ("input_ids", "x", "input")), None)
            if x is None:
                x = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return
        if not self._fixed_batch:
            self.batch_size = int(x.shape[0])
        # Integer inputs of shape (batch, seq) are token ids: the sequence length is known.
        if not self._fixed_seq and x.dim() == 2 and not x.is_floating_point():
            self.seq_len = int(x.shape[1])

    def _on_opt_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        try:
            if not self.active or os.getpid() != self._pid:
                return
            grads = [p.grad for p in self._all_params]
            present = [g for g in grads if g is not None]
            norms = ts.foreach_norms(present)
            if norms:
                self._step_grad_norm = ts.total_norm(norms)
            if self._state is not None:
                it = iter(norms)
                per_pos = [next(it) if g is not None else None for g in grads]
                for k, pos in enumerate(self._watched_pos):
                    if pos is not None and per_pos[pos] is not None:
                        self._state.grad_norms[k] = per_pos[pos]
                if self.log_params and self._params:
                    self._take_snapshot(self._state)
        except Exception as exc:
            self._error("optimizer step pre-hook", exc)

    def _on_opt_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        try:
            if not self.active or os.getpid() != self._pid:
                return
            self._end_step()
        except Exception as exc:
            self._error("optimizer step post-hook", exc)

    # ------------------------------------------------------------------ sampled step

    def _begin_sampled(self) -> None:
        state = _StepState(len(self._layers))
        self._state = state
        if self.optimizer is None and self.log_params and self._params:
            self._take_snapshot(state)
        handles = self._step_handles
        if self._hooks_allowed:
            for i, layer in enumerate(self._layers):
                handles.append(layer.module.register_forward_pre_hook(self._fwd_pre[i]))
                handles.append(layer.module.register_forward_hook(self._fwd_post[i]))
        if self.optimizer is None:
            for k, (_, _, p) in enumerate(self._params):
                if p.requires_grad:
                    handles.append(p.register_post_accumulate_grad_hook(self._grad_acc[k]))

    def _take_snapshot(self, state: _StepState) -> None:
        """Copy the weights of as many whole layers as fit in ``snapshot_max_bytes``,
        starting where the previous sampled step stopped, so that a model too big to copy
        at once still gets every layer's update ratio, in turn."""
        n = len(self._layers)
        budget = self.snapshot_max_bytes
        chosen: list[int] = []
        used = 0
        i = self._snapshot_next
        for _ in range(n):
            size = self._layer_bytes[i]
            if size and size <= budget - used:
                chosen.append(i)
                used += size
            elif size and chosen:
                break
            i = (i + 1) % n
        self._snapshot_next = i
        idx = [k for layer in chosen for k in self._layer_params[layer]]
        state.snapshot_idx = idx
        state.snapshot = ts.snapshot([self._params[k][2] for k in idx])

    def _remove_step_hooks(self) -> None:
        for handle in self._step_handles:
            try:
                handle.remove()
            except Exception as exc:
                self._error("hook removal", exc)
        self._step_handles.clear()

    def _on_forward_pre(self, i: int, module: nn.Module, args: tuple) -> None:
        try:
            state = self._state
            if state is None:
                return
            if self._cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                state.fwd0[i] = ev
                if self.log_memory:
                    state.mem0[i] = torch.cuda.memory_allocated(self._device)
            else:
                state.fwd0[i] = time.perf_counter()
            if state.calls[i] == 0 and torch.is_grad_enabled():
                x = args[0] if args else None
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    x.register_hook(self._bwd_end[i])
                elif self.optimizer is not None:
                    # No input gradient (embeddings, the first layer): the layer's backward
                    # ends when its parameters' gradients are accumulated.
                    for k in self._layer_params[i]:
                        p = self._params[k][2]
                        if p.requires_grad:
                            self._step_handles.append(
                                p.register_post_accumulate_grad_hook(self._grad_acc[k]))
        except Exception as exc:
            self._error(f"forward pre-hook of layer {self.layers[i]!r}", exc)

    def _on_forward(self, i: int, module: nn.Module, args: tuple, out: Any) -> None:
        try:
            state = self._state
            if state is None:
                return
            if state.fwd0[i] is None:
                # Hooks attached while this very module was starting (the watched module is
                # itself the layer): no start time for this call, statistics still count.
                pass
            elif self._cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                pairs = state.fwd[i] or []
                pairs.append((state.fwd0[i], ev))
                state.fwd[i] = pairs
                if self.log_memory:
                    delta = torch.cuda.memory_allocated(self._device) - state.mem0[i]
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
            self._error(f"forward hook of layer {self.layers[i]!r}", exc)

    def _stamp(self) -> Any:
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _on_grad_output(self, i: int, grad: torch.Tensor) -> None:
        try:
            state = self._state
            if state is not None and state.bwd0[i] is None:
                state.bwd0[i] = self._stamp()
        except Exception as exc:
            self._error(f"backward hook of layer {self.layers[i]!r}", exc)

    def _on_grad_input(self, i: int, grad: torch.Tensor) -> None:
        try:
            state = self._state
            if state is not None:
                state.bwd1[i] = self._stamp()
        except Exception as exc:
            self._error(f"backward hook of layer {self.layers[i]!r}", exc)

    def _on_grad_accumulated(self, k: int, param: torch.Tensor) -> None:
        try:
            state = self._state
            if state is None or param.grad is None:
                return
            if self.optimizer is None:
                state.grad_norms[k] = ts.foreach_norms([param.grad])[0]
            i = self._params[k][0]
            # Layers whose input needs no gradient (embeddings, first layer): the backward
            # ends when their last parameter gradient is accumulated.
            if self._hooks_allowed:
                state.bwd1[i] = self._stamp() if state.bwd0[i] is not None else state.bwd1[i]
        except Exception as exc:
            self._error("gradient accumulation hook", exc)

    # ------------------------------------------------------------------ step end

    def _end_step(self) -> None:
        now = time.perf_counter()
        now_ns = time.time_ns()
        step = self.step
        if self.scalars:
            self._record_train(step, now, now_ns)
        self._boundary_t = now
        state = self._state
        if state is not None:
            self._state = None
            self._remove_step_hooks()
            try:
                self._finish_sampled(state, step, now_ns)
            except Exception as exc:
                self._error("layer statistics at step end", exc)
            self.sampled_steps += 1
            self._flush_train()
        elif len(self._pending_train) >= self._train_batch:
            self._flush_train()
        self.step = step + 1

    def _record_train(self, step: int, now: float, now_ns: int) -> None:
        fields: dict[str, Any] = {"step": step}
        if self._boundary_t is not None:
            dt = now - self._boundary_t
            if dt > 0:
                fields["step_time_seconds"] = dt
                if self.batch_size:
                    fields["samples_per_second"] = self.batch_size / dt
                    if self.seq_len:
                        fields["tokens_per_second"] = self.batch_size * self.seq_len / dt
        if self.optimizer is not None and self.optimizer.param_groups:
            lr = self.optimizer.param_groups[0].get("lr")
            if isinstance(lr, torch.Tensor):
                lr = float(lr)
            if isinstance(lr, (int, float)):
                fields["lr"] = float(lr)
        grad = self._step_grad_norm
        self._step_grad_norm = None
        self._pending_train.append((step, now_ns, fields, grad))

    def _flush_train(self) -> None:
        pending, self._pending_train = self._pending_train, []
        if not pending:
            return
        grads = [g for *_, g in pending if g is not None]
        # Gradient norms of many steps cross to the host together: one sync per flush.
        values = torch.stack([g.float().to(grads[0].device) for g in grads]).cpu().tolist() \
            if grads else []
        it = iter(values)
        points = []
        for _step, t_ns, fields, grad in pending:
            if grad is not None:
                value = next(it)
                if math.isfinite(value):
                    fields["grad_norm"] = value
            points.append(Point("train", self._base_tags, fields, t_ns))
        self._send(points)

    def _finish_sampled(self, state: _StepState, step: int, now_ns: int) -> None:
        params = [p for _, _, p in self._params]
        weight_norms: list[torch.Tensor] = []
        update_norms: list[torch.Tensor] = []
        if self.log_params and params:
            weight_norms = ts.foreach_norms(params)
            if state.snapshot is not None:
                update_norms = ts.foreach_norms(ts.difference(
                    [params[k] for k in state.snapshot_idx], state.snapshot))
        grad_keys = sorted(state.grad_norms)
        scalars = [state.grad_norms[k] for k in grad_keys]
        scalars += weight_norms + update_norms
        act_fields, flat = ts.to_host([m for _, m in state.acts], scalars, self._device)
        fields: list[dict[str, Any]] = [{"step": step} for _ in self._layers]
        for (i, _), f in zip(state.acts, act_fields, strict=True):
            fields[i].update(f)
        off = 0
        grad_vals = dict(zip(grad_keys, flat[off:off + len(grad_keys)], strict=True))
        off += len(grad_keys)
        np_ = len(params)
        wn = flat[off:off + np_] if weight_norms else []
        off += len(wn)
        un = dict(zip(state.snapshot_idx, flat[off:off + len(update_norms)], strict=True))
        has_u = [False] * len(self._layers)

        # Per-layer sums of squares of per-parameter norms.
        g2 = [0.0] * len(self._layers)
        has_g = [False] * len(self._layers)
        w2 = [0.0] * len(self._layers)
        u2 = [0.0] * len(self._layers)
        param_points = []
        for k, (i, _pname, _p) in enumerate(self._params):
            pf: dict[str, Any] = {"step": step}
            if k in grad_vals:
                g2[i] += grad_vals[k] ** 2
                has_g[i] = True
                pf["grad_norm"] = grad_vals[k]
            if wn:
                w2[i] += wn[k] ** 2
                pf["weight_norm"] = wn[k]
            if k in un and wn:
                u2[i] += un[k] ** 2
                has_u[i] = True
                if wn[k] > 0:
                    pf["update_ratio"] = un[k] / wn[k]
            if self.per_param and len(pf) > 1:
                param_points.append(Point("layer_param", self._param_tags[k], pf, now_ns))

        if self._cuda:
            # The copy above already waited for the stream; events recorded by autograd's
            # device thread are covered by one explicit synchronisation per sampled step.
            torch.cuda.synchronize(self._device)
        for i in range(len(self._layers)):
            f = fields[i]
            if has_g[i]:
                f["grad_norm"] = math.sqrt(g2[i])
            if wn and self._layers[i].params:
                f["weight_norm"] = math.sqrt(w2[i])
            if has_u[i] and w2[i] > 0:
                f["update_ratio"] = math.sqrt(u2[i]) / math.sqrt(w2[i])
            fwd = state.fwd[i]
            if fwd is not None:
                f["forward_seconds"] = (
                    sum(a.elapsed_time(b) for a, b in fwd) / 1000.0 if self._cuda else fwd)
            b0, b1 = state.bwd0[i], state.bwd1[i]
            if b0 is not None and b1 is not None:
                dt = b0.elapsed_time(b1) / 1000.0 if self._cuda else b1 - b0
                if dt >= 0:
                    f["backward_seconds"] = dt
            if state.mem[i] is not None:
                f["memory_allocated_delta_bytes"] = int(state.mem[i])
        points = [Point("layer", self._layer_tags[i], f, now_ns)
                  for i, f in enumerate(fields) if len(f) > 1]
        self._send(points + param_points)

    def _send(self, points: list[Point]) -> None:
        for point in points:
            try:
                self._emit(point)
                self.points_emitted += 1
            except Exception as exc:
                self.emit_errors += 1
                self._error("emit", exc)

    # ------------------------------------------------------------------ lineage

    def _record_model(self, hyperparameters: dict[str, Any] | None) -> None:
        attrs = describe_model(self.inner, self._layers)
        attrs.update({
            "layers_watched": len(self._layers),
            "every": self.every,
            "layer_hooks": "on" if self._hooks_allowed else f"skipped: {self.compiled_reason}",
        })
        if hyperparameters:
            attrs["hyperparameters"] = jsonsafe.jsonable(hyperparameters, jsonsafe.CONFIG)
        if self.optimizer is not None:
            attrs["optimizer"] = type(self.optimizer).__name__
            defaults = getattr(self.optimizer, "defaults", {})
            attrs["optimizer_defaults"] = jsonsafe.jsonable(defaults, jsonsafe.CONFIG)
        run_id = self._base_tags["run_id"] or None
        # Keyed by architecture: one model entity across runs; the weights are checkpoints.
        attrs["architecture_digest"] = digest = architecture_digest(self.inner)
        entity_id = model_entity_id(digest)
        now = time.time_ns()
        self._emit(EntityRecord(entity_id=entity_id, entity_kind="model", run_id=run_id,
                                name=type(self.inner).__name__, attributes=attrs,
                                created_ns=now))
        subject = None
        if self._run is not None:
            try:
                subject = self._run.current_task_id()
            except Exception:
                subject = None
            subject = subject or getattr(self._run, "run_id", None)
        if subject:
            self._emit(RelationRecord(relation="used", subject_id=subject, object_id=entity_id,
                                      run_id=run_id, role="model", time_ns=now))
        self.model_entity_id = entity_id
        models = getattr(self._run, "model_entity_ids", None)  # checkpoints derive from it
        if isinstance(models, list) and entity_id not in models:
            models.append(entity_id)

    def checkpoint(self, path: str, step: int | None = None, **attributes: Any) -> str | None:
        """Record a checkpoint file as a lineage entity generated by the current task at
        ``step`` (default: the current step), derived from this model's entity and from
        the previous checkpoint of this model in the run (``derived`` relations).

        Calls ``run.produce(path, kind="checkpoint", step=..., derived_from=[model])``;
        the file is not read here beyond what ``produce`` does. Never raises; returns the
        checkpoint's entity id, or None when there is no run or recording failed.
        """
        if self._run is None or not hasattr(self._run, "produce"):
            return None
        try:
            model = [self.model_entity_id] if self.model_entity_id else None
            return self._run.produce(path, kind="checkpoint",
                                     step=self.step if step is None else step,
                                     derived_from=model, **attributes)
        except Exception as exc:
            self._error("checkpoint record", exc)
            return None

    # ------------------------------------------------------------------ public

    def stats(self) -> dict[str, Any]:
        """Counters: ``step``, ``sampled_steps``, ``points_emitted``, ``hook_errors``,
        ``emit_errors``, ``layers`` (count), ``layer_hooks`` (bool)."""
        return {"step": self.step, "sampled_steps": self.sampled_steps,
                "points_emitted": self.points_emitted, "hook_errors": self.hook_errors,
                "emit_errors": self.emit_errors, "layers": len(self._layers),
                "layer_hooks": self._hooks_allowed}

    def unwatch(self) -> None:
        """Remove every hook and emit what is pending (the current sampled step's statistics
        so far and buffered training scalars). Idempotent; never raises."""
        with self._lock:
            if not self.active:
                return
            self.active = False
        try:
            if self.optimizer is None and self._in_step:
                self._in_step = False
                self._end_step()  # the last step ends with the watch
            if self._state is not None:
                state, self._state = self._state, None
                self._remove_step_hooks()
                self._finish_sampled(state, self.step, time.time_ns())
                self.sampled_steps += 1
            self._flush_train()
        except Exception as exc:
            self._error("unwatch", exc)
        self._remove_step_hooks()
        for handle in self._permanent:
            try:
                handle.remove()
            except Exception as exc:
                self._error("hook removal", exc)
        self._permanent.clear()
        with _WATCHERS_LOCK:
            if _WATCHERS.get(self.root) is self:
                del _WATCHERS[self.root]

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unwatch()

    def __repr__(self) -> str:
        return (f"Watcher(layers={len(self._layers)}, every={self.every}, step={self.step}, "
                f"active={self.active})")


def watch(
    model: nn.Module,
    every: int | None = None,
    *,
    layers: Sequence[str] | str | None = None,
    depth: int | None = None,
    max_layers: int | None = None,
    log_params: bool = True,
    per_param: bool = False,
    log_memory: bool | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    scalars: bool = True,
    snapshot_max_bytes: int = 256 * 2**20,
    hyperparameters: dict[str, Any] | None = None,
    run: Any = None,
    emit: Callable[[Any], Any] | None = None,
) -> Watcher:
    """Watch ``model``: per-layer statistics every ``every`` steps and per-step training
    scalars, written as time series of the current run; a ``model`` lineage entity at once.

    Args:
        model: the module (a DDP or ``torch.compile`` wrapper is unwrapped; see docs/torch.md).
        every: layer statistics every N steps (default: setting ``torch.every``, 10).
        layers: glob patterns (``"encoder.*"``) or ``"re:<regex>"`` on dotted module names;
            default every leaf module and every module owning parameters directly.
        depth: cut the module tree at this depth (1 = the model's direct children).
        max_layers: cap on watched layers (default: setting ``torch.max_layers``).
        log_params: weight L2 norm and update ratio per layer (copies the watched weights
            once per sampled step, at most ``snapshot_max_bytes`` of them).
        per_param: also write one ``layer_param`` point per parameter tensor.
        log_memory: CUDA allocated-memory delta per layer (default: on for CUDA models).
        optimizer: defines the step boundary (its ``step()``), gives the learning rate and
            the global gradient norm.
        batch_size, seq_len: for samples/s and tokens/s; inferred from the first input
            tensor (``(batch, seq)`` integer token ids) when not given.
        scalars: write the per-step ``train`` point (step time, throughput, lr, grad norm).
        snapshot_max_bytes: most bytes of weights copied per sampled step for the update
            ratio (default 256 MiB); bigger models get the ratio for a rotating subset of
            whole layers each sampled step, layers bigger than this never.
        hyperparameters: recorded on the model entity.
        run: the run to write to (default: the current run; outside any workflow the
            implicit run, as for ``provscope.log``).
        emit: write records here instead of ``run.emit`` (tests, custom sinks).

    Returns:
        A :class:`Watcher` (a context manager; ``unwatch()`` removes every hook). With
        ``PROVSCOPE_ENABLED=0`` an inactive watcher is returned and no hook is attached.

    Raises:
        ConfigError: bad arguments (one line naming the argument and what is allowed).
            Raised here, never from the training step. More layers than ``max_layers`` is
            not an error: the first ``max_layers`` are watched and one line says so.

    Does not block: hooks hand points to the run's non-blocking buffer.
    """
    run = run if run is not None else (_current_run() if emit is None else None)
    cfg = getattr(getattr(run, "config", None), "torch", None)
    every = every if every is not None else getattr(cfg, "every", 10)
    max_layers = max_layers if max_layers is not None else getattr(cfg, "max_layers", 512)
    if emit is None and (run is None or getattr(run, "enabled", True) is False):
        if run is None and _enabled():
            log.warning("provscope.watch: no run to record into and no emit=; "
                        "nothing is recorded")
        emit = _discard
        active = False
    else:
        active = True
    sink = emit if emit is not None else run.emit
    with _WATCHERS_LOCK:
        previous = _WATCHERS.get(model)
    if previous is not None:
        previous.unwatch()
    watcher = Watcher(
        model, emit=sink, run=run, run_id=getattr(run, "run_id", None),
        host=getattr(run, "host", None), rank=getattr(run, "rank", None), every=every,
        layers=layers, depth=depth, max_layers=max_layers, log_params=log_params,
        per_param=per_param, log_memory=log_memory, optimizer=optimizer,
        batch_size=batch_size, seq_len=seq_len, scalars=scalars,
        snapshot_max_bytes=snapshot_max_bytes,
    )
    if not active:
        watcher.unwatch()
        return watcher
    try:
        watcher._record_model(hyperparameters)
    except Exception as exc:
        watcher._error("model lineage record", exc)
    with _WATCHERS_LOCK:
        _WATCHERS[model] = watcher
    return watcher


def _discard(record: Any) -> None:
    return None


def _enabled() -> bool:
    try:
        from provscope.job.api import enabled
    except ImportError:
        return True
    return enabled()


def unwatch(model: nn.Module) -> bool:
    """Stop watching ``model`` (removes every hook). Returns False when it was not watched."""
    with _WATCHERS_LOCK:
        watcher = _WATCHERS.get(model)
    if watcher is None:
        return False
    watcher.unwatch()
    return True


def watched(model: nn.Module) -> Watcher | None:
    """The active watcher of ``model``, or None."""
    with _WATCHERS_LOCK:
        return _WATCHERS.get(model)
