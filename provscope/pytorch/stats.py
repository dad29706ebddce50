"""On-device reductions for layer statistics, in a bounded workspace.

Two rules keep the watched job's memory and time where they were:

* **No full-size temporaries.** An activation is never upcast or masked whole. Each one is
  copied (and so upcast to fp32) into a fixed fp32 *workspace* of at most
  :data:`WORKSPACE_ELEMENTS` elements per device, row by row; an activation bigger than a
  few rows is reduced piece by piece through the same workspace. Norms of weights and
  gradients are reduced in their own dtype (``torch._foreach_norm``; on CUDA with an fp32
  result, which the fused kernel computes without a copy; on the CPU the kernels
  accumulate low-precision types in fp32 and round the result to the tensor's dtype).
  Integer and other non-floating tensors (quantised weights) have no statistics.
* **Batched across layers.** The workspace is a 2-D block of rows of :data:`ROW` elements;
  a small activation takes whole rows (zero padded: zeros add nothing to a sum, a norm or
  a non-zero count and cannot exceed an absolute maximum). One flush reduces every filled
  row with a handful of kernels, whatever the number of layers, and leaves the per-row
  results on the device; the host adds rows up into layers (``numpy.*.reduceat``) once
  per sampled step, after one copy. Nothing here synchronises a CUDA device before that
  copy.

Row statistics, in order: sum, L2 norm, max, min, non-zero count, NaN count, Inf count.
They become catalogue fields in :func:`activation_fields`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "ROW",
    "WORKSPACE_ELEMENTS",
    "ActivationStats",
    "activation_fields",
    "difference",
    "first_tensor",
    "local",
    "param_norms",
    "snapshot",
    "total_norm",
]

ROW = 1024
"""Width of one workspace row, in elements."""

WORKSPACE_ELEMENTS = 4 * 2**20
"""Most fp32 elements of the activation workspace of one device (16 MiB)."""

SMALL_ROWS = 64
"""Activations of at most this many rows are copied whole into the workspace; bigger ones
are reduced in pieces of up to the whole workspace."""

_STATS = 7  # sum, norm, max, min, non-zero, NaN, Inf


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor of a module output that statistics describe: the output itself, else the
    first floating-point tensor of a tuple/list or of a dict's values (Hugging Face
    ``ModelOutput`` included), else the first tensor there; None when there is none."""
    if isinstance(value, torch.Tensor):
        return value
    items: Sequence[Any]
    if isinstance(value, Mapping):
        items = list(value.values())
    elif isinstance(value, (tuple, list)):
        items = value
    else:
        return None
    tensors = [item for item in items if isinstance(item, torch.Tensor)]
    return next((t for t in tensors if t.is_floating_point()), tensors[0] if tensors else None)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor`` (FSDP2, tensor parallel), else ``t`` itself: every
    statistic provscope takes of a sharded tensor is of this rank's shard."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None and type(t).__name__ == "DTensor" else t


def has_statistics(x: torch.Tensor) -> bool:
    """Floating-point (not complex), strided and non-empty."""
    return (x.layout == torch.strided and x.is_floating_point() and not x.is_complex()
            and x.numel() > 0)


class _Slot:
    """Rows of the workspace that one layer's activation is copied into each sampled
    step: a view of the activation's shape, cached, so that the copy is one call."""

    __slots__ = ("base", "device", "numel", "row", "rows", "shape", "space", "view")

    def __init__(self, space: _Workspace, row: int, rows: int) -> None:
        self.space = space
        self.device = space.block.device
        self.base = space.block[row: row + rows].view(-1)  # rows * ROW elements
        self.row = row
        self.rows = rows
        self.numel = 0
        self.shape: torch.Size | None = None
        self.view: torch.Tensor | None = None

    def fill(self, x: torch.Tensor) -> None:
        if x.shape != self.shape:
            n = self.numel = x.numel()
            self.base[n:].zero_()  # padding: adds nothing to any statistic
            self.view = self.base[:n].view(x.shape)
            self.shape = x.shape
        self.view.copy_(x)  # type: ignore[union-attr]


