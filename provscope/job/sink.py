"""Where the in-job API's records go: the node agent, else a pipeline inside the job.

A ``Sink`` is created lazily on the first record. With a node agent listening on its
local socket (``provscope.job.agent_client.AgentClient.try_connect``), ``client.destination``
decides: ``agent`` sends the records there; ``own`` runs the job's own pipeline and keeps
the agent connection only to say hello (the agent still samples the job's processes);
``auto`` (default) is ``own`` when the job's config names a store of its own
(``provscope.destinations.names_destination``) that differs from the agent's, else
``agent``. With no agent it follows ``client.no_agent``: ``"embedded"`` runs
``Pipeline.from_config(config)`` in the job (background threads write to the embedded
SQLite file or the configured servers), ``"drop"`` counts and drops. Relative paths are
anchored to the directory the job was in when its first record was made. ``submit``
never blocks and never raises; ``Sink.where`` (logged once at INFO) says where records go.

Fork safety: ``os.register_at_fork`` forgets every sink in a forked child (a DataLoader
worker) without touching the parent's threads or locks; the child's first record
creates its own connection or pipeline. A child started by ``multiprocessing`` flushes
it when the worker exits (``multiprocessing.util.Finalize``); a child that leaves with
``os._exit`` must call ``provscope.flush()`` first.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from provscope.job import telemetry

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = ["Sink", "all_sinks", "flush_all", "get_sink", "on_exit", "set_factory", "shutdown_all"]

log = logging.getLogger("provscope.client")

#: Builds the backend (an object with submit/submit_many/flush/shutdown/stats) for a config.
Factory = Callable[["Config"], Any]


class _Drop:
    """The backend of ``client.no_agent: drop`` (and of a backend that failed to start)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.dropped = 0

    def submit(self, record: Any) -> None:
        self.dropped += 1

    def submit_many(self, records: Sequence[Any]) -> None:
        self.dropped += len(records)

    def flush(self, timeout_s: float) -> bool:
        return True

    def shutdown(self, timeout_s: float) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"drop": {"points_dropped_total": float(self.dropped)}}


class _Watched:
    """The job's own pipeline while a node agent listens: records go to the pipeline; the
    agent connection only says who this process is (hello, run identity), so the agent
    still samples the job's process tree and GPUs (node telemetry)."""

    def __init__(self, pipeline: Any, agent: Any) -> None:
        self.pipeline = pipeline
        self.agent = agent

    @property
    def processors(self) -> Any:
        return getattr(self.pipeline, "processors", ())

    def submit(self, record: Any) -> Any:
        return self.pipeline.submit(record)

    def submit_many(self, records: Sequence[Any]) -> Any:
        return self.pipeline.submit_many(records)

    def set_identity(self, run_id: str | None = None, rank: int | None = None) -> None:
        self.agent.set_identity(run_id, rank)

    def flush(self, timeout_s: float) -> bool:
        return bool(self.pipeline.flush(timeout_s))

    def shutdown(self, timeout_s: float) -> None:
        try:
            self.pipeline.shutdown(timeout_s)
        finally:
            self.agent.shutdown(0.5)

    def stats(self) -> dict[str, Any]:
        out = dict(self.pipeline.stats())
        out["agent_link"] = {"connected": float(bool(self.agent.connected))}
        return out


def _agent_destinations(path: Any) -> dict[str, str] | None:
    """Where the agent on ``path`` writes (its STATUS reply), None when it does not say.
    Blocks at most one second (a local socket answers in milliseconds)."""
    from provscope import wire

    try:
        reply = wire.request(path, wire.STATUS, None, timeout_s=1.0)
    except Exception:
        return None
    where = reply.get("destinations") if isinstance(reply, dict) else None
    return where if isinstance(where, dict) else None


def _keep_own(config: Config, ask_agent: Callable[[], dict[str, str] | None]) -> bool:
    """``client.destination: auto``: the job's own stores when its config names one and
    the agent writes elsewhere (or does not say where). A job launched with the agent's
    own settings (``provscope run`` passes its environment on) still uses the agent."""
    from provscope.destinations import destinations, names_destination

    if not names_destination(config):
        return False
    agent_where = ask_agent()
    if agent_where is None:
        return True
    mine = destinations(config)
    return any(mine[k] != agent_where.get(k) for k in ("time_series", "lineage"))


