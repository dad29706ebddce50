"""A reference reader of one line of line protocol, as InfluxDB 1.x reads it.

Written from the rules of InfluxDB's own parser (models/points.go): a backslash makes
the scanner skip the next character; only some escapes are removed afterwards
(measurement: ``\\,`` and ``\\ ``; tag keys and values: ``\\,``, ``\\=``, ``\\ ``; field
keys: those and ``\\"``; string values: ``\\"`` and ``\\\\``); every other backslash is
kept as it is. A line starting with ``#`` is a comment. Used to prove that what the
encoder writes is read back as the sanitisation policy says.
"""

from __future__ import annotations

from typing import Any


class Unreadable(ValueError):
    """InfluxDB would not read this line as one point."""


def _unescape(text: str, chars: str) -> str:
    for c in chars:
        text = text.replace("\\" + c, c)
    return text


def read_line(line: str) -> tuple[str, dict[str, str], dict[str, Any], int | None]:
    """(measurement, tags, fields, time) of one line. Raises ``Unreadable``."""
    n = len(line)
    if not line or line[0] == "#":
        raise Unreadable("empty or a comment")

    def scan(i: int, stops: str) -> tuple[str, int]:
        start = i
        while i < n and line[i] not in stops:
            i += 2 if line[i] == "\\" else 1
        if i > n:
            raise Unreadable("a backslash ends the line")
        return line[start:i], i

    raw, i = scan(0, ", ")
    if not raw or "\n" in raw:
        raise Unreadable("measurement")
    measurement = _unescape(raw, ", ")
    tags: dict[str, str] = {}
    while i < n and line[i] == ",":
        key, i = scan(i + 1, "=, ")
        if i >= n or line[i] != "=" or not key:
            raise Unreadable("tag key")
        value, i = scan(i + 1, ", =")
        if not value or (i < n and line[i] == "="):
            raise Unreadable("tag value")
        k, v = _unescape(key, ",= "), _unescape(value, ",= ")
        if k in tags or "\n" in k + v:
            raise Unreadable("duplicate tag or newline")
        tags[k] = v
    if i >= n or line[i] != " ":
        raise Unreadable("no fields")
    i += 1
    fields: dict[str, Any] = {}
    while True:
        key, i = scan(i, "=, ")
        if i >= n or line[i] != "=" or not key:
            raise Unreadable("field key")
        i += 1
        if i < n and line[i] == '"':
            j, out = i + 1, []
            while j < n and line[j] != '"':
                if line[j] == "\\" and j + 1 < n and line[j + 1] in '"\\':
                    out.append(line[j + 1])
                    j += 2
                else:
                    out.append(line[j])
                    j += 1
            if j >= n:
                raise Unreadable("unterminated string")
            value: Any = "".join(out)
            i = j + 1
        else:
            raw, i = scan(i, ", ")
            value = _scalar(raw)
        k = _unescape(key, ',=" ')
        if "\n" in k or k in fields:
            raise Unreadable("field key")
        fields[k] = value
        if i >= n or line[i] == " ":
            break
        if line[i] != ",":
            raise Unreadable("field separator")
        i += 1
    time_ns = None
    if i < n:
        try:
            time_ns = int(line[i + 1:])
        except ValueError:
            raise Unreadable("time") from None
    return measurement, tags, fields, time_ns


def _scalar(raw: str) -> Any:
    if raw in ("t", "T", "true", "True", "TRUE"):
        return True
    if raw in ("f", "F", "false", "False", "FALSE"):
        return False
    try:
        if raw.endswith("i"):
            value = int(raw[:-1])
            if not -(2**63) <= value < 2**63:
                raise Unreadable("int out of range")
            return value
        value = float(raw)
    except ValueError:
        raise Unreadable(f"number {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise Unreadable("not a finite number")
    return value
