"""Local ingest: the agent's Unix-socket server for the records of the jobs on its node.

One accept thread and one reader thread per connection (``provscope-ingest-<n>``); frames
are decoded (``provscope.wire``) and handed to callbacks that must not block (the
pipeline's ``submit_many``). A bad frame is rejected and counted and the stream goes on;
an oversized header, or a connection that keeps sending garbage, closes that connection
only. The socket file is ``0600`` in a ``0700`` directory: only the agent's user can
connect. The job's side is ``provscope.job.agent_client.AgentClient``.

The PIDs in HELLO and WATCH frames are the sender's view; a job in a container has its
own PID namespace. Each connection's peer PID (``SO_PEERCRED``, already in the agent's
namespace) turns them into PIDs the agent's process collector and NVML (host PIDs) can
match (``provscope.agent.peer``).

Acknowledged delivery (``provscope.wire``, protocol version 2): a job whose hello asks
for acks gets DURABLE frames saying how many of its data frames are durable. The
``on_points``/``on_records`` callbacks return a mark for the records of each frame and
``durable(mark)`` says when they are settled (the node agent passes the pipeline's
``submit_many`` and ``durable``); without ``durable`` a frame counts as durable once its
callback returned. The connection's reader thread checks its marks after every read and,
while some are outstanding, at least every ``_ACK_POLL_S``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provscope.agent.peer import agent_pid, peer_pid

from provscope import wire as fr
from provscope.records import Point
from provscope.safefs import UnsafePath, private_dir

__all__ = ["IngestServer"]

log = logging.getLogger("provscope.ingest")

# A connection whose frames are nearly all rejected is a broken or hostile sender.
_MAX_BAD_IN_A_ROW = 1000
# How often a connection that wants acks looks at its outstanding marks while idle (an
# exporter settles a batch a flush interval after it arrived, not when the job writes).
_ACK_POLL_S = 0.02


class _Acks:
    """One connection's data frames and the marks of those not yet known durable."""

    __slots__ = ("enabled", "frames", "marks", "sent")

    def __init__(self) -> None:
        self.enabled = False  # the peer's hello asked for DURABLE frames
        self.frames = 0  # data frames received on this connection
        self.marks: deque[tuple[int, Any]] = deque()  # (frame number, mark), oldest first
        self.sent = -1  # the n of the last DURABLE frame sent



