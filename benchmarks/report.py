"""Report speed: `provscope report` of a 30-minute run, from the embedded store.

The run is synthesised into a fresh embedded SQLite file the way provscope records a
real one: node series at 1 Hz for 30 minutes (cpu, memory, disk, and 8 GPUs), one
``train`` point per step (3 steps/s: 5,400 steps of loss, lr, grad_norm, throughput and
step time), layer statistics every 10 steps (24 layers, 9 fields), and the lineage of the
run (epochs, sampled step tasks, an eval task per epoch, a dataset used, checkpoints
produced). The figure ``report_render_s`` is the wall time of the whole command, as a
user runs it (``python -m provscope.cli report RUN_ID -o report.html`` in a new process:
interpreter start, imports, reads, drawing, writing); the split between gathering and
drawing, measured in this process, is printed beside it. Best of ``--repeat`` runs.

Usage: python benchmarks/report.py [--quick] [--minutes M] [--repeat N]
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
from provscope.exporters.embedded import EmbeddedPointsExporter
from provscope.exporters.lineage.store import SqlLineageStore
from provscope.exporters.pipeline import Pipeline

from provscope import report
from provscope.config import load_config
from provscope.ids import new_id
from provscope.records import EntityRecord, Point, RelationRecord, RunRecord, TaskRecord

SEC = 1_000_000_000
LAYER_FIELDS = ("activation_mean", "activation_std", "activation_abs_max",
                "activation_zero_fraction", "forward_seconds", "backward_seconds",
                "grad_norm", "weight_norm", "update_ratio")


def synthesise(path: Path, minutes: float, host: str = "gpu-node-01") -> tuple[str, dict]:
    """Write one run of ``minutes`` into the embedded file at ``path``; its id and counts."""
    config = load_config(overrides={"embedded.path": str(path)}, environ={})
    seconds = int(minutes * 60)
    start = time.time_ns() - (seconds + 60) * SEC
    end = start + seconds * SEC
    run_id = new_id()
    steps = seconds * 3
    points: list[Point] = []
    for s in range(seconds):  # node series at 1 Hz
        t = start + s * SEC
        points.append(Point("cpu", {"host": host}, {
            "usage_percent": 60 + 20 * math.sin(s / 60), "user_percent": 50.0,
            "system_percent": 8.0, "iowait_percent": 2.0, "idle_percent": 40.0,
            "load1": 12.0, "load5": 11.0, "load15": 10.0}, t))
        points.append(Point("memory", {"host": host}, {
            "used_percent": 40 + s / seconds * 10, "used_bytes": 2e11, "available_bytes": 3e11,
            "total_bytes": 5e11}, t))
        points.append(Point("disk", {"host": host, "device": "nvme0n1"}, {
            "read_bytes_total": 2e8 * s, "written_bytes_total": 1e7 * s,
            "reads_total": 1000.0 * s, "writes_total": 100.0 * s}, t))
        for g in range(8):
            points.append(Point("gpu", {"host": host, "gpu": str(g)}, {
                "utilization_percent": 85 + 10 * math.sin(s / 30 + g),
                "memory_used_bytes": 6e10, "memory_total_bytes": 8e10, "power_watts": 550.0,
                "energy_joules_total": 550.0 * s, "temperature_celsius": 65.0,
                "sm_clock_hertz": 1.98e9}, t))
    for step in range(steps):  # one train point per step
        t = start + int(step / steps * seconds * SEC)
        points.append(Point("train", {"run_id": run_id, "host": host, "rank": "0"}, {
            "step": step, "epoch": step // 900, "loss": 4.0 / (1 + step / 500),
            "lr": 3e-4, "grad_norm": 1.0 / (1 + step / 1000),
            "tokens_per_second": 5e5 + 1e4 * math.sin(step / 50),
            "samples_per_second": 244.0, "step_time_seconds": 0.33}, t))
        if step % 10 == 0:  # layer statistics every 10 steps
            for i in range(24):
                layer = f"blocks.{i // 2}.{'attn' if i % 2 else 'mlp'}"
                points.append(Point("layer", {"run_id": run_id, "host": host, "rank": "0",
                                              "layer": layer},
                                    {"step": step, **{f: (i + 1) * 1e-3 * (1 + step / steps)
                                                      for f in LAYER_FIELDS}}, t + i))
    with Pipeline([EmbeddedPointsExporter.from_config(config)]) as pipeline:
        for i in range(0, len(points), 5000):
            pipeline.submit_many(points[i:i + 5000])
            pipeline.flush(60)
        assert pipeline.flush(120)

    store = SqlLineageStore(config.lineage_url)
    data, ckpt = new_id(), new_id()
    records: list = [RunRecord(run_id, name="llm-pretrain", status="finished", host=host,
                               user="bench", start_ns=start, end_ns=end,
                               command="torchrun train.py --lr 3e-4",
                               code={"commit": "a" * 40, "dirty": False},
                               config={"lr": 3e-4, "layers": 12},
                               environment={"python": "3.11.7", "packages": {"torch": "2.13"}}),
                     EntityRecord(data, "dataset", uri="file:///data/tokens.bin",
                                  digest="sha256:" + "b" * 64, size_bytes=10**11),
                     RelationRecord("used", run_id, data, run_id=run_id)]
    epochs = steps // 900
    for e in range(epochs):
        ep = new_id()
        e0 = start + e * 300 * SEC
        records.append(TaskRecord(ep, run_id, name=f"epoch {e}", task_kind="epoch",
                                  start_ns=e0, end_ns=e0 + 290 * SEC, status="finished",
                                  host=host, rank=0,
                                  resources={"cpu_seconds": 2000.0, "gpu_seconds": 8 * 290.0,
                                             "gpu_energy_joules": 8 * 290 * 550.0,
                                             "read_bytes": 6 * 10**10, "peak_rss_bytes": 5 << 30}))
        for k in range(0, 900, 100):  # sampled step tasks
            s0 = e0 + int(k / 3 * SEC)
            records.append(TaskRecord(new_id(), run_id, parent_task_id=ep, name=f"step {k}",
                                      task_kind="step", start_ns=s0, end_ns=s0 + SEC // 3,
                                      status="finished", host=host, rank=0))
        records.append(TaskRecord(new_id(), run_id, name="eval", task_kind="eval",
                                  start_ns=e0 + 290 * SEC, end_ns=e0 + 300 * SEC,
                                  status="finished", host=host, rank=0))
    records += [EntityRecord(ckpt, "checkpoint", uri="file:///ckpt/final.pt", run_id=run_id,
                             size_bytes=2 * 10**9),
                RelationRecord("generated", run_id, ckpt, run_id=run_id)]
    store.write(records)
    store.close()
    return run_id, {"points": len(points), "tasks": sum(isinstance(r, TaskRecord)
                                                         for r in records)}


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=None, help="run length (default 30)")
    p.add_argument("--repeat", type=int, default=None, help="best of N (default 3)")
    args = p.parse_args()
    minutes = args.minutes or (5.0 if args.quick else 30.0)
    repeat = args.repeat or (1 if args.quick else 3)
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="provscope-report-bench-") as tmp:
        db = Path(tmp) / "provscope.db"
        t0 = time.perf_counter()
        run_id, counts = synthesise(db, minutes)
        print(f"# synthesised {minutes:g} min: {counts['points']} points, "
              f"{counts['tasks']} tasks in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        out = Path(tmp) / "report.html"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROVSCOPE_")}
        env["PROVSCOPE_EMBEDDED_PATH"] = str(db)
        env["PYTHONPATH"] = str(root)
        walls = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "provscope.cli", "report", run_id, "-o",
                            str(out), "--no-progress"], check=True, env=env, cwd=tmp,
                           stdout=subprocess.DEVNULL)
            walls.append(time.perf_counter() - t0)
        config = load_config(overrides={"embedded.path": str(db)}, environ={})
        t0 = time.perf_counter()
        data = report.gather([run_id], config=config)
        gather_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        text = report.render(data, config=config)
        render_s = time.perf_counter() - t0
        print(f"# in process: gather {gather_s:.2f} s, draw {render_s:.2f} s, "
              f"{len(text) / 1024:.0f} KiB", file=sys.stderr)
        _common.emit([_common.figure("report", "report_render_s", min(walls), "s", "lower",
                                     minutes=minutes, points=counts["points"],
                                     gather_s=round(gather_s, 3), draw_s=round(render_s, 3),
                                     html_kib=round(len(text) / 1024))])


if __name__ == "__main__":
    main()
