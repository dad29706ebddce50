"""The node agent: collectors, scheduler, local ingest, pipeline and /metrics in one object.

``Agent(config)`` is a context manager. ``start`` takes the node lock (an exclusive
``flock`` on ``agent.pid`` beside the socket, holding the agent's pid), so a second agent
on the same node refuses with a message naming the running pid and socket. ``stop`` works
to one deadline: stop ingest and sampling, join their threads, final flush of the
pipeline, then each exporter's shutdown with the time left.

Signals are the caller's business (``provscope agent`` installs SIGTERM/SIGINT handlers
that call ``stop``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provscope.agent.collectors.amdsmi import AmdSmiCollector
from provscope.agent.collectors.cpu import CpuCollector
from provscope.agent.collectors.disk import DiskCollector
from provscope.agent.collectors.filesystem import FilesystemCollector
from provscope.agent.collectors.health import HealthCollector
from provscope.agent.collectors.memory import MemoryCollector
from provscope.agent.collectors.net import NetCollector
from provscope.agent.collectors.nvml import NvmlCollector
from provscope.agent.collectors.process import ProcessCollector, WatchList
from provscope.agent.ingest import IngestServer
from provscope.agent.reaper import Reaper
from provscope.agent.scheduler import Scheduled, Scheduler
from provscope.exporters.pipeline import Pipeline

from provscope.destinations import absolute_paths, describe, destinations
from provscope.errors import ProvscopeError
from provscope.safefs import open_private, private_dir
from provscope.wire import socket_path

if TYPE_CHECKING:
    from provscope.exporters.base import Exporter

    from provscope.config import Config

__all__ = ["Agent", "AgentAlreadyRunning", "pidfile_path", "read_pid"]

log = logging.getLogger("provscope.agent")

_SWEEP_FIRST_S = 5.0  # first look for left-over spools, seconds after start
_SWEEP_S = 60.0  # then every minute


class AgentAlreadyRunning(ProvscopeError):
    """Another agent holds this node's lock."""


def pidfile_path(sock: Path) -> Path:
    """The lock/pid file of the agent listening on ``sock``."""
    return sock.with_name(sock.stem + ".pid")


def read_pid(sock: Path) -> int | None:
    """The pid written in the agent's pid file, or None (also for a pid file that is a
    symlink or another user's: ``provscope stop`` must never signal a planted pid)."""
    try:
        fd = open_private(pidfile_path(sock), os.O_RDONLY)
    except OSError:
        return None
    try:
        return int(os.read(fd, 64).decode().strip() or "0") or None
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


