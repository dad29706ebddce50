"""GPU check: provscope's GPU paths on real hardware, in one run of under 5 minutes.

Run it from a checkout on a machine with an NVIDIA GPU, torch (CUDA build) and
nvidia-ml-py installed::

    python benchmarks/gpu_check.py                 # every check
    python benchmarks/gpu_check.py --only overhead,memory
    python benchmarks/gpu_check.py --cpu-dry-run   # the script's own paths, tiny sizes, CPU

It prints one JSON object per line on stdout, one per check, as soon as the check ends:
``{"check": NAME, "ok": true|false|null, "seconds": ..., ...}``. ``ok`` null means the
check did not run here (``skipped`` says why: one GPU, a dry run, the time budget). Where
a check is a figure, its line is also a ``benchmarks/_common.figure`` object (``bench``,
``metric``, ``value``, ``unit``, ``better``, ``baseline``...). A check that fails is
reported (``ok`` false, ``error`` when it raised), never raised: the exit status is 0
unless the script itself crashes. With no CUDA device the only line is
``{"check": "gpu", "ok": false, "reason": "no CUDA device"}`` and the exit status is 0.

Checks (docs/BENCHMARKS.md, "GPU check", says what each line means and the targets):

``gpu``                the devices, torch, CUDA and driver versions.
``nvml_collector``     the agent's NVML collector in this process on the idle GPUs: the
                       fields of each measurement with their Python types (against the
                       catalogue's dtype), median ``collect()`` time in ms, ``gpu_up``,
                       the decoded clock-event (throttle) reasons at idle, whether Xid
                       events, GPM metrics and MIG devices are available.
``memory``             peak ``torch.cuda.max_memory_allocated`` of a bf16 decoder-only
                       transformer (8 layers, d_model 1024, vocab 32k, seq 512, batch 8,
                       AdamW) trained bare, then with ``watch(model, every=1,
                       optimizer=opt)``: the bytes ``watch`` adds, against the limit
                       5 % of the parameter bytes + 64 MiB.
``overhead_every10``,  total-time ratio of the instrumented loop (``workflow`` + ``watch``
``overhead_every1``    + ``run.steps`` + ``run.log``, the default pipeline and in-job
                       telemetry) over the bare loop, same model, each loop in its own
                       process, blocks of 10 steps in ABBA order, the device synchronised
                       at each block's start and end (never per step). Targets <= 1.01
                       and <= 1.05.
``compile``            ``model.compile()`` of a smaller model of the same kind, trained
                       watched (``every=2``, so sampled and unsampled steps alternate) and
                       unwatched: dynamo's counters (frames compiled, graphs, graph breaks,
                       recompiles) after warm-up and after 50 more steps; equal, and the
                       watched equal to the unwatched.
``gradscaler``         fp16 autocast with ``torch.amp.GradScaler``, one forced overflow:
                       the ``train`` point of that step says ``optimizer_step_skipped`` = 1
                       (needs ``watch(..., scaler=scaler)``; reported as not available when
                       ``watch`` has no such parameter).
``gpu_process``        ``provscope agent`` started on a private socket and store; while the
                       job trains, the agent watches the job's PID and writes
                       ``gpu_process`` points for the job's run.
``energy_by_uuid``     with two GPUs or more: a task's ``gpu_energy_joules`` under
                       ``CUDA_VISIBLE_DEVICES=1`` equals the NVML energy counter delta of
                       that GPU found by UUID, within 5 %; one GPU: skipped.

Everything the checks write (embedded stores, the agent's socket and lock, spool and
state directories, compile caches) lives in one temporary directory, removed at the end;
``PROVSCOPE_*`` variables are ignored, so no user setting, directory or running agent is
touched.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import figure

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: In the order they run: the ones whose time is least certain (inductor's cold compile)
#: last, so that a spent time budget costs the fewest checks.
CHECKS = ("nvml_collector", "memory", "overhead", "gradscaler", "gpu_process", "compile",
          "energy_by_uuid")
#: Fixed workspace the memory must-reach allows beside 5 % of the parameter bytes.
WORKSPACE_BYTES = 64 * 2**20
OVERHEAD_TARGETS = {10: 1.01, 1: 1.05}
ENERGY_TOLERANCE = 0.05
#: Protocol lines between this script and its worker processes start with this.
TAG = "@@ "


@dataclass(frozen=True)
class LMConfig:
    """Sizes of the decoder-only transformer LM."""

    vocab: int
    d_model: int
    layers: int
    heads: int
    ffn: int
    seq: int
    batch: int


#: The issue's model: about 167 M parameters, 334 MB in bf16.
FULL = LMConfig(vocab=32_000, d_model=1024, layers=8, heads=16, ffn=4096, seq=512, batch=8)
#: The compile and GradScaler checks: the same kind of model, smaller, so that inductor's
#: two cold compiles stay within the time budget.
SMALL = LMConfig(vocab=32_000, d_model=512, layers=2, heads=8, ffn=2048, seq=256, batch=8)
#: ``--cpu-dry-run``: tiny, to run the script's own code paths on a CPU.
TINY = LMConfig(vocab=256, d_model=32, layers=2, heads=2, ffn=64, seq=16, batch=4)


# ----------------------------------------------------------------------------- pure helpers


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as None and tuples/sets as lists (valid JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return [jsonable(v) for v in sorted(value, key=str)]
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def check_line(check: str, ok: bool | None, **extra: Any) -> dict[str, Any]:
    """One result line: ``{"check": check, "ok": ok, **extra}``."""
    return {"check": check, "ok": ok, **extra}


def figure_line(check: str, ok: bool | None, metric: str, value: float, unit: str,
                better: str, **extra: Any) -> dict[str, Any]:
    """A result line that is also a ``_common.figure`` (bench ``gpu_check``)."""
    return {"check": check, "ok": ok, **figure("gpu_check", metric, value, unit, better,
                                                **extra)}


def field_types(points: Iterable[Any]) -> dict[str, dict[str, str]]:
    """{measurement: {field: Python type name(s) seen, ``|``-joined}} of some points."""
    seen: dict[str, dict[str, set[str]]] = {}
    for p in points:
        fields = seen.setdefault(p.measurement, {})
        for name, value in p.fields.items():
            fields.setdefault(name, set()).add(type(value).__name__)
    return {m: {f: "|".join(sorted(t)) for f, t in sorted(fs.items())}
            for m, fs in sorted(seen.items())}


def type_problems(types: Mapping[str, Mapping[str, str]],
                  specs: Iterable[Any]) -> dict[str, list[str]]:
    """Emitted fields the catalogue does not know (``uncatalogued``) and fields whose Python
    type is not the catalogue's ``dtype`` (``wrong_type``: int fields must be int, float
    fields float), as ``measurement.field`` names."""
    want = {(s.measurement, s.field): s.dtype for s in specs}
    expect = {"int": {"int"}, "float": {"float"}, "bool": {"bool", "int"}, "str": {"str"}}
    unknown, wrong = [], []
    for meas, fields in types.items():
        for name, tnames in fields.items():
            dtype = want.get((meas, name))
            if dtype is None:
                unknown.append(f"{meas}.{name}")
            elif not set(tnames.split("|")) <= expect.get(dtype, {dtype}):
                wrong.append(f"{meas}.{name}: {tnames}, catalogue {dtype}")
    return {"uncatalogued": unknown, "wrong_type": wrong}


def memory_verdict(peak_bare: int, peak_watch: int, param_bytes: int,
                   workspace: int = WORKSPACE_BYTES) -> dict[str, Any]:
    """Bytes ``watch`` adds to the peak, the must-reach limit (5 % of the parameter bytes +
    the workspace) and whether it is met."""
    added = int(peak_watch) - int(peak_bare)
    limit = int(0.05 * param_bytes) + int(workspace)
    return {"added_bytes": added, "limit_bytes": limit, "ok": added <= limit}


def overhead_summary(bare_s: Sequence[float], inst_s: Sequence[float]) -> dict[str, Any]:
    """Total-time ratio of paired blocks (instrumented / bare), the median and the p10/p90
    of the per-block ratios."""
    if len(bare_s) != len(inst_s) or not bare_s or sum(bare_s) <= 0:
        raise ValueError("overhead_summary: needs the same number (> 0) of bare and "
                         "instrumented block times")
    blocks = [i / b for b, i in zip(bare_s, inst_s, strict=True) if b > 0]
    q = statistics.quantiles(blocks, n=10) if len(blocks) >= 2 else None
    return {"ratio": sum(inst_s) / sum(bare_s), "bare_total_s": sum(bare_s),
            "inst_total_s": sum(inst_s), "median_block_ratio": statistics.median(blocks),
            "block_ratio_p10_p90": [q[0], q[-1]] if q else None}


def dynamo_counts(counters: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """The figures of ``torch._dynamo.utils.counters`` that grow on each (re)compile.
    Reads with ``get`` so the defaultdict gains no keys."""
    def group(name: str) -> Mapping[str, int]:
        return counters.get(name) or {}

    return {"frames_total": int(group("frames").get("total", 0)),
            "frames_ok": int(group("frames").get("ok", 0)),
            "unique_graphs": int(group("stats").get("unique_graphs", 0)),
            "graph_breaks": int(sum(group("graph_break").values())),
            "recompiles": int(sum(group("recompiles").values()))}


def rows_by_step(frame: Any) -> dict[int, dict[str, Any]]:
    """A long-format ``query.points`` frame of ``train`` points as {step: {field: value}}
    (string fields from ``str_value``); points without a ``step`` field are left out."""
    import pandas as pd

    by_time: dict[int, dict[str, Any]] = {}
    for row in frame.itertuples(index=False):
        value = row.value
        if pd.isna(value):
            text = getattr(row, "str_value", None)
            value = None if text is None or pd.isna(text) else text
        by_time.setdefault(int(row.time_ns), {})[str(row.field)] = value
    out: dict[int, dict[str, Any]] = {}
    for fields in by_time.values():
        step = fields.get("step")
        if isinstance(step, int | float) and math.isfinite(step):
            out.setdefault(int(step), {}).update(fields)
    return out


def skip_verdict(flags: Mapping[int, Any], truth: Iterable[int],
                 forced: int) -> dict[str, Any]:
    """Compare the ``optimizer_step_skipped`` flags of the train points ({step: value or
    None}) with the steps the scaler really skipped (its scale went down)."""
    truth = sorted(set(truth))
    flagged = sorted(s for s, v in flags.items() if v is not None and float(v) >= 1)
    missing = [s for s in truth if s not in flags]
    return {"forced_step": forced, "skipped_steps": truth, "flagged_steps": flagged,
            "steps_without_point": missing,
            "ok": forced in truth and flagged == truth and not missing}


def relative_error(value: float | None, reference: float | None) -> float | None:
    """``|value - reference| / reference``; None when either is missing or the reference
    is not positive."""
    if value is None or reference is None or not reference > 0:
        return None
    return abs(float(value) - float(reference)) / float(reference)


# ----------------------------------------------------------------------------- isolation


def isolate(tmp: Path) -> None:
    """Point every place provscope or torch would write outside the checkout at ``tmp``
    and drop the ``PROVSCOPE_*`` variables (settings come from the checks alone). Child
    processes inherit this environment."""
    for key in [k for k in os.environ if k.startswith("PROVSCOPE_")]:
        del os.environ[key]
    for var, sub in (("XDG_STATE_HOME", "state"), ("XDG_RUNTIME_DIR", "run"),
                     ("XDG_CACHE_HOME", "cache"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
                     ("TRITON_CACHE_DIR", "triton")):
        path = tmp / sub
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.environ[var] = str(path)
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(REPO) + (os.pathsep + path if path else "")


def settings_for(tmp: Path, name: str, **more: Any) -> dict[str, Any]:
    """``workflow(settings=...)`` of one check: its own embedded file, and an agent socket
    where no agent listens (unless ``more`` names one)."""
    out: dict[str, Any] = {"embedded.path": str(tmp / f"{name}.db"),
                           "agent.socket_path": str(tmp / "no-agent" / "agent.sock"),
                           "influxdb.spool_dir": str(tmp / "spool")}
    out.update(more)
    return out


def store_config(db: Path) -> Any:
    from provscope.config import load_config

    return load_config(overrides={"embedded.path": str(db)}, environ={})


# ----------------------------------------------------------------------------- the model


def build_lm(cfg: LMConfig, device: str, dtype: Any = None, seed: int = 0
             ) -> tuple[Any, Any, Any]:
    """(model, AdamW, 4 batches of token ids) of a decoder-only LM built from
    ``nn.TransformerEncoderLayer`` (pre-norm, GELU) with a causal mask."""
    import torch
    from torch import nn

    class DecoderLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
            self.pos = nn.Embedding(cfg.seq, cfg.d_model)
            layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, cfg.ffn, dropout=0.0,
                                               activation="gelu", batch_first=True,
                                               norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(cfg.d_model)
            self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
            # A boolean causal mask (True: masked): attention converts it to the query's
            # dtype, so it fits bf16 weights and fp16 autocast alike.
            causal = torch.ones(cfg.seq, cfg.seq, dtype=torch.bool).triu(1)
            self.register_buffer("mask", causal, persistent=False)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(tokens.shape[1], device=tokens.device)
            h = self.embed(tokens) + self.pos(pos)
            h = self.blocks(h, mask=self.mask, is_causal=True)
            return self.head(self.norm(h))

    torch.manual_seed(seed)
    model = DecoderLM().to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.randint(0, cfg.vocab, (4, cfg.batch, cfg.seq + 1), device=device)
    return model, opt, data


def lm_loss(model: Any, batch: Any, vocab: int) -> Any:
    import torch.nn.functional as F

    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))


def train_step(model: Any, opt: Any, batch: Any, vocab: int) -> Any:
    """One plain step; returns the detached loss (no host sync)."""
    opt.zero_grad(set_to_none=True)
    loss = lm_loss(model, batch, vocab)
    loss.backward()
    opt.step()
    return loss.detach()


def param_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- context


@dataclass
class Ctx:
    """What every check needs."""

    tmp: Path
    device: str  # "cuda" or "cpu" (dry run)
    dry: bool
    steps: int  # timed steps per loop and phase of the overhead check
    block: int
    agent_seconds: float
    compile_backend: str
    lm: LMConfig
    small: LMConfig

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def dtype(self) -> Any:
        import torch

        return torch.bfloat16 if self.cuda else torch.float32


# ----------------------------------------------------------------------------- 1: NVML


def check_nvml(ctx: Ctx) -> list[dict[str, Any]]:
    """The agent's NVML collector in this process: fields and types, collect() time,
    gpu_up, decoded clock-event reasons at idle, Xid/GPM/MIG availability."""
    from provscope.agent.collectors.nvml import CLOCK_EVENT_REASONS, NvmlCollector

    from provscope.errors import CollectorUnavailable

    collector = NvmlCollector(host="gpu-check")
    try:
        collector.open()
    except CollectorUnavailable as exc:
        if ctx.dry:
            return [check_line("nvml_collector", None, skipped="dry run on the CPU",
                               reason=str(exc))]
        return [check_line("nvml_collector", False, reason=str(exc))]
    samples = 20
    times_ms: list[float] = []
    points: list[Any] = []
    try:
        for _ in range(samples):
            t0 = time.perf_counter()
            pts = list(collector.collect(time.time_ns()))
            times_ms.append((time.perf_counter() - t0) * 1e3)
            points.extend(pts)
            time.sleep(0.1)  # GPM metrics are rates over the time between two samples
        xid = getattr(collector, "_xid", None)
        xid_registered = sorted(xid.registered) if xid is not None else []
        uuids = collector.device_uuids
    finally:
        collector.close()
    types = field_types(points)
    problems = type_problems(types, collector.specs())
    gpu_points = [p for p in points if p.measurement == "gpu"]
    last: dict[str, dict[str, Any]] = {}
    for p in gpu_points:
        last[p.tags.get("gpu_uuid") or p.tags.get("gpu", "?")] = p.fields
    reason_names = [name for name, _, _ in CLOCK_EVENT_REASONS]
    idle = {uuid: {"throttle_reasons": f.get("throttle_reasons"),
                   "throttled": f.get("throttled"),
                   "reasons": [n for n in reason_names if f.get(n) == 1]}
            for uuid, f in last.items()}
    ups = {uuid: f.get("up") for uuid, f in last.items()}
    gpm_fields = ("sm_active_percent", "sm_occupancy_percent", "tensor_active_percent",
                  "dram_active_percent", "gr_engine_active_percent")
    gpm = sorted({k for p in gpu_points for k in p.fields if k in gpm_fields})
    mig_points = [p for p in points if p.measurement == "gpu_mig"]
    steady = times_ms[1:] or times_ms
    ok = bool(ups) and all(v == 1 for v in ups.values()) and not problems["wrong_type"] \
        and not problems["uncatalogued"]
    return [figure_line(
        "nvml_collector", ok, "collect_ms_median", statistics.median(steady), "ms", "lower",
        collect_ms_first=round(times_ms[0], 3), collect_ms_max=round(max(steady), 3),
        samples=samples, gpus=len(uuids), gpu_up=ups, idle_clock_events=idle,
        xid_events={"available": bool(xid_registered), "gpus": len(xid_registered)},
        gpm={"available": bool(gpm), "fields": gpm},
        mig={"available": bool(mig_points), "instances":
             len({p.tags.get("mig_uuid") for p in mig_points})},
        fields_per_point={m: len(f) for m, f in types.items()},
        field_types=types, **problems)]


# ----------------------------------------------------------------------------- 2: memory


def check_memory(ctx: Ctx) -> list[dict[str, Any]]:
    """Peak CUDA memory of the bf16 LM trained bare, then with watch(every=1)."""
    if not ctx.cuda:
        return [check_line("memory", None, skipped="dry run on the CPU: "
                           "torch.cuda.max_memory_allocated needs a GPU")]
    import torch

    import provscope

    cfg = ctx.lm
    model, opt, data = build_lm(cfg, ctx.device, torch.bfloat16)
    steps = 10
    for i in range(3):  # AdamW state, cuBLAS workspaces, allocator pools
        train_step(model, opt, data[i % 4], cfg.vocab)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        train_step(model, opt, data[i % 4], cfg.vocab)
    torch.cuda.synchronize()
    peak_bare = torch.cuda.max_memory_allocated()
    with provscope.workflow("gpu-check-memory", settings=settings_for(ctx.tmp, "memory")) as run:
        watcher = provscope.watch(model, every=1, optimizer=opt)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for step, _ in run.steps(range(steps)):
            run.log(loss=train_step(model, opt, data[step % 4], cfg.vocab))
        torch.cuda.synchronize()
        peak_watch = torch.cuda.max_memory_allocated()
        stats = watcher.stats()
        watcher.unwatch()
    torch.cuda.synchronize()
    retained = torch.cuda.memory_allocated() - base
    pbytes = param_bytes(model)
    del model, opt, data
    free_cuda()
    verdict = memory_verdict(peak_bare, peak_watch, pbytes)
    return [figure_line(
        "memory", verdict["ok"] and stats["sampled_steps"] >= steps and stats["hook_errors"] == 0,
        "watch_peak_added_bytes",
        verdict["added_bytes"], "bytes", "lower",
        baseline="limit: 5 % of parameter bytes + 64 MiB",
        baseline_value=verdict["limit_bytes"], peak_bare_bytes=peak_bare,
        peak_watch_bytes=peak_watch, parameter_bytes=pbytes,
        allocated_after_unwatch_bytes=retained, steps=steps, model=asdict(cfg),
        dtype="bfloat16", watcher=stats)]


# ----------------------------------------------------------------------------- 3: overhead


class Worker:
    """A worker process of this script, spoken to in lines (``TAG``-prefixed replies)."""

    def __init__(self, args: list[str], name: str, cwd: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, bufsize=1, cwd=str(cwd),
            env=dict(env) if env is not None else None)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"gpu-check-{name}", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(TAG):
                self._lines.put(line[len(TAG):].rstrip("\n"))
            else:  # a library printing to stdout: keep it out of the JSON lines
                print(f"# {self.name}: {line.rstrip()}", file=sys.stderr)
        self._lines.put(None)

    def ask(self, command: str | None, expect: str, timeout_s: float = 300.0) -> str:
        """Send ``command`` (None: just wait) and return the rest of the reply that starts
        with ``expect``. Raises RuntimeError when the worker dies, answers otherwise or
        takes longer than ``timeout_s``."""
        if command is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"{self.name} worker: no answer to {command!r} in "
                               f"{timeout_s:.0f} s") from None
        if line is None:
            self.proc.wait(30)
            raise RuntimeError(f"{self.name} worker exited ({self.proc.returncode}) "
                               f"before answering {command!r}")
        word, _, rest = line.partition(" ")
        if word != expect:
            raise RuntimeError(f"{self.name} worker: expected {expect!r}, got {line!r}")
        return rest

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def check_overhead(ctx: Ctx) -> list[dict[str, Any]]:
    """Total-time ratio, instrumented over bare, every 10 steps and every step."""
    common = ["--device", ctx.device, "--tmp", str(ctx.tmp)] + (["--cpu-dry-run"] if ctx.dry
                                                                 else [])
    workers = {kind: Worker(["--worker", f"overhead-{kind}", *common], f"overhead-{kind}",
                            ctx.tmp)
               for kind in ("bare", "inst")}
    out: list[dict[str, Any]] = []
    try:
        for w in workers.values():
            w.ask(None, "ready", timeout_s=600)
        blocks = max(2, -(-ctx.steps // ctx.block))
        for every in (10, 1):
            for w in workers.values():
                w.ask(f"phase {every} {max(ctx.block, 5)}", "ok")
            times: dict[str, list[float]] = {"bare": [], "inst": []}
            sampled = 0
            for j in range(blocks):
                for kind in (("bare", "inst") if j % 2 == 0 else ("inst", "bare")):
                    seconds, hit = workers[kind].ask(f"block {ctx.block}", "t").split()
                    times[kind].append(float(seconds))
                    sampled += int(hit)
            stats = json.loads(workers["inst"].ask("end", "stats"))
            workers["bare"].ask("end", "stats")
            s = overhead_summary(times["bare"], times["inst"])
            target = OVERHEAD_TARGETS[every]
            ok = None if ctx.dry else s["ratio"] <= target and stats.get("hook_errors") == 0 \
                and sampled > 0
            extra = {"skipped": "dry run on the CPU: the figure is not the GPU's"} if ctx.dry \
                else {}
            out.append(figure_line(
                f"overhead_every{every}", ok, f"overhead_every{every}", s["ratio"], "ratio",
                "lower", baseline="target", baseline_value=target,
                compared_with="bare loop in its own process; blocks of "
                              f"{ctx.block} steps, ABBA, device synchronised per block",
                instrumented_total_s=round(s["inst_total_s"], 4),
                bare_total_s=round(s["bare_total_s"], 4),
                median_block_ratio=round(s["median_block_ratio"], 4),
                block_ratio_p10_p90=[round(x, 4) for x in s["block_ratio_p10_p90"] or []],
                bare_step_ms=round(1e3 * s["bare_total_s"] / (blocks * ctx.block), 3),
                steps=blocks * ctx.block, sampled_steps=sampled, device=ctx.device,
                model=asdict(ctx.lm), watcher=stats, **extra))
        done = json.loads(workers["inst"].ask("quit", "bye"))
        workers["bare"].ask("quit", "bye")
        for line in out:
            line["pipeline"] = done
    finally:
        for w in workers.values():
            w.close()
    return out


def overhead_worker(kind: str, ctx: Ctx) -> int:
    """One loop of the overhead check, driven by lines on stdin:
    ``phase EVERY WARMUP`` (instrumented: a new ``watch`` and ``run.steps`` loop), ``block N``
    (N timed steps, device synchronised before and after; answers ``t SECONDS SAMPLED``),
    ``end`` (closes the phase; answers ``stats {...}``), ``quit``."""
    import torch

    cfg = ctx.lm
    model, opt, data = build_lm(cfg, ctx.device, ctx.dtype())
    sync = torch.cuda.synchronize if ctx.cuda else (lambda: None)
    counter = itertools.count()
    for _ in range(3):
        train_step(model, opt, data[next(counter) % 4], cfg.vocab)
    sync()
    stack = contextlib.ExitStack()
    run: Any = None
    loop: Any = None
    watcher: Any = None
    provscope: Any = None
    if kind == "inst":
        import provscope

        run = stack.enter_context(provscope.workflow(
            "gpu-check-overhead", settings=settings_for(ctx.tmp, "overhead")))

    def one() -> None:
        batch = data[next(counter) % 4]
        if loop is None:
            train_step(model, opt, batch, cfg.vocab)
        else:
            next(loop)
            run.log(loss=train_step(model, opt, batch, cfg.vocab))

    _reply("ready")
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "phase":
            every, warmup = int(rest[0]), int(rest[1])
            if run is not None:
                watcher = provscope.watch(model, every=every, optimizer=opt)
                loop = run.steps(itertools.count())
            for _ in range(warmup):
                one()
            sync()
            _reply("ok")
        elif cmd == "block":
            before = watcher.sampled_steps if watcher is not None else 0
            sync()
            t0 = time.perf_counter()
            for _ in range(int(rest[0])):
                one()
            sync()
            elapsed = time.perf_counter() - t0
            after = watcher.sampled_steps if watcher is not None else 0
            _reply(f"t {elapsed!r} {after - before}")
        elif cmd == "end":
            stats: dict[str, Any] = {}
            if watcher is not None:
                loop.close()
                stats = watcher.stats()
                watcher.unwatch()
                loop = watcher = None
            _reply("stats " + json.dumps(jsonable(stats)))
        elif cmd == "quit":
            done: dict[str, Any] = {}
            if run is not None:
                stack.close()
                run.flush(60.0)
                done = {"mode": run.sink_mode, "written": run.written(),
                        "run_errors": run.errors}
            _reply("bye " + json.dumps(jsonable(done)))
            return 0
    return 0


def _reply(text: str) -> None:
    print(TAG + text, flush=True)


# ----------------------------------------------------------------------------- 4: compile


def check_compile(ctx: Ctx) -> list[dict[str, Any]]:
    """Dynamo's counters of a ``model.compile()``d LM, unwatched and watched."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    import provscope

    cfg = ctx.small if not ctx.dry else ctx.lm
    warmup, more, every = 4, 50, 2

    def run_one(watched: bool) -> dict[str, Any]:
        torch._dynamo.reset()
        counters.clear()
        model, opt, data = build_lm(cfg, ctx.device, ctx.dtype())
        model.compile(backend=ctx.compile_backend)
        sync = torch.cuda.synchronize if ctx.cuda else (lambda: None)
        out: dict[str, Any] = {}
        with contextlib.ExitStack() as stack:
            if watched:
                run = stack.enter_context(provscope.workflow(
                    "gpu-check-compile", settings=settings_for(ctx.tmp, "compile")))
                watcher = provscope.watch(model, every=every, optimizer=opt)
                steps = iter(run.steps(itertools.count()))
            t0 = time.perf_counter()
            for i in range(warmup + more):
                if watched:
                    next(steps)
                loss = train_step(model, opt, data[i % 4], cfg.vocab)
                if watched:
                    run.log(loss=loss)
                if i == warmup - 1:
                    sync()
                    out["after_warmup"] = dynamo_counts(counters)
                    out["warmup_s"] = round(time.perf_counter() - t0, 3)
            sync()
            out["after_more"] = dynamo_counts(counters)
            if watched:
                steps.close()
                out["watcher"] = watcher.stats()
                watcher.unwatch()
        del model, opt, data
        free_cuda()
        return out

    bare = run_one(False)
    watched = run_one(True)
    torch._dynamo.reset()
    stable = watched["after_warmup"] == watched["after_more"]
    same = watched["after_more"] == bare["after_more"]
    bare_stable = bare["after_warmup"] == bare["after_more"]
    compiled = bare["after_more"]["frames_ok"] > 0
    # A watcher whose hooks fail records nothing and recompiles nothing: that is no pass.
    ws = watched["watcher"]
    watching = ws["hook_errors"] == 0 and ws["step"] >= warmup + more
    return [check_line(
        "compile", compiled and stable and same and watching,
        no_recompile_after_warmup=stable, same_as_unwatched=same,
        unwatched_stable=bare_stable, compiled=compiled, watcher_healthy=watching,
        backend=ctx.compile_backend, warmup_steps=warmup, more_steps=more, every=every,
        unwatched=bare, watched=watched, model=asdict(cfg))]


