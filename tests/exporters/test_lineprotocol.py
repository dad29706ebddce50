"""Line protocol: the same bytes as influxdb-client (for the sanitised point), every
escaping rule, the int policy."""

from __future__ import annotations

import math
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from influxdb_client import Point as ClientPoint
from provscope.exporters.influxdb.lineprotocol import encode_batch, encode_lines, encode_point
from provscope.exporters.influxdb.sanitize import clean_point

from provscope.records import Point

# Characters that matter to line protocol, plus unicode and emoji.
_SPECIAL = st.sampled_from([",", " ", "=", '"', "\\", "\n", "\r", "\t", "é", "日", "🔥", "#"])
_TEXT = st.lists(st.one_of(_SPECIAL, st.characters(codec="utf-8", exclude_categories=["Cs"])),
                 max_size=12).map("".join)
_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    _TEXT,
    st.none(),
)


def _client_line(p: Point, ints_as_float: bool = False) -> str:
    """influxdb-client's line for the point as the sanitiser stores it ("" if refused)."""
    p = clean_point(p, ints_as_float=ints_as_float)
    if p is None:
        return ""
    cp = ClientPoint(p.measurement)
    for k, v in p.tags.items():
        cp.tag(k, v)
    for k, v in p.fields.items():
        cp.field(k, v)
    cp.time(p.time_ns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # its '#'-measurement warning
        return cp.to_line_protocol()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    measurement=_TEXT.filter(bool),
    tags=st.dictionaries(_TEXT, _TEXT, max_size=4),
    fields=st.dictionaries(_TEXT, _VALUES, max_size=5),
    time_ns=st.integers(min_value=0, max_value=2**62),
)
def test_same_bytes_as_influxdb_client_on_random_points(measurement, tags, fields, time_ns):
    p = Point(measurement, tags, fields, time_ns)
    assert encode_point(p, ints_as_float=False) == _client_line(p)
    # Twice: the second pass goes through the cached series and its specialised encoder.
    assert encode_point(p, ints_as_float=False) == _client_line(p)


_FLOATS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=-1e-3, max_value=1e-3),  # around repr's switch to exponents at 1e-4
    st.floats(min_value=1e15, max_value=1e17),  # and at 1e16
    st.integers(min_value=-(10**6), max_value=10**6).map(float),  # whole floats: "3", not "3.0"
)


@settings(max_examples=400, deadline=None)
@given(values=st.lists(_FLOATS, min_size=1, max_size=12))
def test_wide_float_points_format_exactly_like_repr(values):
    # Points with several floats take the bulk float formatting path.
    fields = {f"f{i:02d}": v for i, v in enumerate(values)}
    fields["n"] = 7
    p = Point("wide", {"host": "n1"}, fields, 1)
    expected = _client_line(p)
    assert encode_point(p, ints_as_float=False) == expected
    assert encode_point(p, ints_as_float=False) == expected  # the cached, compiled encoder


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["gpu", "cpu", "a b"]),
                          st.sampled_from([{"host": "n1"}, {"host": "n 2", "gpu": "0"}]),
                          st.dictionaries(st.sampled_from(["x", "y", "z w"]), _VALUES,
                                          max_size=3)),
                max_size=30))
def test_batches_of_repeated_series_match_influxdb_client(rows):
    points = [Point(m, t, f, i) for i, (m, t, f) in enumerate(rows)]
    expected = "\n".join(filter(None, (_client_line(p) for p in points))).encode()
    assert encode_batch(points, ints_as_float=False) == expected


def test_escaping_rules_for_each_part():
    p = Point("cpu load,x", {"host name": "a=b,c d", "k=": "v"},
              {"f,1": 1.5, "msg": 'say "hi" \\ ok'}, 7)
    assert encode_point(p) == (
        r"cpu\ load\,x,host\ name=a\=b\,c\ d,k\==v "
        r'f\,1=1.5,msg="say \"hi\" \\ ok" 7'
    )


