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

The two loops run at the same time in two processes but never together: each runs a
block of 10 steps while the other waits (untimed) for its turn, blocks in ABBA order, so
load from elsewhere and slow drifts of the machine hit both alike while each process keeps
its own caches, allocator and threads. Full size: 300 timed steps per loop after 30
warm-up steps, 2 process pairs per figure; ``--quick``: one pair of 30-step loops.

Figures:

* ``overhead_every10`` and ``overhead_every1``: the headline, total time of all timed
  instrumented steps / total time of all timed bare steps (sampled steps included; a
  step's time runs from the top of the loop body to the top of the next one, so the loop
  helper's own work counts). Targets <= 1.03 and <= 1.15.
  Beside it: ``median_step_ratio`` (median instrumented step / median bare step),
  ``sampled_step_s`` and ``sampled_step_ratio`` (the median time of one step with layer
  statistics, and that over the median bare step), ``main_thread_cpu_ratio`` (the same
  ratio in CPU time of the training thread, less disturbed by other load),
  ``block_ratio_p10_p90`` (spread of the per-block ratios), ``exit_flush_s`` (leaving the
  workflow: the final flush, outside the loop) and ``telemetry_thread_cpu_share`` (CPU time
  of the in-job telemetry thread over the loop's time).

``--device cuda`` runs the same workload on a GPU (step timing synchronises the device
at each step end in both loops).
"""

from __future__ import annotations

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


class _Clock:
    """Step times of one loop, paused between blocks by the driver (not timed)."""

    def __init__(self, warmup: int, block: int) -> None:
        self.warmup, self.block = warmup, block
        self.steps: list[float] = []  # seconds of each timed step
        self.cpu_s = 0.0  # the main thread's CPU seconds over the timed steps
        self._t: float | None = None
        self._c = 0.0
        self._i = 0

    def top(self) -> None:
        """At the top of each step (after the loop helper's work for the previous one)."""
        now, cpu = time.perf_counter(), time.thread_time()
        if self._t is not None and self._i > self.warmup:
            self.steps.append(now - self._t)
            self.cpu_s += cpu - self._c
        k = self._i - self.warmup
        if k >= 0 and k % self.block == 0:
            # Hand the machine to the other loop, wait for our turn (outside the timing).
            print("ready", flush=True)
            if sys.stdin.readline().strip() != "go":
                raise SystemExit(0)
            now, cpu = time.perf_counter(), time.thread_time()
        self._t, self._c = now, cpu
        self._i += 1

    def done(self) -> None:
        """After the last step: record it, tell the driver, wait for leave to exit."""
        now, cpu = time.perf_counter(), time.thread_time()
        if self._t is not None and self._i > self.warmup:
            self.steps.append(now - self._t)
            self.cpu_s += cpu - self._c
        print("finished", flush=True)
        sys.stdin.readline()  # the other loop may still run its last block


def worker(kind: str, every: int, steps: int, warmup: int, block: int, device: str,
           db: str) -> dict:
    """One loop of ``warmup + steps`` steps; the timed part runs in blocks of ``block``
    steps, each started by the driver. Returns the timed steps' times."""
    import torch
    from torch import nn

    torch.set_num_threads(1)
    model, opt, data = _model(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n = warmup + steps
    clock = _Clock(warmup, block)
    sampled: list[bool] = []

    def body(batch: torch.Tensor, log=None) -> None:
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
        for batch in batches:
            clock.top()
            body(batch)
        clock.done()
    else:
        import threading

        import provscope
        from provscope.job import sink

        settings = {"embedded.path": db,
                    "agent.socket_path": str(Path(db).with_suffix(".no-agent.sock"))}
        with provscope.workflow(f"overhead-every{every}", settings=settings) as run:
            watcher = provscope.watch(model, every=every, optimizer=opt)
            for _step, batch in run.steps(batches):
                clock.top()
                before = watcher.sampled_steps
                body(batch, run.log)
                sampled.append(watcher.sampled_steps != before)
            clock.done()
            watcher.unwatch()
            stats = sink.get_sink(run.config).stats()
            tel = stats.get("telemetry") or {}
            thread = next((t for t in threading.enumerate()
                           if t.name == "provscope-telemetry"), None)
            out["telemetry_thread_cpu_s"] = _thread_cpu_s(getattr(thread, "native_id", None))
            t_exit = time.perf_counter()
        run.flush(60.0)
        out["exit_flush_s"] = time.perf_counter() - t_exit
        out.update(mode=run.sink_mode, sampled=sampled[warmup:],
                   points=watcher.stats()["points_emitted"],
                   hook_errors=watcher.stats()["hook_errors"],
                   telemetry_points=tel.get("points", 0),
                   telemetry_collectors=sorted(
                       k for k, v in (tel.get("collectors") or {}).items()
                       if v.get("state") == "active"),
                   telemetry_errors=tel.get("collector_errors"),
                   written=run.written())
    out["steps_s"] = clock.steps
    out["main_thread_cpu_s"] = clock.cpu_s
    return out


# ----------------------------------------------------------------------------- driver


def _start(kind: str, every: int, steps: int, warmup: int, block: int, device: str,
           db: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
           "--every", str(every), "--steps", str(steps), "--warmup", str(warmup),
           "--block", str(block), "--device", device, "--db", str(db)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVSCOPE_")}
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env, bufsize=1)


def _wait_for(proc: subprocess.Popen, kind: str, *words: str) -> str:
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.wait(60)
            raise RuntimeError(f"{kind} worker stopped ({proc.returncode})")
        if line.strip() in words:
            return line.strip()


def _pair(every: int, steps: int, warmup: int, block: int, device: str, db: Path
          ) -> tuple[dict, dict]:
    """Run the bare and the instrumented loop side by side, one block of steps at a time
    (the other process waits, untimed), blocks in ABBA order; returns both results."""
    procs = {kind: _start(kind, every, steps, warmup, block, device, db)
             for kind in ("bare", "inst")}
    try:
        for kind, proc in procs.items():
            _wait_for(proc, kind, "ready")  # warmed up, waiting at the first block
        blocks = -(-steps // block)
        for j in range(blocks):
            for kind in (("bare", "inst") if j % 2 == 0 else ("inst", "bare")):
                proc = procs[kind]
                proc.stdin.write("go\n")
                proc.stdin.flush()
                _wait_for(proc, kind, "ready" if j < blocks - 1 else "finished")
        results = {}
        for kind, proc in procs.items():
            out, _ = proc.communicate("leave\n", timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"{kind} worker failed ({proc.returncode})")
            results[kind] = json.loads(out.strip().splitlines()[-1])
        return results["bare"], results["inst"]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


def measure(every: int, steps: int, warmup: int, block: int, pairs: int, device: str,
            tmp: Path) -> dict:
    """Both loops' figures over ``pairs`` process pairs."""
    bare: list[dict] = []
    inst: list[dict] = []
    for r in range(pairs):
        b, i = _pair(every, steps, warmup, block, device, tmp / f"every{every}-{r}.db")
        bare.append(b)
        inst.append(i)
    bare_steps = [s for b in bare for s in b["steps_s"]]
    inst_steps = [s for i in inst for s in i["steps_s"]]
    flags = [hit for i in inst for hit in i["sampled"]]
    sampled_steps = [s for s, hit in zip(inst_steps, flags, strict=True) if hit]
    plain_steps = [s for s, hit in zip(inst_steps, flags, strict=True) if not hit]
    bare_med = statistics.median(bare_steps)
    sampled_med = statistics.median(sampled_steps) if sampled_steps else None
    # Per block of the pair: instrumented / bare time of the same block (drift cancels).
    block_ratios = []
    for b, i in zip(bare, inst, strict=True):
        for k in range(0, len(b["steps_s"]), block):
            block_ratios.append(sum(i["steps_s"][k:k + block]) / sum(b["steps_s"][k:k + block]))
    tel_cpu = [i["telemetry_thread_cpu_s"] for i in inst
               if i.get("telemetry_thread_cpu_s") is not None]
    return {
        "ratio": sum(inst_steps) / sum(bare_steps),
        "cpu_ratio": sum(i["main_thread_cpu_s"] for i in inst)
        / sum(b["main_thread_cpu_s"] for b in bare),
        "block_ratio_p10_p90": [round(statistics.quantiles(block_ratios, n=10)[0], 4),
                                round(statistics.quantiles(block_ratios, n=10)[-1], 4)]
        if len(block_ratios) >= 2 else None,
        "bare_total_s": sum(bare_steps),
        "inst_total_s": sum(inst_steps),
        "bare_median_s": bare_med,
        "inst_median_s": statistics.median(inst_steps),
        "median_step_ratio": statistics.median(inst_steps) / bare_med,
        "unsampled_median_s": statistics.median(plain_steps) if plain_steps else None,
        "sampled_step_s": sampled_med,
        "sampled_step_ratio": sampled_med / bare_med if sampled_med else None,
        "sampled": sum(flags),
        "exit_flush_s": statistics.median(i["exit_flush_s"] for i in inst),
        "telemetry_thread_cpu_share": (sum(tel_cpu) / sum(inst_steps) if tel_cpu else None),
        "inst": inst[-1],
    }


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu (the issue's workload) or cuda (needs a GPU)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per loop (default 300; --quick 30)")
    p.add_argument("--pairs", type=int, default=None,
                   help="bare/instrumented process pairs per figure (default 2; --quick 1)")
    p.add_argument("--block", type=int, default=10,
                   help="steps each loop runs before the other one takes its turn")
    p.add_argument("--worker", choices=["bare", "inst"], help=argparse_hidden())
    p.add_argument("--every", type=int, default=None,
                   help="only the figure of this watch(every=...) (10 or 1; default both)")
    p.add_argument("--warmup", type=int, default=None, help=argparse_hidden())
    p.add_argument("--db", help=argparse_hidden())
    args = p.parse_args()
    steps = args.steps or (30 if args.quick else 300)
    warmup = args.warmup if args.warmup is not None else (5 if args.quick else 30)
    if args.worker:
        result = worker(args.worker, args.every or 10, steps, warmup, args.block, args.device,
                        args.db)
        print(json.dumps(result), flush=True)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("overhead: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
    pairs = args.pairs or (1 if args.quick else 2)
    figures = []
    with tempfile.TemporaryDirectory(prefix="provscope-overhead-") as tmp:
        for every in ([args.every] if args.every else [10, 1]):
            r = measure(every, steps, warmup, args.block, pairs, args.device, Path(tmp))
            last = r["inst"]
            print(f"# every={every}: total {r['inst_total_s']:.2f} s instrumented / "
                  f"{r['bare_total_s']:.2f} s bare = {r['ratio']:.4f} ({pairs} process "
                  f"pairs, blocks of {args.block} steps in ABBA order; block ratios p10-p90 "
                  f"{r['block_ratio_p10_p90']}; main thread CPU time ratio "
                  f"{r['cpu_ratio']:.4f}); median step {r['inst_median_s'] * 1e3:.2f} / "
                  f"{r['bare_median_s'] * 1e3:.2f} ms = {r['median_step_ratio']:.4f}; "
                  f"sampled step {_ms(r['sampled_step_s'])} ms ({r['sampled']} sampled), "
                  f"unsampled {_ms(r['unsampled_median_s'])} ms; exit flush "
                  f"{r['exit_flush_s'] * 1e3:.0f} ms; mode {last['mode']}; telemetry "
                  f"{last['telemetry_collectors']} ({last['telemetry_points']} points, "
                  f"errors {last['telemetry_errors']}, thread CPU share "
                  f"{_pct(r['telemetry_thread_cpu_share'])}); "
                  f"{last['points']} watcher points, {last['hook_errors']} hook errors, "
                  f"written {last['written']}", file=sys.stderr)
            figures.append(figure(
                "overhead", f"overhead_every{every}", r["ratio"], "ratio", "lower",
                compared_with="bare loop in its own process (no provscope), blocks "
                              f"of {args.block} steps alternating ABBA",
                instrumented_total_s=round(r["inst_total_s"], 4),
                bare_total_s=round(r["bare_total_s"], 4),
                median_step_ratio=round(r["median_step_ratio"], 4),
                sampled_step_s=_round(r["sampled_step_s"]),
                sampled_step_ratio=_round(r["sampled_step_ratio"], 4),
                bare_median_step_s=round(r["bare_median_s"], 6),
                main_thread_cpu_ratio=round(r["cpu_ratio"], 4),
                block_ratio_p10_p90=r["block_ratio_p10_p90"],
                exit_flush_s=round(r["exit_flush_s"], 4),
                telemetry_thread_cpu_share=_round(r["telemetry_thread_cpu_share"], 6),
                device=args.device, steps=steps, pairs=pairs,
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
