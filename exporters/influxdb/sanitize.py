"""The one policy for what a point may carry, applied before any backend stores it.

Both time-series backends (the line protocol writer and the embedded SQLite store) apply
it, so they store the same names and the same values, and every value that cannot be
stored is counted by itself: it never costs its neighbours. docs/lineprotocol.md
("Sanitisation") is the user-facing description; the rules:

Names (measurement, tag keys, tag values, field keys):

- **Control characters** U+0000-U+001F and U+007F are replaced by their Unicode control
  pictures (U+2400 + code, U+2421 for DEL): a newline becomes ``␊``, a tab ``␉``, NUL
  ``␀``. Each stays distinct from the others and from the two characters ``\\n``.
- **A backslash** before ``,``, ``=``, space or ``"``, or at the end of the text, is
  replaced by U+29F5 (reverse solidus operator, which looks like it): line protocol cannot carry it
  there (it would escape the separator after it). Every other backslash is kept.
- **Lone surrogates** (text that is not valid Unicode) become U+FFFD.
- A **measurement** starting with ``#`` gets a ``_`` in front (InfluxDB reads a line
  starting with ``#`` as a comment).
- The **keys** ``time``, ``_field`` and ``_measurement`` (tag or field) get a trailing
  ``_`` (InfluxDB refuses them).
- An **empty** tag key or value leaves that tag out. Two tags or fields whose keys are
  equal after these rules: the first in sorted order of the original keys is kept.

Refused, and counted by reason (``REASONS``):

- a point with an empty measurement, or a series key (escaped measurement and tags)
  longer than 65,535 bytes: ``invalid_name``;
- a point whose time is not an integer within InfluxDB's range: ``invalid_time``;
- a field with an empty key (or a duplicate, see above): ``invalid_name``;
- a float that is NaN or infinite, an int outside int64 (written as an int) or outside
  the float range (written as a float), a value of another type: ``invalid_value``;
- a value whose type differs from its field's type: ``type_conflict``. A field's type is
  the catalogue's dtype when the catalogue declares it, else the type of the first
  value seen for that measurement and field (by this exporter). Ints are floats unless
  the catalogue declares ``int`` (``ints_as_float``);
- a point left with no field: ``no_field``.

String field values keep every character except lone surrogates (U+FFFD).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any

from provscope.catalogue import lookup
from provscope.records import Point

__all__ = [
    "BACKSLASH",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_SERIES_KEY_BYTES",
    "REASONS",
    "TIME_MAX",
    "TIME_MIN",
    "PointPolicy",
    "clean_key",
    "clean_measurement",
    "clean_point",
    "clean_string",
    "clean_tag_value",
    "value_class",
]

log = logging.getLogger("provscope.exporters.sanitize")

BACKSLASH = "\u29f5"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT_MAX = 1.7976931348623157e308
# InfluxDB's time range (models.MinNanoTime/MaxNanoTime, with a margin of one).
TIME_MIN, TIME_MAX = -(2**63) + 2, 2**63 - 2
MAX_SERIES_KEY_BYTES = 65535
RESERVED_KEYS = frozenset({"time", "_field", "_measurement"})
#: Why a point or a field value was refused (one counter each).
REASONS = ("invalid_name", "invalid_time", "invalid_value", "type_conflict", "no_field",
           "server")

# One pass over the original text: each match is replaced independently, and a
# replacement is never itself special, so the result needs no second pass.
_SPECIAL = re.compile(r'[\x00-\x1f\x7f\ud800-\udfff]|\\(?=[,= "]|\Z)')
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_CACHE_MAX = 50_000
_names: dict[Any, str] = {}


def _replace(m: re.Match[str]) -> str:
    c = m.group()
    if c == "\\":
        return BACKSLASH
    o = ord(c)
    if o < 0x20:
        return chr(0x2400 + o)
    return "\u2421" if o == 0x7F else "\ufffd"


def _clean(value: Any) -> str:
    text = value if type(value) is str else str(value)
    return _SPECIAL.sub(_replace, text) if _SPECIAL.search(text) else text


def clean_tag_value(value: Any) -> str:
    """A tag value as it is stored (``""``: the tag is left out). Never raises."""
    cached = _names.get(value) if type(value) is str else None
    if cached is not None:
        return cached
    out = _clean(value)
    if type(value) is str:
        if len(_names) >= _CACHE_MAX:
            _names.clear()
        _names[value] = out
    return out


def clean_key(key: Any) -> str:
    """A tag or field key as it is stored (``""``: unusable). Never raises."""
    out = clean_tag_value(key)
    return out + "_" if out in RESERVED_KEYS else out


def clean_measurement(name: Any) -> str:
    """A measurement as it is stored (``""``: unusable, the point is refused)."""
    out = clean_tag_value(name)
    return "_" + out if out[:1] == "#" else out


def clean_string(value: str) -> str:
    """A string field value as it is stored: lone surrogates become U+FFFD."""
    return _SURROGATE.sub("\ufffd", value) if _SURROGATE.search(value) else value


def _declared(measurement: str, field: str) -> str | None:
    spec = lookup(measurement, field)
    return spec.dtype if spec is not None else None


def value_class(measurement: str, field: str, value: Any,
                ints_as_float: bool) -> tuple[str, Any] | tuple[None, str]:
    """The stored type of ``value`` and the value to write, or ``(None, reason)``.

    Types: ``float``, ``int``, ``bool``, ``str``. An ``int`` is a ``float`` unless the
    catalogue declares the field ``int`` (or ``ints_as_float`` is off); numpy/torch
    scalars are converted by their ``dtype.kind``.
    """
    t = type(value)
    if t is float or (t is not bool and isinstance(value, float)):
        value = float(value)
        if value - value:
            return None, "invalid_value"
        return "float", value
    if t is bool:
        return "bool", value
    if isinstance(value, int):
        value = int(value)
        if not ints_as_float or _declared(measurement, field) == "int":
            if INT64_MIN <= value <= INT64_MAX:
                return "int", value
            return None, "invalid_value"
        if -FLOAT_MAX <= value <= FLOAT_MAX:
            return "float", value
        return None, "invalid_value"
    if isinstance(value, str):
        return "str", clean_string(str(value))
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    try:
        if kind == "f":
            return value_class(measurement, field, float(value), ints_as_float)
        if kind in ("i", "u"):
            return value_class(measurement, field, int(value), ints_as_float)
        if kind == "b":
            return "bool", bool(value)
    except (TypeError, ValueError, OverflowError):
        pass
    return None, "unsupported"


class PointPolicy:
    """Field types per series and the counts of everything refused, for one exporter.

    Thread-safe counters; the type table is bounded (``max_fields`` measurement+field
    pairs; past it, new fields are not checked here and the server's answer decides).

    Args:
        ints_as_float: ints are floats unless the catalogue declares ``int``.
        name: the exporter's name, for log lines.
        max_fields: size bound of the type table.
    """

    def __init__(self, ints_as_float: bool = True, name: str = "points",
                 max_fields: int = 100_000) -> None:
        self.ints_as_float = ints_as_float
        self.name = name
        self._types: dict[tuple[str, str], str] = {}
        self._max = max_fields
        self._lock = threading.Lock()
        self.points_rejected = 0
        self.fields_rejected = 0
        self.by_reason: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._last_log: dict[str, float] = {}
        self.log_every_s = 60.0

    def expect(self, measurement: str, field: str, cls: str) -> bool:
        """True when ``cls`` is the field's type (its first type, if new). Never blocks
        beyond a dict update."""
        key = (measurement, field)
        known = self._types.get(key)
        if known is None:
            declared = _declared(measurement, field)
            if declared is not None:
                known = declared
            else:
                if len(self._types) >= self._max:
                    return True
                known = cls
            self._types.setdefault(key, known)
        return known == cls

    def field_type(self, measurement: str, field: str) -> str | None:
        """The type recorded for a field (None: not seen yet)."""
        return self._types.get((measurement, field))

    def reject_points(self, reason: str, count: int, detail: str) -> None:
        """Count ``count`` points refused for ``reason``; log one line at most every
        ``log_every_s`` per reason (the counts stay exact)."""
        with self._lock:
            self.points_rejected += count
            self.by_reason[reason] = self.by_reason.get(reason, 0) + count
        self._log(reason, "%d point(s) dropped (%s): %s", count, reason, detail)

    def reject_field(self, reason: str, measurement: Any, field: Any, detail: str) -> None:
        """Count one field value left out of its point for ``reason``."""
        with self._lock:
            self.fields_rejected += 1
            self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        self._log(reason, "a value of field %r of measurement %r left out (%s): %s",
                  field, measurement, reason, detail)

    def _log(self, reason: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_log.get(reason, -self.log_every_s) >= self.log_every_s:
            self._last_log[reason] = now
            log.warning("%s: " + msg + " (further ones are counted, logged at most once a "
                        "minute)", self.name, *args)

    def stats(self) -> dict[str, float]:
        """``points_rejected_total``, ``fields_rejected_total`` and one
        ``rejected_<reason>_total`` per reason (names as in the catalogue)."""
        out = {"points_rejected_total": float(self.points_rejected),
               "fields_rejected_total": float(self.fields_rejected)}
        for reason in REASONS:
            out[f"rejected_{reason}_total"] = float(self.by_reason.get(reason, 0))
        return out


def _time_ok(time_ns: Any) -> bool:
    return time_ns is None or (type(time_ns) is int and TIME_MIN <= time_ns <= TIME_MAX)


def clean_point(point: Point, policy: PointPolicy | None = None,
                ints_as_float: bool = True) -> Point | None:
    """``point`` as it is stored, or None when it is refused.

    With a ``policy``, field types are checked against it and every refusal is counted
    there; without one nothing is counted, no type is checked, and a value of an
    unsupported type raises ``ValueError`` (one line naming it).
    """
    if policy is not None:
        ints_as_float = policy.ints_as_float
    measurement = clean_measurement(point.measurement)
    if not measurement:
        if policy is not None:
            policy.reject_points("invalid_name", 1, "empty measurement")
        return None
    time_ns = point.time_ns
    if not _time_ok(time_ns):
        try:
            time_ns = int(time_ns)
        except (TypeError, ValueError, OverflowError):
            time_ns = TIME_MAX + 1
        if not TIME_MIN <= time_ns <= TIME_MAX:
            if policy is not None:
                policy.reject_points("invalid_time", 1, f"time {point.time_ns!r}")
            return None
    tags: dict[str, str] = {}
    for key, value in sorted(point.tags.items(), key=_sort_key):
        if value is None:
            continue
        k, v = clean_key(key), clean_tag_value(value)
        if k and v and k not in tags:
            tags[k] = v
    if _series_key_bytes(measurement, tags) > MAX_SERIES_KEY_BYTES:
        if policy is not None:
            policy.reject_points("invalid_name", 1, "series key longer than 65535 bytes")
        return None
    fields: dict[str, Any] = {}
    for fkey, fvalue in sorted(point.fields.items(), key=_sort_key):
        if fvalue is None:
            continue
        k = clean_key(fkey)
        if not k or k in fields:
            if policy is not None:
                policy.reject_field("invalid_name", measurement, fkey,
                                    "empty key" if not k else f"same key as another: {k!r}")
            continue
        cls, out = value_class(measurement, k, fvalue, ints_as_float)
        if cls is None:
            if out == "unsupported":
                if policy is None:
                    raise ValueError(
                        f"field {fkey!r} of measurement {point.measurement!r}: a value of "
                        f"type {type(fvalue).__name__} cannot be written (allowed: float, "
                        "int, bool, str)")
                policy.reject_field("invalid_value", measurement, fkey,
                                    f"type {type(fvalue).__name__} (allowed: float, int, "
                                    "bool, str)")
            elif policy is not None:
                policy.reject_field("invalid_value", measurement, fkey, f"value {fvalue!r:.80}")
            continue
        if policy is not None and not policy.expect(measurement, k, cls):
            held = policy.field_type(measurement, k)
            policy.reject_field("type_conflict", measurement, fkey,
                                f"a {cls} where the field holds {held}")
            continue
        fields[k] = out
    if not fields:
        if policy is not None:
            policy.reject_points("no_field", 1, f"measurement {measurement!r} has no "
                                 "writable field")
        return None
    # Sorted by the stored keys: the order line protocol writers use.
    return Point(measurement, dict(sorted(tags.items())), dict(sorted(fields.items())),
                 time_ns)


def _sort_key(item: tuple[Any, Any]) -> str:
    key = item[0]
    return key if type(key) is str else str(key)


_KEY_ESCAPE = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})


def _series_key_bytes(measurement: str, tags: dict[str, str]) -> int:
    n = len(measurement.encode("utf-8", "replace")) + 2 * measurement.count(",") \
        + 2 * measurement.count(" ")
    for k, v in tags.items():
        n += 2 + len(k.translate(_KEY_ESCAPE).encode()) + len(v.translate(_KEY_ESCAPE).encode())
    return n
