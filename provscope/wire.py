"""The local socket's wire format: length-prefixed frames with JSON bodies.

A frame is a 5-byte header, ``>IB`` (body length in bytes, frame type), then the body.
Bodies are UTF-8 JSON (the C encoder and decoder in the standard library are the fastest
portable choice; no dependency). Frame types:

=====  ============  ==========================================================
type   name          body
=====  ============  ==========================================================
1      HELLO         ``{"v": 2, "pid": int, "run_id": str|null, "rank": int|null,
                     "watch": bool, "acks": bool}`` (watch false: a forked child, already
                     in a watched tree; acks true: the job wants DURABLE frames)
2      POINTS        ``{"k": [[measurement, tags, [field, ...]], ...],
                     "p": [[k, time_ns, value, ...], ...]}``
3      RECORDS       ``[record.to_dict(), ...]`` (lineage records, or points)
4      STATUS        empty; the agent answers with one STATUS_REPLY frame
5      STATUS_REPLY  ``{...}`` the agent's status
6      WATCH         ``{"pid": int, "run_id": str, "rank": int|null, "paths": [str]}``
7      ACK           ``{}`` the agent's answer to WATCH
8      DURABLE       ``{"n": int}`` agent to job: the first ``n`` data frames of this
                     connection are durable
9      FLUSH         empty, job to agent, only after a hello with ``"acks": true``: the
                     job waits in ``flush``; export what is queued now rather than at
                     the next flush interval
=====  ============  ==========================================================

Acknowledged delivery (protocol version 2). The data frames of a connection (POINTS and
RECORDS, counted from 1 whether or not the agent could read them) are numbered by
position; nothing in the frame carries the number. A job whose hello says
``"acks": true`` gets a DURABLE frame at once (``n`` = the data frames so far: the
agent's way of saying it acknowledges) and then whenever more of its frames are durable:
every record of frame ``n`` and of the frames before it is written to its destination,
appended to the destination's on-disk spool, or dropped and counted by the agent. The
job keeps every frame it sent until it is acknowledged and sends the unacknowledged ones
again, in order, on its next connection (``provscope.job.agent_client``). A version-1
agent ignores ``acks`` and never answers with DURABLE; a version-1 job never asks, and
gets none.

A POINTS frame with a bad row or key entry loses only the rows concerned (counted by the
agent); the stores' sanitisation policy judges names and values.

POINTS frames carry each distinct (measurement, tags, field names) once in a key table
and the points as flat rows of numbers referring to it, so a batch of one series costs
little more than its numbers, and decoding parses lists of numbers rather than objects
(about 1.6 times faster with the standard library's decoder).

A frame longer than ``MAX_FRAME_BYTES`` cannot be skipped safely (the sender is broken or
hostile), so the decoder raises ``FrameTooLarge`` and the connection closes; every other
bad frame (unknown type, not UTF-8, not JSON, wrong shape) raises ``BadFrame`` and the
stream goes on with the next frame.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provscope.records import Point, record_from_dict

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = [
    "ACK",
    "DATA_TYPES",
    "DURABLE",
    "FLUSH",
    "HEADER",
    "HELLO",
    "MAX_FRAME_BYTES",
    "POINTS",
    "RECORDS",
    "STATUS",
    "STATUS_REPLY",
    "VERSION",
    "WATCH",
    "BadFrame",
    "FrameDecoder",
    "FrameTooLarge",
    "decode_durable",
    "decode_json",
    "decode_points",
    "decode_points_counted",
    "decode_records",
    "encode_frame",
    "encode_json",
    "encode_points",
    "encode_records",
]

HEADER = struct.Struct(">IB")
HELLO, POINTS, RECORDS, STATUS, STATUS_REPLY, WATCH, ACK, DURABLE, FLUSH = range(1, 10)
KNOWN_TYPES = frozenset({HELLO, POINTS, RECORDS, STATUS, STATUS_REPLY, WATCH, ACK, DURABLE,
                         FLUSH})
#: Frame types that carry records; DURABLE counts these, in order, per connection.
DATA_TYPES = frozenset({POINTS, RECORDS})
#: The protocol version a hello announces (2: acknowledged delivery).
VERSION = 2
#: Largest body accepted, bytes. Clients split batches well below it.
MAX_FRAME_BYTES = 16 * 1024 * 1024

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=True).encode
_loads = json.loads


class BadFrame(ValueError):
    """A frame was rejected; the stream is still in sync."""


class FrameTooLarge(BadFrame):
    """The header announced a body over the limit; the stream cannot be trusted any more."""


def encode_frame(ftype: int, body: bytes) -> bytes:
    """Header + body."""
    return HEADER.pack(len(body), ftype) + body


def encode_json(ftype: int, obj: Any) -> bytes:
    """A frame whose body is ``obj`` as JSON."""
    return encode_frame(ftype, _dumps(obj).encode("utf-8"))


def encode_points(points: Sequence[Point]) -> bytes:
    """One POINTS frame for ``points`` (any mix of series and field sets)."""
    keys: list[list[Any]] = []
    index: dict[tuple[str, int, tuple[str, ...]], int] = {}
    rows: list[list[Any]] = []
    append = rows.append
    for p in points:
        fields = p.fields
        names = tuple(fields)
        # id(tags): producers reuse one tags mapping per series; equal copies only cost a
        # duplicate key-table entry, never a wrong tag.
        key = (p.measurement, id(p.tags), names)
        k = index.get(key)
        if k is None:
            k = index[key] = len(keys)
            keys.append([p.measurement, dict(p.tags), names])
        append([k, p.time_ns, *fields.values()])
    return encode_json(POINTS, {"k": keys, "p": rows})


def encode_records(records: Sequence[Any]) -> bytes:
    """One RECORDS frame (lineage records or points, as ``to_dict()``)."""
    return encode_json(RECORDS, [r.to_dict() for r in records])


def decode_json(body: bytes) -> Any:
    """Parse a JSON body. Raises ``BadFrame`` (not UTF-8, not JSON)."""
    try:
        return _loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadFrame(f"body is not UTF-8 (byte {exc.start})") from None
    except ValueError as exc:
        raise BadFrame(f"body is not JSON ({exc})") from None
    except RecursionError:
        raise BadFrame("body nests too deeply") from None


def decode_durable(body: bytes) -> int:
    """The frame count of a DURABLE body. Raises ``BadFrame`` unless ``{"n": int >= 0}``."""
    obj = decode_json(body)
    n = obj.get("n") if type(obj) is dict else None
    if type(n) is not int or n < 0:
        raise BadFrame('durable body must be {"n": int >= 0}')
    return n


# JSON can also produce these; none is a field value.
_BAD_VALUE_TYPES = frozenset({list, dict, type(None)})


def decode_points(body: bytes) -> list[Point]:
    """Points of a POINTS body (rows that cannot be read are left out; see
    ``decode_points_counted``). Raises ``BadFrame`` when the body itself is unreadable."""
    return decode_points_counted(body)[0]


def _series_entry(entry: Any) -> tuple[str, dict, tuple[str, ...], int] | None:
    """A key-table entry, or None when it cannot describe points."""
    if (type(entry) is not list or len(entry) != 3 or type(entry[0]) is not str
            or type(entry[1]) is not dict or type(entry[2]) is not list or not entry[2]):
        return None
    tags = entry[1]
    if any(type(v) is not str for v in tags.values()):
        return None
    names = tuple(entry[2])
    if any(type(name) is not str for name in names) or len(set(names)) != len(names):
        return None
    return entry[0], tags, names, len(names) + 2


def decode_points_counted(body: bytes) -> tuple[list[Point], int]:
    """Points of a POINTS body and the number of rows left out.

    One bad part costs only the rows it describes: a key entry of the wrong shape (tag
    values not strings, field names not distinct strings) leaves out the rows that refer
    to it; a row of the wrong shape (index, int time, one value per field, values that
    are numbers, bools or strings) leaves out itself. Names are not judged here: the
    stores' sanitisation policy makes them storable or refuses the point, counted.

    Raises:
        BadFrame: the body is not JSON, or not ``{"k": [...], "p": [...]}``.
    """
    obj = decode_json(body)
    if type(obj) is not dict or type(obj.get("k")) is not list or type(obj.get("p")) is not list:
        raise BadFrame('points body must be {"k": [...], "p": [...]}')
    series = [_series_entry(entry) for entry in obj["k"]]
    n = len(series)
    out: list[Point] = []
    append = out.append
    bad = _BAD_VALUE_TYPES
    dropped = 0
    for row in obj["p"]:
        if type(row) is not list or len(row) < 3 or type(row[0]) is not int \
                or not 0 <= row[0] < n or type(row[1]) is not int:
            dropped += 1
            continue
        entry = series[row[0]]
        if entry is None or len(row) != entry[3]:
            dropped += 1
            continue
        values = row[2:]
        if any(type(v) in bad for v in values):
            dropped += 1
            continue
        meas, tags, names, _ = entry
        append(Point(meas, tags, dict(zip(names, values, strict=False)), row[1]))
    return out, dropped


def decode_records(body: bytes) -> list[Any]:
    """Records of a RECORDS body. Raises ``BadFrame`` naming the first bad record."""
    obj = decode_json(body)
    if type(obj) is not list:
        raise BadFrame("records body must be a JSON list")
    out = []
    for item in obj:
        if type(item) is not dict:
            raise BadFrame("each record must be a JSON object")
        try:
            out.append(record_from_dict(item))
        except (ValueError, TypeError) as exc:
            raise BadFrame(str(exc)) from None
    return out


class FrameDecoder:
    """Splits a byte stream into frames. Feed bytes, iterate frames.

    Args:
        max_frame_bytes: bodies over this raise ``FrameTooLarge``.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame_bytes

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[tuple[int, bytes]]:
        """Append bytes; yield every complete ``(type, body)``.

        Raises:
            FrameTooLarge: a header announced a body over the limit.
            BadFrame: an unknown frame type (that frame is skipped first).
        """
        buf = self._buf
        buf += data
        pos = 0
        size = HEADER.size
        try:
            while len(buf) - pos >= size:
                length, ftype = HEADER.unpack_from(buf, pos)
                if length > self._max:
                    raise FrameTooLarge(f"frame of {length} bytes is over the "
                                        f"{self._max}-byte limit")
                end = pos + size + length
                if end > len(buf):
                    break
                body = bytes(buf[pos + size:end])
                pos = end
                if ftype not in KNOWN_TYPES:
                    raise BadFrame(f"unknown frame type {ftype}")
                yield ftype, body
        finally:
            del buf[:pos]

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (non-zero at close: a truncated frame)."""
        return len(self._buf)


# ----------------------------------------------------------------------------- socket

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


def request(path: str | os.PathLike[str], ftype: int, body: Any,
            timeout_s: float = 2.0) -> Any:
    """Send one frame and wait for the agent's single answer frame (STATUS, WATCH).

    Blocks up to ``timeout_s``. Raises ``OSError`` when no agent answers.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect(str(path))
        s.sendall(encode_json(ftype, body) if body is not None else encode_frame(ftype, b""))
        decoder = FrameDecoder()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            data = s.recv(65536)
            if not data:
                break
            for _, reply in decoder.feed(data):
                return decode_json(reply)
        raise OSError(errno.ECONNRESET, f"no answer from the agent at {path}")
    finally:
        s.close()
