"""Local ingest: framing, socket permissions, the job-side client, bad and hostile input."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import stat
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from provscope.agent.ingest import IngestServer

from provscope import wire as fr
from provscope.config import load_config
from provscope.job.agent_client import AgentClient
from provscope.records import Point, RelationRecord, RunRecord, TaskRecord
from provscope.wire import default_socket_path, request


class Received:
    def __init__(self) -> None:
        self.points: list = []
        self.records: list = []
        self.hellos: list = []
        self.watches: list = []


@pytest.fixture
def server(sock_path):
    got = Received()
    srv = IngestServer(sock_path, on_points=got.points.extend, on_records=got.records.extend,
                       on_hello=lambda *a: got.hellos.append(a), on_watch=got.watches.append,
                       status=lambda: {"ok": True, "points": len(got.points)})
    srv.start()
    srv.got = got
    yield srv
    srv.stop()


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def _config(sock_path, **kw):
    return load_config(overrides={"agent.socket_path": str(sock_path), **kw}, environ={})


# --------------------------------------------------------------------------- framing


def test_points_survive_encode_and_decode_with_their_types():
    tags = {"host": "h", "run_id": "r", "rank": "0"}
    pts = [Point("train", tags, {"loss": 0.5, "step": 3, "ok": True, "phase": "fit"}, 10 + i)
           for i in range(3)]
    pts.append(Point("gpu", {"host": "h"}, {"power_watts": 1e300}, 99))
    [(ftype, body)] = list(fr.FrameDecoder().feed(fr.encode_points(pts)))
    assert ftype == fr.POINTS
    assert fr.decode_points(body) == pts


def test_one_series_costs_little_more_than_its_numbers():
    tags = {"host": "node-17", "run_id": "01a2117d-7b2b-725e-871f-71f545c593f8", "rank": "3"}
    pts = [Point("train", tags, {"loss": 0.25}, 1_700_000_000_000_000_000 + i)
           for i in range(1000)]
    assert len(fr.encode_points(pts)) / 1000 < 35


def test_decoder_reassembles_frames_split_at_every_byte():
    data = fr.encode_records([RunRecord("r1", name="n")]) + fr.encode_json(fr.HELLO, {"pid": 1})
    dec = fr.FrameDecoder()
    frames = [f for i in range(len(data)) for f in dec.feed(data[i:i + 1])]
    assert [t for t, _ in frames] == [fr.RECORDS, fr.HELLO]
    assert dec.pending == 0


def test_oversized_header_is_refused_before_reading_the_body():
    dec = fr.FrameDecoder(max_frame_bytes=1024)
    with pytest.raises(fr.FrameTooLarge, match="over the 1024-byte limit"):
        list(dec.feed(struct.pack(">IB", 1025, fr.POINTS)))


@pytest.mark.parametrize("body, message", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{not json", "not JSON"),
    (b"[1, 2]", "points body must be"),
])
def test_unreadable_points_bodies_are_rejected_with_a_reason(body, message):
    with pytest.raises(fr.BadFrame, match=message):
        fr.decode_points(body)


@pytest.mark.parametrize("key, row", [
    ('["m", {"t": 1}, ["f"]]', "[1, 1, 1.0]"),  # tag value not a string
    ('["m", {}, []]', "[1, 1]"),  # no field names
    ('["m", {}, ["f", "f"]]', "[1, 1, 1.0, 2.0]"),  # field names not distinct
    ('["m", {}, ["f"]]', "[5, 1, 1.0]"),  # no such key index
    ('["m", {}, ["f"]]', "[1, 1.5, 1.0]"),  # time not an int
    ('["m", {}, ["f"]]', "[1, 1, [1]]"),  # a list for a value
    ('["m", {}, ["f"]]', "[1, 1, null]"),
    ('["m", {}, ["f"]]', "[1, 1, 1.0, 2.0]"),  # two values for one field
])
def test_a_bad_row_or_key_entry_costs_only_its_own_rows(key, row):
    # Key 0 is good, key 1 is the one under test; good rows sit on both sides.
    body = ('{"k": [["ok", {"h": "x"}, ["v"]], ' + key + '], "p": [[0, 1, 1.0], ' + row
            + ", [0, 2, 2.0]]}").encode()
    points, dropped = fr.decode_points_counted(body)
    assert dropped == 1
    assert [(p.measurement, p.fields["v"], p.time_ns) for p in points] == \
        [("ok", 1.0, 1), ("ok", 2.0, 2)]


def test_bad_records_are_rejected_naming_the_problem():
    with pytest.raises(fr.BadFrame, match="not one of point, run, task"):
        fr.decode_records(b'[{"type": "bogus"}]')


# --------------------------------------------------------------------------- server


def test_socket_is_owner_only(server):
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(server.path.parent).st_mode) == 0o700


def test_default_socket_path_is_per_user(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket_path() == tmp_path / "provscope" / "agent.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket_path().parent.name == f"provscope-{os.getuid()}"


def test_a_second_server_on_a_live_socket_refuses(server):
    other = IngestServer(server.path, on_points=list, on_records=list)
    with pytest.raises(OSError, match="already listens"):
        other.start()


def test_a_stale_socket_file_is_replaced(sock_path):
    sock_path.parent.mkdir(mode=0o700)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    s.close()  # file left behind, nobody listening
    srv = IngestServer(sock_path, on_points=list, on_records=list)
    srv.start()
    srv.stop()
    assert not sock_path.exists()


def test_client_records_reach_the_server_with_hello_identity(server):
    client = AgentClient.try_connect(_config(server.path), run_id="run-9", rank=2)
    assert client is not None
    pts = [Point("train", {"host": "h"}, {"loss": float(i)}, i) for i in range(12_000)]
    client.submit_many(pts[:6000])
    for p in pts[6000:]:
        client.submit(p)
    client.submit(TaskRecord("t1", "run-9", name="epoch", task_kind="epoch"))
    client.submit(RelationRecord("used", "t1", "e1", run_id="run-9"))
    assert client.flush(10)
    assert _wait(lambda: len(server.got.points) == 12_000 and len(server.got.records) == 2)
    assert server.got.points == pts
    assert server.got.records[0] == TaskRecord("t1", "run-9", name="epoch", task_kind="epoch")
    assert server.got.hellos == [(os.getpid(), "run-9", 2)]
    stats = client.stats()
    assert stats["points_written_total"] == 12_002 and stats["points_dropped_total"] == 0
    client.shutdown(2)
    assert server.rejected == 0


def test_status_and_watch_requests_get_answers(server):
    assert request(server.path, fr.STATUS, None) == {"ok": True, "points": 0}
    assert request(server.path, fr.WATCH, {"pid": 5, "run_id": "r", "paths": ["/x"]}) == {}
    assert server.got.watches == [{"pid": 5, "run_id": "r", "paths": ["/x"]}]


def test_try_connect_returns_none_at_once_when_no_agent_listens(sock_path):
    t0 = time.monotonic()
    assert AgentClient.try_connect(_config(sock_path)) is None
    assert time.monotonic() - t0 < 0.1


def test_client_never_blocks_buffers_while_agent_is_away_and_reconnects(sock_path):
    got = Received()
    srv = IngestServer(sock_path, on_points=got.points.extend, on_records=got.records.extend)
    srv.start()
    client = AgentClient.try_connect(_config(sock_path, **{"client.reconnect_s": 0.1,
                                                           "client.buffer_size": 1000}))
    client.submit(Point("m", {"host": "h"}, {"v": 1.0}, 1))
    assert client.flush(5) and _wait(lambda: len(got.points) == 1)
    srv.stop()
    time.sleep(0.1)
    t0 = time.perf_counter()
    for i in range(5000):
        client.submit(Point("m", {"host": "h"}, {"v": 2.0}, 2 + i))
    per_call = (time.perf_counter() - t0) / 5000
    assert per_call < 200e-6  # never waits for the missing agent
    assert not client.flush(0.3)
    # A buffer of 1000 (plus at most one frame in flight) holds the newest; the rest drop.
    assert client.stats()["points_dropped_total"] >= 3000
    srv2 = IngestServer(sock_path, on_points=got.points.extend, on_records=got.records.extend)
    srv2.start()
    try:
        assert client.flush(10)
        assert _wait(lambda: got.points[-1].time_ns == 5001)
        assert client.stats()["reconnects_total"] >= 1
        assert len(got.points) - 1 + client.dropped == 5000
    finally:
        client.shutdown(2)
        srv2.stop()


def test_a_forked_child_starts_with_an_empty_buffer_and_its_own_connection(server):
    client = AgentClient.try_connect(_config(server.path), run_id="r", rank=0)
    client.submit(Point("m", {"host": "h"}, {"v": 1.0}, 1))
    assert client.flush(5)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        ok = client.stats()["queue_depth"] == 0 and not client.connected
        client.submit(Point("m", {"host": "child"}, {"v": 2.0}, 2))
        ok = ok and client.flush(5)
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    assert _wait(lambda: any(p.tags["host"] == "child" for p in server.got.points))
    # The child said hello as a forked worker: it is not watched as a separate tree.
    assert server.got.hellos == [(os.getpid(), "r", 0)]
    client.submit(Point("m", {"host": "parent"}, {"v": 3.0}, 3))
    assert client.flush(5)
    client.shutdown(1)


# --------------------------------------------------------------------------- hostile input


def _frame_soup(rng: random.Random) -> bytes:
    """One frame that is bad in one of the ways a broken or hostile sender produces."""
    kind = rng.randrange(6)
    if kind == 0:  # random body under a valid header
        return fr.encode_frame(rng.choice([fr.POINTS, fr.RECORDS, fr.HELLO]),
                               rng.randbytes(rng.randrange(64)))
    if kind == 1:  # not UTF-8
        return fr.encode_frame(fr.POINTS, b'{"k": ["\xff\xfe"]}')
    if kind == 2:  # unknown frame type
        return fr.encode_frame(rng.randrange(8, 256), rng.randbytes(8))
    if kind == 3:  # valid JSON, wrong shape
        return fr.encode_json(rng.choice([fr.POINTS, fr.RECORDS, fr.HELLO, fr.WATCH]),
                              rng.choice([[1], {"k": 1}, "x", None, {"pid": "1"}]))
    if kind == 4:  # a frame type the agent never accepts from a job
        return fr.encode_json(fr.STATUS_REPLY, {})
    return fr.encode_json(fr.RECORDS, [{"type": "task", "task_id": 1.5}])


def test_ten_thousand_bad_frames_are_rejected_and_counted_and_the_agent_keeps_serving(server):
    rng = random.Random(1234)
    good = fr.encode_points([Point("m", {"host": "h"}, {"v": 1.0}, 1)])
    sent_bad = 0
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(server.path))
        chunk = []
        for _ in range(500):
            chunk.append(_frame_soup(rng))
            sent_bad += 1
        chunk.append(good)
        s.sendall(b"".join(chunk))
        s.close()
    assert sent_bad == 10_000
    assert _wait(lambda: server.rejected == 10_000 and len(server.got.points) == 20)
    # Still serving a well-behaved job.
    assert request(server.path, fr.STATUS, None)["ok"] is True


def test_oversized_and_truncated_frames_are_counted_and_close_only_that_connection(server):
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(server.path))
    s.sendall(struct.pack(">IB", fr.MAX_FRAME_BYTES + 1, fr.POINTS) + b"x" * 100)
    assert s.recv(10) == b""  # closed by the agent
    s.close()
    t = socket.socket(socket.AF_UNIX)
    t.connect(str(server.path))
    t.sendall(fr.encode_points([Point("m", {"host": "h"}, {"v": 1.0}, 1)])[:-3])
    t.close()
    assert _wait(lambda: server.rejected == 2)
    assert server.closed_bad == 1
    assert request(server.path, fr.STATUS, None)["ok"] is True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_never_break_the_decoder(data):
    dec = fr.FrameDecoder(max_frame_bytes=4096)
    try:
        for ftype, body in dec.feed(data):
            for decode in (fr.decode_points, fr.decode_records, fr.decode_json):
                with contextlib.suppress(fr.BadFrame):
                    decode(body)
            assert ftype in fr.KNOWN_TYPES
    except fr.BadFrame:
        pass


# --------------------------------------------------------------------------- peer PIDs

_CONTAINER_JOB = """
import socket, subprocess, sys, time
from provscope import wire as fr
cmd = subprocess.Popen(["sleep", "30"])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(fr.encode_json(fr.HELLO, {"v": 1, "pid": __import__("os").getpid(),
                                    "run_id": "r", "rank": 0}))
