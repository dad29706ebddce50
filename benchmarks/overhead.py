"""Overhead of provscope's in-job instrumentation on a small transformer LM.

Workload (fixed by the issue): a 4-layer transformer language model, d_model 128, 4 heads,
sequence 64, batch 16, vocabulary 1000, synthetic tokens, AdamW, ``torch.set_num_threads(1)``
on the CPU. Two identical models train side by side in one process: the bare one and the
instrumented one, alternating step by step (ABBA order) so that machine noise hits both
alike.
The instrumented loop runs inside ``provscope.workflow`` with the real embedded pipeline
(background thread writing the SQLite file), node telemetry (cpu + memory collectors on
the agent's scheduler thread, 1 s interval), a per-step ``run.log(loss=...)``, and
``provscope.watch(model, every=N, optimizer=opt)`` (layer statistics every N steps plus
the per-step ``train`` point: step time, throughput, lr, gradient norm).

Figures (value = instrumented / bare median step time, as the issue defines them; reported
alongside: ``mean_ratio``, which includes the sampled steps' cost, and
``paired_median_ratio``, the median over steps of instrumented / adjacent bare step time,
the estimate least disturbed by other load on the machine):

* ``overhead_every10``: layer statistics every 10 steps (target <= 1.03);
* ``overhead_every1``: layer statistics every step (target <= 1.15).

``--device cuda`` runs the same workload on a GPU (step timing synchronises the device
at each step end in both loops).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import emit, figure, parser
from torch import nn

VOCAB, D_MODEL, LAYERS, HEADS, SEQ, BATCH = 1000, 128, 4, 4, 64, 16


class TinyLM(nn.Module):
    """Decoder-only LM built from ``nn.TransformerEncoderLayer`` with a causal mask."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Embedding(SEQ, D_MODEL)
        layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, 4 * D_MODEL, dropout=0.1,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ),
                             persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.embed(tokens) + self.pos(pos)
        h = self.encoder(h, mask=self.mask, is_causal=True)
        return self.head(self.norm(h))


def _trainer(device: str, seed: int):
    torch.manual_seed(seed)
    model = TinyLM().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, VOCAB, (8, BATCH, SEQ + 1), device=device)
    return model, opt, data


def _step(model, opt, data, i: int, sync, log=None) -> float:
    t0 = time.perf_counter()
    batch = data[i % data.shape[0]]
    opt.zero_grad(set_to_none=True)
    logits = model(batch[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    if log is not None:
        log(loss=loss.detach())
    sync()
    return time.perf_counter() - t0


def _telemetry(run):
    """Node collectors on the scheduler thread, feeding the run's pipeline; None if the
    collector modules are unavailable."""
    try:
        from provscope.agent.collectors.cpu import CpuCollector
        from provscope.agent.collectors.memory import MemoryCollector
        from provscope.agent.scheduler import Scheduled, Scheduler
    except ImportError:
        return None
    entries = [Scheduled(CpuCollector(run.host), 1.0), Scheduled(MemoryCollector(run.host), 1.0)]

    def sink(points):
        for p in points:
            run.emit(p)

    scheduler = Scheduler(entries, sink)
    scheduler.start()
    return scheduler


def measure(every: int, steps: int, warmup: int, device: str, db: Path) -> dict:
    import provscope

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    bare = _trainer(device, 0)
    inst = _trainer(device, 0)
    bare_t: list[float] = []
    inst_t: list[float] = []
    with provscope.workflow(f"overhead-every{every}",
                            settings={"embedded.path": str(db)}) as run:
        telemetry = _telemetry(run)
        watcher = provscope.watch(inst[0], every=every, optimizer=inst[1])
        try:
            for i in range(warmup):
                _step(*bare, i, sync)
                _step(*inst, i, sync, run.log)
            # Step-by-step alternation in ABBA order: load from other processes and slow
            # drifts (thermal, allocator) hit both loops alike, and neither always goes first.
            for k in range(steps):
                i = warmup + k
                if k % 2 == 0:
                    bare_t.append(_step(*bare, i, sync))
                    inst_t.append(_step(*inst, i, sync, run.log))
                else:
                    inst_t.append(_step(*inst, i, sync, run.log))
                    bare_t.append(_step(*bare, i, sync))
        finally:
            watcher.unwatch()
            if telemetry is not None:
                telemetry.stop()
        run.flush(30.0)
        stats = watcher.stats()
    mb, mi = statistics.median(bare_t), statistics.median(inst_t)
    # Each instrumented step against the bare step next to it: robust to external load.
    paired = statistics.median(a / b for a, b in zip(inst_t, bare_t, strict=True))
    return {
        "bare_median": mb, "inst_median": mi, "ratio": mi / mb, "paired": paired,
        "mean_ratio": statistics.fmean(inst_t) / statistics.fmean(bare_t),
        "sampled_steps": stats["sampled_steps"], "points": stats["points_emitted"],
        "hook_errors": stats["hook_errors"], "telemetry": telemetry is not None,
        "written": run.written(),
    }


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu (the issue's workload) or cuda (needs a GPU)")
    p.add_argument("--steps", type=int, default=None, help="steps per loop (default 300)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("overhead: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    steps = args.steps or (60 if args.quick else 300)
    warmup = 10 if args.quick else 30
    figures = []
    with tempfile.TemporaryDirectory(prefix="provscope-overhead-") as tmp:
        for every in (10, 1):
            r = measure(every, steps, warmup, args.device, Path(tmp) / f"every{every}.db")
            print(f"# every={every}: bare {r['bare_median'] * 1e3:.2f} ms, instrumented "
                  f"{r['inst_median'] * 1e3:.2f} ms (median), mean ratio "
                  f"{r['mean_ratio']:.4f}, paired median ratio {r['paired']:.4f}, "
                  f"{r['sampled_steps']} sampled steps, "
                  f"{r['points']} points, {r['hook_errors']} hook errors, telemetry "
                  f"{'on' if r['telemetry'] else 'off'}, written {r['written']}",
                  file=sys.stderr)
            figures.append(figure(
                "overhead", f"overhead_every{every}", r["ratio"], "ratio", "lower",
                bare_median_s=round(r["bare_median"], 6),
                instrumented_median_s=round(r["inst_median"], 6),
                mean_ratio=round(r["mean_ratio"], 4),
                paired_median_ratio=round(r["paired"], 4), device=args.device, steps=steps,
                pipeline="embedded (SQLite)",
            ))
    emit(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
