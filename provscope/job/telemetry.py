"""The job samples its own telemetry when it runs its own pipeline (no node agent).

With an agent on the node the agent samples the node and the job's process tree. With no
agent (the embedded default) the job would otherwise record no telemetry at all, so the
sink starts a ``JobTelemetry`` beside its embedded pipeline: the agent's own collectors
(``provscope.agent.collectors``) on the agent's scheduler, one daemon thread
(``provscope-telemetry``), every ``client.telemetry_interval_s`` (5 s; MLflow's system
metrics sample every 10 s), plus one sample at start and one at shutdown.

What it records, with the agent's measurement names and tags so dashboards need no
special case:

- ``cpu``, ``memory``, ``disk``, ``net`` of the node (tag ``host``);
- ``process``: the job's process tree, DataLoader workers included (tags ``host``,
  ``run_id``, ``rank`` of the innermost run open on this pipeline, else the last one);
- ``gpu`` (tags ``host``, ``gpu``, ``gpu_uuid``) for the job's own GPUs only, and
  ``gpu_process`` for its processes on them (see ``job_gpus``).

Rules: starting returns at once (collectors open on the sampling thread; ``nvmlInit``
can take seconds); a collector that raises is disabled after ``MAX_FAILURES`` failures in
a row, and every failure is counted (``stats()``); nothing here raises into the job. A
forked child (a DataLoader worker, a fork-based pool) and a DataLoader worker never start
a sampler: the parent's process series already cover them. ``client.telemetry: false``
turns it off.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from provscope.agent.scheduler import Scheduler
    from provscope.config import Config

__all__ = ["JobTelemetry", "job_gpus", "start", "stats", "stop"]

log = logging.getLogger("provscope.telemetry")

#: Consecutive ``collect`` exceptions before a collector is disabled.
MAX_FAILURES = 3
#: Longest wait for the sampling thread (and the final sample) at shutdown, seconds.
STOP_TIMEOUT_S = 2.0


class _JobIdentity:
    """Which run the job's process series belong to: the innermost workflow open on this
    pipeline, else the implicit run, else the last one seen (so the series continue under
    the run that just ended until the process exits, and the final sample has a run)."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.last: tuple[str, int | None] | None = None

    def current(self) -> tuple[str, int | None] | None:
        from provscope.job import context

        candidates = list(reversed(context.active_runs()))
        api = sys.modules.get("provscope.job.api")
        implicit = getattr(api, "_implicit", None)
        if implicit is not None:
            candidates.append(implicit)
        for run in candidates:
            sink = getattr(run, "_sink", None)
            if sink is None or getattr(run, "status", "") != "running":
                continue
            # A sink still "pending" is the one whose factory started this sampler and has
            # not yet stored the pipeline (the first sample races that assignment).
            if sink.backend is self._backend or (sink.backend is None
                                                 and sink.mode == "pending"):
                rank = getattr(run, "rank", None)
                self.last = (str(run.run_id), rank if isinstance(rank, int) else None)
                break
        return self.last


class _JobProcess:
    """The agent's ``ProcessCollector`` watching this process's tree under the run's
    identity (registered afresh at each sample: the run may change)."""

    name = "process"

    def __init__(self, host: str, identity: _JobIdentity) -> None:
        from provscope.agent.collectors.process import ProcessCollector

        self.inner = ProcessCollector(host, scan="tree")
        self._identity = identity
        self._pid = os.getpid()

    def open(self) -> None:
        self.inner.open()

    def collect(self, now_ns: int) -> Any:
        ident = self._identity.current()
        if ident is None:
            return []  # no run yet: a process series needs its run_id
        run_id, rank = ident
        w = self.inner.watch.get(self._pid)
        if w is None or w.run_id != run_id or w.rank != rank:
            self.inner.watch.add(self._pid, run_id, rank)
        return self.inner.collect(now_ns)

    def close(self) -> None:
        self.inner.close()

    def specs(self) -> Any:
        return self.inner.specs()


# ----------------------------------------------------------------------------- GPUs


