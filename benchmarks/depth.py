"""Host cost of a sampled step as the model gets deeper: ``host_ms_per_leaf``.

Workload (fixed by the issue): a stack of blocks of ``Linear(64, 64)`` + ``GELU`` (two
watched leaf layers per block), 32 to 1,024 leaves, batch 32, SGD, ``torch.set_num_threads(1)``
on the CPU, so that the device work per layer is tiny and what is measured is provscope's
host work per layer: hooks, reductions, the copy to the host and the points.

For each depth two copies of the model train in one process, one bare and one watched with
``provscope.watch(model, every=1, optimizer=opt)`` inside ``provscope.workflow`` (the
default embedded store, in a temporary directory), so every watched step is a sampled
step. They alternate in blocks of steps in ABBA order, so load from elsewhere hits both
alike. The figure is the extra time of a sampled step over the bare step, divided by the
number of watched leaves: ``(total watched time - total bare time) / steps / leaves``,
in milliseconds. ``host_ms_per_leaf`` counts the CPU time of the training thread (its
host time: hooks, reductions, the copy to the host, building the points), which other
processes on the machine do not inflate; ``wall_ms_per_leaf`` beside it is wall time,
which also carries the embedded store's background thread writing the layer points (one
SQLite row per field value) on the same cores. Target: host <= 0.05 ms per leaf, and
within 20 % of that from 32 to 1,024 leaves (``flatness``: the largest per-leaf figure
over the smallest).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from _common import emit, figure, parser

WIDTH, BATCH = 64, 32


def _model(leaves: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU()) for _ in range(leaves // 2)]
    return nn.Sequential(*blocks)


def measure(leaves: int, steps: int, block: int, db: str) -> dict[str, float]:
    """Seconds of ``steps`` bare and ``steps`` sampled steps at this depth."""
    import torch

    import provscope
    from provscope.pytorch.watch import watch

    bare, watched = _model(leaves), _model(leaves)
    opt_b = torch.optim.SGD(bare.parameters(), lr=1e-3)
    opt_w = torch.optim.SGD(watched.parameters(), lr=1e-3)
    x = torch.randn(BATCH, WIDTH)

    def step(model, opt) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.thread_time()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.thread_time() - c0

    totals = {"bare": 0.0, "watched": 0.0, "bare_cpu": 0.0, "watched_cpu": 0.0}
    # The embedded store in a private directory; no agent on this machine is reached, and
    # no in-job telemetry thread competes with the loop.
    settings = {"embedded.path": db, "agent.socket_path": db + ".no-agent.sock",
                "client.telemetry": False}
    with provscope.workflow(f"depth-{leaves}", settings=settings):
        w = watch(watched, every=1, optimizer=opt_w, max_layers=leaves)
        for _ in range(3):  # warm-up: allocator, first hooks, first points
            step(bare, opt_b)
            step(watched, opt_w)
        done = 0
        order = [("bare", bare, opt_b), ("watched", watched, opt_w)]
        while done < steps:
            for name, model, opt in order:
                for _ in range(block):
                    wall, cpu = step(model, opt)
                    totals[name] += wall
                    totals[name + "_cpu"] += cpu
            order.reverse()
            done += block
        stats = w.stats()
        w.unwatch()
    if stats["hook_errors"] or stats["layers"] != leaves:
        raise SystemExit(f"depth {leaves}: unexpected watcher state {stats}")
    return totals


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--leaves", type=int, nargs="*", default=None,
                   help="depths to measure (default 32 64 128 256 512 1024)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    depths = args.leaves or ([32, 256, 1024] if args.quick else [32, 64, 128, 256, 512, 1024])
    steps, block = (20, 5) if args.quick else (60, 10)
    db = str(Path(tempfile.mkdtemp(prefix="provscope-depth-")) / "provscope.db")
    figures = []
    per_leaf = []
    for leaves in depths:
        t = measure(leaves, steps, block, db)
        bare_ms = t["bare"] / steps * 1e3
        sampled_ms = t["watched"] / steps * 1e3
        bare_cpu = t["bare_cpu"] / steps * 1e3
        sampled_cpu = t["watched_cpu"] / steps * 1e3
        wall = (sampled_ms - bare_ms) / leaves
        value = (sampled_cpu - bare_cpu) / leaves
        per_leaf.append(value)
        print(f"# {leaves} leaves: training thread CPU {bare_cpu:.2f} -> {sampled_cpu:.2f} ms "
              f"per step, {value:.4f} ms per leaf; wall {bare_ms:.2f} -> {sampled_ms:.2f} ms, "
              f"{wall:.4f} ms per leaf", file=sys.stderr)
        figures.append(figure("depth", "host_ms_per_leaf", value, "ms", "lower",
                              baseline="bare step (training thread CPU ms)",
                              baseline_value=bare_cpu, leaves=leaves,
                              sampled_step_cpu_ms=round(sampled_cpu, 3), target=0.05))
        figures.append(figure("depth", "wall_ms_per_leaf", wall, "ms", "lower",
                              baseline="bare step (wall ms)", baseline_value=bare_ms,
                              leaves=leaves, sampled_step_ms=round(sampled_ms, 3)))
    low = min(v for v in per_leaf if v > 0) if any(v > 0 for v in per_leaf) else 0.0
    figures.append(figure("depth", "flatness", max(per_leaf) / low if low else float("nan"),
                          "ratio", "lower", leaves=f"{depths[0]}-{depths[-1]}", target=1.2))
    emit(figures)


if __name__ == "__main__":
    main()
