"""On-device reductions for layer statistics.

Everything here runs under ``torch.no_grad`` on the tensor's own device and returns small
tensors; nothing is copied to the host. The caller stacks the results of a whole step and
moves them to the host once (one synchronisation per sampled step, not one per layer).

Activation moments are kept raw (sum, L2 norm, min, max, non-zero count, NaN count, Inf
count) and turned into mean / std / abs-max / zero fraction on the host by
:func:`activation_fields`, because a few host float operations are cheaper than a chain of
tiny device kernels per layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "ACTIVATION_WIDTH",
    "ZERO_SAMPLE",
    "Moments",
    "activation_fields",
    "activation_moments",
    "difference",
    "first_tensor",
    "foreach_norms",
    "snapshot",
    "to_host",
    "total_norm",
]

ACTIVATION_WIDTH = 7
"""Length of the vector :func:`activation_moments` returns."""

ZERO_SAMPLE = 16_384
"""On the CPU, the zero fraction of a bigger activation is estimated from this many elements."""
_RUNS = 64

_FLOAT_KEEP = (torch.float32, torch.float64)


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


class Moments:
    """Raw moments of one activation, still on its device (0-d tensors) until
    :func:`to_host` moves a whole step's worth at once."""

    __slots__ = ("counted", "counts", "floats", "numel")

    def __init__(self, floats: tuple, counts: tuple, numel: int, counted: int) -> None:
        self.floats = floats  # sum, L2 norm, min, max (0-d float tensors)
        self.counts = counts  # non-zero, NaN, Inf (0-d int64 tensors, or host ints)
        self.numel = numel
        self.counted = counted  # elements the non-zero count covers


