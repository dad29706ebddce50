"""The InfluxDB writer: batching, the response policy, splitting and a disk spool.

It speaks to the server through ``InfluxTransport`` (``transport.py``: the v1/v2/v3
endpoints, auth headers, the keep-alive connection, gzip); this module decides what each
answer means.

Response policy, per batch:

- 2xx: written.
- 400/422 "partial write" (InfluxDB 1.x wrote the rest): exactly the points it names
  are counted as dropped (``dropped=N`` plus one per line it could not parse).
- 400/422 for the whole batch (a type conflict inside the batch, a 2.x parse error):
  the lines the message names (by text or by line number) are dropped and counted, and
  the rest is sent again once without them; when the message names none (or the rest is
  rejected again), the batch is halved and each half sent, down to the single lines the
  server refuses. So a rejected point never costs its neighbours, and each is counted.
  Messages are logged at most once a minute per kind; the counts are exact.
- 401/403: credentials are wrong. Logged (once a minute) as an auth error; the data is
  kept in the spool, not lost, and replayed once the credentials work.
- 404 "database not found": the database is created again and the batch retried.
- 413: the batch is split in halves, each sent (and split again) on its own.
- 429, 5xx, connection errors and timeouts: retried up to ``max_retries`` times with
  exponential backoff and full jitter (``provscope.backoff``), honouring ``Retry-After``
  (capped at ``max_backoff_s``); then the batch goes to the spool.

Spool: while it holds anything, new batches are appended behind it (order is kept) and
each ``export`` first replays it oldest-first (for at most a couple of seconds) once the
server answers again; between failed attempts the server is probed with a growing delay
(capped at 5 s) rather than on every batch. A new exporter on the same spool directory
replays what an earlier process left. ``export`` returns ``SUCCESS`` once every point of
a batch is written, spooled (durable) or counted as dropped by the exporter itself (so
``stats()`` holds every drop), and ``RETRY`` only when no spool could be opened and the
server is unreachable; it never raises.

Before encoding, every point goes through ``sanitize``'s policy (``self.policy``): names
made storable, field types kept per series, refused points and values counted by reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from provscope.exporters.base import ExportResult
from provscope.exporters.influxdb.lineprotocol import encode_lines
from provscope.exporters.influxdb.sanitize import PointPolicy
from provscope.exporters.influxdb.transport import InfluxTransport, TransportError, error_text
from provscope.exporters.spool import Spool, SpoolBusy, report_left

from provscope.backoff import Backoff, backoff_delay, retry_after_seconds
from provscope.destinations import safe_url
from provscope.errors import ConfigError
from provscope.forking import reset_in_child

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = ["InfluxDBExporter", "default_spool_dir"]

log = logging.getLogger("provscope.exporters.influxdb")

_OK, _REJECTED, _FAILED = "ok", "rejected", "failed"
_PROBE_CAP_S = 5.0  # longest wait between attempts to reach a server that was down
_REPLAY_BUDGET_S = 2.0  # longest an export call spends replaying the spool
_LOG_EVERY_S = 60.0
_DROPPED_RE = re.compile(r"dropped=(\d+)")
# InfluxDB 1.x joins one "unable to parse '<line>': <why>" per bad line with newlines.
_UNPARSED_RE = re.compile(r"(?:^|\n)(?:partial write: )?unable to parse '")
# 2.x names bad lines by number: "errors encountered on line(s): line 2: ...; line 5: ...".
_LINE_NO_RE = re.compile(r"\bline (\d+):")
_SPOOL_SLOTS = 8
_STREAM_CHUNK = 1000  # batches of at least twice this are sent as overlapping chunks


def default_spool_dir() -> Path:
    """``$XDG_STATE_HOME/provscope/spool``, or ``~/.local/state/provscope/spool``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return Path(base) / "provscope" / "spool"


