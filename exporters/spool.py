"""An on-disk FIFO of opaque byte payloads, bounded in bytes, that survives restarts.

Used by exporters to keep what a destination could not take (gzip'd line protocol for
InfluxDB, JSON-encoded records for the lineage store) until it comes back.

Layout: a directory of segment files ``<seq>.seg`` (``seq`` increasing, zero-padded);
each holds records ``[magic u32][length u32][count u32][crc32 u32][payload]`` (little
endian). ``count`` is the caller's record count of the payload (points, rows), kept so
that drops can be counted in records, not bytes. The read position inside the oldest
segment is kept in ``<seq>.ack`` (8 bytes); a segment is deleted once fully read.

Durability is "fsync-light": every append is written to the OS (it survives the
process crashing or being killed), and the data is ``fsync``'ed when a segment is
sealed and on ``close``; a machine crash can lose the last unsealed segment's tail. On
open, every segment is scanned: a record cut short or failing its CRC (a torn write) ends
that segment; what follows is skipped and counted in ``torn_records``.

Ordering: ``peek`` always returns the oldest unacknowledged payload; ``ack`` removes it.
A new ``Spool`` on the same directory sees what an earlier process left. One process at
a time uses a directory: ``Spool`` takes an exclusive ``flock`` on ``<dir>/lock`` and
raises ``SpoolBusy`` when another holds it.

Bound: when the total size passes ``max_bytes``, the oldest segments are deleted and their
unread records and counts added to ``dropped_records`` / ``dropped_count``.

Not thread-safe by itself for writers; stats properties may be read from any thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from provscope.safefs import open_private, private_dir

__all__ = ["Spool", "SpoolBusy", "read_label", "report_left"]

log = logging.getLogger("provscope.spool")
_LABEL = "destination.json"  # what a spool directory holds, for `provscope spool`

_MAGIC = 0x50535031  # "PSP1"
_HEADER = struct.Struct("<IIII")
_ACK = struct.Struct("<Q")


def _write_private(path: Path, data: bytes) -> None:
    """Replace the contents of a small owner-only file (an ``.ack``) without following
    a symlink."""
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class SpoolBusy(OSError):
    """Another process holds the spool directory."""


@dataclass
class _Segment:
    seq: int
    path: Path
    size: int  # bytes of valid records in the file
    read_pos: int  # offset of the first unacknowledged record
    records: int  # unacknowledged records
    count: int  # sum of their counts


class Spool:
    """A bounded, crash-tolerant, ordered on-disk queue of byte payloads.

    Args:
        directory: created if missing; one process at a time.
        max_bytes: bound on the bytes kept (segment files); the oldest segment goes first.
        segment_bytes: a segment is sealed (fsync'ed) and a new one started past this size;
            default: ``max_bytes / 16`` clamped to 64 KiB .. 64 MiB.

    Raises:
        SpoolBusy: another process uses ``directory``.
        OSError: the directory cannot be created or read.
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int = 1 << 30,
                 segment_bytes: int | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError(f"spool max_bytes must be > 0, got {max_bytes}")
        self.directory = Path(directory)
        # Owner-only and verified (provscope.safefs): spooled batches are the job's data.
        private_dir(self.directory)
        self.max_bytes = max_bytes
        # About 1/16 of the bound per segment, so that a full spool drops its oldest
        # sixteenth, not everything (a 64 KiB spool in 64 KiB segments dropped it all).
        self.segment_bytes = segment_bytes or max(4 << 10, min(64 << 20, max_bytes // 16))
        self._lock_fd = open_private(self.directory / "lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise SpoolBusy(f"spool directory {self.directory} is in use by another process") \
                from None
        self._mutex = threading.Lock()
        self._segments: list[_Segment] = []
        self._writer: io.BufferedWriter | None = None  # open file of the newest segment
        self._next_seq = 1
        self._peeked: tuple[int, int] | None = None  # (seq, offset) of the last peek
        self.dropped_records = 0
        self.dropped_count = 0
        self.torn_records = 0
        self._closed = False
        self._recover()

    def label(self, **what: str) -> None:
        """Record what this directory holds (``kind``, ``destination`` as a URL without
        credentials, ``unit``) in ``destination.json``, for ``provscope spool``. Never
        raises."""
        with contextlib.suppress(OSError):
            _write_private(self.directory / _LABEL, json.dumps(what, sort_keys=True).encode())

    # ------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        for path in sorted(self.directory.glob("*.seg")):
            try:
                seq = int(path.stem)
            except ValueError:
                continue
            ack_path = path.with_suffix(".ack")
            read_pos = 0
            with contextlib.suppress(OSError, struct.error):
                read_pos = _ACK.unpack(ack_path.read_bytes()[: _ACK.size])[0]
            self._next_seq = max(self._next_seq, seq + 1)
            seg = self._scan(seq, path, read_pos)
            if seg.records == 0:
                self._delete(seg)
            else:
                self._segments.append(seg)

    def _scan(self, seq: int, path: Path, read_pos: int) -> _Segment:
        """Validate records; truncate a torn tail (counted) so appends continue cleanly."""
        data = path.read_bytes()
        view = memoryview(data)
        pos = 0
        records = count = 0
        while pos < len(data):
            if pos + _HEADER.size > len(data):
                self.torn_records += 1
                break
            magic, length, n, crc = _HEADER.unpack_from(data, pos)
            end = pos + _HEADER.size + length
            if magic != _MAGIC or end > len(data) or \
                    zlib.crc32(view[pos + _HEADER.size:end]) != crc:
                self.torn_records += 1
                break
            if pos >= read_pos:
                records += 1
                count += n
            pos = end
        if pos < len(data):
            with open(path, "r+b") as f:
                f.truncate(pos)
        return _Segment(seq, path, pos, min(read_pos, pos), records, count)

    # ------------------------------------------------------------------ writing

    def append(self, payload: bytes, count: int = 1) -> None:
        """Add one payload at the tail. Blocks on one buffered write (no fsync).

        Args:
            payload: opaque bytes (at most 4 GiB).
            count: how many records the payload holds (for drop accounting).

        Raises:
            OSError: the disk write failed (nothing was added).
        """
        record = _HEADER.pack(_MAGIC, len(payload), count, zlib.crc32(payload)) + payload
        with self._mutex:
            self._check_open()
            seg = self._segments[-1] if self._segments else None
            if seg is None or self._writer is None or seg.size >= self.segment_bytes:
                seg = self._new_segment()
            writer = self._writer
            assert writer is not None  # _new_segment opened it
            writer.write(record)
            writer.flush()  # to the OS: survives a crash of this process
            seg.size += len(record)
            seg.records += 1
            seg.count += count
            self._enforce_bound()

    def _new_segment(self) -> _Segment:
        self._seal()
        seq = self._next_seq
        self._next_seq += 1
        path = self.directory / f"{seq:020d}.seg"
        fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # 0600, no symlink
        self._writer = os.fdopen(fd, "ab")  # kept open across appends
        seg = _Segment(seq, path, 0, 0, 0, 0)
        self._segments.append(seg)
        return seg

    def _seal(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.flush()
                os.fsync(self._writer.fileno())
            self._writer.close()
            self._writer = None

    def _enforce_bound(self) -> None:
        while self._segments and self._total_bytes() > self.max_bytes:
            seg = self._segments.pop(0)
            self.dropped_records += seg.records
            self.dropped_count += seg.count
            if not self._segments:
                self._seal()
            self._delete(seg)

    def _total_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    # ------------------------------------------------------------------ reading

    def peek(self) -> tuple[bytes, int] | None:
        """The oldest unacknowledged ``(payload, count)``, or None when empty. Reads disk.

        A record that no longer reads back (the file was damaged while open) is skipped
        and counted in ``torn_records``.
        """
        with self._mutex:
            self._check_open()
            while self._segments:
                seg = self._segments[0]
                if seg.records == 0:
                    if seg is self._segments[-1] and self._writer is not None:
                        return None
                    self._segments.pop(0)
                    self._delete(seg)
                    continue
                if seg is self._segments[-1] and self._writer is not None:
                    self._writer.flush()
                try:
                    with open(seg.path, "rb") as f:
                        f.seek(seg.read_pos)
                        header = f.read(_HEADER.size)
                        magic, length, count, crc = _HEADER.unpack(header)
                        payload = f.read(length)
                    if magic != _MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
                        raise ValueError("damaged record")
                except (OSError, ValueError, struct.error):
                    self.torn_records += seg.records
                    self.dropped_records += seg.records
                    self.dropped_count += seg.count
                    seg.records = seg.count = 0
                    if seg is self._segments[-1]:
                        self._seal()
                    continue
                self._peeked = (seg.seq, seg.read_pos)
                return payload, count
            return None

    def ack(self) -> None:
        """Remove the payload the last ``peek`` returned. Persists the read position.

        A no-op when that payload is gone already (its segment was dropped by the bound).
        """
        with self._mutex:
            self._check_open()
            peeked, self._peeked = self._peeked, None
            if not self._segments:
                return
            seg = self._segments[0]
            if seg.records == 0 or peeked != (seg.seq, seg.read_pos):
                return
            with open(seg.path, "rb") as f:
                f.seek(seg.read_pos)
                _, length, count, _ = _HEADER.unpack(f.read(_HEADER.size))
            seg.read_pos += _HEADER.size + length
            seg.records -= 1
            seg.count -= count
            if seg.records == 0 and not (seg is self._segments[-1] and self._writer is not None):
                self._segments.pop(0)
                self._delete(seg)
            elif seg.records == 0:
                # The segment being written is fully read: start the next append afresh.
                self._segments.pop(0)
                self._seal()
                self._delete(seg)
            else:
                _write_private(seg.path.with_suffix(".ack"), _ACK.pack(seg.read_pos))

    # ------------------------------------------------------------------ state

    @property
    def pending_records(self) -> int:
        """Payloads not yet acknowledged."""
        return sum(s.records for s in self._segments)

    @property
    def pending_count(self) -> int:
        """Sum of the counts of the payloads not yet acknowledged."""
        return sum(s.count for s in self._segments)

    @property
    def pending_bytes(self) -> int:
        """Bytes of the segment files on disk (acknowledged records of a segment included)."""
        return sum(s.size for s in self._segments)

    def __len__(self) -> int:
        return self.pending_records

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("spool is closed")

    def _delete(self, seg: _Segment) -> None:
        for path in (seg.path, seg.path.with_suffix(".ack")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def close(self) -> None:
        """fsync and close the open segment, release the directory. Idempotent."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._seal()
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)

    def detach(self) -> None:
        """Drop this process's handles without unlocking or syncing (a forked child).

        The parent keeps the directory and its lock; the child's copy becomes closed.
        """
        self._closed = True
        with contextlib.suppress(Exception):
            if self._writer is not None:
                os.close(self._writer.fileno())  # the fd only: no flush of a shared buffer
                self._writer = None
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)  # closing a copy keeps the parent's flock

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_label(directory: str | os.PathLike[str]) -> dict[str, str]:
    """What ``Spool.label`` recorded for ``directory`` ({} when nothing readable)."""
    try:
        out = json.loads((Path(directory) / _LABEL).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in out.items()} if isinstance(out, dict) else {}


def report_left(count: int, unit: str, directory: str | os.PathLike[str],
                destination: str) -> None:
    """The one line a process prints at exit when data is still spooled: how much,
    where, for which destination, and what replays it. Nothing when ``count`` is 0."""
    if count > 0:
        log.warning("provscope: %d %s for %s are still spooled in %s; the next process "
                    "writing there replays them, or run `provscope spool replay`",
                    count, unit, destination, directory)
