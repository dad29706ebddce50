"""Fuzzing in bulk: hypothesis draws a seed and a shape, a seeded generator expands it
into a batch of adversarial inputs, and every input is checked on its own.

Drawing each input through hypothesis costs milliseconds on a small CI machine; drawing
one seed per batch and expanding it with ``random.Random`` costs microseconds per input,
so the suite checks 100,000+ inputs here (x20 under ``--long``): points through the
encoder and its policy (each read back by the reference reader exactly as
``clean_point`` says, or counted), and byte streams through the frame decoder (frames or
one clear error, never another exception). A failure prints the seed that reproduces it.
"""

from __future__ import annotations

import contextlib
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from provscope.exporters.influxdb import sanitize
from provscope.exporters.influxdb.lineprotocol import encode_lines
from provscope.exporters.influxdb.sanitize import PointPolicy, clean_point

from provscope import wire as fr
from provscope.records import Point
from tests.faults.fuzzing import fuzz_settings
from tests.faults.lineparse import read_line
from tests.faults.test_fuzz_encoder import _same

pytestmark = [pytest.mark.faults]

BATCH = 200  # inputs per hypothesis example

_CHARS = (",  =\"\\\n\r\t\x00\x1f\x7f#_aZ09.-éß日本🔥\u2028\u200b\ufeff\ud800\udfff"
          "\u29f5\u240a\U0010ffff")
_WORDS = ["time", "_field", "_measurement", "a\\", "\\\\", "#m", "a\\ b", "a\\=b", "x\\n", "",
          "cpu", "train", "gpu", "loss", "step", "v", "logical_cpus", "utilization_percent"]
_SPECIAL = [math.nan, math.inf, -math.inf, 2**63, -(2**63) - 1, 2**1030, -0.0, 1e308,
            5e-324, True, False, "", "q\"uote", "back\\", [1], {"a": 1}, b"x", None]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setattr(sanitize.log, "disabled", True)


def _text(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(_WORDS)
    return "".join(rng.choice(_CHARS) for _ in range(rng.randint(0, 7)))


def _value(rng: random.Random) -> object:
    r = rng.random()
    if r < 0.3:
        return rng.uniform(-1e6, 1e6)
    if r < 0.5:
        return rng.randint(-(2**70), 2**70)
    if r < 0.6:
        return rng.choice((True, False))
    if r < 0.8:
        return _text(rng)
    return rng.choice(_SPECIAL)


def _point(rng: random.Random) -> Point:
    tags = {_text(rng): _text(rng) for _ in range(rng.randint(0, 3))}
    fields = {_text(rng): _value(rng) for _ in range(rng.randint(0, 3))}
    t = rng.choice([None, rng.randint(-(2**64), 2**64), rng.randint(0, 2**62),
                    2**63 - 1, -(2**63)])
    return Point(_text(rng), tags, fields, t)


def test_bulk_points_are_read_back_as_the_policy_says_or_counted(long_run):
    checked = 0

    @fuzz_settings(300, long_run)
    @given(st.integers(0, 2**32 - 1), st.booleans())
    def run(seed: int, ints_as_float: bool) -> None:
        nonlocal checked
        rng = random.Random(seed)
        batch = [_point(rng) for _ in range(BATCH)]
        encoding, model = PointPolicy(ints_as_float), PointPolicy(ints_as_float)
        lines = encode_lines(batch, policy=encoding)
        stored = [p for p in (clean_point(p, model) for p in batch) if p is not None]
        assert len(lines) + encoding.points_rejected == len(batch), seed
        assert encoding.stats() == model.stats(), seed
        assert len(lines) == len(stored), seed
        for line, point in zip(lines, stored, strict=True):
            line.encode("utf-8")
            assert _same(read_line(line), point), (seed, line, point)
        checked += len(batch)

    run()
    assert checked >= 300 * BATCH


def test_bulk_byte_streams_give_frames_or_one_clear_error(long_run):
    checked = 0
    good = fr.encode_points([Point("ok", {"h": "x"}, {"v": 1.0}, 1)])

    def stream(rng: random.Random) -> bytes:
        parts = []
        for _ in range(rng.randint(1, 4)):
            r = rng.random()
            if r < 0.3:
                parts.append(rng.randbytes(rng.randint(0, 40)))
            elif r < 0.6:
                body = rng.randbytes(rng.randint(0, 24))
                parts.append(fr.encode_frame(rng.randint(0, 255), body))
            elif r < 0.8:
                parts.append(fr.HEADER.pack(rng.randint(0, 2**32 - 1), rng.randint(0, 255)))
            else:
                body = good if rng.random() < 0.5 else good[: rng.randint(0, len(good))]
                parts.append(body)
        return b"".join(parts)

    @fuzz_settings(300, long_run)
    @given(st.integers(0, 2**32 - 1))
    def run(seed: int) -> None:
        nonlocal checked
        rng = random.Random(seed)
        for _ in range(BATCH):
            data = stream(rng)
            decoder = fr.FrameDecoder(max_frame_bytes=1 << 16)
            chunk = rng.randint(1, 17)
            for i in range(0, len(data), chunk):
                try:
                    for ftype, body in decoder.feed(data[i:i + chunk]):
                        assert ftype in fr.KNOWN_TYPES and type(body) is bytes, seed
                        for decode in (fr.decode_points_counted, fr.decode_records,
                                       fr.decode_json):
                            with contextlib.suppress(fr.BadFrame):
                                decode(body)
                except fr.FrameTooLarge:
                    break  # the connection is closed: documented
                except fr.BadFrame:
                    continue  # that frame is skipped, the stream goes on
            checked += 1

    run()
    assert checked >= 300 * BATCH
