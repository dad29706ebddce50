"""Overhead of provscope's in-job instrumentation on a small transformer LM, as a user gets it.

Workload (fixed by the issue): a 4-layer transformer language model, d_model 128, 4 heads,
sequence 64, batch 16, vocabulary 1000, synthetic tokens, AdamW, ``torch.set_num_threads(1)``
on the CPU.

Each loop runs in a process of its own: the *bare* loop never imports provscope (no
provscope thread exists), the *instrumented* loop is the docs' example with nothing started
by hand: ``provscope.workflow`` with the default settings (only the embedded file is put in
a temporary directory and the agent socket pointed where no agent listens, so that an agent
running on this machine cannot change what is measured), so the embedded pipeline writes
the SQLite file on its background threads and the in-job telemetry samples the node and
the process tree every 5 s; ``provscope.watch(model, every=N, optimizer=opt)``;
``for step, batch in run.steps(batches)``; ``run.log(loss=loss.detach())`` every step.

Processes alternate bare/instrumented in ABBA order over several rounds (4; ``--quick``:
one pair of 20-step loops, a rough look), so slow drifts of the machine hit both alike.
Figures:

* ``overhead_every10`` and ``overhead_every1``: the headline, total loop time of every
  instrumented round / total loop time of every bare round (warm-up steps excluded,
  sampled steps included). Targets <= 1.03 and <= 1.15.
  Beside it: ``median_step_ratio`` (median instrumented step / median bare step),
  ``sampled_step_s`` and ``sampled_step_ratio`` (the median cost of one step with layer
  statistics, and that over the median bare step), ``round_ratios`` (each ABBA pair),
  ``exit_flush_s`` (leaving the workflow: the final flush, outside the loop) and the
  in-job telemetry's own thread CPU time.

``--device cuda`` runs the same workload on a GPU (step timing synchronises the device
at each step end in both loops).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import emit, figure, parser

VOCAB, D_MODEL, LAYERS, HEADS, SEQ, BATCH = 1000, 128, 4, 4, 64, 16
HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- worker


def _model(device: str):
    import torch
    from torch import nn

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

    torch.manual_seed(0)
    model = TinyLM().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, VOCAB, (8, BATCH, SEQ + 1), device=device)
    return model, opt, data


def _thread_cpu_s(native_id: int | None) -> float | None:
    """CPU seconds (user + system) of one thread of this process, from procfs."""
    if native_id is None:
        return None
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def worker(kind: str, every: int, steps: int, warmup: int, device: str, db: str) -> dict:
    """One loop of ``warmup + steps`` steps; returns the timed part's step times."""
    import torch
    from torch import nn

    torch.set_num_threads(1)
    model, opt, data = _model(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n = warmup + steps
    marks: list[float] = []  # perf_counter at the top of each step, and one after the last
    cpu: list[float] = []  # the main thread's CPU time at the same points
    sampled: list[bool] = []

    def body(i: int, batch: torch.Tensor, log=None) -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                           batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        if log is not None:
            log(loss=loss.detach())
        sync()

    batches = (data[i % data.shape[0]] for i in range(n))
    out: dict = {"kind": kind}
    if kind == "bare":
        assert "provscope" not in sys.modules
        for i, batch in enumerate(batches):
            marks.append(time.perf_counter())
            cpu.append(time.thread_time())
            body(i, batch)
        marks.append(time.perf_counter())
        cpu.append(time.thread_time())
        out["provscope_threads"] = 0
    else:
        import threading

        import provscope
        from provscope.job import sink

        settings = {"embedded.path": db,
                    "agent.socket_path": str(Path(db).with_suffix(".no-agent.sock"))}
        with provscope.workflow(f"overhead-every{every}", settings=settings) as run:
            watcher = provscope.watch(model, every=every, optimizer=opt)
            for step, batch in run.steps(batches):
                marks.append(time.perf_counter())
                cpu.append(time.thread_time())
                before = watcher.sampled_steps
                body(step, batch, run.log)
                sampled.append(watcher.sampled_steps != before)
            marks.append(time.perf_counter())
            cpu.append(time.thread_time())
            watcher.unwatch()
            stats = sink.get_sink(run.config).stats()
            tel = stats.get("telemetry") or {}
            thread = next((t for t in threading.enumerate()
                           if t.name == "provscope-telemetry"), None)
            out["telemetry_thread_cpu_s"] = _thread_cpu_s(getattr(thread, "native_id", None))
            out["provscope_threads"] = sum(t.name.startswith("provscope")
                                           for t in threading.enumerate())
            t_exit = time.perf_counter()
        run.flush(60.0)
        out["exit_flush_s"] = time.perf_counter() - t_exit
        out.update(mode=run.sink_mode, sampled=sampled[warmup:],
                   sampled_steps=watcher.stats()["sampled_steps"],
                   points=watcher.stats()["points_emitted"],
                   hook_errors=watcher.stats()["hook_errors"],
                   telemetry_points=tel.get("points", 0),
                   telemetry_collectors=sorted(
                       k for k, v in (tel.get("collectors") or {}).items()
                       if v.get("state") == "active"),
                   telemetry_errors=tel.get("collector_errors"),
                   written=run.written())
    steps_s = [b - a for a, b in itertools.pairwise(marks)][warmup:]
    out["steps_s"] = steps_s
    out["total_s"] = marks[-1] - marks[warmup]
    out["main_thread_cpu_s"] = cpu[-1] - cpu[warmup]
    return out


# ----------------------------------------------------------------------------- driver


def _spawn(kind: str, every: int, steps: int, warmup: int, device: str, db: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
           "--every", str(every), "--steps", str(steps), "--warmup", str(warmup),
           "--device", device, "--db", str(db)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVSCOPE_")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(every: int, steps: int, warmup: int, rounds: int, device: str, tmp: Path) -> dict:
    bare: list[dict] = []
    inst: list[dict] = []
    for r in range(rounds):
        # ABBA: bare first in even rounds, instrumented first in odd ones.
        order = ("bare", "inst") if r % 2 == 0 else ("inst", "bare")
        for kind in order:
            got = _spawn(kind, every, steps, warmup, device, tmp / f"every{every}-r{r}.db")
            (bare if kind == "bare" else inst).append(got)
    bare_steps = [s for b in bare for s in b["steps_s"]]
    inst_steps = [s for i in inst for s in i["steps_s"]]
    sampled_steps = [s for i in inst for s, hit in zip(i["steps_s"], i["sampled"],
                                                        strict=True) if hit]
    plain_steps = [s for i in inst for s, hit in zip(i["steps_s"], i["sampled"],
                                                      strict=True) if not hit]
    bare_med = statistics.median(bare_steps)
    sampled_med = statistics.median(sampled_steps) if sampled_steps else None
    tel_cpu = [i["telemetry_thread_cpu_s"] for i in inst
               if i.get("telemetry_thread_cpu_s") is not None]
    return {
        "ratio": sum(i["total_s"] for i in inst) / sum(b["total_s"] for b in bare),
        "round_ratios": [round(i["total_s"] / b["total_s"], 4)
                         for i, b in zip(inst, bare, strict=True)],
        "cpu_ratio": sum(i["main_thread_cpu_s"] for i in inst)
        / sum(b["main_thread_cpu_s"] for b in bare),
        "bare_total_s": sum(b["total_s"] for b in bare),
        "inst_total_s": sum(i["total_s"] for i in inst),
        "bare_median_s": bare_med,
        "inst_median_s": statistics.median(inst_steps),
        "median_step_ratio": statistics.median(inst_steps) / bare_med,
        "unsampled_median_s": statistics.median(plain_steps) if plain_steps else None,
        "sampled_step_s": sampled_med,
        "sampled_step_ratio": sampled_med / bare_med if sampled_med else None,
        "sampled_per_round": statistics.mean(sum(i["sampled"]) for i in inst),
        "exit_flush_s": statistics.median(i["exit_flush_s"] for i in inst),
        "telemetry_thread_cpu_share": (sum(tel_cpu) / sum(i["total_s"] for i in inst)
                                       if tel_cpu else None),
        "inst": inst[-1],
    }


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu (the issue's workload) or cuda (needs a GPU)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per loop (default 300; --quick 20)")
    p.add_argument("--rounds", type=int, default=None,
                   help="bare/instrumented process pairs per figure, in ABBA order "
                        "(default 4; --quick 1)")
    p.add_argument("--worker", choices=["bare", "inst"], help=argparse_hidden())
    p.add_argument("--every", type=int, default=10, help=argparse_hidden())
    p.add_argument("--warmup", type=int, default=None, help=argparse_hidden())
    p.add_argument("--db", help=argparse_hidden())
    args = p.parse_args()
    steps = args.steps or (20 if args.quick else 300)
    warmup = args.warmup if args.warmup is not None else (5 if args.quick else 30)
    if args.worker:
        print(json.dumps(worker(args.worker, args.every, steps, warmup, args.device, args.db)))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("overhead: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
    rounds = args.rounds or (1 if args.quick else 4)
    figures = []
    with tempfile.TemporaryDirectory(prefix="provscope-overhead-") as tmp:
        for every in (10, 1):
            r = measure(every, steps, warmup, rounds, args.device, Path(tmp))
            last = r["inst"]
            print(f"# every={every}: total {r['inst_total_s']:.2f} s instrumented / "
                  f"{r['bare_total_s']:.2f} s bare = {r['ratio']:.4f} over {rounds} ABBA "
                  f"rounds {r['round_ratios']} (main thread CPU time ratio "
                  f"{r['cpu_ratio']:.4f}); median step {r['inst_median_s'] * 1e3:.2f} / "
                  f"{r['bare_median_s'] * 1e3:.2f} ms = {r['median_step_ratio']:.4f}; "
                  f"sampled step {_ms(r['sampled_step_s'])} ms "
                  f"({r['sampled_per_round']:.0f} per round), unsampled "
                  f"{_ms(r['unsampled_median_s'])} ms; exit flush "
                  f"{r['exit_flush_s'] * 1e3:.0f} ms; mode {last['mode']}; telemetry "
                  f"{last['telemetry_collectors']} ({last['telemetry_points']} points, "
                  f"errors {last['telemetry_errors']}, thread CPU share "
                  f"{_pct(r['telemetry_thread_cpu_share'])}); "
                  f"{last['points']} watcher points, {last['hook_errors']} hook errors, "
                  f"written {last['written']}", file=sys.stderr)
            figures.append(figure(
                "overhead", f"overhead_every{every}", r["ratio"], "ratio", "lower",
                compared_with="bare loop in its own process (no provscope), ABBA rounds",
                instrumented_total_s=round(r["inst_total_s"], 4),
                bare_total_s=round(r["bare_total_s"], 4),
                median_step_ratio=round(r["median_step_ratio"], 4),
                main_thread_cpu_ratio=round(r["cpu_ratio"], 4),
                sampled_step_s=_round(r["sampled_step_s"]),
                sampled_step_ratio=_round(r["sampled_step_ratio"], 4),
                bare_median_step_s=round(r["bare_median_s"], 6),
                round_ratios=r["round_ratios"], exit_flush_s=round(r["exit_flush_s"], 4),
                telemetry_thread_cpu_share=_round(r["telemetry_thread_cpu_share"], 6),
                device=args.device, steps=steps, rounds=rounds,
                pipeline=f"{last['mode']} (SQLite), in-job telemetry "
                         f"{','.join(last['telemetry_collectors']) or 'off'}",
            ))
    emit(figures)
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def _round(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(x, nd)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3f} %"


if __name__ == "__main__":
    sys.exit(main())
