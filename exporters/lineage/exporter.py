"""The pipeline exporter of lineage records: ``SqlLineageExporter`` around a
``SqlLineageStore``, with its failure policy (spool while the database is away, drop only
the records it rejects)."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from provscope.exporters.base import ExportResult
from provscope.exporters.lineage.engine import safe_url, spool_key
from provscope.exporters.lineage.spool import LineageSpool, default_spool_root
from provscope.exporters.lineage.store import SqlLineageStore
from sqlalchemy import exc as sa_exc

from provscope.backoff import Backoff
from provscope.errors import LineageSchemaError

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = ["SqlLineageExporter"]

log = logging.getLogger("provscope.lineage")


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


class SqlLineageExporter:
    """Pipeline exporter writing lineage records to a ``SqlLineageStore``.

    Failure policy:
      - database locked, unreachable or restarting, or of a newer schema version: the batch
        goes to the on-disk spool (``spool_dir``) and counts as accepted; later batches
        follow it there (order kept) until a replay succeeds. Replays are attempted with a
        backoff (``provscope.backoff``: full jitter, window 0.5 s doubling to 10 s) and on
        ``flush``. Without a spool (``spool_dir``
        None, or unusable) the answer is ``RETRY``: the batch stays in the pipeline's
        bounded queue. A warning is logged at most once a minute (the newer-schema error,
        once an hour).
      - a record the database rejects (bad data) -> the batch is written record by record,
        the rejected ones are dropped, counted and logged.

    Args:
        url: lineage URL (see ``SqlLineageStore``).
        batch_size: records per transaction (read by the pipeline).
        flush_interval_s: longest wait before a record is written (read by the pipeline).
        busy_timeout_ms: SQLite lock wait / PostgreSQL connect timeout per attempt.
        spool_dir: parent directory of the spool; None: no spool.
        spool_max_bytes: bound on the spool; past it the oldest batches are dropped.
    """

    name: ClassVar[str] = "lineage"
    accepts: ClassVar[frozenset[str]] = frozenset({"lineage"})

    def __init__(self, url: str, *, batch_size: int = 1000, flush_interval_s: float = 1.0,
                 busy_timeout_ms: int = 2000, spool_dir: str | os.PathLike[str] | None = None,
                 spool_max_bytes: int = 1 << 30) -> None:
        self.url = url
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.store = SqlLineageStore(url, busy_timeout_ms=busy_timeout_ms)
        self.spool: LineageSpool | None = None
        if spool_dir is not None:
            self.spool = LineageSpool(spool_dir, spool_key(url), spool_max_bytes)
            self.spool.adopt()
        self.written = 0
        self.rejected = 0
        self.last_error: str | None = None
        self._last_log: dict[str, float] = {}
        self._next_replay = 0.0
        self._replay_backoff = Backoff(0.5, 10.0)
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_config(cls, config: Config) -> SqlLineageExporter:
        """Build from ``config.lineage`` and ``config.lineage_url`` (no connection yet).

        The spool lives under ``influxdb.spool_dir`` (default
        ``$XDG_STATE_HOME/provscope/spool``), bounded by ``influxdb.spool_max_bytes``.

        Raises:
            ConfigError: unsupported URL scheme or missing driver.
        """
        spool_dir = config.influxdb.spool_dir or default_spool_root()
        return cls(config.lineage_url, batch_size=config.lineage.batch_size,
                   flush_interval_s=config.lineage.flush_interval_s, spool_dir=spool_dir,
                   spool_max_bytes=config.influxdb.spool_max_bytes)

    def _warn(self, kind: str, every_s: float, msg: str, *args: Any,
              level: int = logging.WARNING) -> None:
        now = time.monotonic()
        if now - self._last_log.get(kind, -math.inf) >= every_s:
            self._last_log[kind] = now
            log.log(level, msg, *args)

    def export(self, batch: Sequence[Any]) -> ExportResult:
        """Write one batch in one transaction. Never raises; see the class failure policy."""
        if self._closed:
            return ExportResult.DROP
        try:
            # Older batches waiting on disk go first; while the database is still down the
            # new batch joins them without another connection attempt.
            if self.spool is not None and self.spool.pending and (
                    time.monotonic() < self._next_replay or not self._replay()):
                return self._hold(batch)
            self.written += self.store.write(batch)
            self.last_error = None
            return ExportResult.SUCCESS
        except Exception as exc:
            if self._unavailable(exc):
                return self._hold(batch)
            return self._export_one_by_one(batch, exc)

    def _unavailable(self, exc: BaseException) -> bool:
        """Log and classify a failure: True when the database may come back."""
        self.last_error = _one_line(exc) if not isinstance(exc, LineageSchemaError) \
            else str(exc)
        if isinstance(exc, LineageSchemaError):
            self._warn("schema", 3600, "lineage store %s: %s; records kept until then",
                       safe_url(self.url), exc, level=logging.ERROR)
            return True
        if _retryable(exc):
            self._warn("unreachable", 60, "lineage store %s unavailable (%s); records kept "
                       "and retried", safe_url(self.url), self.last_error)
            return True
        return False

    _server_gone = False  # the last replay failed because no server answered at all

    def _hold(self, batch: Sequence[Any]) -> ExportResult:
        if self.spool is not None and self.spool.append(batch):
            return ExportResult.SUCCESS
        return ExportResult.RETRY

    def _replay(self) -> bool:
        """Write the spooled batches. True when the spool is empty afterwards."""
        assert self.spool is not None
        try:
            self.spool.replay(self._write_replayed)
        except Exception as exc:
            self._server_gone = _no_server(exc)
            if not self._unavailable(exc):
                log.exception("lineage spool replay failed")
            self._next_replay = time.monotonic() + self._replay_backoff.next()
            return False
        self._replay_backoff.reset()
        self.last_error = None
        return True

    def _write_replayed(self, records: list[Any]) -> None:
        try:
            self.written += self.store.write(records)
        except Exception as exc:
            if _retryable(exc) or isinstance(exc, LineageSchemaError):
                raise
            self._export_one_by_one(records, exc)  # bad data: drop only the bad records

    def _export_one_by_one(self, batch: Sequence[Any], first: BaseException) -> ExportResult:
        self._warn("rejected", 60, "lineage store %s rejected a batch (%s); writing it record "
                   "by record and dropping the rejected ones", safe_url(self.url),
                   _one_line(first))
        for i, record in enumerate(batch):
            try:
                self.written += self.store.write([record])
            except Exception as exc:
                if _retryable(exc) or isinstance(exc, LineageSchemaError):
                    # The rest waits (what was written already is idempotent).
                    return self._hold(batch[i:])
                self.rejected += 1
                self._warn("dropped", 60, "lineage record dropped (%s): %s", _one_line(exc),
                           str(record)[:200])
        return ExportResult.SUCCESS

    def flush(self, timeout_s: float) -> bool:
        """Replay the spool within ``timeout_s``. True when nothing is left on disk."""
        if self.spool is None or not self.spool.pending:
            return True
        deadline = time.monotonic() + timeout_s
        while True:
            if self._replay():
                return True
            left = deadline - time.monotonic()
            if left <= 0 or self._server_gone:
                # No server at the URL: the records are safe on disk and a later flush or
                # the next process writes them; waiting would only hold up the caller.
                return False
            time.sleep(min(0.2, left))

    def shutdown(self, timeout_s: float) -> None:
        """Replay what is spooled within the deadline, then release everything. Idempotent.

        Batches still spooled stay on disk; the next process on this URL replays them, so
        a job exiting during an outage waits at most 2 s here, not the whole deadline.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.flush(min(timeout_s, 2.0))
        finally:
            if self.spool is not None:
                self.spool.report_left()
                self.spool.close()
            self.store.close()

    def stats(self) -> dict[str, float]:
        """Counters named as in ``provscope.catalogue.internal`` (records, not bytes)."""
        out = {"points_written_total": float(self.written),
               "points_dropped_total": float(self.rejected)}
        if self.spool is not None:
            out["points_dropped_total"] += self.spool.dropped
            out["points_spooled_total"] = float(self.spool.spooled)
            out["points_replayed_total"] = float(self.spool.replayed)
            out["spool_bytes"] = float(self.spool.pending_bytes)
        return out


_NO_SERVER = ("connection refused", "could not connect", "no route to host",
              "name or service not known", "could not translate host name")


def _no_server(exc: BaseException) -> bool:
    """True when the database server could not be reached at all (not a lock or a timeout
    inside a running server)."""
    text = str(exc).lower()
    return any(marker in text for marker in _NO_SERVER)


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0] if text else ''}"

