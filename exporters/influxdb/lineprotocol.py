"""InfluxDB line protocol encoding: ``measurement,tag=v field=1 1700000000000000000``.

Pure functions, no I/O. The output is byte-for-byte what ``influxdb_client``'s
``Point.to_line_protocol`` produces for the same point (with ``ints_as_float=False``), so
either can be used as the reference of the other.

Names and values are first made storable by ``sanitize`` (the one policy both backends
apply: control characters, problem backslashes, ``#``, reserved keys, empty names, type
conflicts, out-of-range numbers; see docs/lineprotocol.md). The output is then
byte-for-byte what ``influxdb_client``'s ``Point.to_line_protocol`` produces for the
sanitised point (with ``ints_as_float=False``).

Rules after sanitising:

- **measurement**: ``,`` and space are escaped with a backslash.
- **tag keys, tag values, field keys**: ``,``, ``=`` and space are escaped with a backslash.
- **string field values**: ``"`` and ``\\`` are escaped with a backslash, the value is
  double-quoted; newlines and other characters are kept.
- **tags** and **fields** are sorted by their stored keys.
- **floats** use Python's shortest round-trip ``repr`` with a trailing ``.0`` removed
  (``3.0`` -> ``3``, ``0.1`` -> ``0.1``, ``1e+16``).
- **booleans** are ``true``/``false``.
- **integers**: InfluxDB fixes a field's type at its first write and rejects a batch whose
  types conflict, and a Python metric is often ``5`` one step and ``5.5`` the next. So,
  by default (``ints_as_float=True``), an ``int`` is written as a float (digits, no
  suffix) unless the catalogue (``provscope.catalogue.lookup``) declares the field with
  ``dtype="int"``, which gets the ``i`` suffix. ``ints_as_float=False`` writes every int
  with ``i`` (influxdb-client's default, used to compare bytes).
- **time** is Unix nanoseconds; a ``time_ns`` of ``None`` leaves the timestamp out (the
  server then uses its own clock).

With a ``PointPolicy`` (the writer always passes its own), a refused point gives no line
and a refused value is left out of its line, each counted by reason in the policy;
without one, nothing is counted or type-checked and a value of an unsupported type
raises ``ValueError``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from provscope.exporters.influxdb.sanitize import (
    FLOAT_MAX,
    INT64_MAX,
    INT64_MIN,
    MAX_SERIES_KEY_BYTES,
    TIME_MAX,
    TIME_MIN,
    PointPolicy,
    clean_key,
    clean_measurement,
    clean_point,
    clean_tag_value,
)

from provscope.catalogue import lookup
from provscope.records import Point

__all__ = ["encode_batch", "encode_lines", "encode_point"]

# str.translate with a table is one C loop per string (the same tables as influxdb-client,
# so the bytes agree); every distinct name is escaped once and then served from a dict.
# Names are sanitised first (no control characters, no backslash before a separator).
_ESCAPE_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ "})
_ESCAPE_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})
# Lone surrogates cannot be UTF-8 encoded: they become U+FFFD in the same C loop.
_STRING_TABLE: dict[int | str, str] = {c: "\ufffd" for c in range(0xD800, 0xE000)}
_STRING_TABLE.update({'"': r"\"", "\\": r"\\"})
_ESCAPE_STRING = str.maketrans(_STRING_TABLE)

# Caches: names, tag sets and field-key sets repeat from point to point (bounded
# cardinality by design), so their escaped and sorted forms are computed once. Each cache
# is cleared when it grows past _CACHE_MAX so a stream of unique names cannot grow memory.
_CACHE_MAX = 50_000
_key_cache: dict[Any, str] = {}  # field key -> escaped key
_int_cache: dict[tuple[Any, Any], str] = {}  # (measurement, field) -> "i" or ""
# (measurement, *tag keys, _SEP, *tag values, *field keys) -> _Series, one dict per
# ints_as_float mode. A flat tuple of the dicts' own keys and values is the cheapest key
# CPython can build (no per-item tuples); _SEP (never equal to a key) and the equal
# number of tag keys and values make it unambiguous. It keeps the caller's key order:
# callers emit the same order for the same series, so it hits.
_SEP = object()
# Shapes with at least this many floats format them in one orjson call (_bulk_float_text).
_BULK_MIN = 3
_dumps: Callable[..., bytes] | None
try:
    from orjson import dumps as _orjson_dumps

    _dumps = _orjson_dumps
except ImportError:  # optional: without it every float goes through repr
    _dumps = None
_FLOAT_CACHE_MAX = 20_000
_float_text: dict[float, str] = {}  # float -> its line protocol text (bounded, never 0.0)
_series_caches: dict[bool, dict[tuple, _Series]] = {True: {}, False: {}}


class _Series:
    """What one (measurement, tag set, field-key set) encodes to, computed once."""

    __slots__ = ("checked", "classes", "excluded", "fast", "measurement", "prefix", "shape")

    def __init__(self, measurement: str, prefix: str | None, shape: tuple,
                 excluded: tuple) -> None:
        self.measurement = measurement  # the stored (sanitised) measurement
        self.prefix = prefix  # "measurement,k=v,k2=v2 " (sorted, escaped); None: refused
        # sorted ((key, escaped stored key + "=", int suffix, stored key), ...)
        self.shape = shape
        self.excluded = excluded  # keys left out: empty or equal to another once stored
        self.fast: Any = None  # specialised encoder for the first value types seen
        self.classes: tuple = ()  # ((stored key, stored type), ...) the encoder writes
        self.checked: list[PointPolicy] = []  # policies that accept those types


def _escape_key(key: Any) -> str:
    escaped = _key_cache.get(key)
    if escaped is None:
        if len(_key_cache) >= _CACHE_MAX:
            _key_cache.clear()
        escaped = clean_key(key).translate(_ESCAPE_KEY)
        _key_cache[key] = escaped
    return escaped


def _sort_key(item: Any) -> str:
    return item if type(item) is str else str(item)


def _build_prefix(measurement: str, tags: Any) -> str | None:
    """The escaped series prefix of the sanitised names; None when the point is refused
    (empty measurement, series key over ``MAX_SERIES_KEY_BYTES``)."""
    if not measurement:
        return None
    stored: dict[str, str] = {}
    for key in sorted(tags, key=_sort_key):
        value = tags[key]
        if value is None:
            continue
        k, v = clean_key(key), clean_tag_value(value)
        if k and v and k not in stored:
            stored[k] = v
    parts = [measurement.translate(_ESCAPE_MEASUREMENT)]
    for k, v in sorted(stored.items()):
        parts.append(f"{k.translate(_ESCAPE_KEY)}={v.translate(_ESCAPE_KEY)}")
    prefix = ",".join(parts) + " "
    if len(prefix.encode("utf-8", "replace")) > MAX_SERIES_KEY_BYTES:
        return None
    return prefix


def _int_suffix(measurement: Any, field: Any) -> str:
    key = (measurement, field)
    suffix = _int_cache.get(key)
    if suffix is None:
        if len(_int_cache) >= _CACHE_MAX:
            _int_cache.clear()
        spec = lookup(measurement, field) if isinstance(field, str) else None
        suffix = "i" if spec is not None and spec.dtype == "int" else ""
        _int_cache[key] = suffix
    return suffix


def _build_shape(measurement: str, keys: Iterable[Any],
                 ints_as_float: bool) -> tuple[tuple, tuple]:
    """(sorted shape, keys left out): of keys equal once stored, the first in sorted order
    of the original keys is kept."""
    shape = []
    seen: set[str] = set()
    excluded = []
    for key in sorted(keys, key=_sort_key):
        stored = clean_key(key)
        if not stored or stored in seen:
            excluded.append(key)
            continue
        seen.add(stored)
        suffix = _int_suffix(measurement, stored) if ints_as_float else "i"
        shape.append((key, _escape_key(key) + "=", suffix, stored))
    shape.sort(key=lambda entry: entry[3])
    return tuple(shape), tuple(excluded)


_FAST_TYPES = {float: "float", int: "int", str: "str", bool: "bool"}
_PLAIN = re.compile(r"[A-Za-z0-9_.:/@+-]+=")


def _compile(shape: tuple, fields: Any) -> Any:
    """A specialised encoder for one shape and the value types in ``fields``, or None.

    Telemetry repeats the same series with the same field types, so the generic loop's
    per-field type dispatch, list and join can be replaced by one type guard and one
    f-string (about twice as fast). The generated ``enc(fields, prefix, time_ns)`` returns
    None when its guard fails (another type, NaN/inf, no time) and the caller then takes
    the generic path, so the bytes are the same either way. Keys and escaped text are
    passed in the namespace, never pasted into the source.
    """
    types = [type(fields[key]) for key, _, _, _ in shape]
    if not types or len(types) > 64 or any(t not in _FAST_TYPES for t in types):
        return None
    # The series key holds the field keys in insertion order, so every dict that finds
    # this encoder has exactly that order: one unpack of .values() replaces N lookups.
    position = {key: i for i, key in enumerate(fields)}
    ns: dict[str, Any] = {"E": _ESCAPE_STRING, "R": _float_text}
    # The time and every int must be in InfluxDB's ranges (else the generic path refuses
    # them, counted); chained comparisons of ints are exact.
    guard = [f"type(t) is int and {TIME_MIN} <= t <= {TIME_MAX}"]
    conv: list[str] = []
    out: list[str] = []
    finite: list[str] = []
    for (key, key_eq, suffix, _), t in zip(shape, types, strict=True):
        i = position[key]
        # Plain keys go into the f-string as literal text (one fewer lookup and format per
        # field); anything else is passed by name, so no key text can change the code.
        if _PLAIN.fullmatch(key_eq):
            name = key_eq
        else:
            ns[f"A{i}"] = key_eq
            name = f"{{A{i}}}"
        guard.append(f"type(v{i}) is {_FAST_TYPES[t]}")
        if t is float:
            finite.append(f"v{i} - v{i}")
            text = repr(fields[key]).removesuffix(".0")
            if len(text) < 12:
                # Telemetry repeats such values (0 and 100 %, totals, clock rates): a
                # bounded cache of their text turns repr into one dict lookup. Zero is not
                # cached (0.0 == -0.0 would share an entry; its repr is fast anyway).
                conv.append(f"        s{i} = R.get(v{i})")
                conv.append(f"        if s{i} is None:")
                conv.append(f"            s{i} = repr(v{i}).removesuffix('.0')")
                conv.append(f"            if v{i} and len(R) < {_FLOAT_CACHE_MAX}: R[v{i}] = s{i}")
            else:
                # Long texts (float32 statistics) seldom repeat: no cache lookup.
                conv.append(f"        s{i} = repr(v{i}).removesuffix('.0')")
            out.append(f"{name}{{s{i}}}")
        elif t is int:
            low, high = (INT64_MIN, INT64_MAX) if suffix else (-FLOAT_MAX, FLOAT_MAX)
            guard.append(f"{low!r} <= v{i} <= {high!r}")
            out.append(f"{name}{{v{i}}}{suffix}")
        elif t is str:
            out.append(f'{name}"{{v{i}.translate(E)}}"')
        else:
            out.append(f"{name}{{'true' if v{i} else 'false'}}")
    if finite:
        # x - x is 0.0 for a finite float and NaN for NaN/inf; one sum checks them all.
        guard.append("not (" + " + ".join(finite) + ")")
    floats = [f"v{position[key]}" for (key, _, _, _), t in zip(shape, types, strict=True)
              if t is float]
    if _dumps is not None and len(floats) >= _BULK_MIN:
        conv = _bulk_float_text(floats)
        ns["D"] = _dumps
    quote = "'" * 3
    source = "\n".join([
        "def enc(f, p, t):",
        "    " + "".join(f"v{i}, " for i in range(len(types))) + "= f.values()",
        "    if " + " and ".join(guard) + ":", *conv,
        f"        return f{quote}{{p}}" + ",".join(out) + f" {{t}}{quote}",
        "    return None",
    ])
    exec(source, ns)  # source built from the fixed templates above only
    return ns["enc"]


def _bulk_float_text(names: list[str]) -> list[str]:
    """Source lines that set ``s<i>`` for the float variables ``v<i>`` in ``names``.

    ``repr(float)`` is most of the encoder's time on wide points. orjson formats a tuple
    of floats in one C call with the same shortest round-trip digits as ``repr``, and in
    the same notation except where ``repr`` switches to an exponent: below 1e-4 (orjson
    writes ``0.0000...``) and from 1e16 up (orjson writes ``1e16``, Python ``1e+16``).
    Those texts (any ``e``, any ``0.0000``) take ``repr`` instead, one by one, so the bytes are
    always ``repr(v).removesuffix(".0")``; a false alarm (``10.00001``) only costs a repr.
    Between floats there is only ``,``, so ``.0,`` and a final ``.0`` are the suffixes.
    """
    targets = "".join(f"{n.replace('v', 's', 1)}, " for n in names)
    values = "(" + "".join(f"{n}, " for n in names) + ")"
    return [
        f"        j = D({values})[1:-1].decode()",
        "        if '.0,' in j:",
        "            j = j.replace('.0,', ',')",
        "        if j[-2:] == '.0':",
        "            j = j[:-2]",
        f"        {targets}= j.split(',')",
        "        if 'e' in j or '0.0000' in j:",
        f"            {targets}= [s if 'e' not in s and '0.0000' not in s else "
        f"repr(x).removesuffix('.0') for s, x in zip(({targets}), {values}, strict=True)]",
    ]


def _series(key: tuple | None, point: Point, ints_as_float: bool) -> _Series:
    fields = point.fields
    measurement = clean_measurement(point.measurement)
    shape, excluded = _build_shape(measurement, fields, ints_as_float)
    series = _Series(measurement, _build_prefix(measurement, point.tags), shape, excluded)
    if series.prefix is not None and not excluded:
        series.fast = _compile(shape, fields)
        if series.fast is not None:
            series.classes = tuple(
                (stored, _CLASSES[type(fields[k])] if type(fields[k]) is not int
                 else ("int" if suffix else "float"))
                for k, _, suffix, stored in shape)
    if key is not None:
        cache = _series_caches[ints_as_float]
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[key] = series
    return series


_CLASSES = {float: "float", str: "str", bool: "bool"}


def _accepts(series: _Series, policy: PointPolicy) -> bool:
    """True when ``policy`` accepts the value types ``series.fast`` writes (registering
    them for fields it has not seen); then that encoder's lines need no more checks.
    Called only after the encoder wrote a line, i.e. for values of exactly those types."""
    measurement = series.measurement
    expect = policy.expect
    if all([expect(measurement, stored, cls) for stored, cls in series.classes]):
        series.checked.append(policy)
        return True
    return False


def _encode_stored(point: Point, ints_as_float: bool) -> str:
    """The line of a point ``clean_point`` returned (the generic path)."""
    measurement = point.measurement
    parts = [measurement.translate(_ESCAPE_MEASUREMENT)]
    for k, v in point.tags.items():
        parts.append(f"{k.translate(_ESCAPE_KEY)}={v.translate(_ESCAPE_KEY)}")
    values = []
    for k, value in point.fields.items():
        key_eq = k.translate(_ESCAPE_KEY) + "="
        t = type(value)
        if t is float:
            values.append(key_eq + repr(value).removesuffix(".0"))
        elif t is bool:
            values.append(key_eq + ("true" if value else "false"))
        elif t is int:
            suffix = _int_suffix(measurement, k) if ints_as_float else "i"
            values.append(f"{key_eq}{value}{suffix}")
        else:
            values.append(key_eq + '"' + str(value).translate(_ESCAPE_STRING) + '"')
    line = ",".join(parts) + " " + ",".join(values)
    return line if point.time_ns is None else f"{line} {point.time_ns}"


def encode_lines(points: Iterable[Point], ints_as_float: bool = True,
                 policy: PointPolicy | None = None) -> list[str]:
    """The lines of the points that can be written, in order; never blocks.

    A point the policy refuses (``sanitize``) gives no line; a value it refuses is left
    out of its line.

    Args:
        points: samples (``time_ns`` in Unix nanoseconds, or None for server time).
        ints_as_float: write ints as floats unless the catalogue declares them ``int``
            (with a ``policy``, the policy's setting is used).
        policy: checks field types per series and counts every refusal; None: nothing
            is counted or type-checked.

    Raises:
        ValueError: without a policy, a field value of a type line protocol cannot carry
            (one line, naming it). With a policy it is counted and left out instead.
    """
    # The hot path; each choice was measured on CPython 3.11:
    # - one cache lookup per point finds the series' escaped prefix, sorted field keys and
    #   a specialised encoder (_compile); sorting items per point alone cost a quarter;
    # - repr(float) is the one cost that cannot be avoided (shortest round-trip digits,
    #   the same text as influxdb-client's str()), so nothing else is done per float;
    # - with a policy, a series' encoder is checked against it once (_accepts); its type
    #   guard then proves every later line it writes has the accepted types;
    # - the generic path (sanitise the point, then encode it) runs only for points the
    #   specialised encoder declines.
    if policy is not None:
        ints_as_float = policy.ints_as_float
    mode = bool(ints_as_float)
    cache = _series_caches[mode]
    lines: list[str] = []
    add_line = lines.append
    for point in points:
        tags = point.tags
        fields = point.fields
        try:
            key = (point.measurement, *tags, _SEP, *tags.values(), *fields)
            series = cache[key]
        except KeyError:
            series = _series(key, point, mode)
        except TypeError:  # an unhashable tag value: encode without caching
            series = _series(None, point, mode)
        fast = series.fast
        if fast is not None:
            line = fast(fields, series.prefix, point.time_ns)
            # A line means the values have the encoder's types: accepted once per policy.
            if line is not None and (policy is None or policy in series.checked
                                     or _accepts(series, policy)):
                add_line(line)
                continue
        stored = clean_point(point, policy, mode)
        if stored is not None:
            add_line(_encode_stored(stored, mode))
    return lines


def encode_point(point: Point, ints_as_float: bool = True,
                 policy: PointPolicy | None = None) -> str:
    """One line of line protocol for ``point`` (no newline); ``""`` when it is refused.

    Args:
        point: the sample (``time_ns`` in Unix nanoseconds, or None for server time).
        ints_as_float: write ints as floats unless the catalogue declares them ``int``.
        policy: as for ``encode_lines``.

    Raises:
        ValueError: as ``encode_lines``.
    """
    lines = encode_lines((point,), ints_as_float, policy)
    return lines[0] if lines else ""


def encode_batch(points: Iterable[Point], ints_as_float: bool = True,
                 policy: PointPolicy | None = None) -> bytes:
    """The lines of ``points`` joined by ``"\\n"`` (no trailing newline), UTF-8 encoded.

    Raises:
        ValueError: as ``encode_lines``.
    """
    return "\n".join(encode_lines(points, ints_as_float, policy)).encode()