# ----------------------------------------------------------------------------- 5: GradScaler


def check_gradscaler(ctx: Ctx) -> list[dict[str, Any]]:
    """One forced overflow under GradScaler: is that step's train point flagged?"""
    import inspect

    import torch

    import provscope
    from provscope import query

    cfg = ctx.small if not ctx.dry else ctx.lm
    has_scaler = "scaler" in inspect.signature(provscope.watch).parameters
    model, opt, data = build_lm(cfg, ctx.device, torch.float32)  # fp32 master weights
    scaler = torch.amp.GradScaler(ctx.device)
    steps, forced = 8, 4
    truth: list[int] = []
    db = ctx.tmp / "gradscaler.db"
    kwargs = {"scaler": scaler} if has_scaler else {}
    with provscope.workflow("gpu-check-gradscaler",
                            settings=settings_for(ctx.tmp, "gradscaler")) as run:
        watcher = provscope.watch(model, every=10, optimizer=opt, **kwargs)
        for step, _ in run.steps(range(steps)):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(ctx.device, dtype=torch.float16):
                loss = lm_loss(model, data[step % 4], cfg.vocab)
            scaler.scale(loss).backward()
            if step == forced:
                next(model.parameters()).grad.fill_(float("inf"))
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            if scaler.get_scale() < before:  # the scaler found inf/NaN: the step was skipped
                truth.append(step)
            run.log(loss=loss.detach())
        stats = watcher.stats()
        watcher.unwatch()
    run.flush(30.0)
    rows = rows_by_step(query.points("train", run_id=run.run_id, config=store_config(db)))
    del model, opt, data
    free_cuda()
    flags = {s: f.get("optimizer_step_skipped") for s, f in rows.items()}
    verdict = skip_verdict(flags, truth, forced)
    fields_at_forced = sorted(rows.get(forced, {}))
    if not has_scaler:
        return [check_line("gradscaler", False, available=False,
                           reason="provscope.watch has no scaler= parameter yet",
                           fields_at_forced_step=fields_at_forced, watcher=stats,
                           **{k: v for k, v in verdict.items() if k != "ok"})]
    return [check_line("gradscaler", verdict["ok"], available=True,
                       fields_at_forced_step=fields_at_forced, watcher=stats,
                       **{k: v for k, v in verdict.items() if k != "ok"})]


