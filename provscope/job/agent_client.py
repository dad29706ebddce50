"""The job's connection to the node agent: a bounded buffer and one sender thread.

``submit`` appends to a bounded in-process deque and returns at once; a background
thread (``provscope-client-send``) batches records into frames (``provscope.wire``) and
writes them to the agent's Unix socket (the queue and thread are
``provscope.bounded.QueueWorker``, as in the pipeline). When the agent goes away the
client keeps buffering (the oldest records are dropped and counted when the buffer is
full) and reconnects with backoff and jitter, at least every ``client.reconnect_s``.
After ``fork`` the child starts with an empty buffer and its own connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
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
        sock: socket.socket | None = None,
    ) -> None:
        self.path = str(path)
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
            self._send_hello(sock)

    def _reset_queue(self) -> None:
        super()._reset_queue()
        self._pid = os.getpid()
        self._pending: bytes | None = None
        self._pending_n = 0
        self._hello_due = False
        self._reconnect = Backoff(min(_FIRST_RECONNECT_S, self._reconnect_s), self._reconnect_s)
        self.sent = 0
        self.reconnects = 0

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
                       sock=sock)
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
        return fr.encode_json(fr.HELLO, {"v": 1, "pid": os.getpid(), "run_id": self._run_id,
                                         "rank": self._rank, "watch": self._watch})

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
        self.reconnects += 1
        return True

    def _drop_connection(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None

    def _next_frames(self) -> tuple[bytes, int]:
        batch = self._take()
        points = [r for r in batch if type(r) is Point]
        frames = b""
        if points:
            frames += fr.encode_points(points)
        if len(points) != len(batch):
            frames += fr.encode_records([r for r in batch if type(r) is not Point])
        return frames, len(batch)

    def _run(self) -> None:
        next_try = 0.0
        queue = self._queue
        while True:
            if self._pending is None and not queue and not self._hello_due:
                self._idle.set()
                if self._stopping:
                    return
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
                if self._pending is None:
                    if not queue:
                        continue
                    self._pending, self._pending_n = self._next_frames()
                self._sock.sendall(self._pending)
                self.sent += self._pending_n
                self._pending = None
            except Exception:
                # The agent went away mid-frame: it discards the partial frame, so the
                # whole frame is sent again after the reconnect.
                self._drop_connection()
                next_try = time.monotonic() + self._reconnect.next()

    # ------------------------------------------------------------- control

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued has been written to the agent's socket.

        Blocks up to ``timeout_s``. True when nothing is left in this process.
        """
        return self._wait_drained(time.monotonic() + timeout_s,
                                  busy=lambda: self._pending is not None)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush within the deadline, stop the sender, close the socket. Idempotent;
        what is still buffered at the deadline is counted as dropped."""
        if self._stopping:
            return
        deadline = time.monotonic() + timeout_s
        self.flush(timeout_s)
        self._stop_accepting()
        self._join(deadline)
        self._drop_queued()
        if self._pending is not None:
            self.dropped += self._pending_n
            self._pending = None
        self._drop_connection()

    def stats(self) -> dict[str, float]:
        """Counters: received, sent, dropped, buffered, connected, reconnects."""
        return {
            "points_received_total": float(self.received),
            "points_written_total": float(self.sent),
            "points_dropped_total": float(self.dropped),
            "queue_depth": float(len(self._queue)),
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

