"""Local ingest: jobs on the node hand their records to the agent over a Unix socket.

Server side (``IngestServer``, in the agent): one accept thread and one reader thread per
connection (``provscope-ingest-<n>``); frames are decoded (``provscope.agent.framing``)
and handed to callbacks that must not block (the pipeline's ``submit_many``). A bad frame
is rejected and counted and the stream goes on; an oversized header, or a connection
that keeps sending garbage, closes that connection only. The socket file is ``0600``
in a ``0700`` directory: only the agent's user can connect.

Client side (``AgentClient``, in the job): ``submit`` appends to a bounded in-process
deque and returns at once; a background thread (``provscope-client-send``) batches
records into frames and writes them. When the agent goes away the client keeps
buffering (the oldest records are dropped and counted when the buffer is full) and
reconnects every ``client.reconnect_s``. After ``fork`` the child starts with an empty
buffer and its own connection.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provscope.agent import framing as fr

from provscope import env
from provscope.forking import reset_in_child
from provscope.records import Point

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = ["AgentClient", "IngestServer", "default_socket_path", "request", "socket_path"]

log = logging.getLogger("provscope.ingest")

# A connection whose frames are nearly all rejected is a broken or hostile sender.
_MAX_BAD_IN_A_ROW = 1000


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/provscope/agent.sock``, else ``<tmp>/provscope-<uid>/agent.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "provscope" / "agent.sock"
    return Path(tempfile.gettempdir()) / f"provscope-{os.getuid()}" / "agent.sock"


def socket_path(config: Config) -> Path:
    """The socket path the config names, else the default."""
    p = config.agent.socket_path
    return Path(p).expanduser() if p else default_socket_path()


# ============================================================================ server


class IngestServer:
    """Unix-socket server that feeds job records into callbacks.

    Args:
        path: socket file; its directory is created ``0700`` if missing.
        on_points: receives a list of ``Point`` per POINTS frame.
        on_records: receives a list of lineage records per RECORDS frame.
        on_hello: receives ``(pid, run_id, rank)`` of a job that said hello.
        on_watch: receives a WATCH frame's dict (``provscope run`` registering a command).
        status: returns the dict sent back for a STATUS frame.
        max_frame_bytes: larger frames close the connection.

    Raises (from ``start``):
        OSError: the socket cannot be bound (``EADDRINUSE`` when another agent listens).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        on_points: Callable[[list[Point]], Any],
        on_records: Callable[[list[Any]], Any],
        on_hello: Callable[[int, str | None, int | None], Any] | None = None,
        on_watch: Callable[[dict[str, Any]], Any] | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
        max_frame_bytes: int = fr.MAX_FRAME_BYTES,
    ) -> None:
        self.path = Path(path)
        self._on_points = on_points
        self._on_records = on_records
        self._on_hello = on_hello
        self._on_watch = on_watch
        self._status = status
        self._max = max_frame_bytes
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._accept_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._n = 0
        self.frames = 0
        self.rejected = 0
        self.points = 0
        self.records = 0
        self.closed_bad = 0

    @property
    def connections(self) -> int:
        return len(self._conns)

    def start(self) -> None:
        """Bind, listen and start accepting (returns at once)."""
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        if self.path.exists() or self.path.is_symlink():
            if _listening(self.path):
                raise OSError(errno.EADDRINUSE, f"an agent already listens on {self.path}")
            self.path.unlink()  # stale socket of an agent that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the file is created 0600; no window where others can connect
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(128)
        sock.settimeout(0.5)
        self._sock = sock
        self._accept_thread = threading.Thread(target=self._accept, name="provscope-ingest",
                                               daemon=True)
        self._accept_thread.start()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            conn.settimeout(None)
            with self._lock:
                self._conns.add(conn)
                self._n += 1
                n = self._n
            t = threading.Thread(target=self._serve, args=(conn,),
                                 name=f"provscope-ingest-{n}", daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        decoder = fr.FrameDecoder(self._max)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        bad_in_a_row = 0
        try:
            while not self._stop.is_set():
                try:
                    n = conn.recv_into(buf)
                except OSError:
                    break
                if n == 0:
                    break
                frames = decoder.feed(view[:n])
                while True:
                    try:
                        ftype, body = next(frames)
                    except StopIteration:
                        break
                    except fr.FrameTooLarge as exc:
                        self.rejected += 1
                        self.closed_bad += 1
                        log.warning("ingest: %s; connection closed", exc)
                        return
                    except fr.BadFrame as exc:
                        self.rejected += 1
                        bad_in_a_row += 1
                        log.debug("ingest: frame rejected: %s", exc)
                        frames = decoder.feed(b"")
                        continue
                    self.frames += 1
                    try:
                        self._handle(conn, ftype, body)
                        bad_in_a_row = 0
                    except fr.BadFrame as exc:
                        self.rejected += 1
                        bad_in_a_row += 1
                        log.debug("ingest: frame rejected: %s", exc)
                    if bad_in_a_row >= _MAX_BAD_IN_A_ROW:
                        self.closed_bad += 1
                        log.warning("ingest: %d bad frames in a row; connection closed",
                                    bad_in_a_row)
                        return
            if decoder.pending:
                self.rejected += 1  # the peer closed in the middle of a frame
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _handle(self, conn: socket.socket, ftype: int, body: bytes) -> None:
        if ftype == fr.POINTS:
            points = fr.decode_points(body)
            self.points += len(points)
            self._on_points(points)
        elif ftype == fr.RECORDS:
            records = fr.decode_records(body)
            pts = [r for r in records if r.kind == "point"]
            self.points += len(pts)
            self.records += len(records) - len(pts)
            self._on_records(records)
        elif ftype == fr.HELLO:
            hello = fr.decode_json(body)
            if type(hello) is not dict or type(hello.get("pid")) is not int:
                raise fr.BadFrame('hello body must be {"pid": int, ...}')
            run_id, rank = hello.get("run_id"), hello.get("rank")
            if (run_id is not None and type(run_id) is not str) or \
                    (rank is not None and type(rank) is not int):
                raise fr.BadFrame("hello run_id must be a string and rank an integer")
            if self._on_hello is not None and hello.get("watch", True) is not False:
                self._on_hello(hello["pid"], run_id, rank)
        elif ftype == fr.WATCH:
            watch = fr.decode_json(body)
            if type(watch) is not dict or type(watch.get("pid")) is not int \
                    or type(watch.get("run_id")) is not str:
                raise fr.BadFrame('watch body must be {"pid": int, "run_id": str, ...}')
            if self._on_watch is not None:
                self._on_watch(watch)
            conn.sendall(fr.encode_json(fr.ACK, {}))
        elif ftype == fr.STATUS:
            reply = self._status() if self._status else {}
            conn.sendall(fr.encode_json(fr.STATUS_REPLY, reply))
        else:
            raise fr.BadFrame(f"frame type {ftype} is not accepted by the agent")

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop accepting, close every connection, remove the socket file."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def stats(self) -> dict[str, float]:
        return {
            "ingest_frames_total": float(self.frames + self.rejected),
            "ingest_frames_rejected_total": float(self.rejected),
            "ingest_points_total": float(self.points),
            "ingest_records_total": float(self.records),
            "ingest_connections": len(self._conns),
        }


def _listening(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def request(path: str | os.PathLike[str], ftype: int, body: Any,
            timeout_s: float = 2.0) -> Any:
    """Send one frame and wait for the agent's single answer frame (STATUS, WATCH).

    Blocks up to ``timeout_s``. Raises ``OSError`` when no agent answers.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect(str(path))
        s.sendall(fr.encode_json(ftype, body) if body is not None else fr.encode_frame(ftype, b""))
        decoder = fr.FrameDecoder()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            data = s.recv(65536)
            if not data:
                break
            for _, reply in decoder.feed(data):
                return fr.decode_json(reply)
        raise OSError(errno.ECONNRESET, f"no answer from the agent at {path}")
    finally:
        s.close()


# ============================================================================ client

class AgentClient:
    """The job's connection to the node agent. Every method is safe to call from any
    thread; none raises; ``submit``/``submit_many`` never block.

    Build it with ``try_connect``.

    Args:
        path: the agent's socket.
        buffer_size: records held while the agent is slow or away; oldest dropped, counted.
        reconnect_s: delay between reconnect attempts while the agent is away.
        run_id, rank: announced in the hello frame (the process collector tags this
            process tree with them); default ``$PROVSCOPE_RUN_ID`` and the rank variables.
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
        self._size = buffer_size
        self._reconnect_s = reconnect_s
        self._run_id = run_id if run_id is not None else os.environ.get(env.RUN_ID) or None
        self._rank = rank if rank is not None else _env_rank()
        self._batch = batch_size
        self._interval = send_interval_s
        self._sock = sock
        # A forked child (DataLoader worker) is already inside its parent's watched tree;
        # watching it separately would split the job's series.
        self._watch = True
        self._init_state()
        reset_in_child(self, AgentClient._reset_after_fork)
        if sock is not None:
            self._send_hello(sock)

    def _init_state(self) -> None:
        self._pid = os.getpid()
        self._buf: deque[Any] = deque()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._pending: bytes | None = None
        self._pending_n = 0
        self._hello_due = False
        self.received = 0
        self.sent = 0
        self.dropped = 0
        self.reconnects = 0
        self.send_errors = 0

    @classmethod
    def try_connect(cls, config: Config, *, run_id: str | None = None,
                    rank: int | None = None) -> AgentClient | None:
        """Connect to the node agent if one listens; never blocks.

        Returns:
            A connected client, or None when no agent listens on ``socket_path(config)``
            (or the connection fails in any way).
        """
        path = socket_path(config)
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

    def submit(self, record: Any) -> None:
        """Queue one record for the agent. Never blocks or raises."""
        if self._pid != os.getpid():
            self._reset_after_fork()
        if self._stopping:
            self.dropped += 1
            return
        buf = self._buf
        if len(buf) >= self._size:
            buf.popleft()
            self.dropped += 1
        buf.append(record)
        self.received += 1
        if self._thread is None:
            self._start_thread()
        if len(buf) >= self._batch:
            self._wake.set()

    def submit_many(self, records: Sequence[Any]) -> None:
        """Queue many records. Never blocks or raises."""
        if self._pid != os.getpid():
            self._reset_after_fork()
        n = len(records)
        if self._stopping:
            self.dropped += n
            return
        buf = self._buf
        over = len(buf) + n - self._size
        if over > 0:
            self.dropped += over
            if over >= len(buf):
                buf.clear()
                records = records[len(records) - self._size:] if n > self._size else records
            else:
                for _ in range(over):
                    buf.popleft()
        buf.extend(records)
        self.received += n
        if self._thread is None:
            self._start_thread()
        if len(buf) >= self._batch:
            self._wake.set()

    def set_identity(self, run_id: str | None = None, rank: int | None = None) -> None:
        """Announce a (new) run id / rank to the agent (the job learned it after connect)."""
        self._run_id = run_id if run_id is not None else self._run_id
        self._rank = rank if rank is not None else self._rank
        self._hello_due = True
        self._wake.set()
        if self._thread is None:
            self._start_thread()

    # ------------------------------------------------------------- sender side

    def _start_thread(self) -> None:
        with self._thread_lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="provscope-client-send",
                                            daemon=True)
            self._thread.start()

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
        buf = self._buf
        n = min(self._batch, len(buf))
        batch = [buf.popleft() for _ in range(n)]
        points = [r for r in batch if type(r) is Point]
        frames = b""
        if points:
            frames += fr.encode_points(points)
        if len(points) != len(batch):
            frames += fr.encode_records([r for r in batch if type(r) is not Point])
        return frames, n

    def _run(self) -> None:
        next_try = 0.0
        while True:
            if self._pending is None and not self._buf and not self._hello_due:
                self._idle.set()
                if self._stopping:
                    return
                self._wake.wait(self._interval)
                self._wake.clear()
                continue
            self._idle.clear()
            if self._sock is None:
                now = time.monotonic()
                if now >= next_try and not self._connect():
                    next_try = now + self._reconnect_s
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
                    if not self._buf:
                        continue
                    self._pending, self._pending_n = self._next_frames()
                self._sock.sendall(self._pending)
                self.sent += self._pending_n
                self._pending = None
            except Exception:
                # The agent went away mid-frame: it discards the partial frame, so the
                # whole frame is sent again after the reconnect.
                self.send_errors += 1
                self._drop_connection()
                next_try = time.monotonic() + self._reconnect_s

    # ------------------------------------------------------------- control

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued has been written to the agent's socket.

        Blocks up to ``timeout_s``. True when nothing is left in this process.
        """
        deadline = time.monotonic() + timeout_s
        if self._thread is None:
            return not self._buf
        while time.monotonic() < deadline:
            self._wake.set()
            if not self._buf and self._pending is None and self._idle.wait(0.01) \
                    and not self._buf and self._pending is None:
                return True
            time.sleep(0.002)
        return False

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush within the deadline, stop the sender, close the socket. Idempotent;
        what is still buffered at the deadline is counted as dropped."""
        if self._stopping:
            return
        deadline = time.monotonic() + timeout_s
        self.flush(timeout_s)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        left = len(self._buf) + (self._pending_n if self._pending is not None else 0)
        self.dropped += left
        self._buf.clear()
        self._pending = None
        self._drop_connection()

    def stats(self) -> dict[str, float]:
        """Counters: received, sent, dropped, buffered, connected, reconnects."""
        return {
            "points_received_total": float(self.received),
            "points_written_total": float(self.sent),
            "points_dropped_total": float(self.dropped),
            "queue_depth": float(len(self._buf)),
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
        self._init_state()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _env_rank() -> int | None:
    for var in (env.RANK, "RANK", "LOCAL_RANK"):
        value = os.environ.get(var)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return None
    return None
