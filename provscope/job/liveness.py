"""A job's signs of life: heartbeats of its open runs, and an orderly end on SIGTERM.

Heartbeats: every open run of the process is on one list; one daemon thread
(``provscope-heartbeat``, started with the first run) writes a heartbeat record for each
every ``client.heartbeat_s`` (``RunRecord(run_id, heartbeat_ns=now)``, merged into the
run row's ``heartbeat_ns``; the start record carries the first). A job that dies without
a word (SIGKILL, the OOM killer, a lost node) stops them; the node agent and the readers
(``provscope runs``, ``provscope.query``) then see the run ``lost`` once its heartbeat is
older than ``lineage.lost_after_s`` (``SqlLineageStore.mark_lost``).

SIGTERM: when the job has no SIGTERM handler of its own (the default action would kill
it on the spot, without ``atexit``), the first run started in the main thread installs
one (``client.handle_sigterm``). It ends the open tasks and runs of the process as
``killed`` (the status ``provscope run`` gives a command killed by a signal), flushes the
records for up to ``SIGTERM_FLUSH_S``, then restores the default action and sends the
signal again, so the process still dies of SIGTERM (exit status -15 / 143). The work runs
on a helper thread the handler waits for, so a lock the interrupted main thread holds can
delay the exit by at most ``SIGTERM_FLUSH_S``, never hang it. A forked child (a
DataLoader worker) that inherited the handler dies at once, as it would have.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from provscope.job.run import Run

__all__ = ["SIGTERM_FLUSH_S", "register", "unregister"]

log = logging.getLogger("provscope.client")

#: Longest wait for the runs' end records to be written after SIGTERM, seconds.
SIGTERM_FLUSH_S = 5.0

_runs: list[Run] = []
_lock = threading.Lock()
_wake = threading.Event()
_list_pid = os.getpid()  # the process the list belongs to (a forked child starts afresh)
_thread_pid: int | None = None
_sigterm_pid: int | None = None


def register(run: Run) -> None:
    """Add an open run: heartbeats (when ``client.heartbeat_s`` > 0) and the SIGTERM end.
    Never raises."""
    global _list_pid
    try:
        with _lock:
            if _list_pid != os.getpid():
                _runs.clear()
                _list_pid = os.getpid()
            _runs.append(run)
        if run.config.client.heartbeat_s > 0:
            _ensure_thread()
        if run.config.client.handle_sigterm:
            _install_sigterm()
    except Exception:
        log.debug("cannot watch run %s for heartbeats", run, exc_info=True)


def unregister(run: Run) -> None:
    """Remove a run that ended. Never raises."""
    with _lock:
        for i in range(len(_runs) - 1, -1, -1):
            if _runs[i] is run:
                del _runs[i]
                break


def _open_runs() -> list[Run]:
    with _lock:
        if _list_pid != os.getpid():
            return []  # a forked child's copy lists the parent's runs
        return list(_runs)


def _ensure_thread() -> None:
    global _thread_pid
    with _lock:
        if _thread_pid == os.getpid():
            return
        _thread_pid = os.getpid()
    threading.Thread(target=_beat, name="provscope-heartbeat", daemon=True).start()


def _beat() -> None:
    """Every heartbeat interval (the shortest among open runs), one record per open run."""
    while True:
        runs = _open_runs()
        intervals = [r.config.client.heartbeat_s for r in runs if r.config.client.heartbeat_s]
        _wake.wait(min(intervals) if intervals else 30.0)
        _wake.clear()
        for run in _open_runs():
            if run.config.client.heartbeat_s > 0:
                try:
                    run.heartbeat()
                except Exception:  # never let the thread die
                    log.debug("heartbeat failed", exc_info=True)


# ----------------------------------------------------------------------------- SIGTERM


def _install_sigterm() -> None:
    global _sigterm_pid
    if _sigterm_pid == os.getpid() or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # the job (or its framework) handles SIGTERM itself
    signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_pid = os.getpid()


def _on_sigterm(signum: int, frame: Any) -> None:
    if _sigterm_pid == os.getpid():
        helper = threading.Thread(target=_end_all, name="provscope-sigterm", daemon=True)
        helper.start()
        helper.join(SIGTERM_FLUSH_S + 1.0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _end_all() -> None:
    """End every open run of the process (innermost first) as ``killed``, then flush."""
    from provscope.job import sink

    for run in reversed(_open_runs()):
        try:
            run.abort("killed")
        except Exception:
            log.debug("cannot end run %s at SIGTERM", run, exc_info=True)
    try:
        sink.flush_all(SIGTERM_FLUSH_S)
    except Exception:
        log.debug("flush at SIGTERM failed", exc_info=True)