def _torch_device_uuids() -> set[str] | None:
    """UUIDs (``GPU-...``) of the CUDA devices this process holds memory on, when torch is
    already imported and CUDA is initialised; None otherwise. Never initialises CUDA."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        cuda = torch.cuda
        if not cuda.is_initialized():
            return None
        out = set()
        for i in range(cuda.device_count()):
            if cuda.memory_reserved(i) > 0:
                uuid = str(cuda.get_device_properties(i).uuid)
                out.add(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        return out or None
    except Exception:
        return None


def job_gpus(devices: Sequence[Mapping[str, str]],
             environ: Mapping[str, str] | None = None,
             torch_uuids: Callable[[], set[str] | None] = _torch_device_uuids) -> set[int]:
    """Which of the node's GPUs (NVML's list, as tags) belong to this job.

    1. torch already uses CUDA: the devices it holds memory on, matched by UUID (this
       follows ``torch.cuda.set_device(local_rank)`` and any ``CUDA_DEVICE_ORDER``);
    2. else ``CUDA_VISIBLE_DEVICES``: ``GPU-`` UUIDs (or their prefixes) by UUID, integers
       as NVML indices (PCI bus order, as schedulers assign them); ``""``/``-1``: none;
    3. else none: a job that has not touched a GPU records no GPU series (the node agent
       records every GPU of the node).

    Called at each sample, so a job that starts using CUDA later is picked up.
    """
    uuids = torch_uuids()
    if uuids:
        return {i for i, t in enumerate(devices) if t.get("gpu_uuid") in uuids}
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return set()
    chosen: set[int] = set()
    for entry in (e.strip() for e in visible.split(",")):
        if not entry:
            break
        if entry.lstrip("-").isdigit():
            index = int(entry)
            if index < 0:
                break  # CUDA stops at the first invalid entry
            if index < len(devices):
                chosen.add(index)
        elif entry.startswith("GPU-"):
            chosen.update(i for i, t in enumerate(devices)
                          if t.get("gpu_uuid", "").startswith(entry))
        else:
            break  # MIG-... or garbage: CUDA ignores the rest too
    return chosen


# ----------------------------------------------------------------------------- sampler


class JobTelemetry:
    """The in-job sampler of one pipeline. Build it with :func:`start`.

    Args:
        config: the job's settings (``host``, ``client.telemetry_*``).
        submit: receives each sample's points (``Pipeline.submit_many``); must not block.
        backend: the pipeline whose runs name the process series.
        collectors: replace the built-in collectors (tests); each needs ``name``.
    """

    def __init__(self, config: Config, submit: Callable[[Sequence[Any]], Any], backend: Any,
                 collectors: Sequence[Any] | None = None) -> None:
        from provscope.agent.scheduler import Scheduled, Scheduler

        self.identity = _JobIdentity(backend)
        interval = config.client.telemetry_interval_s
        if collectors is None:
            collectors = self._build(config)
        self.scheduler: Scheduler = Scheduler(
            [Scheduled(c, interval) for c in collectors], submit,
            max_failures=MAX_FAILURES, thread_name="provscope-telemetry",
            unavailable_level=logging.INFO,
        )
        self.pid = os.getpid()
        self._stopped = False
        self._lock = threading.Lock()

    def _build(self, config: Config) -> list[Any]:
        from provscope.agent.collectors.cpu import CpuCollector
        from provscope.agent.collectors.disk import DiskCollector
        from provscope.agent.collectors.memory import MemoryCollector
        from provscope.agent.collectors.net import NetCollector
        from provscope.agent.collectors.nvml import NvmlCollector

        host = config.host_name
        wanted = config.client.telemetry_collectors
        process = _JobProcess(host, self.identity)
        builders: dict[str, Callable[[], Any]] = {
            "cpu": lambda: CpuCollector(host),
            "memory": lambda: MemoryCollector(host),
            "disk": lambda: DiskCollector(host),
            "net": lambda: NetCollector(host),
            "process": lambda: process,
            "nvml": lambda: NvmlCollector(host, pid_map=process.inner.pids_of,
                                          devices=job_gpus),
        }
        return [builders[name]() for name in wanted if name in builders]

    def start(self) -> JobTelemetry:
        """Start sampling on the background thread; returns at once."""
        self.scheduler.start(background=True)
        return self

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the thread, take the final sample (handed to the pipeline before it
        drains), close the collectors. Blocks up to about ``timeout_s``. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if os.getpid() != self.pid:
            return  # a forked child: the thread is the parent's
        self.scheduler.stop(timeout_s, final_sample=True)
        errors = self.scheduler.collector_errors
        if errors:
            disabled = [e.name for e in self.scheduler.entries if e.state == "disabled"]
            log.info("provscope: in-job telemetry had %d collector errors%s", errors,
                     f" (disabled: {', '.join(disabled)})" if disabled else "")

    def stats(self) -> dict[str, Any]:
        """``points``, ``collector_errors``, ``disabled`` (names), ``collectors`` (the
        scheduler's per-collector status: state, samples, errors, last duration)."""
        s = self.scheduler
        return {"points": s.points_total, "collector_errors": s.collector_errors,
                "ticks_skipped": s.ticks_skipped,
                "disabled": [e.name for e in s.entries if e.state == "disabled"],
                "collectors": s.status()}


# ----------------------------------------------------------------------------- registry

# Keyed by id(backend): one sampler per in-job pipeline.
_running: dict[int, JobTelemetry] = {}
_registry_lock = threading.Lock()
_forked = False


def _in_worker() -> bool:
    """A forked child or a DataLoader worker: its parent's sampler already covers it."""
    if _forked:
        return True
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            return torch.utils.data.get_worker_info() is not None
        except Exception:
            return False
    return False


def start(config: Config, backend: Any) -> JobTelemetry | None:
    """Start the in-job sampler for ``backend`` (a ``Pipeline``) unless the settings turn
    it off or this process is a worker (see the module docstring). Returns at once; never
    raises (None when not started)."""
    try:
        if not config.client.telemetry or not config.client.telemetry_collectors \
                or _in_worker():
            return None
        telemetry = JobTelemetry(config, backend.submit_many, backend)
        with _registry_lock:
            if id(backend) in _running:
                return _running[id(backend)]
            _running[id(backend)] = telemetry
        return telemetry.start()
    except Exception:
        log.warning("provscope: in-job telemetry cannot start; the job runs on without it",
                    exc_info=True)
        return None


def stop(backend: Any, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop the sampler of ``backend`` (final sample included). Never raises."""
    with _registry_lock:
        telemetry = _running.pop(id(backend), None)
    if telemetry is None:
        return
    try:
        telemetry.stop(timeout_s)
    except Exception:
        log.debug("in-job telemetry stop failed", exc_info=True)


def stats(backend: Any) -> dict[str, Any] | None:
    """The sampler's counters for ``backend``, None when none runs."""
    telemetry = _running.get(id(backend))
    return telemetry.stats() if telemetry is not None else None


def _after_fork_in_child() -> None:
    global _forked, _registry_lock
    _forked = True
    _registry_lock = threading.Lock()
    _running.clear()  # the parent's threads do not exist here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
