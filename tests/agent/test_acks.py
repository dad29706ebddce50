"""Acknowledged delivery between the job and the agent (protocol version 2): the agent's
DURABLE frames follow the pipeline, the job's resend window is bounded with every drop
counted, unacknowledged frames are sent again in order to a new agent, and a peer of
protocol version 1 on either side still works."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import pytest
from provscope.agent.ingest import IngestServer
from provscope.exporters.base import ExportResult
from provscope.exporters.memory import MemoryExporter
from provscope.exporters.pipeline import Pipeline

from provscope import wire as fr
from provscope.job import agent_client
from provscope.job.agent_client import AgentClient
from provscope.records import Point, TaskRecord


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


def _points(n, start=0):
    tags = {"host": "h"}
    return [Point("m", tags, {"v": float(i)}, i) for i in range(start, start + n)]


class FakeAgent:
    """A socket peer that records the data frames it gets and acknowledges only when told
    (``acks=False``: a protocol-version-1 agent that never does)."""

    def __init__(self, path, *, acks=True):
        self.path = str(path)
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self.acks = acks
        self.frames: list[list[int]] = []  # per data frame: the points' times
        self.hellos: list[dict] = []
        self.conn: socket.socket | None = None
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(self.path)
        self._srv.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        with contextlib.suppress(OSError):
            conn, _ = self._srv.accept()
            self.conn = conn
            decoder = fr.FrameDecoder()
            while data := conn.recv(65536):
                for ftype, body in decoder.feed(data):
                    if ftype == fr.HELLO:
                        self.hellos.append(fr.decode_json(body))
                        if self.acks and self.hellos[-1].get("acks"):
                            conn.sendall(fr.encode_json(fr.DURABLE, {"n": 0}))
                    elif ftype == fr.POINTS:
                        self.frames.append([p.time_ns for p in fr.decode_points(body)])

    @property
    def times(self) -> list[int]:
        return [t for frame in list(self.frames) for t in frame]

    def ack(self, n):
        assert self.conn is not None
        self.conn.sendall(fr.encode_json(fr.DURABLE, {"n": n}))

    def kill(self):
        """Gone without a word, as a SIGKILLed agent: nothing it held is acknowledged."""
        with contextlib.suppress(OSError):
            self._srv.close()
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)
            self.conn.close()
        self._thread.join(5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _client(path, **kw):
    kw.setdefault("batch_size", 100)
    kw.setdefault("send_interval_s", 0.01)
    kw.setdefault("reconnect_s", 0.1)
    return AgentClient(path, **kw)


# --------------------------------------------------------------------------- the window


def test_a_full_resend_window_stops_sending_and_the_buffer_drops_exactly_the_rest(sock_path):
    agent = FakeAgent(sock_path)
    client = _client(sock_path, buffer_size=1000)
    try:
        client.submit_many(_points(1000))
        assert _wait(lambda: len(agent.times) == 1000)  # the window is full now
        for p in _points(4000, start=1000):
            client.submit(p)  # never blocks, though nothing is acknowledged
        time.sleep(0.3)  # nothing more goes out while the window is full
        stats = client.stats()
        # The window holds what was sent (1000 records: ten frames of 100) and nothing
        # more was sent; the buffer kept the newest 1000; the oldest of the rest were
        # dropped, each counted, and none of them reached the agent.
        assert stats["points_written_total"] == 1000 == len(agent.times)
        assert stats["resend_window_records"] == 1000
        assert stats["queue_depth"] == 1000
        assert stats["points_dropped_total"] == 3000
        assert agent.times == list(range(1000))  # the oldest went first, in order
        # The agent acknowledges: the window empties and the buffered newest follow.
        agent.ack(10)
        assert _wait(lambda: client.sent == 2000)
        agent.ack(20)
        assert client.flush(5)
        assert agent.times == list(range(1000)) + list(range(4000, 5000))
        stats = client.stats()
        assert stats["points_acknowledged_total"] == 2000
        assert stats["points_acknowledged_total"] + stats["points_dropped_total"] \
            == stats["points_received_total"] == 5000
    finally:
        client.shutdown(1)
        agent.kill()


def test_the_window_is_bounded_in_bytes_too(sock_path):
    agent = FakeAgent(sock_path)
    client = _client(sock_path, buffer_size=100_000, resend_max_bytes=16 << 10)
    try:
        client.submit_many(_points(3000))
        assert _wait(lambda: client.sent > 0 and len(agent.times) == client.sent)
        time.sleep(0.3)
        stats = client.stats()
        # Sending stops at the first frame past the bound: at most one frame over it.
        assert 16 << 10 <= stats["resend_window_bytes"] < (16 << 10) + (8 << 10), stats
        assert stats["points_written_total"] < 3000 and stats["points_dropped_total"] == 0
        assert stats["queue_depth"] == 3000 - stats["points_written_total"]
    finally:
        client.shutdown(0.5)
        agent.kill()
    # Shut down with frames unacknowledged: what was sent is counted as unacknowledged,
    # what never left is counted as dropped; nothing is in neither.
    stats = client.stats()
    assert stats["points_unacknowledged_total"] == stats["points_written_total"]
    assert stats["points_unacknowledged_total"] + stats["points_dropped_total"] == 3000


def test_unacknowledged_frames_go_again_in_order_to_the_next_agent(sock_path):
    first = FakeAgent(sock_path)
    client = _client(sock_path)
    try:
        client.submit_many(_points(300))
        assert _wait(lambda: len(first.times) == 300)
        first.ack(1)  # the first frame (100 points) is durable; two are not
        assert _wait(lambda: client.stats()["points_acknowledged_total"] == 100)
        first.kill()
        client.submit_many(_points(50, start=300))  # while no agent listens
        second = FakeAgent(sock_path)
        assert _wait(lambda: len(second.times) == 250)
        # The two unacknowledged frames first, exactly as sent, then the new points.
        assert second.frames[:2] == [list(range(100, 200)), list(range(200, 300))]
        assert second.times == list(range(100, 350))
        assert second.hellos[0]["acks"] is True and second.hellos[0]["v"] == fr.VERSION
        second.ack(3)
        assert client.flush(5)
        stats = client.stats()
        assert stats["points_resent_total"] == 200 and stats["reconnects_total"] >= 1
        assert stats["points_acknowledged_total"] == 350
        assert stats["points_dropped_total"] == 0 and stats["resend_window_records"] == 0
    finally:
        client.shutdown(1)
        with contextlib.suppress(Exception):
            second.kill()


# --------------------------------------------------------------------------- old peers


def test_a_version_1_agent_that_never_acknowledges_gets_delivery_on_write(sock_path,
                                                                           monkeypatch):
    monkeypatch.setattr(agent_client, "_LEGACY_AFTER_S", 0.3)
    agent = FakeAgent(sock_path, acks=False)
    client = _client(sock_path, buffer_size=1000)
    try:
        # More than the window holds: after the fallback nothing waits for an ack.
        client.submit_many(_points(900))
        assert client.flush(5)
        client.submit_many(_points(900, start=900))
        assert client.flush(5)
        assert _wait(lambda: agent.times == list(range(1800)))
        stats = client.stats()
        assert stats["points_written_total"] == 1800 and stats["points_dropped_total"] == 0
        assert stats["points_acknowledged_total"] == 0
        assert stats["resend_window_records"] == 0
    finally:
        client.shutdown(1)
        agent.kill()


def test_a_version_1_job_gets_no_acks_and_its_records_arrive(sock_path):
    got: list = []
    srv = IngestServer(sock_path, on_points=got.extend, on_records=got.extend)
    srv.start()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(sock_path))
        s.sendall(fr.encode_json(fr.HELLO, {"v": 1, "pid": os.getpid(), "run_id": "r",
                                            "rank": 0, "watch": False}))
        s.sendall(fr.encode_points(_points(10)))
        s.sendall(fr.encode_records([TaskRecord("t", "r", name="x")]))
        assert _wait(lambda: len(got) == 11)
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):  # the agent says nothing to a version-1 job
            s.recv(100)
        assert srv.acks_sent == 0 and srv.rejected == 0
    finally:
        s.close()
        srv.stop()


# --------------------------------------------------------------------------- the agent


class Gate(MemoryExporter):
    """A memory exporter that answers RETRY until opened (a destination that is away)."""

    name = "gate"

    def __init__(self, accepts=None):
        super().__init__(accepts)
        self.open = False

    def export(self, batch):
        if not self.open:
            return ExportResult.RETRY
        return super().export(batch)


def test_the_agent_acknowledges_only_what_the_pipeline_settled(sock_path):
    gate = Gate()
    pipeline = Pipeline([gate], flush_interval_s=0.02)
    srv = IngestServer(sock_path, on_points=pipeline.submit_many,
                       on_records=pipeline.submit_many, durable=pipeline.durable)
    srv.start()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    decoder = fr.FrameDecoder()

    def acks(timeout):
        s.settimeout(timeout)
        out = []
        with contextlib.suppress(TimeoutError):
            while True:
                out += [fr.decode_durable(b) for t, b in decoder.feed(s.recv(4096))
                        if t == fr.DURABLE]
        return out

    try:
        s.connect(str(sock_path))
        s.sendall(fr.encode_json(fr.HELLO, {"v": 2, "pid": os.getpid(), "acks": True}))
        assert acks(0.3) == [0]  # the answer to the hello: this agent acknowledges
        s.sendall(fr.encode_points(_points(5)))
        s.sendall(fr.encode_frame(fr.POINTS, b"not json"))  # rejected: settled at once
        s.sendall(fr.encode_points(_points(5, start=5)))
        assert acks(0.5) == []  # the exporter has not taken any of it
        gate.open = True
        # The exporter retries the batch it refused on its backoff: on a loaded machine
        # the acknowledgement can come later than a second after the gate opens.
        got: list[int] = []
        deadline = time.monotonic() + 15
        while not (got and got[-1] == 3) and time.monotonic() < deadline:
            got += acks(0.5)
        assert got and got[-1] == 3, got  # frames are numbered, the rejected one too
        assert [p.time_ns for p in gate.records] == list(range(10))
    finally:
        s.close()
        srv.stop()
        pipeline.shutdown(1)


def test_pipeline_marks_follow_each_exporter_and_count_drops_as_settled():
    gate = Gate(accepts=frozenset({"points"}))
    lineage = MemoryExporter(accepts=frozenset({"lineage"}))
    pipeline = Pipeline([gate, lineage], queue_size=10, batch_size=5, flush_interval_s=0.01)
    try:
        record = pipeline.submit_many([TaskRecord("t", "r", name="x")])
        assert _wait(lambda: pipeline.durable(record))  # lineage only: not held by points
        first = pipeline.submit_many(_points(5))
        time.sleep(0.1)
        assert not pipeline.durable(first)
        # The queue holds 10: these push the oldest queued out, dropped and counted,
        # while the first batch is still in the exporter's hands.
        later = pipeline.submit_many(_points(12, start=5))
        time.sleep(0.1)
        assert not pipeline.durable(first) and not pipeline.durable(later)
        gate.open = True
        assert _wait(lambda: pipeline.durable(later))
        assert pipeline.durable(first)
        stats = pipeline.stats()[gate.name]
        assert stats["points_dropped_total"] + len(gate.records) == 17
    finally:
        pipeline.shutdown(1)


def test_a_waiting_job_asks_the_agent_to_export_now_instead_of_at_its_interval(sock_path):
    exporter = MemoryExporter()
    pipeline = Pipeline([exporter], flush_interval_s=30.0)  # the agent would wait 30 s
    srv = IngestServer(sock_path, on_points=pipeline.submit_many,
                       on_records=pipeline.submit_many, durable=pipeline.durable,
                       on_flush=pipeline.wake)
    srv.start()
    client = _client(sock_path)
    try:
        client.submit_many(_points(10))
        t0 = time.monotonic()
        assert client.flush(10)  # durable: written by the exporter, acknowledged
        assert time.monotonic() - t0 < 2.0
        assert [p.time_ns for p in exporter.records] == list(range(10))
        assert client.stats()["points_acknowledged_total"] == 10
        # FLUSH means nothing on a connection that did not ask for acks: rejected.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock_path))
            s.sendall(fr.encode_frame(fr.FLUSH, b""))
            assert _wait(lambda: srv.rejected == 1)
    finally:
        client.shutdown(1)
        srv.stop()
        pipeline.shutdown(1)
