"""How many samples (and tokens) one forward pass of the watched model carries.

The batch dimension is taken from where the model says it is, never guessed from the
first dimension alone:

1. ``watch(batch_size=N)``: N samples per forward; ``watch(batch_dim=d)``: dimension ``d``
   of the model's input.
2. The model holds a module that declares its layout (``nn.Transformer``,
   ``TransformerEncoderLayer``/``DecoderLayer``, ``nn.MultiheadAttention``, ``nn.RNN``/
   ``LSTM``/``GRU``, through ``batch_first``): when it is the watched module itself, its
   input's batch dimension is 0 with ``batch_first=True`` and 1 otherwise. When it sits
   inside, a one-shot hook on the outermost such module reads the batch size there and
   finds the one dimension of the model's input that has that size (a model that
   transposes its input inside is read right). Until then, and when no single dimension
   matches (after a few tries, or on a ``torch.compile`` model, whose submodules get no
   hooks), samples are not counted: no ``samples_per_second`` rather than a wrong one, and
   one log line says how to give it.
3. No module declares a layout (MLPs, CNNs, most language models): dimension 0, the
   convention of ``nn.Linear``, ``nn.Conv*d``, ``nn.BatchNorm*d``, ``nn.Embedding`` on
   token ids.

Tokens: ``seq_len=`` when given, else the other dimension of a 2-D integer input (token
ids).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from provscope.errors import ConfigError
from provscope.pytorch.hooks import Hook, HookErrors

__all__ = ["BatchCounter", "declared_batch_first"]

log = logging.getLogger("provscope.torch")

_LAYOUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
    nn.MultiheadAttention, nn.RNNBase,
)
_CALIBRATION_TRIES = 8  # forwards whose batch size equals another dimension of the input
_INPUT_KEYS = ("input_ids", "x", "input", "src", "inputs_embeds")


def declared_batch_first(module: nn.Module) -> bool | None:
    """The module's own ``batch_first`` when it declares a layout, else None."""
    if isinstance(module, _LAYOUT_MODULES):
        value = getattr(module, "batch_first", None)
        if value is None:  # Transformer*Layer: the layout of its attention
            value = getattr(getattr(module, "self_attn", None), "batch_first", None)
        return bool(value) if value is not None else None
    return None


def _first_tensor(args: tuple, kwargs: dict) -> Any:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) or (x is not None and hasattr(x, "batch_sizes")):
        return x
    for key in _INPUT_KEYS:
        v = kwargs.get(key)
        if isinstance(v, torch.Tensor):
            return v
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


class BatchCounter:
    """``count(args, kwargs)`` -> ``(samples, tokens)`` of one forward of the model
    (``(0, 0)`` when unknown). Cheap: a shape read per call once the layout is known."""

    def __init__(self, model: nn.Module, *, batch_size: int | None, batch_dim: int | None,
                 seq_len: int | None, hooks_allowed: bool, errors: HookErrors) -> None:
        for name, value, low in (("batch_size", batch_size, 1), ("batch_dim", batch_dim, 0),
                                 ("seq_len", seq_len, 1)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < low):
                raise ConfigError(f"watch({name}=...): {value!r} is not an integer >= {low}")
        if batch_size is not None and batch_dim is not None:
            raise ConfigError("watch(): give batch_size= (samples per forward) or batch_dim= "
                              "(the input's batch dimension), not both")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.batch_dim: int | None = batch_dim
        self.source = "batch_size" if batch_size else ("batch_dim" if batch_dim is not None
                                                       else "")
        self._errors = errors
        self._model_name = type(model).__name__
        self._calibrating: nn.Module | None = None
        self._handle: Any = None
        self._root_shape: tuple[int, ...] | None = None
        self._tries = 0
        self._warned = False
        if self.source:
            return
        own = declared_batch_first(model)
        if own is not None:
            self.batch_dim, self.source = (0 if own else 1), f"{self._model_name}.batch_first"
            return
        inner = next((m for m in model.modules() if m is not model
                      and declared_batch_first(m) is not None), None)
        if inner is None:
            self.batch_dim, self.source = 0, "convention"
        elif not hooks_allowed:
            self._unknown(f"it holds a {type(inner).__name__} (sequence-first or batch-first "
                          "layout) and is compiled, so its layout cannot be read")
        else:
            self._calibrating = inner
            self._handle = inner.register_forward_pre_hook(Hook(self._on_inner))

    # ------------------------------------------------------------------ hot path

    def count(self, args: tuple, kwargs: dict) -> tuple[int, int]:
        """Samples and tokens of this forward; ``(0, 0)`` when unknown. Never raises."""
        x = _first_tensor(args, kwargs)
        if x is None:
            return (self.batch_size or 0), 0
        if self._calibrating is not None:
            self._root_shape = tuple(x.shape) if isinstance(x, torch.Tensor) else None
            return 0, 0
        if self.batch_size:
            samples = self.batch_size
        elif self.batch_dim is not None and isinstance(x, torch.Tensor) \
                and x.dim() > self.batch_dim:
            samples = int(x.shape[self.batch_dim])
        elif hasattr(x, "batch_sizes") and self.batch_dim is not None:  # PackedSequence
            samples = int(x.batch_sizes[0])
        else:
            return 0, 0
        if self.seq_len:
            return samples, samples * self.seq_len
        if isinstance(x, torch.Tensor) and x.dim() == 2 and not x.is_floating_point() \
                and self.batch_dim in (0, 1):
            return samples, samples * int(x.shape[1 - self.batch_dim])
        return samples, 0

    # ------------------------------------------------------------------ calibration

    def _on_inner(self, module: nn.Module, args: tuple) -> None:
        try:
            root, self._root_shape = self._root_shape, None
            x = args[0] if args else None
            bf = declared_batch_first(module)
            if root is None or not isinstance(x, torch.Tensor) or bf is None:
                return
            # Unbatched inputs (2-D for attention and RNNs) carry no batch dimension.
            if x.dim() < 3:
                return
            n = int(x.shape[0 if bf else 1])
            dims = [d for d, size in enumerate(root) if size == n]
            if len(dims) == 1:
                self.batch_dim = dims[0]
                self.source = f"{type(module).__name__}.batch_first={bf}"
                self._stop()
                return
            self._tries += 1
            if not dims:
                self._unknown(f"no dimension of its input {list(root)} has the batch size "
                              f"{n} its {type(module).__name__} sees")
                self._stop()
            elif self._tries >= _CALIBRATION_TRIES:
                self._unknown(f"the batch size {n} its {type(module).__name__} sees matches "
                              f"several dimensions of its input {list(root)}")
                self._stop()
        except Exception as exc:
            self._errors("batch layout hook", exc)
            self._stop()

    def _stop(self) -> None:
        self._calibrating = None
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.remove()

    def _unknown(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("provscope.watch: the batch dimension of %s's input is unknown (%s); "
                        "samples_per_second and tokens_per_second are not reported; pass "
                        "watch(batch_size=N) or watch(batch_dim=D)", self._model_name, why)

    def close(self) -> None:
        """Remove the calibration hook if it is still attached."""
        self._stop()
