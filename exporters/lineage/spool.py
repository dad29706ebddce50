"""On-disk holding area for lineage batches while the lineage database is unavailable.

A thin layer over ``provscope.exporters.spool.Spool``: batches are stored as JSON (the
records' ``to_dict()``), replayed oldest first, and acknowledged only once the database
committed them. Each process takes its own spool directory, ``lineage-<url hash>`` or,
when another live process holds that one, ``lineage-<url hash>-1``, ``-2``, ...; a process
that starts later takes over (and replays) a directory a dead process left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from provscope.exporters.spool import Spool, SpoolBusy, report_left

from provscope.destinations import safe_url
from provscope.records import record_from_dict

__all__ = ["LineageSpool", "default_spool_root"]

_SLOTS = 16


def default_spool_root() -> Path:
    """``$XDG_STATE_HOME/provscope/spool`` or ``~/.local/state/provscope/spool``."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "provscope" / "spool"


class LineageSpool:
    """Lazily opened spool of lineage batches for one database URL.

    Args:
        root: parent directory of the spool directories.
        url: the lineage URL (its hash names the directory).
        max_bytes: bound on the spool; past it the oldest batches are dropped and counted.
    """

    def __init__(self, root: str | os.PathLike[str], url: str, max_bytes: int) -> None:
        self.root = Path(root).expanduser()
        self.name = "lineage-" + hashlib.sha1(url.encode()).hexdigest()[:12]
        self.url = url
        self.max_bytes = max_bytes
        self._spool: Spool | None = None
        self._pid = os.getpid()
        self.spooled = 0
        self.replayed = 0
        self.unreadable = 0

    def _open(self, create: bool) -> Spool | None:
        if self._pid != os.getpid():  # forked child: the parent owns the directory lock
            self._spool, self._pid = None, os.getpid()
        if self._spool is not None:
            return self._spool
        for k in range(_SLOTS):
            path = self.root / (self.name if k == 0 else f"{self.name}-{k}")
            if not create and not path.exists():
                continue
            try:
                self._spool = Spool(path, max_bytes=self.max_bytes)
                self._spool.label(kind="lineage", destination=safe_url(self.url),
                                  unit="lineage records")
                return self._spool
            except SpoolBusy:
                continue
        return None

    def adopt(self) -> None:
        """Open a directory an earlier process left, if any (so that it gets replayed)."""
        with contextlib.suppress(OSError):
            self._open(create=False)

    @property
    def pending(self) -> int:
        """Records waiting on disk."""
        return self._spool.pending_count if self._spool is not None else 0

    @property
    def pending_bytes(self) -> int:
        return self._spool.pending_bytes if self._spool is not None else 0

    @property
    def dropped(self) -> int:
        """Records lost: the spool passed its byte bound, or a batch no longer decodes."""
        return self.unreadable + (self._spool.dropped_count if self._spool is not None else 0)

    def append(self, batch: Sequence[Any]) -> bool:
        """Store a batch on disk. Blocks on one file write. False when no spool could be used."""
        try:
            spool = self._open(create=True)
            if spool is None:
                return False
            payload = json.dumps([r.to_dict() for r in batch], default=str).encode()
            spool.append(payload, count=len(batch))
        except (OSError, ValueError):
            return False
        self.spooled += len(batch)
        return True

    def replay(self, write: Callable[[list[Any]], object]) -> None:
        """Write spooled batches, oldest first, acknowledging each once ``write`` returns.

        Raises:
            whatever ``write`` raises (the batch stays spooled).
        """
        spool = self._spool
        while spool is not None:
            item = spool.peek()
            if item is None:
                return
            payload, count = item
            try:
                records = [record_from_dict(d) for d in json.loads(payload)]
            except (ValueError, TypeError, AttributeError):
                self.unreadable += count  # damaged on disk: skipped and counted as dropped
                spool.ack()
                continue
            write(records)
            spool.ack()
            self.replayed += count

    def report_left(self) -> None:
        """One warning line when records are still spooled (at exit)."""
        spool = self._spool
        if spool is not None:
            report_left(spool.pending_count, "lineage records", spool.directory,
                        safe_url(self.url))

    def close(self) -> None:
        """Release the directory; what is left stays on disk for the next process."""
        if self._spool is not None and self._pid == os.getpid():
            self._spool.close()
        self._spool = None