def _default_factory(config: Config) -> tuple[str, Any]:
    from provscope.job.agent_client import AgentClient

    try:
        client = AgentClient.try_connect(config)
    except Exception:
        log.warning("cannot reach the provscope agent; continuing without it", exc_info=True)
        client = None
    choice = config.client.destination
    if client is not None:
        path = client.path
        own = choice == "own" or (
            choice == "auto" and _keep_own(config, lambda: _agent_destinations(path)))
        if not own:
            return "agent", client
        from provscope.destinations import absolute_paths
        from provscope.exporters.pipeline import Pipeline

        try:
            pipeline = Pipeline.from_config(_own_stores(absolute_paths(config)))
        except BaseException:
            client.shutdown(0.0)
            raise
        return "embedded", _Watched(pipeline, client)
    if config.client.no_agent == "drop":
        return "drop", _Drop("no agent and client.no_agent=drop")
    from provscope.destinations import absolute_paths
    from provscope.exporters.pipeline import Pipeline

    # The files stay where they were named, whatever chdir; an unwritable one is replaced.
    config = _own_stores(absolute_paths(config))
    pipeline = Pipeline.from_config(config)
    telemetry.start(config, pipeline)  # the job samples itself: no agent does it
    return "embedded", pipeline


_factory: Callable[[Config], tuple[str, Any]] = _default_factory

#: The embedded file each configuration's records really go to (a stand-in when the
#: named one cannot be written: provscope/fallback.py), for the line that says where.
_redirected: dict[str, str] = {}


def _own_stores(config: Config) -> Config:
    from provscope import fallback

    used = fallback.redirect(config)
    if used.embedded.path != config.embedded.path:
        _redirected[config.embedded.path] = used.embedded.path
    return used


def set_factory(factory: Callable[[Config], tuple[str, Any]] | None) -> None:
    """Replace how backends are built (tests, embedding applications); None restores it.

    The factory returns ``(mode, backend)``. Sinks made earlier keep their backend.
    """
    global _factory
    _factory = factory or _default_factory


def _where(mode: str, backend: Any, config: Config) -> str:
    from provscope.destinations import describe, destinations

    if mode == "agent":
        path = getattr(backend, "path", "?")
        agent_where = _agent_destinations(path) if log.isEnabledFor(logging.INFO) else None
        return f"the node agent on {path}" + (
            f", which writes {describe(agent_where)}" if agent_where else "")
    if mode == "embedded":
        from provscope.destinations import absolute_paths

        anchored = absolute_paths(config)
        stand_in = _redirected.get(anchored.embedded.path)
        if stand_in is not None:
            config = anchored.model_copy(update={
                "embedded": anchored.embedded.model_copy(update={"path": stand_in})})
        text = describe(destinations(config))
        agent = getattr(backend, "agent", None)
        if agent is not None:
            text += (f" (this job's own stores; the node agent on {agent.path} samples its "
                     "processes)")
        return text
    if mode == "drop":
        return "nowhere: no agent listens and client.no_agent=drop (records counted, dropped)"
    return f"nowhere: {getattr(backend, 'reason', mode)} (records counted, dropped)"


class Sink:
    """The in-job record sink for one configuration. Never blocks, never raises.

    Counters: ``submitted`` records handed over, ``dropped`` records lost (no backend,
    backend failed to start, or it raised), ``errors`` exceptions swallowed.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.mode = "pending"
        self.backend: Any = None
        self.submitted = 0
        self.dropped = 0
        self.errors = 0
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._closed = False
        #: Where the records go, in words (set when the backend starts): store URLs
        #: without credentials and absolute paths, or the agent's socket.
        self.where = ""

    def reset_after_fork(self) -> None:
        """Forget the parent's backend and counters (called in a forked child)."""
        self._lock = threading.Lock()
        self.backend = None
        self.mode = "pending"
        self.submitted = self.dropped = self.errors = 0
        self.pid = os.getpid()
        self._closed = False

    def _get(self) -> Any:
        backend = self.backend
        if backend is not None:
            return backend
        with self._lock:
            if self.backend is None:
                if self._closed:
                    self.mode, self.backend = "closed", _Drop("sink closed")
                else:
                    try:
                        self.mode, self.backend = _factory(self.config)
                    except Exception as exc:
                        self.errors += 1
                        log.warning("provscope: cannot start the record pipeline (%s); "
                                    "records of this process are counted and dropped", exc)
                        self.mode, self.backend = "failed", _Drop(str(exc))
                    _after_start(self)
                    self._say_where()
            return self.backend

    def _say_where(self) -> None:
        """Set ``where`` and log it once at INFO: the first line a verbose job prints."""
        try:
            self.where = _where(self.mode, self.backend, self.config)
            log.info("provscope: records of this process (pid %d) go to %s", self.pid,
                     self.where)
        except Exception:
            log.debug("cannot describe where records go", exc_info=True)

    def submit(self, record: Any) -> None:
        """Hand one record to the backend. Never blocks, never raises."""
        try:
            self._get().submit(record)
            self.submitted += 1
        except Exception:
            self.errors += 1
            self.dropped += 1

    def submit_many(self, records: Sequence[Any]) -> None:
        """Hand many records to the backend. Never blocks, never raises."""
        try:
            self._get().submit_many(records)
            self.submitted += len(records)
        except Exception:
            self.errors += 1
            self.dropped += len(records)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait up to ``timeout_s`` until everything submitted is written. True when done."""
        backend = self.backend
        if backend is None:
            return True
        try:
            return bool(backend.flush(timeout_s))
        except Exception:
            self.errors += 1
            return False

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Flush within ``timeout_s`` and stop the backend. Later records are dropped."""
        with self._lock:
            self._closed = True
            backend = self.backend
        if backend is None:
            return
        try:
            # The sampler's final points go in before the pipeline drains.
            telemetry.stop(backend, min(telemetry.STOP_TIMEOUT_S, timeout_s / 2))
            backend.shutdown(timeout_s)
        except Exception:
            self.errors += 1
        self.backend, self.mode = _Drop("sink closed"), "closed"

    def stats(self) -> dict[str, Any]:
        """Mode, client counters and the backend's own statistics."""
        out: dict[str, Any] = {"mode": self.mode, "submitted": self.submitted,
                               "dropped": self.dropped, "errors": self.errors}
        backend = self.backend
        if backend is not None:
            try:
                out["backend"] = backend.stats()
                sampler = telemetry.stats(backend)
                if sampler is not None:
                    out["telemetry"] = sampler
            except Exception:
                self.errors += 1
        return out

    def written(self) -> dict[str, int]:
        """Records the destinations accepted so far: ``{"points": n, "lineage": m}``."""
        out = {"points": 0, "lineage": 0}
        for proc in getattr(self.backend, "processors", ()):
            try:
                n = int(proc.stats().get("points_written_total", 0))
            except Exception:
                continue
            accepts = getattr(proc.exporter, "accepts", ())
            if "points" in accepts:
                out["points"] += n
            elif "lineage" in accepts:
                out["lineage"] += n
        return out


