"""The job's connection to the node agent: a bounded buffer and one sender thread.

``submit`` appends to a bounded in-process deque and returns at once; a background
thread (``provscope-client-send``) batches records into frames (``provscope.wire``) and
writes them to the agent's Unix socket (the queue and thread are
``provscope.bounded.QueueWorker``, as in the pipeline). When the agent goes away the
client keeps buffering (the oldest records are dropped and counted when the buffer is
full) and reconnects with backoff and jitter, at least every ``client.reconnect_s``.
After ``fork`` the child starts with an empty buffer and its own connection.

Acknowledged delivery (``provscope.wire``, protocol version 2). Every frame sent stays in
a resend window until the agent acknowledges it (DURABLE: its records are written,
spooled on disk or counted by the agent); the sender thread reads the acks without
blocking. When the connection breaks (the agent was killed and restarted) the window is
sent again, in order, before anything newer: records may arrive twice (the stores keep
one point per series and time, and merge lineage rows by id), never not at all. The
window is bounded (``client.buffer_size`` records, ``client.resend_max_bytes`` bytes);
while it is full nothing more is sent, so new records wait in the buffer, whose oldest
are dropped and counted when it is full: every drop is of records the agent never got.
An agent of protocol version 1 never acknowledges; after ``_LEGACY_AFTER_S`` without
its first DURABLE a connection falls back to delivery on write, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from provscope import env
from provscope import wire as fr
from provscope.backoff import Backoff
from provscope.bounded import QueueWorker
from provscope.forking import reset_in_child
from provscope.job.identity import env_rank
from provscope.records import Point
from provscope.safefs import trusted_socket
from provscope.wire import socket_path

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = ["AgentClient"]

log = logging.getLogger("provscope.client")

_untrusted_reported: set[str] = set()


def _warn_untrusted(line: str) -> None:
    """One warning per process and socket problem: the job runs on with its own stores."""
    if line not in _untrusted_reported:
        _untrusted_reported.add(line)
        log.warning("provscope: %s", line)


_FIRST_RECONNECT_S = 0.05  # backoff window of the first reconnect attempt
# An acknowledging agent answers a hello at once; one that has not within this time is
# of protocol version 1 and never will.
_LEGACY_AFTER_S = 2.0
# How often a sender waiting only for acks looks again at a peer that sends nothing (a
# closed connection wakes it at once).
_ACK_POLL_S = 0.05


class AgentClient(QueueWorker):
    """The job's connection to the node agent. Every method is safe to call from any
    thread; none raises; ``submit``/``submit_many`` never block.

    Build it with ``try_connect``.

    Args:
        path: the agent's socket.
        buffer_size: records held while the agent is slow or away; oldest dropped, counted.
        reconnect_s: longest delay between reconnect attempts while the agent is away
            (attempts back off with jitter from 50 ms up to it).
        run_id, rank: announced in the hello frame (the process collector tags this
            process tree with them); default ``$PROVSCOPE_RUN_ID`` and the rank
            (``provscope.job.identity.env_rank``). A run that starts later announces
            itself with ``set_identity`` (a second hello on the same connection).
        batch_size: most records per frame.
        send_interval_s: longest time a record waits in the buffer.
        resend_max_bytes: most bytes of sent, unacknowledged frames kept for resending
            (their records are also bounded by ``buffer_size``); while the window is full
            nothing more is sent.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        buffer_size: int = 100_000,
        reconnect_s: float = 2.0,
        run_id: str | None = None,
        rank: int | None = None,
        batch_size: int = 5000,
        send_interval_s: float = 0.1,
        resend_max_bytes: int = 64 << 20,
        sock: socket.socket | None = None,
    ) -> None:
        self.path = str(path)
        self._window_max_records = buffer_size
        self._window_max_bytes = resend_max_bytes
        self._reconnect_s = reconnect_s
        self._run_id = run_id if run_id is not None else os.environ.get(env.RUN_ID) or None
        self._rank = rank if rank is not None else env_rank()
        self._sock = sock
        # A forked child (DataLoader worker) is already inside its parent's watched tree;
        # watching it separately would split the job's series.
        self._watch = True
        super().__init__(capacity=buffer_size, batch_size=batch_size,
                         interval_s=send_interval_s, thread_name="provscope-client-send")
        reset_in_child(self, AgentClient._reset_after_fork)
        if sock is not None:
            self._new_connection(sock)
            self._send_hello(sock)

    def _reset_queue(self) -> None:
        super()._reset_queue()
        self._pid = os.getpid()
        self._hello_due = False
        self._flush_due = False  # flush() waits: ask an acknowledging agent to export now
        self._reconnect = Backoff(min(_FIRST_RECONNECT_S, self._reconnect_s), self._reconnect_s)
        # The resend window: [frame, records, written before] sent or to be sent, not yet
        # acknowledged, oldest first. Its first _on_wire entries were written on the
        # current connection.
        self._window: deque[list[Any]] = deque()
        self._window_bytes = 0
        self._window_records = 0
        self._on_wire = 0
        self._new_connection(None)
        self.sent = 0  # records written to the socket (the first time)
        self.acknowledged = 0  # records the agent acknowledged as durable
        self.resent = 0  # records written again on a new connection
        self.unacknowledged = 0  # records sent but never acknowledged when we shut down
        self.reconnects = 0

    def _new_connection(self, sock: socket.socket | None) -> None:
        """Per-connection state: the frame counts and whether the agent acknowledges."""
        self._acked_frames = 0  # the agent's last DURABLE n on this connection
        self._acking: bool | None = None  # None: not known yet
        self._hello_at = time.monotonic()
        self._decoder = fr.FrameDecoder()
        self._poller: select.poll | None = None
        if sock is not None:
            self._poller = select.poll()
            self._poller.register(sock, select.POLLIN)
        self._on_wire = 0  # every frame of the window is sent again on a new connection

    @classmethod
    def try_connect(cls, config: Config, *, run_id: str | None = None,
                    rank: int | None = None) -> AgentClient | None:
        """Connect to the node agent if one listens; never blocks.

        Returns:
            A connected client, or None when no agent listens on ``socket_path(config)``
            (or the connection fails in any way).
        """
        path = socket_path(config)
        try:
            trusted_socket(path)
        except FileNotFoundError:
            return None
        except OSError as exc:  # planted by another user, or in a directory others can write
            _warn_untrusted(str(exc))
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except OSError:  # no file, refused, backlog full (EAGAIN): no agent for us
            sock.close()
            return None
        sock.setblocking(True)
        sock.settimeout(10.0)
        try:
            return cls(path, buffer_size=config.client.buffer_size,
                       reconnect_s=config.client.reconnect_s, run_id=run_id, rank=rank,
                       resend_max_bytes=config.client.resend_max_bytes, sock=sock)
        except Exception:
            log.debug("agent client setup failed", exc_info=True)
            sock.close()
            return None

    # ------------------------------------------------------------- producer side

    def submit(self, record: Any) -> bool:
        """Queue one record for the agent. Never blocks or raises. False when a record
        was dropped (the buffer was full, or the client is shut down)."""
        if self._pid != os.getpid():
            self._reset_after_fork()
        return super().submit(record)

    def submit_many(self, records: Sequence[Any]) -> int:
        """Queue many records. Never blocks or raises. Returns how many were dropped."""
        if self._pid != os.getpid():
            self._reset_after_fork()
        return super().submit_many(records)

    def set_identity(self, run_id: str | None = None, rank: int | None = None) -> None:
        """Announce a (new) run id / rank to the agent (the job learned it after connect)."""
        self._run_id = run_id if run_id is not None else self._run_id
        self._rank = rank if rank is not None else self._rank
        self._hello_due = True
        self._wake.set()
        if self._thread is None:
            self._start_worker()

    # ------------------------------------------------------------- sender side

    def _hello(self) -> bytes:
        return fr.encode_json(fr.HELLO, {"v": fr.VERSION, "pid": os.getpid(),
                                         "run_id": self._run_id, "rank": self._rank,
                                         "watch": self._watch, "acks": True})

    def _send_hello(self, sock: socket.socket) -> None:
        sock.sendall(self._hello())
        self._hello_due = False

    def _connect(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10.0)
        try:
            sock.connect(self.path)
            self._send_hello(sock)
        except OSError:
            sock.close()
            return False
        self._sock = sock
        self._new_connection(sock)
        self.reconnects += 1
        return True

    def _drop_connection(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._poller = None

    # The window: frames leave it only when acknowledged (or, with a version-1 agent,
    # when written); a new connection sends all of it again, in order.

    def _window_full(self) -> bool:
        return (self._window_records >= self._window_max_records
                or self._window_bytes >= self._window_max_bytes)

    def _release(self, frames: int) -> int:
        """Forget the window's ``frames`` oldest entries; returns their records."""
        window = self._window
        records = 0
        for _ in range(min(frames, len(window))):
            frame, n, _ = window.popleft()
            self._window_bytes -= len(frame)
            records += n
        self._window_records -= records
        self._on_wire = max(0, self._on_wire - frames)
        return records

    def _on_durable(self, n: int) -> None:
        """The agent's DURABLE: the first ``n`` data frames of this connection are safe."""
        if self._acking is False:  # declared version 1 already; its window is gone
            return
        self._acking = True
        new = min(n - self._acked_frames, self._on_wire)
        if new > 0:
            # Frame numbers count from 1 per connection; the acknowledged ones have left
            # the window, so the agent's n is _acked_frames + the _on_wire still here.
            self.acknowledged += self._release(new)
            self._acked_frames += new

    def _read_acks(self) -> None:
        """Take whatever the agent sent (DURABLE frames) without blocking; a closed or
        broken connection is dropped here (its window is sent again on the next)."""
        sock, poller = self._sock, self._poller
        if sock is None or poller is None:
            return
        try:
            while poller.poll(0):
                data = sock.recv(65536)
                if not data:
                    self._drop_connection()  # the agent closed (stopped or killed)
                    return
                for ftype, body in self._decoder.feed(data):
                    if ftype == fr.DURABLE:
                        self._on_durable(fr.decode_durable(body))
        except fr.FrameTooLarge:
            self._drop_connection()
        except fr.BadFrame:
            log.debug("agent client: bad frame from the agent ignored", exc_info=True)
        except OSError:
            self._drop_connection()
        if self._acking is None and self._sock is not None \
                and time.monotonic() - self._hello_at > _LEGACY_AFTER_S:
            # A version-1 agent: what it was given counts as delivered, as before.
            self._acking = False
            self._release(self._on_wire)

    def _next_frames(self) -> None:
        """Encode the next batch into the window (one POINTS and/or one RECORDS frame)."""
        batch = self._take()
        points = [r for r in batch if type(r) is Point]
        frames = []
        if points:
            frames.append((fr.encode_points(points), len(points)))
        if len(points) != len(batch):
            frames.append((fr.encode_records([r for r in batch if type(r) is not Point]),
                           len(batch) - len(points)))
        for frame, n in frames:
            self._window.append([frame, n, False])
            self._window_bytes += len(frame)
            self._window_records += n

    def _unsent(self) -> bool:
        return self._on_wire < len(self._window)

    def _awaiting_acks(self) -> bool:
        return bool(self._window) and self._acking is not False

    def _send_next(self, sock: socket.socket) -> None:
        """Write the window's next unsent frame (encoding a new batch when none is left)."""
        if not self._unsent():
            self._next_frames()
            if not self._unsent():
                return
        entry = self._window[self._on_wire]
        sock.sendall(entry[0])
        self._on_wire += 1
        if entry[2]:
            self.resent += entry[1]
        else:
            entry[2] = True
            self.sent += entry[1]
        if self._acking is False:
            self._release(self._on_wire)

    def _wait_for_acks(self) -> None:
        """Sleep until the agent says something or ``interval`` passes (a new record, a
        full batch, is not waited for: the window is full, or there is nothing to send)."""
        poller = self._poller
        if poller is None:
            self._wait_for_work(1)
            return
        with contextlib.suppress(OSError):
            poller.poll(int(min(self._interval, _ACK_POLL_S) * 1000) or 1)

    def _run(self) -> None:
        next_try = 0.0
        queue = self._queue
        while True:
            self._read_acks()
            can_send = self._unsent() or (bool(queue) and not self._window_full())
            # After the last frame: the agent would otherwise settle it only at its next
            # flush interval (up to a second), and flush() would wait that long.
            flush_now = (self._flush_due and not can_send and self._acking is True
                         and self._sock is not None and bool(self._window))
            if not can_send and not self._hello_due and not flush_now:
                if not self._window:
                    self._flush_due = False
                self._idle.set()
                if self._stopping:
                    return
                if self._sock is not None and self._awaiting_acks():
                    self._wait_for_acks()
                else:
                    self._wait_for_work(1)
                continue
            self._idle.clear()
            if self._sock is None:
                now = time.monotonic()
                if now >= next_try:
                    if self._connect():
                        self._reconnect.reset()
                    else:
                        next_try = now + self._reconnect.next()
                if self._sock is None:
                    if self._stopping:
                        self._idle.set()
                        return
                    self._wake.wait(min(self._interval, max(0.01, next_try - now)))
                    self._wake.clear()
                    continue
            try:
                if self._hello_due:
                    self._send_hello(self._sock)
                if can_send:
                    self._send_next(self._sock)
                elif flush_now:
                    self._sock.sendall(fr.encode_frame(fr.FLUSH, b""))
                    self._flush_due = False
            except Exception:
                # The agent went away mid-frame: it discards the partial frame, and the
                # whole window is sent again after the reconnect.
                self._drop_connection()
                next_try = time.monotonic() + self._reconnect.next()

    # ------------------------------------------------------------- control

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued has been written to the agent's socket and, when
        the agent acknowledges (protocol version 2), until it said that all of it is
        durable (written, spooled or counted by the agent: about one of its flush
        intervals).

        Blocks up to ``timeout_s``. True when nothing is left in this process.
        """
        self._flush_due = True
        return self._wait_drained(
            time.monotonic() + timeout_s,
            busy=lambda: self._unsent() or (self._sock is not None and self._awaiting_acks()))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush within the deadline, stop the sender, close the socket. Idempotent.
        What is still buffered at the deadline, and never written to an agent, is counted
        as dropped; what was written but not acknowledged is counted as unacknowledged
        (the agent may still store it)."""
        if self._stopping:
            return
        deadline = time.monotonic() + timeout_s
        self.flush(timeout_s)
        self._stop_accepting()
        self._join(deadline)
        self._drop_queued()
        for _, n, written in self._window:
            if written:
                self.unacknowledged += n
            else:
                self.dropped += n
        self._release(len(self._window))
        if self.unacknowledged:
            log.warning("provscope: %d records sent to the agent at %s were not acknowledged "
                        "by the shutdown deadline; the agent may still store them",
                        self.unacknowledged, self.path)
        self._drop_connection()

    def stats(self) -> dict[str, float]:
        """Counters (records): received, sent (written to the socket the first time),
        acknowledged by the agent, sent again after a reconnect, unacknowledged at
        shutdown, dropped; the buffer's and the resend window's depth; connected,
        reconnects."""
        return {
            "points_received_total": float(self.received),
            "points_written_total": float(self.sent),
            "points_acknowledged_total": float(self.acknowledged),
            "points_resent_total": float(self.resent),
            "points_unacknowledged_total": float(self.unacknowledged),
            "points_dropped_total": float(self.dropped),
            "queue_depth": float(len(self._queue)),
            "resend_window_records": float(self._window_records),
            "resend_window_bytes": float(self._window_bytes),
            "connected": float(self._sock is not None),
            "reconnects_total": float(self.reconnects),
        }

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _reset_after_fork(self) -> None:
        """In a forked child: forget the parent's buffer, thread and connection."""
        if self._sock is not None:
            # The fd is a copy of the parent's connection: close our copy without
            # shutting the connection down under the parent.
            with contextlib.suppress(OSError):
                os.close(self._sock.detach())
        self._sock = None
        self._watch = False
        self._reset_queue()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

