"""``provscope.watch(model)``: model- and layer-level PyTorch instrumentation.

The public API (:func:`watch`, :func:`unwatch`, :func:`watched`, :class:`Watcher`) and the
model's lineage entity. The work is split by job:

* provscope/pytorch/steps.py: step boundaries (root forward pre-hook, optimizer step
  hooks, ``begin_step``), the run's one step counter, the step's training scalars;
* provscope/pytorch/layers.py: the per-layer hooks attached on sampled steps only
  (``step % every == 0``) and what they collect;
* provscope/pytorch/points.py: the ``layer``/``layer_param`` points of a sampled step;
* provscope/pytorch/batch.py: samples and tokens per forward (the batch dimension);
* provscope/pytorch/hooks.py: hook callables that keep the model picklable, and the
  count of hook failures;
* provscope/pytorch/stats.py, model.py: on-device reductions; layer selection and the
  model's description.

Every hook body is wrapped: an exception is counted (``Watcher.stats()["hook_errors"]``),
logged once per kind, and never reaches the training step.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from provscope import jsonsafe
from provscope.errors import ConfigError
from provscope.job.stepbuffer import StepBuffer
from provscope.pytorch import compiled
from provscope.pytorch.batch import BatchCounter
from provscope.pytorch.hooks import Hook, HookErrors
from provscope.pytorch.layers import LayerSampler
from provscope.pytorch.model import (
    Layer,
    architecture_digest,
    compiled_by_method,
    compiled_inside,
    describe_model,
    model_entity_id,
    select_layers,
    unwrap,
)
from provscope.pytorch.steps import StepClock
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
        batch_dim: int | None = None,
        seq_len: int | None = None,
        scalars: bool = True,
        snapshot_max_bytes: int | None = None,
        start_step: int = 0,
        scaler: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"watch(): model is a {type(model).__name__}, not a torch.nn.Module")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigError(f"watch(every=...): {every!r} is not an integer >= 1")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"watch(optimizer=...): a {type(optimizer).__name__} is not a torch.optim.Optimizer"
            )
        if scaler is not None:
            if optimizer is None:
                raise ConfigError("watch(scaler=...): needs optimizer= too (the scaler skips "
                                  "that optimizer's steps)")
            if not callable(getattr(scaler, "step", None)) or not hasattr(scaler, "update"):
                raise ConfigError(f"watch(scaler=...): a {type(scaler).__name__} is not a "
                                  "torch.amp.GradScaler")
        self._emit = emit
        self._run = run
        self.root = model
        self.inner, self.compiled_reason = unwrap(model)
        self._layers: list[Layer] = select_layers(self.inner, layers, depth, max_layers)
        if self.compiled_reason:  # the whole model runs compiled: no hook inside it
            self._layers = [dataclasses.replace(layer, hooks="none") for layer in self._layers]
        self.layers = [layer.name for layer in self._layers]
        self.every = every
        self.optimizer = optimizer
        self.active = True
        self.model_entity_id: str | None = None
        self.points_emitted = 0
        self.emit_errors = 0
        self._errors = HookErrors()
        self._lock = threading.Lock()
        inside = compiled_inside(self.inner)
        self._hooks_allowed = self.compiled_reason is None and not inside
        self._compiled_layers = [layer for layer in self._layers if layer.hooks == "call"]
        if inside and not self.compiled_reason:
            self.compiled_reason = (
                "parts of the model are compiled: layers inside compiled code get parameter "
                "statistics only; each compiled block is timed and its output described "
                "from outside its compiled code")

        device = next((p.device for p in self.inner.parameters()), torch.device("cpu"))
        cuda = device.type == "cuda"
        rank = rank if rank is not None else _dist_rank()
        base = {"run_id": str(run_id or ""), "host": str(host or _host_default()),
                "rank": str(rank if rank is not None else 0)}
        self._base_tags = base
        self._batch = BatchCounter(self.inner, batch_size=batch_size, batch_dim=batch_dim,
                                   seq_len=seq_len, hooks_allowed=self._hooks_allowed,
                                   errors=self._errors)
        if snapshot_max_bytes is None:
            # The update ratio's weight copy stays within 5 % of the watched weights plus
            # 32 MiB; bigger models get it for a rotating subset of layers.
            trainable = sum(p.numel() * p.element_size() for layer in self._layers
                            for _, p in layer.params
                            if p.requires_grad and p.is_floating_point())
            snapshot_max_bytes = trainable // 20 + 32 * 2**20
        self._sampler = LayerSampler(
            self._layers, tags=base, device=device, log_params=log_params,
            per_param=per_param, log_memory=log_memory, hooks_allowed=True,
            has_optimizer=optimizer is not None,
            snapshot_max_bytes=snapshot_max_bytes, errors=self._errors, send=self._send)
        all_params: list[nn.Parameter] = (
            [p for group in optimizer.param_groups for p in group["params"]]
            if optimizer is not None else [p for p in self.inner.parameters() if p.requires_grad]
        )
        pos = {id(p): k for k, p in enumerate(all_params)}
        # The run's step buffer merges this watcher's scalars with run.log and run.steps
        # into one train point per step; with emit= the watcher keeps a buffer of its own.
        buffer = getattr(run, "step_buffer", None) if emit == getattr(run, "emit", None) \
            else None
        self._own_buffer = buffer is None
        self._buffer: StepBuffer = buffer if buffer is not None else StepBuffer(self._write_train)
        self._clock = StepClock(
            run=run if not self._own_buffer else None, buffer=self._buffer,
            optimizer=optimizer, all_params=all_params,
            watched_pos=[pos.get(id(p)) for _, _, p in self._sampler.params],
            sampler=self._sampler, batch=self._batch, every=every, scalars=scalars,
            cuda=cuda, errors=self._errors, start_step=start_step, scaler=scaler)

        self._permanent: list[Any] = []
        self._wrapped: list[nn.Module] = []
        if compiled_by_method(model):
            # Its hooks would run inside the compiled code: mark steps from outside it.
            compiled.install(model, pre=Hook(self._clock.on_root_forward))
            self._wrapped.append(model)
        else:
            self._permanent.append(model.register_forward_pre_hook(
                Hook(self._clock.on_root_forward), with_kwargs=True))
        for i, layer in enumerate(self._layers):
            if layer.hooks == "call":
                compiled.install(layer.module, pre=self._sampler.call_pre[i],
                                 post=self._sampler.call_post[i])
                self._wrapped.append(layer.module)
        if optimizer is not None:
            self._permanent.append(
                optimizer.register_step_pre_hook(Hook(self._clock.on_optimizer_pre)))
            self._permanent.append(
                optimizer.register_step_post_hook(Hook(self._clock.on_optimizer_post)))
        if self.compiled_reason:
            log.info("provscope.watch: %s", self.compiled_reason)

    # ------------------------------------------------------------------ state

    @property
    def step(self) -> int:
        """The current step (the next one between steps)."""
        return self._clock.step

    @property
    def hook_errors(self) -> int:
        """Exceptions caught in hook bodies."""
        return self._errors.count

    @property
    def sampled_steps(self) -> int:
        """Steps whose layer statistics were taken."""
        return self._sampler.sampled_steps

    def _error(self, kind: str, exc: BaseException) -> None:
        self._errors(kind, exc)

    def begin_step(self, batch: Any = None) -> None:
        """Mark the start of a training step, for loops that never call the watched module's
        ``forward`` (Lightning calls ``training_step``). After the first call the root
        forward hook no longer marks steps. ``batch`` (a tensor, tuple/list or dict) gives
        the samples counted for the step. Never raises; does not block."""
        self._clock.begin_step(batch)

    # ------------------------------------------------------------------ emitting

    def _send(self, points: list[Point]) -> None:
        for point in points:
            try:
                self._emit(point)
                self.points_emitted += 1
            except Exception as exc:
                self.emit_errors += 1
                self._errors("emit", exc)

    def _write_train(self, fields: dict[str, Any], time_ns: int) -> None:
        self._send([Point("train", self._base_tags, fields, time_ns)])

    # ------------------------------------------------------------------ lineage

    def _record_model(self, hyperparameters: dict[str, Any] | None) -> None:
        attrs = describe_model(self.inner, self._layers)
        attrs.update({
            "layers_watched": len(self._layers),
            "every": self.every,
            "layer_hooks": "on" if not self.compiled_reason else (
                f"partial: {self.compiled_reason}" if any(
                    layer.hooks != "none" for layer in self._layers)
                else f"skipped: {self.compiled_reason}"),
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
        """Counters: ``step``, ``sampled_steps``, ``points_emitted`` (layer points, and
        train points when writing to ``emit=``), ``hook_errors``, ``emit_errors``,
        ``layers`` (count), ``layer_hooks`` (bool), ``batch_source`` (where the batch
        dimension came from; empty when unknown)."""
        return {"step": self.step, "sampled_steps": self.sampled_steps,
                "points_emitted": self.points_emitted, "hook_errors": self.hook_errors,
                "emit_errors": self.emit_errors, "layers": len(self._layers),
                "layer_hooks": self._hooks_allowed, "batch_source": self._batch.source}

    def unwatch(self) -> None:
        """Remove every hook and emit what is pending (the current sampled step's statistics
        so far and the step scalars still owed). Idempotent; never raises."""
        with self._lock:
            if not self.active:
                return
            self.active = False
        self._clock.stop()
        self._sampler.remove_hooks()
        self._batch.close()
        for handle in self._permanent:
            try:
                handle.remove()
            except Exception as exc:
                self._errors("hook removal", exc)
        self._permanent.clear()
        for module in self._wrapped:
            try:
                compiled.uninstall(module)
            except Exception as exc:
                self._errors("hook removal", exc)
        self._wrapped.clear()
        if self._own_buffer:
            self._buffer.complete()
        with _WATCHERS_LOCK:
            if _WATCHERS.get(self.inner) is self:
                del _WATCHERS[self.inner]

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
    batch_dim: int | None = None,
    seq_len: int | None = None,
    scalars: bool = True,
    snapshot_max_bytes: int | None = None,
    scaler: Any = None,
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
        batch_size: samples per forward pass, for samples/s (default: read from the input
            at the batch dimension, see ``batch_dim``).
        batch_dim: the batch dimension of the model's first input tensor (default: what
            the model declares, ``batch_first`` of its Transformer/attention/RNN modules,
            else 0; unknown: no samples/s, and one log line).
        seq_len: tokens per sample, for tokens/s (default: the other dimension of 2-D
            integer token ids).
        scalars: add the step's training scalars (step time when no ``run.steps()`` loop
            measures it, samples/s, tokens/s, lr, grad norm) to its ``train`` point.
        snapshot_max_bytes: most bytes of weights copied per sampled step for the update
            ratio (default: 5 % of the watched trainable weights plus 32 MiB); bigger models
            get the ratio for a rotating subset of whole layers each sampled step, layers
            bigger than this never.
        scaler: the ``torch.amp.GradScaler`` of the loop: a step whose optimizer step it
            skipped (Inf/NaN gradients) is still ended, with ``optimizer_step_skipped`` = 1
            on its ``train`` point (0 on the others). Its ``step`` is wrapped while watched.
        hyperparameters: recorded on the model entity.
        run: the run to write to (default: the current run; outside any workflow the
            implicit run, as for ``provscope.log``).
        emit: write records here instead of ``run.emit`` (tests, custom sinks).

    Returns:
        A :class:`Watcher` (a context manager; ``unwatch()`` removes every hook). With
        ``PROVSCOPE_ENABLED=0`` an inactive watcher is returned and no hook is attached.
        Watching a model that is already watched replaces the previous watcher (its hooks
        are removed, what it holds is written) and keeps its step count and, in the same
        run, its model entity: one model, one set of hooks.

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
    key = _key(model)
    with _WATCHERS_LOCK:
        previous = _WATCHERS.get(key)
    if previous is not None:
        log.info("provscope.watch: %s is already watched; the new watch() replaces the "
                 "previous one", type(key).__name__)
        previous.unwatch()
    watcher = Watcher(
        model, emit=sink, run=run, run_id=getattr(run, "run_id", None),
        host=getattr(run, "host", None), rank=getattr(run, "rank", None), every=every,
        layers=layers, depth=depth, max_layers=max_layers, log_params=log_params,
        per_param=per_param, log_memory=log_memory, optimizer=optimizer,
        batch_size=batch_size, batch_dim=batch_dim, seq_len=seq_len, scalars=scalars,
        snapshot_max_bytes=snapshot_max_bytes, scaler=scaler,
        start_step=previous.step if previous is not None else 0,
    )
    if not active:
        watcher.unwatch()
        return watcher
    if previous is not None and previous._run is run and previous._emit == sink \
            and previous.model_entity_id is not None:
        watcher.model_entity_id = previous.model_entity_id  # one model, recorded once
    else:
        try:
            watcher._record_model(hyperparameters)
        except Exception as exc:
            watcher._error("model lineage record", exc)
    with _WATCHERS_LOCK:
        _WATCHERS[key] = watcher
    return watcher


def _key(model: Any) -> Any:
    """The registry key of a model: the module under a DDP or torch.compile wrapper, so that
    watching the wrapper and the module is watching one model."""
    try:
        return unwrap(model)[0] if isinstance(model, nn.Module) else model
    except Exception:
        return model


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
        watcher = _WATCHERS.get(_key(model))
    if watcher is None:
        return False
    watcher.unwatch()
    return True


def watched(model: nn.Module) -> Watcher | None:
    """The active watcher of ``model``, or None."""
    with _WATCHERS_LOCK:
        return _WATCHERS.get(_key(model))