class IngestServer:
    """Unix-socket server that feeds job records into callbacks.

    Args:
        path: socket file; its directory is created ``0700`` if missing.
        on_points: receives a list of ``Point`` per POINTS frame.
        on_records: receives a list of lineage records per RECORDS frame.
        on_hello: receives ``(pid, run_id, rank)`` of a job that said hello.
        on_watch: receives a WATCH frame's dict (``provscope run`` registering a command).
        status: returns the dict sent back for a STATUS frame.
        on_flush: called (must not block) when a job that asked for acks waits for them
            (a FLUSH frame): the pipeline exports what it holds now.
        durable: given what ``on_points``/``on_records`` returned for a frame, True once
            its records are durable (written, spooled, or dropped and counted); must not
            block. None: a frame is durable once its callback returned.
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
        on_flush: Callable[[], Any] | None = None,
        durable: Callable[[Any], bool] | None = None,
        max_frame_bytes: int = fr.MAX_FRAME_BYTES,
    ) -> None:
        self.path = Path(path)
        self._on_points = on_points
        self._on_records = on_records
        self._on_hello = on_hello
        self._on_watch = on_watch
        self._status = status
        self._durable = durable
        self._on_flush = on_flush
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
        self.points_rejected = 0
        self.records = 0
        self.closed_bad = 0
        self.acks_sent = 0  # DURABLE frames sent, all connections

    @property
    def connections(self) -> int:
        return len(self._conns)

    def start(self) -> None:
        """Bind, listen and start accepting (returns at once)."""
        private_dir(self.path.parent)  # owner-only, ours, not a symlink (provscope.safefs)
        if self.path.exists() or self.path.is_symlink():
            if _listening(self.path):
                raise OSError(errno.EADDRINUSE, f"an agent already listens on {self.path}")
            mode = os.lstat(self.path).st_mode
            if not stat.S_ISSOCK(mode):  # never delete a file someone put in its place
                raise UnsafePath(f"{self.path} exists and is not a socket; remove it or set "
                                 f"agent.socket_path")
            self.path.unlink()  # stale socket of an agent that died (unlink: not followed)
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
            t = threading.Thread(target=self._serve, args=(conn, peer_pid(conn)),
                                 name=f"provscope-ingest-{n}", daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, peer: int | None = None) -> None:
        decoder = fr.FrameDecoder(self._max)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        bad_in_a_row = 0
        acks = _Acks()
        try:
            while not self._stop.is_set():
                try:
                    n = conn.recv_into(buf)
                except TimeoutError:  # only while acks are outstanding: look at them
                    self._settle(conn, acks)
                    continue
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
                    if ftype in fr.DATA_TYPES:
                        # Numbered whether or not it can be read: a rejected frame is
                        # settled (counted) at once, and the job's count must match ours.
                        acks.frames += 1
                        acks.marks.append((acks.frames, None))
                    try:
                        mark = self._handle(conn, ftype, body, peer, acks)
                        if ftype in fr.DATA_TYPES:
                            acks.marks[-1] = (acks.frames, mark)
                        bad_in_a_row = 0
                    except fr.BadFrame as exc:
                        self.rejected += 1
                        bad_in_a_row += 1
                        log.debug("ingest: frame rejected: %s", exc)
                    except OSError:
                        return  # the peer left before its answer (STATUS, WATCH) was sent
                    if bad_in_a_row >= _MAX_BAD_IN_A_ROW:
                        self.closed_bad += 1
                        log.warning("ingest: %d bad frames in a row; connection closed",
                                    bad_in_a_row)
                        return
                if not self._settle(conn, acks):
                    return
            if decoder.pending:
                self.rejected += 1  # the peer closed in the middle of a frame
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _settle(self, conn: socket.socket, acks: _Acks) -> bool:
        """Forget the marks now durable and, when the peer asked for acks, send how many
        frames are durable. False when the answer could not be sent (the peer is gone,
        or has not read its acks for so long that the send timed out)."""
        marks = acks.marks
        durable = self._durable
        while marks:
            mark = marks[0][1]
            if mark is not None and durable is not None and not durable(mark):
                break
            marks.popleft()
        if not acks.enabled:
            return True
        upto = marks[0][0] - 1 if marks else acks.frames
        if upto != acks.sent:
            try:
                conn.sendall(fr.encode_json(fr.DURABLE, {"n": upto}))
            except OSError:
                return False
            acks.sent = upto
            self.acks_sent += 1
        return True

    def _handle(self, conn: socket.socket, ftype: int, body: bytes,
                peer: int | None = None, acks: _Acks | None = None) -> Any:
        """Act on one frame; returns the callback's mark for a data frame."""
        if ftype == fr.POINTS:
            points, dropped = fr.decode_points_counted(body)
            self.points += len(points)
            if dropped:
                # Rows a frame could not describe cost only themselves (counted).
                self.points_rejected += dropped
            return self._on_points(points)
        if ftype == fr.RECORDS:
            records = fr.decode_records(body)
            pts = [r for r in records if r.kind == "point"]
            self.points += len(pts)
            self.records += len(records) - len(pts)
            return self._on_records(records)
        if ftype == fr.HELLO:
            hello = fr.decode_json(body)
            if type(hello) is not dict or type(hello.get("pid")) is not int:
                raise fr.BadFrame('hello body must be {"pid": int, ...}')
            run_id, rank = hello.get("run_id"), hello.get("rank")
            if (run_id is not None and type(run_id) is not str) or \
                    (rank is not None and type(rank) is not int):
                raise fr.BadFrame("hello run_id must be a string and rank an integer")
            pid = agent_pid(peer, hello["pid"], "hello")
            if self._on_hello is not None and pid is not None and \
                    hello.get("watch", True) is not False:
                self._on_hello(pid, run_id, rank)
            if hello.get("acks") is True and acks is not None and not acks.enabled:
                # From now on this connection's reader wakes up to send acks while some
                # are outstanding; the first DURABLE (sent by _settle after this frame)
                # tells the job that this agent acknowledges.
                acks.enabled = True
                conn.settimeout(_ACK_POLL_S)
        elif ftype == fr.WATCH:
            watch = fr.decode_json(body)
            if type(watch) is not dict or type(watch.get("pid")) is not int \
                    or type(watch.get("run_id")) is not str:
                raise fr.BadFrame('watch body must be {"pid": int, "run_id": str, ...}')
            pid = agent_pid(peer, watch["pid"], "watch")
            if pid is None:
                log.warning("ingest: WATCH pid %d is not a process of the sender (pid %s) "
                            "in its namespace; not watched", watch["pid"], peer)
            elif self._on_watch is not None:
                self._on_watch({**watch, "pid": pid})
            conn.sendall(fr.encode_json(fr.ACK, {}))
        elif ftype == fr.FLUSH:
            if acks is None or not acks.enabled:
                raise fr.BadFrame("FLUSH is accepted only after a hello that asked for acks")
            if self._on_flush is not None:
                self._on_flush()
        elif ftype == fr.STATUS:
            reply = self._status() if self._status else {}
            conn.sendall(fr.encode_json(fr.STATUS_REPLY, reply))
        else:
            raise fr.BadFrame(f"frame type {ftype} is not accepted by the agent")
        return None

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop accepting, close every connection, remove the socket file."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        bound = self._sock is not None  # only a socket this server bound is removed
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
        if bound:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def stats(self) -> dict[str, float]:
        return {
            "ingest_frames_total": float(self.frames + self.rejected),
            "ingest_frames_rejected_total": float(self.rejected),
            "ingest_points_total": float(self.points),
            "ingest_points_rejected_total": float(self.points_rejected),
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
