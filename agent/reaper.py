"""The agent's reaper: runs whose heartbeat stopped end as ``lost`` in the lineage store.

A job killed without a word (SIGKILL, the OOM killer) never writes its end record; its
run row would say ``running`` forever. One daemon thread (``provscope-reaper``) calls
``SqlLineageStore.mark_lost(lineage.lost_after_s)`` on the agent's lineage store every
``lost_after_s / 4`` seconds (at most once a minute), so such a run and its open tasks
end ``lost`` within about 1.25 x ``lost_after_s`` of their last heartbeat. A failure (the
database is away) is logged at most once an hour and retried at the next round.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["Reaper"]

log = logging.getLogger("provscope.agent")


class Reaper:
    """Marks lost runs in ``store`` (an object with ``mark_lost(lost_after_s)``).

    Attributes: ``runs_lost`` and ``tasks_lost`` (totals marked), ``rounds``.
    """

    def __init__(self, store: Any, lost_after_s: float) -> None:
        self.store = store
        self.lost_after_s = lost_after_s
        self.interval_s = min(60.0, max(0.05, lost_after_s / 4))
        self.runs_lost = 0
        self.tasks_lost = 0
        self.rounds = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_warning = -1e18

    def start(self) -> Reaper:
        self._thread = threading.Thread(target=self._loop, name="provscope-reaper",
                                        daemon=True)
        self._thread.start()
        return self

    def reap(self) -> tuple[int, int]:
        """One round. Blocks on the database. Never raises; ``(0, 0)`` on failure."""
        try:
            runs, tasks = self.store.mark_lost(self.lost_after_s)
        except Exception as exc:
            now = time.monotonic()
            if now - self._last_warning >= 3600:
                self._last_warning = now
                log.warning("cannot mark lost runs in the lineage store (%s: %s); retried",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return 0, 0
        self.rounds += 1
        self.runs_lost += runs
        self.tasks_lost += tasks
        if runs:
            log.info("%d run(s) and %d task(s) lost: no heartbeat for %.0f s", runs, tasks,
                     self.lost_after_s)
        return runs, tasks

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.reap()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
