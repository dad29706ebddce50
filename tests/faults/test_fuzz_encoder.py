"""Fuzzing the line protocol encoder and its sanitisation policy.

Any point (names and keys of any text: unicode, control characters, backslashes, ``#``,
reserved words, empty; values: huge and negative ints, ints beyond int64, NaN, infinity,
bools, strings with quotes and lone surrogates, unsupported types; any time) gives either
a line that InfluxDB reads back exactly as ``sanitize.clean_point`` says, or no line and
a counted refusal: lines + refused points = points, always, and nothing raises.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from provscope.exporters.influxdb import sanitize
from provscope.exporters.influxdb.lineprotocol import encode_lines
from provscope.exporters.influxdb.sanitize import PointPolicy, clean_point

from provscope.records import Point
from tests.faults.fuzzing import fuzz_settings
from tests.faults.lineparse import read_line

pytestmark = [pytest.mark.faults]

# Examples per test (x20 under --long); each example is a batch of 1-6 points.

# Characters that matter to line protocol or to its readers, and a spread of unicode
# (one sampled alphabet: far cheaper to draw than arbitrary code points, so the suite can
# afford many more cases).
_ALPHABET = list(",  =\"\\\n\r\t\x00\x1f\x7f#_aZ09.-éß日本🔥\u2028\u200b\ufeff\ud800\udfff"
                 "\u29f5\u240a\U0010ffff")
_WORDS = st.sampled_from(["time", "_field", "_measurement", "a\\", "\\\\", "#m", "a\\ b",
                          "a\\=b", "x\\n", ""])
text = st.one_of(st.text(st.sampled_from(_ALPHABET), max_size=6), _WORDS)
names = st.one_of(text, st.sampled_from(["cpu", "train", "gpu", "m"]))
fields = st.one_of(
    st.sampled_from(["logical_cpus", "loss", "step", "v", "utilization_percent"]), text)
values = st.one_of(
    st.floats(), st.integers(), st.integers(min_value=2**62, max_value=2**400),
    st.integers(min_value=-(2**400), max_value=-(2**62)), st.booleans(), text, st.none(),
    st.sampled_from([math.nan, math.inf, -math.inf, 2**63, -(2**63) - 1, 2**1030,
                     [1, 2], {"a": 1}, b"bytes", object()]),
)
times = st.one_of(st.integers(min_value=-(2**64), max_value=2**64), st.none(),
                  st.sampled_from([2**63 - 2, 2**63 - 1, -(2**63) + 2, -(2**63)]))
points = st.builds(Point, names, st.dictionaries(text, st.one_of(text, st.none()), max_size=3),
                   st.dictionaries(fields, values, max_size=3), times)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    # Each example makes fresh policies, whose first refusal of each kind logs a line.
    monkeypatch.setattr(sanitize.log, "disabled", True)


def _same(read: tuple, stored: Point) -> bool:
    measurement, tags, got, time_ns = read
    if (measurement, tags, time_ns) != (stored.measurement, dict(stored.tags), stored.time_ns):
        return False
    want = dict(stored.fields)
    if got.keys() != want.keys():
        return False
    for k, v in want.items():
        g = got[k]
        if type(v) is bool or type(g) is bool or type(v) is str:
            if g != v or type(g) is not type(v):
                return False
        elif float(g) != float(v):
            return False
    return True


@pytest.mark.parametrize("ints_as_float", [True, False])
def test_every_point_is_read_back_as_the_policy_says_or_counted(long_run, ints_as_float):
    @fuzz_settings(1000, long_run)
    @given(st.lists(points, min_size=1, max_size=6))
    def run(batch: list[Point]) -> None:
        encoding = PointPolicy(ints_as_float)
        model = PointPolicy(ints_as_float)  # the same decisions, point by point
        lines = encode_lines(batch, policy=encoding)
        stored = [p for p in (clean_point(p, model) for p in batch) if p is not None]
        assert len(lines) + encoding.points_rejected == len(batch)
        assert encoding.stats() == model.stats()
        assert len(lines) == len(stored)
        for line, point in zip(lines, stored, strict=True):
            line.encode("utf-8")  # never a lone surrogate
            assert _same(read_line(line), point), (line, point)

    run()


def test_the_cached_encoders_agree_with_the_generic_path(long_run):
    # The second pass goes through the cached series and their compiled encoders.
    @fuzz_settings(500, long_run)
    @given(st.lists(points, min_size=1, max_size=6))
    def run(batch: list[Point]) -> None:
        first, second = PointPolicy(), PointPolicy()
        assert encode_lines(batch, policy=first) == encode_lines(batch, policy=second)
        assert first.stats() == second.stats()

    run()


def test_without_a_policy_only_unsupported_types_raise(long_run):
    @fuzz_settings(2000, long_run)
    @given(points)
    def run(point: Point) -> None:
        try:
            lines = encode_lines([point])
        except ValueError as exc:
            assert "cannot be written (allowed: float, int, bool, str)" in str(exc)
            return
        for line in lines:
            read_line(line)

    run()