class _Workspace:
    """The fp32 rows of one device, and the slot of each layer in them."""

    __slots__ = ("block", "cuda", "filled", "results", "rows", "slots", "used")

    def __init__(self, device: torch.device, rows: int) -> None:
        self.block = torch.zeros((rows, ROW), dtype=torch.float32, device=device)
        self.rows = rows
        self.used = 0  # rows given to slots
        self.cuda = device.type == "cuda"
        self.slots: dict[int, _Slot] = {}
        self.filled: set[int] = set()  # layers whose slot holds this step's activation
        self.results: list[tuple[int, torch.Tensor]] = []  # (layer, [7, 1]) reduced at once

    def slot(self, layer: int, rows: int) -> _Slot | None:
        slot = self.slots.get(layer)
        if slot is not None and slot.rows >= rows:
            return slot
        if self.used + rows > self.rows:
            return None
        slot = _Slot(self, self.used, rows)
        self.used += rows
        self.slots[layer] = slot
        return slot


class ActivationStats:
    """Activation statistics of one sampled step, batched across layers (see the module
    docstring). :meth:`add` is called from forward hooks and never synchronises a CUDA
    device; :meth:`collect` reduces and moves everything to the host once and returns the
    fields of each layer.

    Each layer gets a slot of whole rows in its device's workspace the first time it is
    seen; afterwards its activation is copied there with one call. The first sampled step
    (before the workspace exists), activations bigger than :data:`SMALL_ROWS` rows and
    those that no longer fit are reduced at once instead, piece by piece. The workspace
    is sized to what the previous sampled step needed, at most ``capacity_rows`` rows.
    """

    def __init__(self, capacity_rows: int = WORKSPACE_ELEMENTS // ROW) -> None:
        self.capacity_rows = capacity_rows
        self._spaces: dict[torch.device, _Workspace] = {}
        self._demand: dict[torch.device, int] = {}  # slot rows wanted this step
        self._numel: dict[int, int] = {}  # elements reduced directly, per layer
        self._direct: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
        self._ready: dict[int, _Slot] = {}  # layer -> its slot, not yet filled this step

    # ------------------------------------------------------------------ filling

    def add(self, layer: int, x: torch.Tensor) -> bool:
        """Take the statistics of activation ``x`` of ``layer`` (copied or reduced now,
        so later in-place changes of ``x`` do not alter them). Returns False when ``x``
        has none (see :func:`has_statistics`). Does not block on a CUDA device."""
        slot = self._ready.get(layer)
        if slot is not None and slot.shape == x.shape and slot.device == x.device \
                and x.is_floating_point() and x.layout == torch.strided:
            # The steady state: the layer's slot already has this shape; one copy.
            slot.view.copy_(x.detach())  # type: ignore[union-attr]
            slot.space.filled.add(layer)
            self._demand[slot.device] = self._demand.get(slot.device, 0) + slot.rows
            del self._ready[layer]  # a second call of the layer in this step is not taken
            return True
        if not has_statistics(x):
            return False
        x = x.detach()
        n = x.numel()
        device = x.device
        rows = -(-n // ROW)
        space = self._spaces.get(device)
        if rows <= SMALL_ROWS:
            self._demand[device] = self._demand.get(device, 0) + rows
            slot = space.slot(layer, rows) if space is not None else None
            if slot is not None and layer not in space.filled:  # type: ignore[union-attr]
                slot.fill(x)
                space.filled.add(layer)  # type: ignore[union-attr]
                self._ready.pop(layer, None)
                return True
        self._numel[layer] = self._numel.get(layer, 0) + n
        # Reduced at once, through a piece-sized scratch buffer when it needs upcasting.
        direct = self._direct.setdefault(device, [])
        limit = WORKSPACE_ELEMENTS
        scratch: torch.Tensor | None = None
        for piece in _pieces(x, limit):
            if piece.dtype != torch.float32 or not piece.is_contiguous():
                if scratch is None:
                    scratch = torch.empty(min(n, limit), dtype=torch.float32, device=device)
                buf = scratch[: piece.numel()].view(piece.shape)
                buf.copy_(piece)
                piece = buf
            direct.append((layer, _piece_stats(piece.view(-1), device.type == "cuda")))
        return True

    # ------------------------------------------------------------------ results

    def collect(self) -> dict[int, dict[str, float]]:
        """Every layer's activation fields; one copy to the host per device (blocks until
        the device has computed them). Resets for the next sampled step, and sizes each
        device's workspace to what this step needed (up to the capacity)."""
        layers: list[int] = []
        numel: list[int] = []
        blocks: list[np.ndarray] = []  # [7, k] per-layer statistics (sum of squares second)
        for device in set(self._spaces) | set(self._direct):
            space = self._spaces.get(device)
            direct = self._direct.get(device, [])
            parts: list[torch.Tensor] = []
            if space is not None and space.filled:
                parts.append(_row_stats(space.block[: space.used], space.cuda))
            parts.extend(stats for _, stats in direct)
            if not parts:
                continue
            values: np.ndarray = torch.cat(parts, dim=1).double().cpu().numpy()
            offset = 0
            if space is not None and space.filled:
                order = sorted(space.slots.items(), key=lambda item: item[1].row)
                used = space.used
                reduced = _reduce_rows(values[:, :used], [s.row for _, s in order])
                keep = [k for k, (layer, _) in enumerate(order) if layer in space.filled]
                layers.extend(order[k][0] for k in keep)
                numel.extend(order[k][1].numel for k in keep)
                blocks.append(reduced[:, keep])
                offset = space.used
            if direct:
                merged: dict[int, list[float]] = {}
                for k, (layer, _) in enumerate(direct):
                    column = values[:, offset + k].copy()
                    column[1] **= 2
                    _merge(merged, layer, column)
                layers.extend(merged)
                numel.extend(self._numel[layer] for layer in merged)
                blocks.append(np.array(list(merged.values())).T)
        if len(set(layers)) != len(layers):  # one layer on several devices: add them up
            merged = {}
            counts: dict[int, int] = {}
            for layer, n, column in zip(layers, numel, np.concatenate(blocks, axis=1).T,
                                        strict=True):
                _merge(merged, layer, column)
                counts[layer] = counts.get(layer, 0) + n
            layers, blocks = list(merged), [np.array(list(merged.values())).T]
            numel = [counts[layer] for layer in layers]
        fields = _fields(layers, np.concatenate(blocks, axis=1), numel) if layers else {}
        self._reset()
        return fields

    def _reset(self) -> None:
        for device, wanted in self._demand.items():
            space = self._spaces.get(device)
            rows = min(self.capacity_rows, wanted)
            if space is None or space.rows < rows:
                if rows > 0:
                    # Sized to this step: the next sampled step copies every layer in.
                    self._spaces[device] = _Workspace(device, rows)
            else:
                space.filled.clear()
        self._demand.clear()
        self._direct.clear()
        self._numel.clear()
        self._ready = {layer: slot for space in self._spaces.values()
                       for layer, slot in space.slots.items()}

    def discard(self) -> None:
        """Drop what was collected (the step is abandoned) and free the workspaces."""
        self._spaces.clear()
        self._ready.clear()
        self._demand.clear()
        self._direct.clear()
        self._numel.clear()


def _reduce_rows(values: np.ndarray, starts: list[int]) -> np.ndarray:
    """Per-slot [7, slots] statistics (the second row as a sum of squares) from per-row
    ones, slots starting at the row indices ``starts`` (ascending, the first 0)."""
    sums = np.add.reduceat(values[[0, 4, 5, 6]], starts, axis=1)
    return np.stack([sums[0], np.add.reduceat(values[1] ** 2, starts),
                     np.maximum.reduceat(values[2], starts),
                     np.minimum.reduceat(values[3], starts), sums[1], sums[2], sums[3]])


def _fields(layers: list[int], acc: np.ndarray, numel: list[int]) -> dict[int, dict[str, Any]]:
    """Catalogue fields of every layer at once from [7, layers] statistics (the second
    row a sum of squares); the same arithmetic as :func:`activation_fields`."""
    n = np.asarray(numel, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = acc[0] / n
        var = acc[1] / n - mean * mean
        std = np.where(var > 0, np.sqrt(np.abs(var)), np.where(np.isnan(var), np.nan, 0.0))
        abs_max = np.maximum(-acc[3], acc[2])
        zero = np.clip(1.0 - acc[4] / n, 0.0, 1.0)
    nan = acc[5].astype(np.int64).tolist()
    inf = acc[6].astype(np.int64).tolist()
    return {layer: {"activation_mean": m, "activation_std": sd, "activation_abs_max": a,
                    "activation_zero_fraction": z, "activation_nan_elements": na,
                    "activation_inf_elements": nf}
            for layer, m, sd, a, z, na, nf in zip(
                layers, mean.tolist(), std.tolist(), abs_max.tolist(), zero.tolist(), nan, inf,
                strict=True)}


def _merge(out: dict[int, list[float]], layer: int, row: Any) -> None:
    """Add one set of statistics (sum of squares second) into a layer's."""
    acc = out.get(layer)
    if acc is None:
        out[layer] = [float(v) for v in row]
        return
    acc[0] += float(row[0])
    acc[1] += float(row[1])
    acc[2] = max(acc[2], float(row[2]))
    acc[3] = min(acc[3], float(row[3]))
    for j in (4, 5, 6):
        acc[j] += float(row[j])


def _pieces(x: torch.Tensor, limit: int) -> Iterator[torch.Tensor]:
    """Views of ``x`` of at most ``limit`` elements each that together cover it, without a
    copy (a non-contiguous tensor is split along its leading dimensions)."""
    n = x.numel()
    if n <= limit:
        yield x
    elif x.is_contiguous():
        flat = x.view(-1)
        for start in range(0, n, limit):
            yield flat[start: start + limit]
    else:
        per_index = n // x.shape[0]
        if per_index > limit:
            for k in range(x.shape[0]):
                yield from _pieces(x[k], limit)
        else:
            step = max(1, limit // per_index)
            for start in range(0, x.shape[0], step):
                yield x[start: start + step]


def _row_stats(block: torch.Tensor, cuda: bool) -> torch.Tensor:
    """[7, rows] statistics of the rows of an fp32 block (see the module docstring)."""
    total = block.sum(1)
    norm = torch.linalg.vector_norm(block, dim=1)
    high = block.amax(1)
    low = block.amin(1)
    if cuda:
        nonzero = torch.count_nonzero(block, dim=1).float()
        nan = torch.isnan(block).sum(1).float()
        inf = torch.isinf(block).sum(1).float()
    elif bool(torch.isfinite(total).all()):
        # count_nonzero is not vectorised on the CPU; |sign| is, and is exact for finite
        # values. The CPU has the sums already, so the branch costs no synchronisation.
        nonzero = block.sign().abs_().sum(1)
        nan = inf = torch.zeros_like(total)
    else:
        nonzero = torch.count_nonzero(block, dim=1).float()
        nan = torch.isnan(block).sum(1).float()
        inf = torch.isinf(block).sum(1).float()
    return torch.stack([total, norm, high, low, nonzero, nan, inf])


ZERO_SAMPLE = 16_384
"""On the CPU, the zero fraction of an activation reduced in pieces (bigger than
:data:`SMALL_ROWS` rows) is estimated from this many elements per piece."""
_RUNS = 64


def _piece_stats(flat: torch.Tensor, cuda: bool) -> torch.Tensor:
    """[7, 1] statistics of one flat fp32 piece of an activation. On the CPU, where
    ``count_nonzero`` is not vectorised and would cost more than every other statistic
    together, the non-zero count of a piece above :data:`ZERO_SAMPLE` elements is
    estimated from 64 evenly spaced runs of that many elements in all, and NaN/Inf are
    only counted when the sum is not finite (the host has the sum already)."""
    n = flat.numel()
    total = flat.sum()
    low, high = torch.aminmax(flat)
    finite = cuda or bool(torch.isfinite(total))
    if cuda or not finite:
        nonzero = torch.count_nonzero(flat).float()
        nan = torch.isnan(flat).sum().float()
        inf = torch.isinf(flat).sum().float()
    else:
        if n > ZERO_SAMPLE:
            stride = n // _RUNS
            runs = flat[: _RUNS * stride].view(_RUNS, stride)[:, : ZERO_SAMPLE // _RUNS]
            nonzero = torch.count_nonzero(runs).float() * (n / runs.numel())
        else:
            nonzero = torch.count_nonzero(flat).float()
        nan = inf = torch.zeros((), device=flat.device)
    return torch.stack([total, torch.linalg.vector_norm(flat), high, low, nonzero, nan,
                        inf]).view(_STATS, 1)


def activation_fields(values: Sequence[float], numel: int) -> dict[str, float]:
    """Host-side: turn one set of raw moments (sum, L2 norm, max, min, non-zero count,
    NaN count, Inf count) into catalogue fields.

    ``std`` is the population standard deviation from the first two moments
    (``sqrt(E[x^2] - E[x]^2)``, clamped at 0). NaN/Inf values propagate into mean/std/abs-max
    as NaN; the counts say why.
    """
    total, norm, high, low, nonzero, nan, inf = (float(v) for v in values[:_STATS])
    mean = total / numel
    var = norm * norm / numel - mean * mean
    std = math.sqrt(var) if var > 0 else (0.0 if var == var else math.nan)
    return {
        "activation_mean": mean,
        "activation_std": std,
        "activation_abs_max": max(-low, high) if low == low and high == high else math.nan,
        "activation_zero_fraction": min(1.0, max(0.0, 1.0 - nonzero / numel)),
        "activation_nan_elements": int(nan),
        "activation_inf_elements": int(inf),
    }


def param_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """L2 norm of each tensor (local shards of DTensors; sparse ones densified), as 0-d
    tensors on their devices, fp32 on CUDA and in the tensor's dtype on the CPU; one fused
    call where the device allows. The caller passes floating-point tensors only.
    Never copies a whole tensor to another dtype."""
    if not tensors:
        return []
    with torch.no_grad():
        dense = [local(t) for t in tensors]
        dense = [t.to_dense() if t.layout != torch.strided else t for t in dense]
        cuda = dense[0].device.type == "cuda"
        try:
            if cuda:
                return list(torch._foreach_norm(dense, 2, dtype=torch.float32))
            return list(torch._foreach_norm(dense))
        except (RuntimeError, TypeError, AttributeError):
            # Mixed devices in one list: one norm per tensor.
            return [torch.linalg.vector_norm(t, dtype=torch.float32 if t.is_cuda else None)
                    for t in dense]


def snapshot(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of ``tensors`` (local shards), for the update ratio around an
    optimizer step."""
    with torch.no_grad():
        detached = [local(t).detach() for t in tensors]
        try:
            return list(torch._foreach_mul(detached, 1.0))
        except (RuntimeError, TypeError, AttributeError):
            return [t.clone() for t in detached]


def difference(after: Sequence[torch.Tensor], before: list[torch.Tensor]) -> list[torch.Tensor]:
    """The update ``before[k] - after[k]`` of each pair, computed in place in ``before`` (a
    snapshot that is no longer needed) to spare an allocation; returns ``before``. The
    sign is the opposite of ``after - before``, which no norm can tell apart."""
    with torch.no_grad():
        after = [local(t).detach() for t in after]
        try:
            torch._foreach_sub_(before, after)
        except (RuntimeError, TypeError, AttributeError):
            for a, b in zip(after, before, strict=True):
                b.sub_(a)
        return before


def total_norm(norms: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of a list of per-tensor L2 norms (the global norm), fp32 on the first one's
    device, without leaving the device."""
    with torch.no_grad():
        try:
            return torch.linalg.vector_norm(torch.stack(list(norms)).float())
        except (RuntimeError, TypeError):  # norms on several devices or of mixed dtypes
            return torch.linalg.vector_norm(
                torch.stack([n.to(norms[0].device, torch.float32) for n in norms]))
