"""InfluxDB line protocol encoding: ``measurement,tag=v field=1 1700000000000000000``.

Pure functions, no I/O. The output is byte-for-byte what ``influxdb_client``'s
``Point.to_line_protocol`` produces for the same point (with ``ints_as_float=False``), so
either can be used as the reference of the other.

Rules:

- **measurement**: ``,`` and space are escaped with a backslash.
- **tag keys, tag values, field keys**: ``,``, ``=`` and space are escaped with a backslash.
- **newline, carriage return, tab** cannot be carried by line protocol in a measurement, a
  key or a tag value (a newline ends the line). They are written as the two-character
  text ``\\n``, ``\\r``, ``\\t`` (backslash + letter), so InfluxDB stores e.g. the tag value
  ``"a\\nb"`` (a real newline) as the 4 characters ``a\\nb``. Reading it back gives that
  text, not a newline. String *field* values carry newlines as they are.
- **string field values**: ``"`` and ``\\`` are escaped with a backslash, the value is
  double-quoted.
- **tags** are sorted by key; a tag whose key or value is empty (or ``None``) is skipped;
  a tag value ending in a backslash gets one trailing space (so the backslash does not
  escape the separator); InfluxDB reads ``\\ `` as an escaped space, so ``a\\`` comes
  back as ``a `` (a limit of the format).
- **fields** are sorted by key; ``None``, NaN and ±inf values are skipped; a point left
  with no field produces no line at all (``encode_point`` returns ``""``).
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

Known limits of the format itself (not of this encoder): a measurement starting with
``#`` is read by InfluxDB as a comment; a measurement, tag key or field key ending in a
backslash escapes the character after it. Catalogued names never do either.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from provscope.catalogue import lookup
from provscope.records import Point

__all__ = ["encode_batch", "encode_lines", "encode_point"]

# str.translate with a table is one C loop per string (the same tables as influxdb-client,
# so the bytes agree); every distinct name is escaped once and then served from a dict.
_ESCAPE_MEASUREMENT = str.maketrans(
    {",": r"\,", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"}
)
_ESCAPE_KEY = str.maketrans(
    {",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"}
)
_ESCAPE_STRING = str.maketrans({'"': r"\"", "\\": r"\\"})

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

    __slots__ = ("fast", "prefix", "shape")

    def __init__(self, prefix: str, shape: tuple, fast: Any) -> None:
        self.prefix = prefix  # "measurement,k=v,k2=v2 " (sorted, escaped)
        self.shape = shape  # sorted ((key, escaped key + "=", int suffix), ...)
        self.fast = fast  # specialised encoder for the first value types seen, or None


def _escape_key(key: Any) -> str:
    escaped = _key_cache.get(key)
    if escaped is None:
        if len(_key_cache) >= _CACHE_MAX:
            _key_cache.clear()
        escaped = str(key).translate(_ESCAPE_KEY)
        _key_cache[key] = escaped
    return escaped


def _build_prefix(measurement: Any, tags: Any) -> str:
    parts = [str(measurement).translate(_ESCAPE_MEASUREMENT)]
    for key, value in sorted(tags.items()):
        if value is None:
            continue
        k = str(key).translate(_ESCAPE_KEY)
        v = str(value).translate(_ESCAPE_KEY)
        if v.endswith("\\"):
            v += " "
        if k and v:
            parts.append(f"{k}={v}")
    return ",".join(parts) + " "


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


def _build_shape(measurement: Any, keys: Iterable[Any], ints_as_float: bool) -> tuple:
    shape = []
    for key in sorted(keys):
        suffix = _int_suffix(measurement, key) if ints_as_float else "i"
        shape.append((key, _escape_key(key) + "=", suffix))
    return tuple(shape)


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
    types = [type(fields[key]) for key, _, _ in shape]
    if not types or len(types) > 64 or any(t not in _FAST_TYPES for t in types):
        return None
    # The series key holds the field keys in insertion order, so every dict that finds
    # this encoder has exactly that order: one unpack of .values() replaces N lookups.
    position = {key: i for i, key in enumerate(fields)}
    ns: dict[str, Any] = {"E": _ESCAPE_STRING, "R": _float_text}
    guard, conv, out, finite = ["type(t) is int"], [], [], []
    for (key, key_eq, suffix), t in zip(shape, types, strict=True):
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
            out.append(f"{name}{{v{i}}}{suffix}")
        elif t is str:
            out.append(f'{name}"{{v{i}.translate(E)}}"')
        else:
            out.append(f"{name}{{'true' if v{i} else 'false'}}")
    if finite:
        # x - x is 0.0 for a finite float and NaN for NaN/inf; one sum checks them all.
        guard.append("not (" + " + ".join(finite) + ")")
    floats = [f"v{position[key]}" for (key, _, _), t in zip(shape, types, strict=True)
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
    series = _Series(_build_prefix(point.measurement, point.tags),
                     _build_shape(point.measurement, fields, ints_as_float), None)
    series.fast = _compile(series.shape, fields)
    if key is not None:
        cache = _series_caches[ints_as_float]
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[key] = series
    return series


def _other(value: Any, measurement: Any, key: Any, ints_as_float: bool) -> str | None:
    """The slow path for subclasses and numpy/torch scalars; same rules as the fast path."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        value = float(value)
        if value - value:
            return None
        s = repr(value)
        return s[:-2] if s[-2:] == ".0" else s
    if isinstance(value, int):
        suffix = _int_suffix(measurement, key) if ints_as_float else "i"
        return f"{int(value)}{suffix}"
    if isinstance(value, str):
        return '"' + str(value).translate(_ESCAPE_STRING) + '"'
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    if kind == "f":
        return _other(float(value), measurement, key, ints_as_float)
    if kind in ("i", "u"):
        return _other(int(value), measurement, key, ints_as_float)
    if kind == "b":
        return "true" if bool(value) else "false"
    raise ValueError(
        f"field {key!r} of measurement {measurement!r}: a value of type "
        f"{type(value).__name__} cannot be written (allowed: float, int, bool, str)"
    )