# ----------------------------------------------------------------------------- 6: agent


def _nvml_pids(uuids: Iterable[str]) -> dict[str, list[int]]:
    """{GPU UUID: PIDs NVML lists as running compute work on it} (host PIDs)."""
    out: dict[str, list[int]] = {}
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return out
    try:
        for uuid in uuids:
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                out[uuid] = sorted(int(p.pid) for p in procs)
            except Exception as exc:
                out[uuid] = [f"error: {exc}"]  # type: ignore[list-item]
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return out


def _torch_uuids() -> list[str]:
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        uuid = str(torch.cuda.get_device_properties(i).uuid)
        out.append(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    return out


def _wait(pred: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def check_gpu_process(ctx: Ctx) -> list[dict[str, Any]]:
    """``provscope agent`` on a private socket; the job trains on the GPU; the agent's
    ``gpu_process`` points for the job's run, and the PIDs on each side."""
    import provscope
    from provscope import query
    from provscope import wire as framing
    from provscope.wire import request

    sock = ctx.tmp / "agent" / "agent.sock"
    db = ctx.tmp / "agent.db"
    log_path = ctx.tmp / "agent.log"
    cmd = [sys.executable, "-m", "provscope.cli",
           "--set", f"agent.socket_path={sock}", "--set", "prometheus.enabled=false",
           "--set", f"embedded.path={db}", "--set", f"influxdb.spool_dir={ctx.tmp / 'spool'}",
           "--set", "agent.interval_s=0.5", "agent"]
    with open(log_path, "w") as log_file:
        agent = subprocess.Popen(cmd, cwd=str(ctx.tmp), stdout=log_file, stderr=log_file)
    try:
        def answers() -> bool:
            try:
                request(sock, framing.STATUS, None, timeout_s=1.0)
                return True
            except OSError:
                return False

        if not _wait(lambda: agent.poll() is not None or answers(), 90):
            return [check_line("gpu_process", False, reason="the agent did not answer in 90 s",
                               agent_log=_tail(log_path))]
        if agent.poll() is not None:
            return [check_line("gpu_process", False, reason=f"the agent exited "
                               f"({agent.returncode})", agent_log=_tail(log_path))]
        model, opt, data = build_lm(ctx.lm, ctx.device, ctx.dtype())
        settings = {"agent.socket_path": str(sock), "embedded.path": str(db),
                    "client.destination": "agent", "influxdb.spool_dir": str(ctx.tmp / "spool")}
        with provscope.workflow("gpu-check-processes", settings=settings) as run:
            deadline = time.monotonic() + ctx.agent_seconds
            steps = 0
            for step, _ in run.steps(itertools.count()):
                run.log(loss=train_step(model, opt, data[step % 4], ctx.lm.vocab))
                steps += 1
                if time.monotonic() >= deadline:
                    break
            if ctx.cuda:
                import torch

                torch.cuda.synchronize()
            status = request(sock, framing.STATUS, None, timeout_s=5.0)
            nvml_pids = _nvml_pids(_torch_uuids())
            mode = run.sink_mode
        run.flush(30.0)
        del model, opt, data
        free_cuda()
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
    rows = query.points("gpu_process", run_id=run.run_id, config=store_config(db))
    points = rows[rows["field"] == "processes"] if len(rows) else rows
    watched = [w["pid"] for w in status.get("watched") or []]
    pid = os.getpid()
    nvml_all = sorted({p for pids in nvml_pids.values() for p in pids if isinstance(p, int)})
    facts = {
        "job_pid": pid, "agent_watched_pids": watched, "nvml_pids": nvml_pids,
        "job_pid_watched": pid in watched,
        "watched_pid_in_nvml": any(p in nvml_all for p in watched),
        "gpu_process_points": len(points),
        "processes_max": float(points["value"].max()) if len(points) else None,
        "gpus_seen": sorted({t.get("gpu_uuid") for t in points["tags"]}) if len(points) else [],
        "agent_nvml_collector": (status.get("collectors") or {}).get("nvml"),
        "job_sink_mode": mode, "train_steps": steps, "agent_seconds": ctx.agent_seconds,
    }
    if not ctx.cuda:
        return [check_line("gpu_process", None, skipped="dry run on the CPU: no GPU "
                           "process to find", **facts)]
    ok = facts["job_pid_watched"] and facts["gpu_process_points"] > 0 \
        and (facts["processes_max"] or 0) >= 1
    return [check_line("gpu_process", ok, **facts)]


def _tail(path: Path, lines: int = 15) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


# ----------------------------------------------------------------------------- 7: energy


def check_energy(ctx: Ctx) -> list[dict[str, Any]]:
    """A task's energy under ``CUDA_VISIBLE_DEVICES=1`` against the NVML counter of that
    GPU by UUID (two GPUs or more)."""
    if not ctx.cuda:
        return [check_line("energy_by_uuid", None, skipped="dry run on the CPU")]
    try:
        import pynvml

        pynvml.nvmlInit()
        count = int(pynvml.nvmlDeviceGetCount())
        uuid1 = None
        if count >= 2:
            uuid1 = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(1))
            uuid1 = uuid1.decode() if isinstance(uuid1, bytes) else str(uuid1)
        pynvml.nvmlShutdown()
    except Exception as exc:
        return [check_line("energy_by_uuid", False, reason=f"NVML cannot count GPUs ({exc})")]
    if count < 2:
        return [check_line("energy_by_uuid", None, skipped=f"{count} GPU: needs two or more",
                           gpus=count)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="1")
    worker = Worker(["--worker", "energy", "--device", "cuda", "--tmp", str(ctx.tmp)],
                    "energy", ctx.tmp, env=env)
    try:
        result = json.loads(worker.ask(None, "result", timeout_s=300))
    finally:
        worker.close()
    err = relative_error(result.get("task_joules"), result.get("nvml_by_uuid_joules"))
    ok = err is not None and err <= ENERGY_TOLERANCE
    return [figure_line(
        "energy_by_uuid", ok, "task_energy_relative_error", err if err is not None else
        float("nan"), "ratio", "lower", baseline="tolerance", baseline_value=ENERGY_TOLERANCE,
        nvml_index1_uuid=uuid1, cuda_device_uuid=result.get("uuid"),
        same_gpu_as_nvml_index1=result.get("uuid") == uuid1, **result)]


def energy_worker(ctx: Ctx) -> int:
    """Child of ``check_energy``, run under ``CUDA_VISIBLE_DEVICES=1``: a task of GPU
    work, and the NVML energy counters around it (of the GPU found by the UUID torch
    reports, and of NVML index 0, the GPU a CUDA-index lookup would wrongly read)."""
    import pandas as pd
    import pynvml
    import torch

    import provscope
    from provscope import query

    x = torch.randn(8192, 8192, device=ctx.device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    uuid = _torch_uuids()[0]
    pynvml.nvmlInit()
    ref = pynvml.nvmlDeviceGetHandleByUUID(uuid)
    first = pynvml.nvmlDeviceGetHandleByIndex(0)

    def joules(handle: Any) -> float:
        return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)) / 1000.0

    db = ctx.tmp / "energy.db"
    with provscope.workflow("gpu-check-energy", settings=settings_for(ctx.tmp, "energy")) as run:
        ref0, first0 = joules(ref), joules(first)
        with run.task("burn"):
            end = time.monotonic() + 8.0
            while time.monotonic() < end:
                for _ in range(20):
                    x = (x @ x).clamp_(-1, 1)
                torch.cuda.synchronize()
        ref1, first1 = joules(ref), joules(first)
    run.flush(30.0)
    tasks = query.tasks(run.run_id, config=store_config(db))
    burn = tasks[tasks["name"] == "burn"]
    raw = burn["gpu_energy_joules"].iloc[0] if len(burn) else None
    task_j = None if raw is None or pd.isna(raw) else float(raw)
    _reply("result " + json.dumps(jsonable({
        "uuid": uuid, "nvml_index_of_uuid": int(pynvml.nvmlDeviceGetIndex(ref)),
        "task_joules": task_j, "nvml_by_uuid_joules": ref1 - ref0,
        "nvml_index0_joules": first1 - first0})))
    return 0