def test_control_characters_in_names_become_control_pictures_but_stay_in_strings():
    p = Point("m\nx", {"t\r": "a\nb\tc\x00"}, {"k\n": 1.0, "s": "line1\nline2"}, 1)
    assert encode_point(p) == 'm\u240ax,t\u240d=a\u240ab\u2409c\u2400 k\u240a=1,s="line1\nline2" 1'
    # A real newline and the two characters backslash + n stay two different series.
    assert encode_point(Point("m", {"t": "a\\nb"}, {"v": 1.0}, 1)) == "m,t=a\\nb v=1 1"


def test_tags_sorted_and_empty_or_none_tag_values_skipped():
    p = Point("m", {"b": "2", "a": "1", "empty": "", "none": None, "": "x"}, {"v": 1.0}, 1)
    assert encode_point(p) == "m,a=1,b=2 v=1 1"


def test_backslashes_that_would_escape_a_separator_are_replaced():
    bs = "\u29f5"
    p = Point("m\\\\", {"k\\": "a\\ b", "a\\=b": "C:\\dir\\"},
              {"f\\\\": 1.0, 'q\\"': 2.0}, 1)
    assert encode_point(p) == (
        f"m\\{bs},a{bs}\\=b=C:\\dir{bs},k{bs}=a{bs}\\ b f\\{bs}=1,q{bs}\"=2 1")


def test_hash_measurements_reserved_keys_and_empty_names():
    assert encode_point(Point("#m", {"time": "x"}, {"time": 1.0}, 1)) == "_#m,time_=x time_=1 1"
    assert encode_point(Point("", {}, {"v": 1.0}, 1)) == ""
    assert encode_point(Point("m", {}, {"": 1.0, "v": 2.0}, 1)) == "m v=2 1"


def test_nan_inf_and_none_fields_are_skipped_and_no_field_gives_no_line():
    p = Point("m", {}, {"a": math.nan, "b": math.inf, "c": -math.inf, "d": None, "e": 2.0}, 1)
    assert encode_point(p) == "m e=2 1"
    assert encode_point(Point("m", {"h": "x"}, {"a": math.nan}, 1)) == ""
    assert encode_lines([Point("m", {}, {}, 1), Point("m", {}, {"a": 1.0}, 2)]) == ["m a=1 2"]


def test_float_formatting_is_shortest_round_trip_without_trailing_zero():
    p = Point("m", {}, {"a": 3.0, "b": 0.1, "c": 1e16, "d": -2.5e-07, "e": 123456789.125}, 1)
    assert encode_point(p) == "m a=3,b=0.1,c=1e+16,d=-2.5e-07,e=123456789.125 1"


def test_ints_are_floats_unless_the_catalogue_says_int():
    p = Point("cpu", {"host": "n1"}, {"logical_cpus": 8, "utilization_percent": 50}, 1)
    assert encode_point(p) == "cpu,host=n1 logical_cpus=8i,utilization_percent=50 1"
    assert encode_point(p, ints_as_float=False) == \
        "cpu,host=n1 logical_cpus=8i,utilization_percent=50i 1"
    assert encode_point(Point("x", {}, {"n": 5}, 1)) == "x n=5 1"


def test_bools_and_types_that_change_between_points_of_one_series():
    a = Point("m", {"h": "1"}, {"v": True, "w": 1.5}, 1)
    b = Point("m", {"h": "1"}, {"v": False, "w": None}, 2)
    c = Point("m", {"h": "1"}, {"v": "text", "w": 2}, 3)
    assert encode_lines([a, b, c], ints_as_float=False) == [
        "m,h=1 v=true,w=1.5 1", "m,h=1 v=false 2", 'm,h=1 v="text",w=2i 3']


def test_numpy_like_scalars_and_missing_time():
    class F32:  # a scalar with a numpy-style dtype, without needing numpy
        class dtype:
            kind = "f"

        def __float__(self):
            return 0.5

    assert encode_point(Point("m", {}, {"a": F32()}, None)) == "m a=0.5"


def test_unsupported_field_type_is_one_clear_error():
    with pytest.raises(ValueError, match=r"field 'a' of measurement 'm'.*allowed: float, int"):
        encode_point(Point("m", {}, {"a": [1, 2]}, 1))