def encode_lines(points: Iterable[Point], ints_as_float: bool = True) -> list[str]:
    """The non-empty lines of ``points``, in order (points with no field give no line).

    Args:
        points: samples (``time_ns`` in Unix nanoseconds, or None for server time).
        ints_as_float: write ints as floats unless the catalogue declares them ``int``.

    Raises:
        ValueError: a field value of a type line protocol cannot carry (one line, naming it).
    """
    # The hot path; each choice was measured on CPython 3.11:
    # - one cache lookup per point finds the series' escaped prefix, sorted field keys and
    #   a specialised encoder (_compile); sorting items per point alone cost a quarter;
    # - repr(float) is the one cost that cannot be avoided (shortest round-trip digits,
    #   the same text as influxdb-client's str()), so nothing else is done per float;
    # - the generic loop below runs only for points the specialised encoder declines, and
    #   checks exact types with `is` before any isinstance (bool is a subclass of int).
    cache = _series_caches[bool(ints_as_float)]
    lines: list[str] = []
    add_line = lines.append
    for point in points:
        tags = point.tags
        fields = point.fields
        try:
            key = (point.measurement, *tags, _SEP, *tags.values(), *fields)
            series = cache[key]
        except KeyError:
            series = _series(key, point, bool(ints_as_float))
        except TypeError:  # an unhashable tag value: encode without caching
            series = _series(None, point, bool(ints_as_float))
        fast = series.fast
        if fast is not None:
            line = fast(fields, series.prefix, point.time_ns)
            if line is not None:
                add_line(line)
                continue
        measurement = point.measurement
        parts: list[str] = []
        append = parts.append
        for fkey, key_eq, suffix in series.shape:
            value: Any = fields[fkey]  # narrowed by type(value) below, which mypy cannot see
            t = type(value)
            if t is float:
                if value - value:  # NaN or +-inf: no line protocol form
                    continue
                append(key_eq + repr(value).removesuffix(".0"))
            elif t is int:
                append(f"{key_eq}{value}{suffix}")
            elif t is str:
                append(key_eq + '"' + value.translate(_ESCAPE_STRING) + '"')
            elif t is bool:
                append(key_eq + ("true" if value else "false"))
            elif value is not None:
                s = _other(value, measurement, fkey, ints_as_float)
                if s is not None:
                    append(key_eq + s)
        if not parts:
            continue
        time_ns = point.time_ns
        if time_ns is None:
            add_line(series.prefix + ",".join(parts))
        else:
            add_line(f"{series.prefix}{','.join(parts)} {int(time_ns)}")
    return lines


def encode_point(point: Point, ints_as_float: bool = True) -> str:
    """One line of line protocol for ``point`` (no newline); ``""`` when it has no field.

    Args:
        point: the sample (``time_ns`` in Unix nanoseconds, or None for server time).
        ints_as_float: write ints as floats unless the catalogue declares them ``int``.

    Raises:
        ValueError: a field value of a type line protocol cannot carry (one line, naming it).
    """
    lines = encode_lines((point,), ints_as_float)
    return lines[0] if lines else ""


def encode_batch(points: Iterable[Point], ints_as_float: bool = True) -> bytes:
    """The lines of ``points`` joined by ``"\\n"`` (no trailing newline), UTF-8 encoded.

    Raises:
        ValueError: as ``encode_lines``.
    """
    return "\n".join(encode_lines(points, ints_as_float)).encode()
