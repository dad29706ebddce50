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
    params = [p for _, _, p in sampler.params]
    weight_norms: list[torch.Tensor] = []
    update_norms: list[torch.Tensor] = []
    if sampler.log_params and params:
        weight_norms = ts.foreach_norms(params)
        if state.snapshot is not None:
            update_norms = ts.foreach_norms(ts.difference(
                [params[k] for k in state.snapshot_idx], state.snapshot))
    grad_keys = sorted(state.grad_norms)
    scalars = [state.grad_norms[k] for k in grad_keys]
    scalars += weight_norms + update_norms
    act_fields, flat = ts.to_host([m for _, m in state.acts], scalars, sampler.device)
    fields: list[dict[str, Any]] = [{"step": step} for _ in range(n_layers)]
    for (i, _), f in zip(state.acts, act_fields, strict=True):
        fields[i].update(f)
    off = 0
    grad_vals = dict(zip(grad_keys, flat[off:off + len(grad_keys)], strict=True))
    off += len(grad_keys)
    wn = flat[off:off + len(params)] if weight_norms else []
    off += len(wn)
    un = dict(zip(state.snapshot_idx, flat[off:off + len(update_norms)], strict=True))

    # Per-layer sums of squares of per-parameter norms.
    g2 = [0.0] * n_layers
    has_g = [False] * n_layers
    w2 = [0.0] * n_layers
    u2 = [0.0] * n_layers
    has_u = [False] * n_layers
    param_points = []
    for k, (i, _pname, _p) in enumerate(sampler.params):
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
        if sampler.per_param and len(pf) > 1:
            param_points.append(Point("layer_param", sampler.param_tags[k], pf, now_ns))

    cuda = sampler.cuda
    if cuda:
        # The copy above already waited for the stream; events recorded by autograd's
        # device thread are covered by one explicit synchronisation per sampled step.
        torch.cuda.synchronize(sampler.device)
    for i in range(n_layers):
        f = fields[i]
        if has_g[i]:
            f["grad_norm"] = math.sqrt(g2[i])
        if wn and sampler.layers[i].params:
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
    points = [Point("layer", sampler.layer_tags[i], f, now_ns)
              for i, f in enumerate(fields) if len(f) > 1]
    return points + param_points
