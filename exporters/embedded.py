"""The embedded time-series store: points in a local SQLite file (no server needed).

Used when ``influxdb.url`` is unset. The file is, by default, the same one the lineage
store writes (``embedded.path``); both writers use WAL mode so they and readers coexist.

Layout (long format, one row per field value)::

    points(time_ns BIGINT, measurement TEXT, field TEXT, value REAL, str_value TEXT,
           run_id TEXT, host TEXT, rank TEXT, tags TEXT)   -- tags: JSON of the other tags

Numbers and booleans go to ``value`` (booleans as 0/1), strings to ``str_value``. The
tags ``run_id``, ``host`` and ``rank`` have their own indexed columns because every read
filters on them; others stay in the JSON ``tags`` column (``json_extract`` reads them).
Indexes: (measurement, field, time_ns) and (run_id, measurement, time_ns).

Names and values follow the same policy as the InfluxDB writer
(``provscope.exporters.influxdb.sanitize``): the same stored names, one type per field,
refused points and values counted by reason, so both backends hold the same data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from provscope.exporters.base import ExportResult
from provscope.exporters.influxdb.sanitize import PointPolicy, clean_point

from provscope.records import Point
from provscope.safefs import private_sqlite

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = ["POINTS_DDL", "EmbeddedPointsExporter", "point_rows"]

log = logging.getLogger("provscope.embedded")

POINTS_DDL = (
    "CREATE TABLE IF NOT EXISTS points ("
    " time_ns INTEGER NOT NULL, measurement TEXT NOT NULL, field TEXT NOT NULL,"
    " value REAL, str_value TEXT, run_id TEXT, host TEXT, rank TEXT, tags TEXT)",
    "CREATE INDEX IF NOT EXISTS ix_points_measurement_field_time"
    " ON points (measurement, field, time_ns)",
    "CREATE INDEX IF NOT EXISTS ix_points_run_measurement_time"
    " ON points (run_id, measurement, time_ns)",
)
_INSERT = ("INSERT INTO points (time_ns, measurement, field, value, str_value, run_id, host,"
           " rank, tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_COLUMN_TAGS = ("run_id", "host", "rank")


def point_rows(points: Sequence[Any], policy: PointPolicy | None = None) -> list[tuple[Any, ...]]:
    """Rows for the ``points`` table (one per field), after the sanitisation policy (a
    refused point or value gives no row and is counted in ``policy``). Non-points are
    skipped."""
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    tag_cache: dict[tuple[tuple[str, str], ...], str | None] = {}
    for raw in points:
        if type(raw) is not Point:
            continue
        try:
            p = clean_point(raw, policy)
        except ValueError:  # no policy: an unsupported value type
            continue
        if p is None:
            continue
        tags = p.tags
        run_id = tags.get("run_id")
        host = tags.get("host")
        rank = tags.get("rank")
        key = tuple(tags.items())
        extra = tag_cache.get(key, "")
        if extra == "":
            rest = {k: v for k, v in tags.items() if k not in _COLUMN_TAGS}
            extra = json.dumps(rest, sort_keys=True, separators=(",", ":")) if rest else None
            tag_cache[key] = extra
        # No time: the time of writing (as InfluxDB uses its clock).
        t = p.time_ns if p.time_ns is not None else time.time_ns()
        m = p.measurement
        for field, value in p.fields.items():
            if isinstance(value, str):
                append((t, m, field, None, value, run_id, host, rank, extra))
            elif isinstance(value, bool):
                append((t, m, field, 1.0 if value else 0.0, None, run_id, host, rank, extra))
            else:  # a finite float or an int in range (the policy checked): REAL
                append((t, m, field, float(value), None, run_id, host, rank, extra))
    return rows


class EmbeddedPointsExporter:
    """Writes ``Point`` records to the ``points`` table of a SQLite file.

    A batch is one transaction with one ``executemany``. A locked file (another writer
    holding the lock longer than ``busy_timeout_ms``) or an unwritable one answers
    ``RETRY`` (logged at most once a minute), so points wait in the pipeline.

    Args:
        path: SQLite file; its directory is created on first write.
        batch_size: points per transaction (read by the pipeline).
        flush_interval_s: longest wait before a point is written (read by the pipeline).
        busy_timeout_ms: how long a write waits on a locked file.
    """

    name: ClassVar[str] = "embedded"
    accepts: ClassVar[frozenset[str]] = frozenset({"points"})

    def __init__(self, path: str, *, batch_size: int = 5000, flush_interval_s: float = 1.0,
                 busy_timeout_ms: int = 2000) -> None:
        self.path = str(Path(path).expanduser())
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._busy_ms = int(busy_timeout_ms)
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._closed = False
        self._last_log = -math.inf
        self.written = 0
        self.last_error: str | None = None
        self.policy = PointPolicy(name="embedded")

    @classmethod
    def from_config(cls, config: Config) -> EmbeddedPointsExporter:
        """The exporter for ``config.embedded.path`` (nothing is opened yet)."""
        return cls(config.embedded.path, batch_size=config.influxdb.batch_size,
                   flush_interval_s=config.influxdb.flush_interval_s)

    def _connect(self) -> sqlite3.Connection:
        if self._pid != os.getpid():
            # A forked child must not share the parent's SQLite handle (or its locks).
            self._conn, self._pid = None, os.getpid()
        if self._conn is None:
            private_sqlite(self.path)  # 0600 file (and so WAL/SHM), parents created
            conn = sqlite3.connect(self.path, timeout=self._busy_ms / 1000,
                                   check_same_thread=False, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                for ddl in POINTS_DDL:
                    conn.execute(ddl)
            except Exception:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def write(self, points: Sequence[Any]) -> int:
        """Insert points in one transaction. Blocks on the file lock up to the busy timeout.

        Returns:
            Rows inserted (one per field value).

        Raises:
            sqlite3.Error: the file is locked, unwritable or corrupt (nothing was written).
        """
        rows = point_rows(points, self.policy)
        if not rows:
            return 0
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return len(rows)

    def export(self, batch: Sequence[Any]) -> ExportResult:
        """Write one batch. Never raises: a database error answers ``RETRY``."""
        if self._closed:
            return ExportResult.DROP
        try:
            with self._lock:
                self.written += self.write(batch)
            self.last_error = None
            return ExportResult.SUCCESS
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            now = time.monotonic()
            if now - self._last_log >= 60:
                self._last_log = now
                log.warning("embedded store %s not writable (%s); points kept and retried",
                            self.path, self.last_error)
            if self._conn is not None and not isinstance(exc, sqlite3.OperationalError):
                self._reset()
            return ExportResult.RETRY

    def _reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                log.debug("closing %s failed", self.path, exc_info=True)

    def flush(self, timeout_s: float) -> bool:
        """Nothing is held here (batches are written synchronously); always True."""
        return True

    def shutdown(self, timeout_s: float) -> None:
        """Close the file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._reset()

    def stats(self) -> dict[str, float]:
        """``points_written_total``: field values written (one row each);
        ``points_dropped_total``: points the sanitisation policy refused; the
        ``*_rejected_total`` counters by reason (as the InfluxDB writer's)."""
        return {"points_written_total": float(self.written),
                "points_dropped_total": float(self.policy.points_rejected),
                **self.policy.stats()}
