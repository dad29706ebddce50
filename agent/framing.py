"""The local socket's wire format: length-prefixed frames with JSON bodies.

A frame is a 5-byte header, ``>IB`` (body length in bytes, frame type), then the body.
Bodies are UTF-8 JSON (the C encoder and decoder in the standard library are the fastest
portable choice; no dependency). Frame types:

=====  ============  ==========================================================
type   name          body
=====  ============  ==========================================================
1      HELLO         ``{"v": 1, "pid": int, "run_id": str|null, "rank": int|null,
                     "watch": bool}`` (false: a forked child, already in a watched tree)
2      POINTS        ``{"k": [[measurement, tags], ...], "p": [[k, fields, time_ns], ...]}``
3      RECORDS       ``[record.to_dict(), ...]`` (lineage records, or points)
4      STATUS        empty; the agent answers with one STATUS_REPLY frame
5      STATUS_REPLY  ``{...}`` the agent's status
6      WATCH         ``{"pid": int, "run_id": str, "rank": int|null, "paths": [str]}``
7      ACK           ``{}`` the agent's answer to WATCH
=====  ============  ==========================================================

POINTS frames carry each distinct (measurement, tags) pair once in a key table and the
points as rows referring to it, so a batch of one series costs little more than its
numbers. A frame longer than ``MAX_FRAME_BYTES`` cannot be skipped safely (the sender is
broken or hostile), so the decoder raises ``FrameTooLarge`` and the connection closes;
every other bad frame (unknown type, not UTF-8, not JSON, wrong shape) raises
``BadFrame`` and the stream goes on with the next frame.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from provscope.records import Point, record_from_dict

__all__ = [
    "ACK",
    "HEADER",
    "HELLO",
    "MAX_FRAME_BYTES",
    "POINTS",
    "RECORDS",
    "STATUS",
    "STATUS_REPLY",
    "WATCH",
    "BadFrame",
    "FrameDecoder",
    "FrameTooLarge",
    "decode_json",
    "decode_points",
    "decode_records",
    "encode_frame",
    "encode_json",
    "encode_points",
    "encode_records",
]

HEADER = struct.Struct(">IB")
HELLO, POINTS, RECORDS, STATUS, STATUS_REPLY, WATCH, ACK = 1, 2, 3, 4, 5, 6, 7
KNOWN_TYPES = frozenset({HELLO, POINTS, RECORDS, STATUS, STATUS_REPLY, WATCH, ACK})
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
    """One POINTS frame for ``points`` (any mix of series)."""
    keys: list[list[Any]] = []
    index: dict[tuple[str, int], int] = {}
    rows: list[list[Any]] = []
    for p in points:
        # id(tags): producers reuse one tags mapping per series; equal copies only cost a
        # duplicate key-table entry, never a wrong tag.
        key = (p.measurement, id(p.tags))
        k = index.get(key)
        if k is None:
            k = index[key] = len(keys)
            keys.append([p.measurement, dict(p.tags)])
        rows.append([k, p.fields if type(p.fields) is dict else dict(p.fields), p.time_ns])
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


_FIELD_TYPES = (float, int, bool, str)


def decode_points(body: bytes) -> list[Point]:
    """Points of a POINTS body. Raises ``BadFrame`` naming the first bad part."""
    obj = decode_json(body)
    if type(obj) is not dict or type(obj.get("k")) is not list or type(obj.get("p")) is not list:
        raise BadFrame('points body must be {"k": [...], "p": [...]}')
    series = []
    for entry in obj["k"]:
        if (type(entry) is not list or len(entry) != 2 or type(entry[0]) is not str
                or not entry[0] or type(entry[1]) is not dict):
            raise BadFrame("points key entry must be [measurement, {tag: value}]")
        tags = entry[1]
        for k, v in tags.items():
            if type(v) is not str or not k:
                raise BadFrame(f"tag {k!r} must be a non-empty key with a string value")
        series.append((entry[0], tags))
    n = len(series)
    out = []
    append = out.append
    for row in obj["p"]:
        try:
            k, fields, t = row
        except (TypeError, ValueError):
            raise BadFrame("point row must be [key, {field: value}, time_ns]") from None
        if type(k) is not int or not 0 <= k < n or type(fields) is not dict or not fields \
                or type(t) is not int:
            raise BadFrame("point row must be [key index, non-empty fields, int time_ns]")
        for v in fields.values():
            if not isinstance(v, _FIELD_TYPES):
                raise BadFrame(f"field value {v!r} must be a number, bool or string")
        meas, tags = series[k]
        append(Point(meas, tags, fields, t))
    return out


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
