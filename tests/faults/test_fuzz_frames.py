"""Fuzzing the job -> agent socket frames: the decoder and the live ingest server.

Garbage, truncated and oversized frames, and POINTS bodies of any JSON shape, give a
clear error (``BadFrame``, ``FrameTooLarge``) or the documented handling (a bad row or
key entry costs only its own rows, counted); nothing else is raised, and the server
stays up: a good frame sent after any stream arrives.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from provscope.agent.ingest import IngestServer

from provscope import wire as fr
from provscope.records import Point
from tests.faults.fuzzing import fuzz_settings

pytestmark = [pytest.mark.faults]


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8)
key_entries = st.one_of(
    st.tuples(st.text(max_size=6), st.dictionaries(st.text(max_size=4), json_scalars,
                                                    max_size=2),
              st.lists(st.text(max_size=4), max_size=3)).map(list),
    json_values)
rows = st.one_of(
    st.tuples(st.integers(-1, 3), st.one_of(st.integers(), st.floats(), st.none()),
              st.lists(json_scalars, max_size=3)).map(lambda t: [t[0], t[1], *t[2]]),
    json_values)
points_bodies = st.one_of(
    st.fixed_dictionaries({"k": st.lists(key_entries, max_size=4),
                           "p": st.lists(rows, max_size=6)}),
    json_values)


def test_points_bodies_give_points_and_counts_or_one_clear_error(long_run):
    @fuzz_settings(3000, long_run)
    @given(points_bodies)
    def run(obj) -> None:
        body = json.dumps(obj).encode()
        try:
            points, dropped = fr.decode_points_counted(body)
        except fr.BadFrame as exc:
            assert str(exc)
            return
        assert len(points) + dropped == len(obj["p"])
        for p in points:
            assert type(p.measurement) is str and type(p.time_ns) is int
            assert all(type(v) is str for v in p.tags.values())
            assert all(type(v) in (int, float, bool, str) for v in p.fields.values())

    run()


def test_byte_streams_give_frames_or_one_clear_error(long_run):
    frames = st.one_of(
        st.binary(max_size=64),
        st.tuples(st.integers(0, 255), st.binary(max_size=32)).map(
            lambda t: fr.encode_frame(t[0], t[1])),
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255)).map(
            lambda t: fr.HEADER.pack(*t)),
    )

    @fuzz_settings(4000, long_run)
    @given(st.lists(frames, max_size=5), st.integers(1, 17))
    def run(parts: list[bytes], chunk: int) -> None:
        stream = b"".join(parts)
        decoder = fr.FrameDecoder(max_frame_bytes=1 << 16)
        for i in range(0, len(stream), chunk):
            try:
                for ftype, body in decoder.feed(stream[i:i + chunk]):
                    assert ftype in fr.KNOWN_TYPES and type(body) is bytes
                    for decode in (fr.decode_points_counted, fr.decode_records, fr.decode_json):
                        with contextlib.suppress(fr.BadFrame):
                            decode(body)
            except fr.FrameTooLarge:
                return  # the connection is closed: documented
            except fr.BadFrame:
                continue  # that frame skipped, the stream goes on
        assert decoder.pending < len(stream) + 1

    run()


@pytest.fixture
def live_server():
    d = tempfile.mkdtemp(prefix="ps-fz-", dir="/tmp")
    got: list[Point] = []
    srv = IngestServer(Path(d) / "run" / "agent.sock", on_points=got.extend,
                       on_records=lambda records: None, max_frame_bytes=1 << 16)
    srv.start()
    srv.got = got  # type: ignore[attr-defined]
    yield srv
    srv.stop()
    shutil.rmtree(d, ignore_errors=True)


def test_the_ingest_server_stays_up_whatever_a_connection_sends(live_server, long_run):
    streams = st.lists(st.one_of(
        st.binary(max_size=48),
        st.tuples(st.sampled_from([*sorted(fr.KNOWN_TYPES), 0, 99]),
                  st.one_of(st.binary(max_size=32),
                            points_bodies.map(lambda o: json.dumps(o).encode()))).map(
            lambda t: fr.encode_frame(*t)),
        st.just(fr.HEADER.pack(2**31, fr.POINTS)),  # oversized
    ), max_size=4)
    good = fr.encode_points([Point("ok", {"h": "x"}, {"v": 1.0}, 1)])
    sent_good = 0

    @fuzz_settings(600, long_run)
    @given(streams, st.booleans())
    def run(parts: list[bytes], truncate: bool) -> None:
        nonlocal sent_good
        stream = b"".join(parts)
        if truncate and stream:
            stream = stream[:-1]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(live_server.path))
            # The server may close this connection (oversized frame): documented.
            with contextlib.suppress(OSError):
                s.sendall(stream)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(live_server.path))
            s.sendall(good)
        sent_good += 1

    run()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and \
            sum(p.measurement == "ok" for p in live_server.got) < sent_good:
        time.sleep(0.02)
    assert sum(p.measurement == "ok" for p in live_server.got) >= sent_good
