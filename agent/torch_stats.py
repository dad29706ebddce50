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
    "activation_fields",
    "activation_moments",
    "first_tensor",
    "foreach_norms",
    "snapshot",
]

ACTIVATION_WIDTH = 7
"""Length of the vector :func:`activation_moments` returns."""

_FLOAT_KEEP = (torch.float32, torch.float64)


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in a module output: the tensor itself, the first of a tuple/list,
    or the first value of a dict (Hugging Face ``ModelOutput`` included); None otherwise."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
        return None
    if isinstance(value, Mapping):
        for item in value.values():
            if isinstance(item, torch.Tensor):
                return item
    return None


def activation_moments(x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """Raw moments of one activation tensor, reduced on its device.

    Returns ``(moments, numel)`` where ``moments`` is a float64 vector of length
    :data:`ACTIVATION_WIDTH`: sum, L2 norm, min, max, non-zero count, NaN count, Inf count.
    Returns None for tensors that have no meaningful statistics here: sparse or other
    non-strided layouts, integer/bool/complex dtypes, and empty tensors. Never blocks on a
    CUDA device; on the CPU the NaN/Inf counts are only computed when the sum is not finite
    (the host already has the value, so the branch costs no synchronisation).
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
        nonzero = torch.count_nonzero(x)
        if x.device.type == "cpu" and math.isfinite(float(total)):
            nan = inf = torch.zeros((), dtype=torch.int64)
        else:
            nan = torch.isnan(x).sum()
            inf = torch.isinf(x).sum()
        floats = torch.stack((total, norm, lo, hi)).double()
        counts = torch.stack((nonzero, nan, inf)).double()
        return torch.cat((floats, counts)), n


def activation_fields(values: Sequence[float], numel: int) -> dict[str, float]:
    """Host-side: turn one :func:`activation_moments` vector into catalogue fields.

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
        "activation_zero_fraction": 1.0 - nonzero / numel,
        "activation_nan_count": int(nan),
        "activation_inf_count": int(inf),
    }


def foreach_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """L2 norm of each tensor, as 0-d float32 tensors on their devices (one fused call
    where the device supports it). Sparse tensors are densified for the norm."""
    if not tensors:
        return []
    with torch.no_grad():
        dense = [t.to_dense() if t.layout != torch.strided else t for t in tensors]
        dense = [t if t.dtype in _FLOAT_KEEP else t.float() for t in dense]
        try:
            return [n.float() for n in torch._foreach_norm(dense)]
        except (RuntimeError, TypeError, AttributeError):
            # Mixed devices/dtypes in one list: fall back to one norm per tensor.
            return [torch.linalg.vector_norm(t).float() for t in dense]


def snapshot(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of ``tensors`` (for the update ratio around an optimizer step)."""
    with torch.no_grad():
        return [t.detach().clone() for t in tensors]
