"""Points of one sampled step: ``layer`` (and ``layer_param``) points, built in one pass.

Gradient norms, weight norms and update norms of every watched parameter, and the
activation moments of every layer, cross to the host in one copy (one synchronisation per
sampled step, none per layer); per-layer values are the root of the sum of squares of
their parameters' norms. Fields a layer cannot have are left out, never written as zero.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from provscope.pytorch import stats as ts
from provscope.records import Point

if TYPE_CHECKING:
    from provscope.pytorch.layers import LayerSampler, StepState

__all__ = ["sampled_step_points"]


def sampled_step_points(sampler: LayerSampler, state: StepState, now_ns: int) -> list[Point]:
    """The ``layer`` and (with ``per_param``) ``layer_param`` points of ``state``, stamped
    ``now_ns``. Blocks once on the device copy of the statistics."""
    step = state.step
    n_layers = len(sampler.layers)
    params = sampler.params
    stat = sampler.stat_params
    weight_norms: list[torch.Tensor] = []
    update_norms: list[torch.Tensor] = []
    if sampler.log_params and stat:
        weight_norms = ts.param_norms([params[k][2] for k in stat])
        if state.snapshot is not None:
            update_norms = ts.param_norms(ts.difference(
                [params[k][2] for k in state.snapshot_idx], state.snapshot))
            state.snapshot = None
    grad_keys = sorted(state.grad_norms)
    scalars = [state.grad_norms[k] for k in grad_keys] + weight_norms + update_norms
    flat = _to_host(scalars, sampler.device)
    act_fields = sampler.acts.collect()
    fields: list[dict[str, Any]] = [{"step": step} for _ in range(n_layers)]
    for i, f in act_fields.items():
        fields[i].update(f)
    off = 0
    grad_vals = dict(zip(grad_keys, flat[off:off + len(grad_keys)], strict=True))
    off += len(grad_keys)
    wn = dict(zip(stat, flat[off:off + len(weight_norms)], strict=True))
    off += len(weight_norms)
    un = dict(zip(state.snapshot_idx, flat[off:off + len(update_norms)], strict=True))

    # Per-layer sums of squares of per-parameter norms.
    g2 = [0.0] * n_layers
    has_g = [False] * n_layers
    w2 = [0.0] * n_layers
    has_w = [False] * n_layers
    u2 = [0.0] * n_layers
    has_u = [False] * n_layers
    param_points = []
    per_param = sampler.per_param
    for k, (i, _pname, _p) in enumerate(params):
        pf: dict[str, Any] = {"step": step}
        g = grad_vals.get(k)
        if g is not None:
            g2[i] += g * g
            has_g[i] = True
            pf["grad_norm"] = g
        w = wn.get(k)
        if w is not None:
            w2[i] += w * w
            has_w[i] = True
            pf["weight_norm"] = w
            u = un.get(k)
            if u is not None:
                u2[i] += u * u
                has_u[i] = True
                if w > 0:
                    pf["update_ratio"] = u / w
        if per_param and len(pf) > 1:
            param_points.append(Point("layer_param", sampler.param_tags[k], pf, now_ns))

    cuda = sampler.cuda
    if cuda:
        # The copies above already waited for their streams; events recorded by autograd's
        # device threads, on every device the layers ran on, are covered by one explicit
        # synchronisation of each device per sampled step.
        for device in state.devices or {sampler.device}:
            torch.cuda.synchronize(device)
    for i in range(n_layers):
        f = fields[i]
        if has_g[i]:
            f["grad_norm"] = math.sqrt(g2[i])
        if has_w[i]:
            f["weight_norm"] = math.sqrt(w2[i])
        if has_u[i] and w2[i] > 0:
            f["update_ratio"] = math.sqrt(u2[i]) / math.sqrt(w2[i])
        fwd = state.fwd[i]
        if fwd is not None:
            f["forward_seconds"] = (
                sum(a.elapsed_time(b) for a, b in fwd) / 1000.0 if cuda else fwd)
        b0, b1 = state.bwd0[i], state.bwd1[i]
        if b0 is not None and b1 is not None:
            dt = b0.elapsed_time(b1) / 1000.0 if cuda else b1 - b0
            if dt >= 0:
                f["backward_seconds"] = dt
        mem = state.mem[i]
        if mem is not None:
            f["memory_allocated_delta_bytes"] = int(mem)
    tags = sampler.layer_tags
    points = [Point("layer", tags[i], f, now_ns) for i, f in enumerate(fields) if len(f) > 1]
    return points + param_points


def _to_host(scalars: list[torch.Tensor], device: torch.device) -> list[float]:
    """0-d tensors to floats in one copy (norms of several devices or dtypes are gathered
    on ``device`` first)."""
    if not scalars:
        return []
    with torch.no_grad():
        try:
            stacked = torch.stack(scalars).double()
        except (RuntimeError, TypeError):  # mixed dtypes or devices
            stacked = torch.stack([s.to(device, torch.float64) for s in scalars])
        return stacked.cpu().tolist()
