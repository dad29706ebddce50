"""Peak memory that ``watch(every=1)`` adds to a bf16 model's training step.

Workload (fixed by the issue): a bf16 MLP of 24 blocks of ``Linear(1024, 1024)`` +
``GELU`` (about 48 MiB of parameters), batch 256 (``--quick``: 32, and 2 measured steps),
plain SGD (no optimizer state), inside
``provscope.workflow`` (the default embedded store in a temporary directory, no agent
reached). Two fresh processes train it the same way; one also calls
``provscope.watch(model, every=1, optimizer=opt)``, so every step is a sampled step. Each
process imports the same modules, trains two warm-up steps, resets its peak resident set
(``/proc/self/clear_refs``), trains the measured steps and reads its peak (``VmHWM``).
glibc's malloc is given a fixed mmap threshold in both (``MALLOC_MMAP_THRESHOLD_``), so
that freed tensors leave the resident set alike in both processes.

Figure ``watch_peak_added_bytes``: peak with watch - peak without, beside the limit the
issue sets: 5 % of the parameter bytes + 64 MiB. ``--device cuda`` measures
``torch.cuda.max_memory_allocated`` instead (CPU peak not read).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import emit, figure, parser

BLOCKS, WIDTH, BATCH = 24, 1024, 256
HERE = Path(__file__).resolve().parent


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(mode: str, steps: int, device: str, db: str, batch: int) -> dict:
    import torch
    from torch import nn

    import provscope
    from provscope.pytorch.watch import watch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(BLOCKS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.GELU()]
    model = nn.Sequential(*layers).to(device=device, dtype=torch.bfloat16)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randn(batch, WIDTH, device=device, dtype=torch.bfloat16)
    cuda = device == "cuda"

    def step() -> None:
        loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    settings = {"embedded.path": db, "agent.socket_path": db + ".no-agent.sock",
                "client.telemetry": False}
    with provscope.workflow(f"memory-{mode}", settings=settings):
        w = watch(model, every=1, optimizer=opt) if mode == "watch" else None
        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_peak()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _peak_rss()
        stats = w.stats() if w is not None else {}
    return {"mode": mode, "peak_bytes": peak, "param_bytes": param_bytes,
            "sampled_steps": stats.get("sampled_steps"), "hook_errors": stats.get("hook_errors")}


def run(mode: str, steps: int, device: str, batch: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVSCOPE_")}
    env["MALLOC_MMAP_THRESHOLD_"] = str(256 * 1024)
    db = str(Path(tempfile.mkdtemp(prefix="provscope-memory-")) / "provscope.db")
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", mode,
                          "--steps", str(steps), "--device", device, "--db", db,
                          "--batch", str(batch)],
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{mode} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--worker", choices=["bare", "watch"], help=None)
    p.add_argument("--db", help=None)
    args = p.parse_args()
    steps = args.steps or (2 if args.quick else 10)
    batch = args.batch or (32 if args.quick else BATCH)
    if args.worker:
        print(json.dumps(worker(args.worker, steps, args.device, args.db, batch)))
        return
    bare = run("bare", steps, args.device, batch)
    watched = run("watch", steps, args.device, batch)
    if watched["hook_errors"] or watched["sampled_steps"] != steps + 2:
        raise SystemExit(f"watcher did not sample every step: {watched}")
    added = watched["peak_bytes"] - bare["peak_bytes"]
    limit = watched["param_bytes"] // 20 + 64 * 2**20
    print(f"# parameters {watched['param_bytes'] / 2**20:.1f} MiB; peak without watch "
          f"{bare['peak_bytes'] / 2**20:.1f} MiB, with watch(every=1) "
          f"{watched['peak_bytes'] / 2**20:.1f} MiB: +{added / 2**20:.1f} MiB "
          f"(limit {limit / 2**20:.1f} MiB)", file=sys.stderr)
    emit([figure("memory", "watch_peak_added_bytes", added, "bytes", "lower",
                 baseline="limit: 5% of parameter bytes + 64 MiB", baseline_value=limit,
                 device=args.device, param_bytes=watched["param_bytes"],
                 peak_bare_bytes=bare["peak_bytes"], peak_watch_bytes=watched["peak_bytes"],
                 steps=steps, batch=batch)])


if __name__ == "__main__":
    main()