class _Failure(Exception):
    """A retryable failure (connection error, timeout, 429, 5xx, auth, missing database)."""

    def __init__(self, reason: str, retry_after: float | None = None, auth: bool = False):
        super().__init__(reason)
        self.retry_after = retry_after
        self.auth = auth


class InfluxDBExporter:
    """Writes ``Point`` batches to InfluxDB 1.x/2.x/3.x. See the module docstring for policy.

    Args:
        url: base URL, ``http://host:8086`` (``https`` works too; a path prefix is kept).
        api: ``"v1"``, ``"v2"`` or ``"v3"``.
        database: v1/v3 database; v2 bucket when ``bucket`` is unset.
        retention_policy: v1 retention policy (None: the database default).
        username, password: v1 credentials (sent as ``u``/``p``).
        org, bucket, token: v2 organisation and bucket; v2/v3 token (v1: sent as a
            ``Token`` header when no username is set, for 2.x's compatibility API).
        create_database: v1: issue ``CREATE DATABASE`` before the first write.
        batch_size, flush_interval_s: read by the pipeline (points per request; seconds).
        gzip: compress request bodies.
        timeout_s: connect and read timeout per request, seconds.
        max_retries: immediate retries of a failing batch before it is spooled.
        retry_backoff_s, max_backoff_s: backoff window of the first retry and its cap
            (``provscope.backoff``; the cap also bounds Retry-After), seconds.
        spool_dir: parent directory of the spool (None: ``default_spool_dir()``); each
            destination gets its own subdirectory, and a second process writing to the same
            destination takes the next free slot (``.1``, ``.2``, ...).
        spool_max_bytes: spool size bound, bytes.
        ints_as_float: write ints as floats unless the catalogue declares them ``int``.

    Raises:
        ConfigError: an unusable URL or api.
    """

    name: ClassVar[str] = "influxdb"
    accepts: ClassVar[frozenset[str]] = frozenset({"points"})

    def __init__(
        self,
        url: str,
        *,
        api: str = "v1",
        database: str = "provscope",
        retention_policy: str | None = None,
        username: str | None = None,
        password: str | None = None,
        org: str | None = None,
        bucket: str | None = None,
        token: str | None = None,
        create_database: bool = True,
        batch_size: int = 5000,
        flush_interval_s: float = 1.0,
        gzip: bool = True,
        timeout_s: float = 10.0,
        max_retries: int = 3,
        retry_backoff_s: float = 0.2,
        max_backoff_s: float = 30.0,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_max_bytes: int = 1 << 30,
        ints_as_float: bool = True,
        tls_verify: bool = True,
        tls_ca_file: str | None = None,
    ) -> None:
        self.transport = InfluxTransport(
            url, api=api, database=database, retention_policy=retention_policy,
            username=username, password=password, org=org, bucket=bucket, token=token,
            gzip=gzip, timeout_s=timeout_s, tls_verify=tls_verify, tls_ca_file=tls_ca_file)
        self.url = url
        self.api = api
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._max_retries = max_retries
        self._backoff0 = retry_backoff_s
        self._max_backoff = max_backoff_s
        self._ints_as_float = ints_as_float
        self._need_db = api == "v1" and create_database
        self._next_try = 0.0  # monotonic time before which the spool path skips the network
        # Delay between probes of a server that is down (reset once it answers).
        self._probe = Backoff(retry_backoff_s, min(_PROBE_CAP_S, max_backoff_s))
        self._deadline: float | None = None  # set by flush/shutdown: no sleep past it
        self._last_log: dict[str, float] = {}
        self._closed = False
        # The sanitisation policy: field types of this destination's series, refusals.
        self.policy = PointPolicy(ints_as_float, name="influxdb")
        # Counters (names as in provscope.catalogue.internal).
        self.points_written = 0
        self.points_dropped = 0  # every point dropped, whatever the cause
        self.points_spooled = 0
        self.points_replayed = 0
        self.retries = 0
        self.batches_failed = 0
        self.last_latency_s = 0.0
        self.spool: Spool | None = self._open_spool(spool_dir, spool_max_bytes)
        reset_in_child(self, InfluxDBExporter._forget_after_fork)

    @classmethod
    def from_config(cls, config: Config) -> InfluxDBExporter:
        """Build from ``config.influxdb``.

        Raises:
            ConfigError: ``influxdb.url`` unset or unusable.
        """
        c = config.influxdb
        if not c.url:
            raise ConfigError("influxdb.url is not set (e.g. http://127.0.0.1:8086)")
        return cls(
            c.url, api=c.api, database=c.database, retention_policy=c.retention_policy,
            username=c.username, password=c.secret("password"), org=c.org, bucket=c.bucket,
            token=c.secret("token"), create_database=c.create_database, batch_size=c.batch_size,
            flush_interval_s=c.flush_interval_s, gzip=c.gzip, timeout_s=c.timeout_s,
            max_retries=c.max_retries, retry_backoff_s=c.retry_backoff_s,
            max_backoff_s=c.max_backoff_s, spool_dir=c.spool_dir,
            spool_max_bytes=c.spool_max_bytes, tls_verify=c.tls_verify,
            tls_ca_file=c.tls_ca_file,
        )

    @property
    def _conn(self) -> http.client.HTTPConnection | None:
        """The transport's kept-alive connection (None when closed)."""
        return self.transport.conn

    # ------------------------------------------------------------------ spool

    def _open_spool(self, spool_dir: Any, max_bytes: int) -> Spool | None:
        parent = Path(spool_dir) if spool_dir else default_spool_dir()
        destination = self.transport.destination
        digest = hashlib.sha1(f"{self.url}|{self.api}|{destination}".encode()).hexdigest()
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", destination)[:40]
        base = f"influxdb-{self.api}-{safe}-{digest[:10]}"
        for slot in range(_SPOOL_SLOTS):
            path = parent / (base if slot == 0 else f"{base}.{slot}")
            try:
                spool = Spool(path, max_bytes=max_bytes)
            except SpoolBusy:
                continue
            except OSError as exc:
                log.warning("influxdb: cannot open the spool in %s (%s); without it, batches "
                            "wait in memory while the server is unreachable", path, exc)
                return None
            spool.label(kind="influxdb", api=self.api, destination=safe_url(self.url),
                        database=destination, unit="points")
            return spool
        log.warning("influxdb: all %d spool slots under %s are in use; running without a spool",
                    _SPOOL_SLOTS, parent)
        return None

    def _spool_append(self, body: bytes, count: int) -> bool:
        if self.spool is None:
            return False
        try:
            self.spool.append(body, count)
        except (OSError, ValueError) as exc:
            self._log("spool", logging.ERROR, "influxdb: spool write failed (%s)", exc)
            return False
        self.points_spooled += count
        return True

    # ------------------------------------------------------------------ export

    def export(self, batch: Sequence[Any]) -> ExportResult:
        """Write one batch of points. Blocks for the retries (bounded); never raises.

        Returns:
            SUCCESS when every point is written, spooled or counted as dropped here;
            RETRY when the batch could be neither written nor spooled.
        """
        try:
            return self._export(batch)
        except Exception:  # the contract: never raise into the pipeline
            log.exception("influxdb: unexpected error; batch of %d dropped", len(batch))
            self.points_dropped += len(batch)
            self.batches_failed += 1
            return ExportResult.SUCCESS

    def _export(self, batch: Sequence[Any]) -> ExportResult:
        if self._closed:
            return ExportResult.RETRY
        start = time.perf_counter()
        spool = self.spool
        if spool is not None and spool.pending_records:
            self._replay(time.monotonic() + _REPLAY_BUDGET_S)
        if spool is not None and not spool.pending_records and self._deadline is None \
                and len(batch) >= 2 * _STREAM_CHUNK:
            self._stream(batch)
            self.last_latency_s = time.perf_counter() - start
            return ExportResult.SUCCESS
        prepared = self._prepare(batch)
        if prepared is None:
            return ExportResult.SUCCESS
        body, count = prepared
        if spool is not None and spool.pending_records:
            if self._spool_append(body, count):
                return ExportResult.SUCCESS
            return ExportResult.RETRY
        result = self._deliver(body, count, retries=True)
        if result == _OK:
            self.last_latency_s = time.perf_counter() - start
            return ExportResult.SUCCESS
        if result == _REJECTED:
            return ExportResult.SUCCESS  # counted in _rejected
        if self._spool_append(body, count):
            return ExportResult.SUCCESS
        return ExportResult.RETRY

    def _prepare(self, points: Sequence[Any]) -> tuple[bytes, int] | None:
        """Encode and compress; None when no point has a writable field."""
        try:
            lines = encode_lines(points, policy=self.policy)
        except Exception:  # a bug must not cost the batch: encode point by point
            lines = self._encode_each(points)
        # Points the policy refused produce no line (counted there by reason).
        self.points_dropped += len(points) - len(lines)
        if not lines:
            return None
        return self.transport.compress("\n".join(lines).encode()), len(lines)

    # ------------------------------------------------------------------ streaming

    def _stream(self, batch: Sequence[Any]) -> None:
        """Send a large batch in chunks, encoding chunk i+1 while the server writes chunk i.

        Encoding and the server's work then overlap (two cores instead of one), with one
        request in flight at a time, so the response policy stays sequential: a chunk
        whose answer is not 2xx goes through the normal path (retries, split, drop) and,
        once one has ended in the spool, the rest follow it there, in order. Every
        outcome is counted here (the batch is answered SUCCESS).
        """
        n = len(batch)
        step = -(-n // max(2, min(4, n // _STREAM_CHUNK)))
        inflight: tuple[bytes, int] | None = None
        failed = False
        for offset in range(0, n + step, step):
            chunk = batch[offset:offset + step]
            nxt = self._prepare(chunk) if chunk else None
            if inflight is not None:
                failed = not self._finish(*inflight) or failed
                inflight = None
            if nxt is None:
                continue
            if failed:
                self._spool_or_drop(*nxt)
            elif self._begin(nxt[0]):
                inflight = nxt
            else:
                failed = not self._settle(self._deliver(*nxt, retries=True), *nxt)

    def _begin(self, body: bytes) -> bool:
        """Send one write request without waiting for its answer. False if it could not."""
        try:
            if self._need_db:
                self._create_database()
            self.transport.send_write(body)
            return True
        except (_Failure, TransportError):
            self.transport.close()
            return False

    def _finish(self, body: bytes, count: int) -> bool:
        """Read the answer to ``_begin``; anything but a clear answer takes the normal path."""
        try:
            status, headers, data = self.transport.read_answer()
            result = self._handle(status, headers, data, count)
        except _Rejected as rejected:
            result = self._isolate(body, count, rejected.message, True)
        except (_Failure, _Split, TransportError):
            self.transport.close()
            result = self._deliver(body, count, retries=True)
        return self._settle(result, body, count)

    def _settle(self, result: str, body: bytes, count: int) -> bool:
        """Count a streamed chunk's outcome; False when it ended in the spool (or lost)."""
        if result == _FAILED:
            self._spool_or_drop(body, count)
            return False
        return True

    def _spool_or_drop(self, body: bytes, count: int) -> None:
        if not self._spool_append(body, count):
            self.points_dropped += count

    def _encode_each(self, batch: Sequence[Any]) -> list[str]:
        """Encode point by point, dropping (and counting, logging once) unencodable ones."""
        lines = []
        for point in batch:
            try:
                lines.extend(encode_lines((point,), policy=self.policy))
            except Exception as exc:
                self.policy.reject_points("invalid_value", 1, f"{type(exc).__name__}: {exc}")
        return lines

    # ------------------------------------------------------------------ delivery

    def _deliver(self, body: bytes, count: int, *, retries: bool) -> str:
        """Send one body; returns _OK (written or handled), _REJECTED or _FAILED.

        With ``retries``, transient failures are retried with backoff first. A 413 splits
        the body; halves that then fail are spooled here, in order.
        """
        attempt = 0
        while True:
            try:
                return self._post(body, count)
            except _Failure as failure:
                if failure.auth:
                    self._log("auth", logging.ERROR,
                              "influxdb: %s at %s: check influxdb.username/password or "
                              "influxdb.token; points are kept in the spool", failure, self.url)
                    self._open_circuit(None)
                    return _FAILED
                # A long Retry-After is better waited out with the batch on disk than with
                # the pipeline's worker asleep while its memory queue fills.
                long_wait = failure.retry_after is not None and \
                    min(failure.retry_after, self._max_backoff) > _PROBE_CAP_S
                if not retries or long_wait or attempt >= self._max_retries \
                        or self._past_deadline():
                    self._log("down", logging.WARNING,
                              "influxdb: %s (%s); spooling until it answers", self.url, failure)
                    self._open_circuit(failure.retry_after)
                    return _FAILED
                self.retries += 1
                delay = backoff_delay(attempt, base_s=self._backoff0, cap_s=self._max_backoff,
                                      retry_after_s=failure.retry_after)
                if self._deadline is not None:
                    delay = min(delay, max(0.0, self._deadline - time.monotonic()))
                time.sleep(delay)
                attempt += 1
            except _Split:
                return self._deliver_split(body, count, retries)
            except _Rejected as rejected:
                return self._isolate(body, count, rejected.message, retries)

    def _deliver_split(self, body: bytes, count: int, retries: bool) -> str:
        lines = self.transport.decompress(body).split(b"\n")
        if len(lines) < 2:
            self._rejected(count, "HTTP 413: a single line is larger than the server accepts",
                           lines[0][:200].decode(errors="replace"))
            return _OK
        mid = len(lines) // 2
        return self._deliver_parts([lines[:mid], lines[mid:]], retries)

    def _deliver_parts(self, parts: list[list[bytes]], retries: bool) -> str:
        """Send parts of a body in order; once one fails, the rest go to the spool."""
        failed = False
        for lines in parts:
            if not lines:
                continue
            part = self.transport.compress(b"\n".join(lines))
            if not failed:
                result = self._deliver(part, len(lines), retries=retries)
                if result != _FAILED:
                    continue  # written, or rejected and counted
                failed = True
            if not self._spool_append(part, len(lines)):
                self.points_dropped += len(lines)
        return _OK

    def _isolate(self, body: bytes, count: int, message: str, retries: bool) -> str:
        """A 400 for the whole batch: find the lines the server refuses, count each of
        them as dropped and deliver every other line (see the module docstring)."""
        lines = self.transport.decompress(body).split(b"\n")
        if len(lines) < 2:
            self._rejected(1, message, lines[0][:200].decode(errors="replace"))
            return _OK
        bad = _named_lines(message, lines)
        if bad and len(bad) < len(lines):
            for i in sorted(bad):
                self._rejected(1, message, lines[i][:200].decode(errors="replace"))
            rest = [line for i, line in enumerate(lines) if i not in bad]
            return self._deliver_parts([rest], retries)
        if bad:  # every line named: all refused
            self._rejected(len(lines), message, lines[0][:200].decode(errors="replace"))
            return _OK
        mid = len(lines) // 2
        return self._deliver_parts([lines[:mid], lines[mid:]], retries)

    def _rejected(self, count: int, message: str, first: str = "") -> None:
        """Count ``count`` points the server refused (dropped, reason ``server``)."""
        self.batches_failed += 1
        self.points_dropped += count
        self.policy.reject_points("server", count, message[:300] + (
            f"; line: {first}" if first else ""))

    def _post(self, body: bytes, count: int) -> str:
        """One request. Returns _OK/_REJECTED; raises _Failure (retryable) or _Split."""
        if self._need_db:
            self._create_database()
        try:
            status, headers, data = self.transport.write(body)
        except TransportError as exc:
            raise _Failure(str(exc)) from None
        return self._handle(status, headers, data, count)

    def _handle(self, status: int, headers: http.client.HTTPMessage, data: bytes,
                count: int) -> str:
        """Apply the response policy to one answer (see the module docstring)."""
        if 200 <= status < 300:
            self.points_written += count
            return _OK
        message = error_text(data) or f"HTTP {status}"
        if status in (400, 422):
            return self._partial_or_rejected(message, count, data)
        if status in (401, 403):
            raise _Failure(f"authentication failed (HTTP {status}: {message})", auth=True)
        if status == 404 and "database not found" in message:
            self._need_db = self.api == "v1"
            raise _Failure(f"HTTP 404: {message}")
        if status == 413:
            raise _Split()
        retry_after = retry_after_seconds(headers.get("Retry-After"))
        if status == 429 or status >= 500:
            raise _Failure(f"HTTP {status}: {message}", retry_after)
        self._rejected(count, f"HTTP {status}: {message}")
        return _REJECTED

    def _partial_or_rejected(self, message: str, count: int, data: bytes) -> str:
        """A 400/422: count what a partial write dropped, or raise ``_Rejected``."""
        if "partial write" in message:
            m = _DROPPED_RE.search(message)
            unparsed = len(_UNPARSED_RE.findall(message))
            named = _json_line_numbers(data)
            if m is not None or unparsed or named:
                # 1.x/2.x ("dropped=N", "unable to parse '...'") and 3.x (one entry per
                # line) wrote the rest: count exactly what the server says it dropped.
                dropped = min(count, (int(m.group(1)) if m else 0) + unparsed + named)
                self.points_written += count - dropped
                if dropped:
                    self._rejected(dropped, message)
                return _OK
        # Nothing says the rest was written: find the refused lines and send the rest
        # again (a point written twice is stored once: same series and time).
        raise _Rejected(message)

    def _create_database(self) -> None:
        try:
            status, data = self.transport.create_database()
        except TransportError as exc:
            raise _Failure(str(exc)) from None
        if status in (401, 403):
            # The user may lack admin rights on a database that exists: write anyway.
            self._log("createdb", logging.WARNING, "influxdb: CREATE DATABASE refused "
                      "(HTTP %d: %s); writing anyway", status, error_text(data))
        elif status >= 500:
            raise _Failure(f"CREATE DATABASE: HTTP {status}")
        self._need_db = False

    # ------------------------------------------------------------------ spool replay

    def _open_circuit(self, retry_after: float | None) -> None:
        # Retry-After may exceed the probe cap (up to max_backoff_s): the server said so.
        delay = self._probe.next()
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._max_backoff))
        self._next_try = time.monotonic() + delay

    def _replay(self, deadline: float, force: bool = False) -> None:
        """Send spooled bodies oldest-first until empty, a failure, or ``deadline``."""
        spool = self.spool
        if spool is None or (not force and time.monotonic() < self._next_try):
            return
        while time.monotonic() < deadline:
            item = spool.peek()
            if item is None:
                return
            body, count = item
            written = self.points_written
            result = self._deliver(body, count, retries=False)
            if result == _FAILED:
                return
            self.points_replayed += self.points_written - written
            spool.ack()
            self._probe.reset()

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    # ------------------------------------------------------------------ control

    def flush(self, timeout_s: float) -> bool:
        """Drain the spool within ``timeout_s`` seconds. True when nothing is left."""
        if self.spool is None or self._closed:
            return True
        deadline = time.monotonic() + timeout_s
        self._deadline = deadline
        try:
            while self.spool.pending_records and time.monotonic() < deadline:
                self._replay(deadline, force=True)
                if self.spool.pending_records and self.transport.refused:
                    # Nothing listens at the URL: the records are safe on disk and a later
                    # flush or the next process sends them. Waiting out the deadline would
                    # only hold up the caller (a job at exit, an agent on SIGTERM).
                    return False
                if self.spool.pending_records:
                    time.sleep(min(max(0.0, deadline - time.monotonic()),
                                   max(0.05, self._next_try - time.monotonic())))
            return not self.spool.pending_records
        finally:
            self._deadline = None

    def shutdown(self, timeout_s: float) -> None:
        """Flush within ``timeout_s``, then close the connection and the spool. Idempotent.

        What the spool still holds stays on disk for the next process.
        """
        if self._closed:
            return
        with contextlib.suppress(Exception):
            self.flush(timeout_s)
        self._closed = True
        self.transport.close()
        if self.spool is not None:
            report_left(self.spool.pending_count, "points", self.spool.directory,
                        safe_url(self.url))
            self.spool.close()

    def stats(self) -> dict[str, float]:
        """Self-metrics (``provscope.catalogue.internal``).

        ``points_dropped_total`` counts every point dropped here: refused by the
        sanitisation policy, rejected by the server (whole batches included), spool
        overflow. ``points_rejected_total``/``fields_rejected_total`` and
        ``rejected_<reason>_total`` say why (``sanitize.REASONS``);
        ``batches_failed_total`` counts every server rejection.
        """
        spool = self.spool
        return {
            **self.policy.stats(),
            "points_written_total": float(self.points_written),
            "points_dropped_total": float(self.points_dropped
                                          # "is not None": an empty Spool is falsy
                                          # (len 0), and its drops must still count.
                                          + (spool.dropped_count if spool is not None
                                             else 0)),
            "points_spooled_total": float(self.points_spooled),
            "points_replayed_total": float(self.points_replayed),
            "retries_total": float(self.retries),
            "batches_failed_total": float(self.batches_failed),
            "spool_bytes": float(spool.pending_bytes if spool else 0),
            "export_latency_seconds": self.last_latency_s,
        }

    def _forget_after_fork(self) -> None:
        # A forked child must not write on the parent's socket or into its spool; it
        # opens its own connection on demand and runs without a spool.
        self.transport.forget()
        if self.spool is not None:
            self.spool.detach()
            self.spool = None

    def _log(self, key: str, level: int, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_log.get(key, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._last_log[key] = now
            log.log(level, msg, *args)


class _Split(Exception):
    """HTTP 413: the body is too large; split it."""


class _Rejected(Exception):
    """HTTP 400/422 for the whole body: find the lines the server refuses."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _json_line_numbers(data: bytes) -> int:
    """The number of lines an InfluxDB 3 partial-write answer names (``data`` entries)."""
    try:
        entries = json.loads(data).get("data")
    except (ValueError, AttributeError):
        return 0
    if not isinstance(entries, list):
        return 0
    return len({e.get("line_number") for e in entries if isinstance(e, dict)} - {None})


def _named_lines(message: str, lines: list[bytes]) -> set[int]:
    """Indexes of the lines a server's error message names: by text (1.x ``unable to
    parse '<line>'``) or by 1-based number (2.x ``line 3:``)."""
    bad: set[int] = set()
    if "unable to parse '" in message:
        index: dict[bytes, list[int]] = {}
        for i, line in enumerate(lines):
            index.setdefault(line, []).append(i)
        for chunk in message.split("unable to parse '")[1:]:
            # The quoted line may itself contain "': ", so try each candidate end.
            for end in [m.start() for m in re.finditer("': ", chunk)] + [len(chunk)]:
                found = index.get(chunk[:end].encode())
                if found:
                    bad.update(found)
                    break
    if not bad and "line(s)" in message:
        for m in _LINE_NO_RE.finditer(message):
            n = int(m.group(1)) - 1
            if 0 <= n < len(lines):
                bad.add(n)
    return bad