fr.request(sys.argv[1], fr.WATCH, {"pid": cmd.pid, "run_id": "r", "rank": None})
print(__import__("os").getpid(), cmd.pid, flush=True)
sys.stdin.readline()
cmd.kill()
"""


def test_the_peer_pid_of_a_real_unix_socket_connection(sock_path):
    import subprocess
    import sys

    from provscope.agent.peer import peer_pid

    sock_path.parent.mkdir(parents=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock_path))
    srv.listen(1)
    child = subprocess.Popen([sys.executable, "-c",
                              "import socket,sys,time;s=socket.socket(socket.AF_UNIX);"
                              "s.connect(sys.argv[1]);time.sleep(5)", str(sock_path)])
    try:
        srv.settimeout(10)
        conn, _ = srv.accept()
        assert peer_pid(conn) == child.pid
        conn.close()
    finally:
        child.kill()
        child.wait()
        srv.close()


def test_pids_of_a_peer_in_another_namespace_are_translated(tmp_path):
    from provscope.agent.peer import agent_pid

    # host pid: (ppid, NSpid as the agent reads it)
    procs = {500: (1, "500\t1"), 501: (500, "501\t2"), 502: (501, "502\t3"),
             2: (1, "2"), 600: (1, "600"), 1: (0, "1")}
    for pid, (ppid, nspid) in procs.items():
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "stat").write_text(f"{pid} (x) S {ppid} 0 0 0\n")
        (d / "status").write_text(f"Name:\tx\nPid:\t{pid}\nNSpid:\t{nspid}\n")
    # A containerised job (host pid 500) says hello as pid 1: it is 500 to the agent.
    assert agent_pid(500, 1, "hello", tmp_path) == 500
    # It registers the command it started (its pid 2 = host 501; 3 = host 502 below it).
    assert agent_pid(500, 2, "watch", tmp_path) == 501
    assert agent_pid(500, 3, "watch", tmp_path) == 502
    # No process 4 in its namespace: nothing is watched (host pid 2 is a stranger).
    assert agent_pid(500, 4, "watch", tmp_path) is None
    # A peer in the agent's own namespace: the numbers agree, unchanged.
    assert agent_pid(600, 600, "hello", tmp_path) == 600
    assert agent_pid(600, 2, "watch", tmp_path) == 2
    assert agent_pid(None, 7, "hello", tmp_path) == 7  # no credentials: as claimed


def test_a_job_in_its_own_pid_namespace_is_registered_under_its_host_pid(server):
    """A real PID namespace (``unshare --pid``, as a container runtime makes one): the
    job's hello and its WATCH reach the agent as the host PIDs that NVML reports."""
    import shutil
    import subprocess
    import sys

    import psutil

    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "--pid", "--fork", "true"],
                           capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("this machine does not let the test create a PID namespace")
    job = subprocess.Popen([unshare, "--pid", "--fork", sys.executable, "-c", _CONTAINER_JOB,
                            str(server.path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
    try:
        ns_job, ns_cmd = (int(x) for x in job.stdout.readline().split())
        assert ns_job == 1  # what the job believes
        [host_job] = psutil.Process(job.pid).children()
        [host_cmd] = host_job.children()
        assert _wait(lambda: server.got.hellos and server.got.watches)
        assert server.got.hellos == [(host_job.pid, "r", 0)]
        assert server.got.watches[0]["pid"] == host_cmd.pid != ns_cmd
    finally:
        with contextlib.suppress(OSError):
            job.stdin.write("\n")
            job.stdin.flush()
        job.wait(10)