def activation_moments(x: torch.Tensor) -> Moments | None:
    """Raw moments of one activation tensor, reduced on its device.

    Sum, L2 norm, min, max, non-zero count, NaN count and Inf count, as 0-d tensors.
    Returns None for tensors that have no meaningful statistics here: sparse or other
    non-strided layouts, integer/bool/complex dtypes, and empty tensors. Never blocks on a
    CUDA device; on the CPU the NaN/Inf counts are only computed when the sum is not finite
    (the host already has the value, so the branch costs no synchronisation), and the
    non-zero count of a contiguous tensor above :data:`ZERO_SAMPLE` elements is estimated
    from 64 evenly spaced contiguous runs of that many elements in total.
    """
    if x.layout != torch.strided or not x.is_floating_point() or x.is_complex():
        return None
    n = x.numel()
    if n == 0:
        return None
    with torch.no_grad():
        x = x.detach()
        if x.dtype not in _FLOAT_KEEP:
            x = x.float()
        total = x.sum()
        norm = torch.linalg.vector_norm(x)
        lo, hi = torch.aminmax(x)
        on_cpu = x.device.type == "cpu"
        counted = n
        if on_cpu and n > ZERO_SAMPLE and x.is_contiguous():
            # count_nonzero is not vectorised on the CPU and would cost more than every other
            # statistic together: estimate the fraction from 64 evenly spaced contiguous runs.
            stride = n // _RUNS
            runs = x.view(-1)[: _RUNS * stride].view(_RUNS, stride)[:, : ZERO_SAMPLE // _RUNS]
            nonzero = torch.count_nonzero(runs)
            counted = runs.numel()
        else:
            nonzero = torch.count_nonzero(x)
        if on_cpu and math.isfinite(float(total)):
            return Moments((total, norm, lo, hi), (nonzero, 0, 0), n, counted)
        return Moments((total, norm, lo, hi),
                       (nonzero, torch.isnan(x).sum(), torch.isinf(x).sum()), n, counted)


def to_host(moments: Sequence[Moments], scalars: Sequence[torch.Tensor],
            device: torch.device) -> tuple[list[dict[str, float]], list[float]]:
    """Move a step's activation moments and extra 0-d tensors (norms) to the host in one
    copy. Returns the catalogue fields of each activation and the scalars as floats."""
    floats = [f for m in moments for f in m.floats]
    floats += list(scalars)
    counts = [c for m in moments for c in m.counts if isinstance(c, torch.Tensor)]
    with torch.no_grad():
        parts = []
        if floats:
            try:
                parts.append(torch.stack(floats).double())
            except (RuntimeError, TypeError):  # mixed dtypes or devices
                parts.append(torch.stack([f.to(device, torch.float64) for f in floats]))
        if counts:
            parts.append(torch.stack([c.to(device) for c in counts]).double())
        flat = torch.cat(parts).cpu().tolist() if parts else []
    nf = 4 * len(moments)
    fvals, svals, cvals = flat[:nf], flat[nf:len(floats)], iter(flat[len(floats):])
    out = []
    for k, m in enumerate(moments):
        total, norm, lo, hi = fvals[4 * k: 4 * k + 4]
        nonzero, nan, inf = (next(cvals) if isinstance(c, torch.Tensor) else c
                             for c in m.counts)
        out.append(activation_fields(
            (total, norm, lo, hi, nonzero * m.numel / m.counted, nan, inf), m.numel))
    return out, svals


def activation_fields(values: Sequence[float], numel: int) -> dict[str, float]:
    """Host-side: turn one set of raw moments (sum, L2 norm, min, max, non-zero count,
    NaN count, Inf count) into catalogue fields.

    ``std`` is the population standard deviation from the first two moments
    (``sqrt(E[x^2] - E[x]^2)``, clamped at 0). NaN/Inf values propagate into mean/std/abs-max
    as NaN; the counts say why.
    """
    total, norm, lo, hi, nonzero, nan, inf = values[:ACTIVATION_WIDTH]
    mean = total / numel
    var = norm * norm / numel - mean * mean
    std = math.sqrt(var) if var > 0 else (0.0 if var == var else math.nan)
    return {
        "activation_mean": mean,
        "activation_std": std,
        "activation_abs_max": max(-lo, hi) if lo == lo and hi == hi else math.nan,
        "activation_zero_fraction": min(1.0, max(0.0, 1.0 - nonzero / numel)),
        "activation_nan_elements": int(nan),
        "activation_inf_elements": int(inf),
    }


def foreach_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """L2 norm of each tensor, as 0-d float tensors on their devices (one fused call where
    the device supports it). Sparse tensors are densified for the norm."""
    if not tensors:
        return []
    with torch.no_grad():
        dense = [t.to_dense() if t.layout != torch.strided else t for t in tensors]
        dense = [t if t.dtype in _FLOAT_KEEP else t.float() for t in dense]
        try:
            return list(torch._foreach_norm(dense))
        except (RuntimeError, TypeError, AttributeError):
            # Mixed devices/dtypes in one list: fall back to one norm per tensor.
            return [torch.linalg.vector_norm(t) for t in dense]


def snapshot(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of ``tensors`` (for the update ratio around an optimizer step)."""
    with torch.no_grad():
        detached = [t.detach() for t in tensors]
        try:
            return list(torch._foreach_mul(detached, 1.0))
        except (RuntimeError, TypeError, AttributeError):
            return [t.clone() for t in detached]


def difference(after: Sequence[torch.Tensor], before: list[torch.Tensor]) -> list[torch.Tensor]:
    """``after[k] - before[k]`` for each pair, computed in place in ``before`` (a snapshot
    that is no longer needed) to spare an allocation; returns ``before``."""
    with torch.no_grad():
        after = [t.detach() for t in after]
        try:
            torch._foreach_sub_(before, after)
            torch._foreach_neg_(before)
        except (RuntimeError, TypeError, AttributeError):
            for a, b in zip(after, before, strict=True):
                b.sub_(a).neg_()
        return before


def total_norm(norms: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of a list of per-tensor L2 norms (the global norm), on the first one's
    device, without leaving the device."""
    with torch.no_grad():
        try:
            return torch.linalg.vector_norm(torch.stack(list(norms)).float())
        except (RuntimeError, TypeError):  # norms on several devices or of mixed dtypes
            return torch.linalg.vector_norm(
                torch.stack([n.to(norms[0].device, torch.float32) for n in norms]))