class Agent:
    """One node agent.

    Args:
        config: the configuration (``agent``, ``prometheus``, stores, ``host``).
        pipeline: use this pipeline instead of ``Pipeline.from_config`` (tests, embedding);
            the agent shuts it down at ``stop``.
        extra_exporters: more exporters for ``Pipeline.from_config``.
        collectors: replace the built-in collectors (tests); None builds them from config.
    """

    def __init__(
        self,
        config: Config,
        *,
        pipeline: Pipeline | None = None,
        extra_exporters: Iterable[Exporter] = (),
        collectors: Sequence[Any] | None = None,
    ) -> None:
        # Relative paths (embedded file, SQLite lineage URL, spool, socket) are anchored to
        # the directory the agent was started in: a detached agent runs in "/".
        self.config = config = absolute_paths(config)
        #: Where this agent writes (``provscope status``, its first log lines).
        self.destinations = destinations(config)
        self.host = config.host_name
        self.socket_path = socket_path(config)
        self.pid = os.getpid()
        self.started_at = 0.0
        self._pipeline = pipeline
        self._extra = list(extra_exporters)
        self._custom_collectors = collectors
        self._lock_fd: int | None = None
        self.pipeline: Pipeline | None = None
        self.prometheus: Any = None
        self.scheduler: Scheduler | None = None
        self.ingest: IngestServer | None = None
        self.watch = WatchList()
        self.process: ProcessCollector | None = None
        self.filesystem: FilesystemCollector | None = None
        self.health: HealthCollector | None = None
        self._stopped = False
        self.reaper: Reaper | None = None
        self._stop_event = threading.Event()
        self._sweeper: threading.Thread | None = None
        self.spool_replayed = 0

    # ---------------------------------------------------------------- lock

    def _take_lock(self) -> None:
        # The directory may be a shared temp directory's <tmp>/provscope-<uid>: another
        # user could have made it first or planted agent.pid as a symlink to a file of
        # ours (or root's). Refused before anything is written (provscope.safefs).
        private_dir(self.socket_path.parent)
        path = pidfile_path(self.socket_path)
        fd = open_private(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            pid = read_pid(self.socket_path)
            raise AgentAlreadyRunning(
                f"an agent already runs on this node (pid {pid or 'unknown'}, socket "
                f"{self.socket_path}); stop it with `provscope stop` or set "
                f"agent.socket_path for a second one"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                pidfile_path(self.socket_path).unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---------------------------------------------------------------- build

    def _build_collectors(self) -> list[Scheduled]:
        cfg = self.config.agent
        if self._custom_collectors is not None:
            out = []
            for c in self._custom_collectors:
                section = getattr(cfg.collectors, c.name, None)
                interval = (section.interval_s if section else None) or cfg.interval_s
                out.append(Scheduled(c, interval))
            return out
        host = self.host
        self.process = ProcessCollector(host, self.watch)
        self.filesystem = FilesystemCollector(host, cfg.collectors.filesystem.paths)
        self.health = HealthCollector(host, self.pipeline, self._agent_stats)
        built = {
            "cpu": CpuCollector(host),
            "memory": MemoryCollector(host),
            "disk": DiskCollector(host),
            "net": NetCollector(host),
            "filesystem": self.filesystem,
            "process": self.process,
            "nvml": NvmlCollector(host, pid_map=self.process.pids_of),
            "amdsmi": AmdSmiCollector(host, pid_map=self.process.pids_of),
            "health": self.health,
        }
        out = []
        for name, collector in built.items():
            section = getattr(cfg.collectors, name)
            if not section.enabled:
                continue
            out.append(Scheduled(collector, section.interval_s or cfg.interval_s,
                                 section.on_startup_error))
        return out

    def start(self) -> Agent:
        """Take the node lock, then start the pipeline, /metrics, collectors and ingest.

        Raises:
            AgentAlreadyRunning: another agent holds the lock.
            ConfigError: a store URL or setting the exporters cannot use.
            CollectorUnavailable: a collector with ``on_startup_error: error`` cannot open.
            OSError: the socket or the /metrics port cannot be bound.
        """
        self._take_lock()
        try:
            self._start()
        except BaseException:
            self.stop(2.0)
            raise
        return self

    def _start(self) -> None:
        self.started_at = time.monotonic()
        if self._pipeline is not None:
            self.pipeline = self._pipeline
        else:
            extra = list(self._extra)
            if self.config.prometheus.enabled:
                from provscope.exporters.prometheus import PrometheusExporter

                self.prometheus = PrometheusExporter.from_config(self.config)
                extra.insert(0, self.prometheus)
            self.pipeline = Pipeline.from_config(self.config, extra=extra)
        self.scheduler = Scheduler(self._build_collectors(), self.pipeline.submit_many)
        self.ingest = IngestServer(
            self.socket_path,
            on_points=self.pipeline.submit_many,
            on_records=self.pipeline.submit_many,
            on_hello=self._on_hello,
            on_watch=self._on_watch,
            status=self.status,
            # A job's frame is acknowledged once the pipeline has written, spooled or
            # counted every record of it (at-least-once delivery across an agent restart).
            durable=self.pipeline.durable,
            on_flush=self.pipeline.wake,
        )
        self.scheduler.start()
        self.ingest.start()
        if self._pipeline is None:
            self._sweeper = threading.Thread(target=self._sweep_spools, daemon=True,
                                             name="provscope-spool-sweep")
            self._sweeper.start()
        self._start_reaper()
        log.info("agent started: pid %d, socket %s, host %s", self.pid, self.socket_path,
                 self.host)
        log.info("records go to: %s", describe(self.where()))

    def _start_reaper(self) -> None:
        """Mark runs whose heartbeat stopped as lost in the agent's lineage store."""
        assert self.pipeline is not None
        for proc in self.pipeline.processors:
            store = getattr(proc.exporter, "store", None)
            if callable(getattr(store, "mark_lost", None)):
                self.reaper = Reaper(store, self.config.lineage.lost_after_s).start()
                return

    def _sweep_spools(self) -> None:
        """Replay spool directories that earlier processes (jobs, a killed agent) left for
        this agent's stores, ``_SWEEP_FIRST_S`` after start and then every ``_SWEEP_S``:
        nobody has to write to the same destination again for them to arrive.
        Directories a live process holds are skipped (that process replays them)."""
        from provscope.exporters.spool_admin import entries, matches, replay, spool_root

        wait = _SWEEP_FIRST_S
        while not self._stop_event.wait(wait):
            wait = _SWEEP_S
            try:
                for entry in entries(spool_root(self.config)):
                    if self._stop_event.is_set():
                        return
                    if entry.busy or not entry.items or not matches(entry, self.config):
                        continue
                    out = replay(entry, self.config)
                    self.spool_replayed += out.replayed
                    log.info("spool %s: %d %s replayed, %d refused, %d left%s", entry.path,
                             out.replayed, entry.unit, out.dropped, out.left,
                             f" ({out.error})" if out.error else "")
            except Exception:
                log.debug("spool sweep failed", exc_info=True)

    # ---------------------------------------------------------------- ingest hooks

    def _on_hello(self, pid: int, run_id: str | None, rank: int | None) -> None:
        if not run_id:
            return
        try:
            import psutil

            for parent in psutil.Process(pid).parents():
                w = self.watch.get(parent.pid)
                if w is not None and w.run_id == run_id and w.rank == rank:
                    return  # already inside that tree (a forked worker)
        except Exception:
            return  # the process is gone or not ours to read
        self.watch.add(pid, run_id, rank)

    def _on_watch(self, body: dict[str, Any]) -> None:
        rank = body.get("rank")
        self.watch.add(body["pid"], body["run_id"], rank if type(rank) is int else None)
        for path in body.get("paths") or ():
            if isinstance(path, str) and self.filesystem is not None:
                self.filesystem.add_path(path)

    # ---------------------------------------------------------------- state

    def _agent_stats(self) -> dict[str, float]:
        out: dict[str, float] = {"uptime_seconds": time.monotonic() - self.started_at}
        total = 0.0
        if self.scheduler is not None:
            out["points_collected_total"] = float(self.scheduler.points_total)
            out["collector_errors_total"] = float(self.scheduler.collector_errors)
            out["ticks_skipped_total"] = float(self.scheduler.ticks_skipped)
            out["collect_overruns_total"] = float(self.scheduler.overruns)
            out["collectors_active"] = self.scheduler.active
            total += self.scheduler.points_total
        if self.ingest is not None:
            ing = self.ingest.stats()
            out.update(ing)
            total += ing["ingest_points_total"] + ing["ingest_records_total"]
        out["points_total"] = total
        return out

    def status(self) -> dict[str, Any]:
        """What ``provscope status`` prints: pid, socket, uptime, rates, drops, collectors."""
        stats = self._agent_stats()
        pipeline = self.pipeline.stats() if self.pipeline is not None else {}
        dropped = sum(s.get("points_dropped_total", 0.0) for s in pipeline.values())
        return {
            "pid": self.pid,
            "host": self.host,
            "socket": str(self.socket_path),
            "uptime_s": round(stats["uptime_seconds"], 3),
            "points_per_s": round(self.health.last_rate, 3) if self.health else None,
            "points_total": stats["points_total"],
            "dropped": dropped,
            "ingest": self.ingest.stats() if self.ingest else {},
            "exporters": pipeline,
            "collectors": self.scheduler.status() if self.scheduler else {},
            "watched": [{"pid": w.pid, "run_id": w.run_id, "rank": w.rank}
                        for w in self.watch.snapshot()],
            "prometheus": self.prometheus.url if self.prometheus else None,
            "destinations": self.where(),
        }

    def where(self) -> dict[str, str]:
        """Where records go: ``time_series``, ``lineage``, ``spool`` and ``metrics`` (the
        /metrics URL when served). URLs carry no credentials; paths are absolute."""
        out = dict(self.destinations)
        if self.prometheus is not None:
            out["metrics"] = self.prometheus.url
        return out

    # ---------------------------------------------------------------- stop

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop within one deadline (default ``pipeline.shutdown_timeout_s``). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        timeout_s = self.config.pipeline.shutdown_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        self._stop_event.set()
        if self.ingest is not None:
            self.ingest.stop(min(2.0, left()))
        if self.scheduler is not None:
            self.scheduler.stop(min(2.0, left()))
        if self.reaper is not None:
            self.reaper.stop(min(1.0, left()))
        if self.pipeline is not None:
            self.pipeline.flush(left() * 0.8)
            self.pipeline.shutdown(left())
        elif self.prometheus is not None:
            self.prometheus.shutdown(left())
        self._release_lock()
        log.info("agent stopped")

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