# ----------------------------------------------------------------------------- driver


RUNNERS: dict[str, Callable[[Ctx], list[dict[str, Any]]]] = {
    "nvml_collector": check_nvml,
    "memory": check_memory,
    "overhead": check_overhead,
    "compile": check_compile,
    "gradscaler": check_gradscaler,
    "gpu_process": check_gpu_process,
    "energy_by_uuid": check_energy,
}


def run_check(name: str, ctx: Ctx) -> list[dict[str, Any]]:
    """Run one check; an exception becomes an ``ok: false`` line with the error (and the
    traceback on stderr). Adds ``seconds``."""
    t0 = time.perf_counter()
    try:
        lines = RUNNERS[name](ctx)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        lines = [check_line(name, False, error=f"{type(exc).__name__}: {exc}")]
    for line in lines:
        line.setdefault("seconds", round(time.perf_counter() - t0, 2))
    return lines


def parse_only(text: str | None) -> list[str]:
    """The checks ``--only`` names (comma-separated), in the script's order. Raises
    ValueError naming an unknown check and the allowed ones."""
    if not text:
        return list(CHECKS)
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in CHECKS]
    if unknown:
        raise ValueError(f"--only: unknown check(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(CHECKS)}")
    return [c for c in CHECKS if c in wanted]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", metavar="CHECKS",
                   help=f"comma-separated checks to run (default all: {', '.join(CHECKS)})")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="timed steps per loop for each overhead figure (default 300)")
    p.add_argument("--agent-seconds", type=float, default=None, metavar="S",
                   help="how long the job trains while the agent watches (default 12)")
    p.add_argument("--budget-s", type=float, default=285.0, metavar="S",
                   help="skip checks not yet started after this many seconds (default 285)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the compile check (default inductor; "
                        "aot_eager in a dry run)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run the checks' code paths on the CPU with a tiny model (no GPU "
                        "figures; for working on this script)")
    p.add_argument("--worker", choices=["overhead-bare", "overhead-inst", "energy"],
                   help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    return p


def make_ctx(args: argparse.Namespace, tmp: Path, device: str) -> Ctx:
    dry = bool(args.cpu_dry_run)
    return Ctx(tmp=tmp, device=device, dry=dry,
               steps=args.steps or (20 if dry else 300), block=5 if dry else 10,
               agent_seconds=args.agent_seconds or (4.0 if dry else 12.0),
               compile_backend=args.compile_backend or ("aot_eager" if dry else "inductor"),
               lm=TINY if dry else FULL, small=TINY if dry else SMALL)


def emit_line(line: Mapping[str, Any]) -> None:
    print(json.dumps(jsonable(line)), flush=True)


def gpu_line(torch: Any) -> dict[str, Any]:
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    driver = None
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        pynvml.nvmlShutdown()
    return check_line("gpu", True, devices=names, torch=torch.__version__,
                      cuda=torch.version.cuda, driver=driver,
                      cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        ctx = make_ctx(args, Path(args.tmp), args.device)
        if args.worker == "energy":
            return energy_worker(ctx)
        return overhead_worker(args.worker.removeprefix("overhead-"), ctx)
    try:
        only = parse_only(args.only)
    except ValueError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        import torch
    except ImportError:
        emit_line(check_line("gpu", False, reason="torch is not installed"))
        return 0
    if args.cpu_dry_run:
        device = "cpu"
        emit_line(check_line("gpu", None, skipped="--cpu-dry-run: the checks' code paths on "
                             "the CPU with a tiny model", torch=torch.__version__))
    elif not torch.cuda.is_available():
        emit_line(check_line("gpu", False, reason="no CUDA device"))
        return 0
    else:
        device = "cuda"
        emit_line(gpu_line(torch))
    with tempfile.TemporaryDirectory(prefix="provscope-gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        isolate(tmp)
        ctx = make_ctx(args, tmp, device)
        for name in only:
            if time.perf_counter() - started > args.budget_s:
                emit_line(check_line(name, None, skipped=f"time budget of {args.budget_s:.0f} s "
                                     "spent (--budget-s)"))
                continue
            print(f"# gpu_check: {name} ...", file=sys.stderr, flush=True)
            for line in run_check(name, ctx):
                emit_line(line)
    print(f"# gpu_check: done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