# ----------------------------------------------------------------------------- registry

_sinks: dict[str, Sink] = {}
_registry_lock = threading.Lock()
_atexit_registered = False


def get_sink(config: Config) -> Sink:
    """The process's sink for ``config`` (one per distinct configuration)."""
    key = config.model_dump_json()
    sink = _sinks.get(key)
    if sink is None:
        with _registry_lock:
            sink = _sinks.get(key)
            if sink is None:
                sink = _sinks[key] = Sink(config)
    return sink


def _after_start(sink: Sink) -> None:
    global _atexit_registered
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(_at_exit)
    if sink.pid != _parent_pid:
        _register_child_finalizer()


def all_sinks() -> list[Sink]:
    return list(_sinks.values())


def flush_all(timeout_s: float = 10.0) -> bool:
    """Flush every sink of this process within one deadline. Blocks up to ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    ok = True
    for sink in all_sinks():
        ok = sink.flush(max(0.0, deadline - time.monotonic())) and ok
    return ok


def shutdown_all(timeout_s: float | None = None, *, forget: bool = False) -> None:
    """Stop every sink, sharing one deadline (default ``pipeline.shutdown_timeout_s``).

    ``forget=True`` also drops them from the registry, so the next record starts afresh
    (tests, applications that change destinations).
    """
    import time

    sinks = all_sinks()
    if forget:
        _sinks.clear()
    if not sinks:
        return
    if timeout_s is None:
        timeout_s = max(s.config.pipeline.shutdown_timeout_s for s in sinks)
    deadline = time.monotonic() + timeout_s
    for sink in sinks:
        sink.shutdown(max(0.0, deadline - time.monotonic()))


_exit_hooks: list[Callable[[], None]] = []


def on_exit(hook: Callable[[], None]) -> None:
    """Run ``hook`` at process exit before the sinks shut down (closes the implicit run)."""
    _exit_hooks.append(hook)


def _at_exit() -> None:
    for hook in list(_exit_hooks):
        try:
            hook()
        except Exception:
            log.debug("exit hook failed", exc_info=True)
    try:
        shutdown_all()
    except Exception:
        log.debug("sink shutdown at exit failed", exc_info=True)


# ----------------------------------------------------------------------------- fork

_parent_pid = os.getpid()
_child_finalizer = False


def _register_child_finalizer() -> None:
    """multiprocessing children skip atexit (os._exit); its Finalize hooks still run."""
    global _child_finalizer
    if _child_finalizer:
        return
    _child_finalizer = True
    try:
        from multiprocessing import util

        util.Finalize(None, _at_exit, exitpriority=10)
    except Exception:
        log.debug("cannot register the child's exit flush", exc_info=True)


def _after_fork_in_child() -> None:
    global _registry_lock, _child_finalizer, _parent_pid
    # Never use the parent's backends: their worker threads do not exist here and their
    # locks may have been held at the fork. Forget them; each sink rebuilds lazily.
    for sink in list(_sinks.values()):
        sink.reset_after_fork()
    _registry_lock = threading.Lock()
    _child_finalizer = False
    _parent_pid = -1  # any sink started from now on belongs to a child process
    from provscope.job import capture, context

    capture.reset_after_fork()
    context.reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
