"""The writer's response policy, against a local HTTP stub.

A real InfluxDB cannot be made to answer 413, 429 or 503 with Retry-After, or 401 on
demand, so these cases use a stub; everything else is tested against the real server.
"""

from __future__ import annotations

import gzip
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from provscope.exporters.base import ExportResult
from provscope.exporters.influxdb.writer import InfluxDBExporter

from provscope.records import Point


class Stub:
    """Answers each POST with the next scripted (status, headers, body); then 204."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str], bytes]] = []
        self.requests: list[tuple[str, dict[str, str], list[str], float]] = []
        self.max_lines: int | None = None  # answer 413 to bodies with more lines
        # Answer 400 for the whole body when a line contains this text (as InfluxDB does
        # for a type conflict inside one batch), with this message.
        self.refuse: str | None = None
        self.refuse_message = b'{"error":"field type conflict"}'
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                lines = raw.decode().split("\n") if raw else []
                stub.requests.append((self.path, dict(self.headers), lines, time.monotonic()))
                if stub.max_lines is not None and len(lines) > stub.max_lines \
                        and self.path.startswith("/write"):
                    status, headers, body = 413, {}, b'{"error":"request too large"}'
                elif stub.refuse is not None and self.path.startswith(("/write", "/api")) \
                        and any(stub.refuse in line for line in lines):
                    status, headers, body = 400, {}, stub.refuse_message
                elif stub.script and self.path.startswith(("/write", "/api")):
                    status, headers, body = stub.script.pop(0)
                else:
                    status, headers, body = 204, {}, b""
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def written(self) -> list[str]:
        """Lines of the write requests, in order (answered 2xx unless scripted or refused)."""
        return [line for path, _, lines, _ in self.requests if path.startswith(("/write", "/api"))
                and not (self.refuse and any(self.refuse in x for x in lines))
                for line in lines]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


def _points(n: int, start: int = 0) -> list[Point]:
    return [Point("m", {"h": "n1"}, {"v": float(i)}, i) for i in range(start, start + n)]


def _exporter(stub: Stub, tmp_path, **kw) -> InfluxDBExporter:
    kw.setdefault("retry_backoff_s", 0.01)
    kw.setdefault("max_backoff_s", 2.0)
    return InfluxDBExporter(stub.url, database="db", spool_dir=tmp_path, **kw)


def _write_lines(stub: Stub) -> list[list[str]]:
    return [lines for path, _, lines, _ in stub.requests if path.startswith("/write")]


def test_413_splits_the_batch_in_halves_until_it_fits(stub, tmp_path):
    stub.max_lines = 3
    exp = _exporter(stub, tmp_path)
    assert exp.export(_points(10)) is ExportResult.SUCCESS
    accepted = [lines for lines in _write_lines(stub) if len(lines) <= 3]
    assert [line for lines in accepted for line in lines] == \
        [f"m,h=n1 v={i} {i}" for i in range(10)]
    assert exp.stats()["points_written_total"] == 10
    exp.shutdown(1)


def test_503_with_retry_after_is_retried_after_that_delay(stub, tmp_path):
    stub.script = [(503, {"Retry-After": "0.5"}, b'{"error":"busy"}')]
    exp = _exporter(stub, tmp_path)
    assert exp.export(_points(2)) is ExportResult.SUCCESS
    (_, _, _, t1), (_, _, _, t2) = [r for r in stub.requests if r[0].startswith("/write")]
    assert t2 - t1 >= 0.45
    stats = exp.stats()
    assert stats["retries_total"] == 1
    assert stats["points_written_total"] == 2
    exp.shutdown(1)


def test_429_retry_after_is_capped_by_max_backoff(stub, tmp_path):
    stub.script = [(429, {"Retry-After": "3600"}, b"slow down")]
    exp = _exporter(stub, tmp_path, max_backoff_s=0.3)
    start = time.monotonic()
    assert exp.export(_points(1)) is ExportResult.SUCCESS
    assert time.monotonic() - start < 5
    assert exp.stats()["points_written_total"] == 1
    exp.shutdown(1)


def _bad_points(n: int, bad: set[int]) -> list[Point]:
    """``n`` points of one series; those in ``bad`` carry a field the stub refuses."""
    return [Point("m", {"h": "n1"}, {"bad" if i in bad else "v": float(i)}, i)
            for i in range(n)]


def test_a_whole_batch_400_costs_only_the_lines_the_server_refuses(stub, tmp_path, caplog):
    # The message names no line (a type conflict inside the batch): the batch is halved
    # down to the refused lines; every other point is written, each refusal counted.
    stub.refuse = "bad="
    exp = _exporter(stub, tmp_path)
    with caplog.at_level("WARNING"):
        assert exp.export(_bad_points(64, {5, 40})) is ExportResult.SUCCESS
        assert exp.export(_bad_points(8, {0})) is ExportResult.SUCCESS
    assert sorted(stub.written()) == sorted(
        [f"m,h=n1 v={i} {i}" for i in range(64) if i not in (5, 40)]
        + [f"m,h=n1 v={i} {i}" for i in range(1, 8)])
    stats = exp.stats()
    assert stats["points_written_total"] == 64 - 2 + 7
    assert stats["points_dropped_total"] == 3
    assert stats["rejected_server_total"] == 3 and stats["points_rejected_total"] == 3
    # One log line per kind and minute, whatever the count.
    assert len([r for r in caplog.records if "dropped (server)" in r.getMessage()]) == 1
    exp.shutdown(1)


def test_a_400_naming_its_lines_retries_the_rest_once_without_them(stub, tmp_path):
    stub.refuse = "bad="
    stub.refuse_message = (b'{"error":"unable to parse \'m,h=n1 bad=3 3\': invalid field '
                           b'format\\nunable to parse \'m,h=n1 bad=7 7\': invalid field format"}')
    exp = _exporter(stub, tmp_path)
    assert exp.export(_bad_points(10, {3, 7})) is ExportResult.SUCCESS
    writes = _write_lines(stub)
    assert len(writes) == 2  # the batch, then the rest once
    assert writes[1] == [f"m,h=n1 v={i} {i}" for i in range(10) if i not in (3, 7)]
    stats = exp.stats()
    assert (stats["points_written_total"], stats["rejected_server_total"]) == (8, 2)
    exp.shutdown(1)


def test_a_v2_style_400_naming_line_numbers(stub, tmp_path):
    stub.refuse = "bad="
    stub.refuse_message = (b'{"code":"invalid","message":"errors encountered on line(s): '
                           b'line 2: invalid field format"}')
    exp = _exporter(stub, tmp_path)
    assert exp.export(_bad_points(4, {1})) is ExportResult.SUCCESS
    assert _write_lines(stub)[1] == ["m,h=n1 v=0 0", "m,h=n1 v=2 2", "m,h=n1 v=3 3"]
    assert exp.stats()["rejected_server_total"] == 1
    exp.shutdown(1)


def test_partial_write_counts_only_the_points_the_server_dropped(stub, tmp_path):
    stub.script = [(400, {}, b'{"error":"partial write: field type conflict: dropped=2"}')]
    exp = _exporter(stub, tmp_path)
    assert exp.export(_points(5)) is ExportResult.SUCCESS
    stats = exp.stats()
    assert (stats["points_written_total"], stats["points_dropped_total"]) == (3, 2)
    exp.shutdown(1)


def test_401_is_an_auth_error_and_the_data_waits_in_the_spool(stub, tmp_path, caplog):
    stub.script = [(401, {}, b'{"error":"authorization failed"}')]
    exp = _exporter(stub, tmp_path, username="u", password="wrong")
    with caplog.at_level("ERROR", logger="provscope.exporters.influxdb"):
        assert exp.export(_points(4)) is ExportResult.SUCCESS
    assert any("authentication failed" in r.getMessage() and "username" in r.getMessage()
               for r in caplog.records)
    assert exp.stats()["points_spooled_total"] == 4
    assert len(_write_lines(stub)) == 1  # auth errors are not hammered with retries
    # Credentials fixed on the server side: the spooled points are replayed, in order.
    assert exp.flush(5)
    assert stub.written()[-4:] == [f"m,h=n1 v={i} {i}" for i in range(4)]
    assert exp.stats()["points_replayed_total"] == 4
    exp.shutdown(1)


def test_while_the_spool_holds_data_new_batches_queue_behind_it(stub, tmp_path):
    stub.script = [(503, {}, b"down")] * 3
    exp = _exporter(stub, tmp_path, max_retries=2)
    assert exp.export(_points(2, 0)) is ExportResult.SUCCESS  # 3 x 503: spooled
    assert exp.stats()["points_spooled_total"] == 2
    assert exp.export(_points(2, 2)) is ExportResult.SUCCESS  # behind it
    assert exp.flush(5)
    ok_lines = stub.written()[-4:]
    assert ok_lines == [f"m,h=n1 v={i} {i}" for i in range(4)]
    exp.shutdown(1)


def test_v3_uses_its_endpoint_and_bearer_token(stub, tmp_path):
    # No InfluxDB 3 server is packaged for the test machines; the v2 path is tested
    # against a real server (tests/exporters/test_influxdb_v2.py).
    v3 = InfluxDBExporter(stub.url, api="v3", database="d3", token="T3", spool_dir=tmp_path)
    assert v3.export(_points(1)) is ExportResult.SUCCESS
    (p3, h3, _, _) = stub.requests[-1]
    assert p3.startswith("/api/v3/write_lp?") and "db=d3" in p3
    assert "precision=nanosecond" in p3 and h3["Authorization"] == "Bearer T3"
    v3.shutdown(1)


def test_v2_sends_org_bucket_and_token():
    # What a server that checks no token cannot show: the request v2 sends.
    from provscope.exporters.influxdb.transport import InfluxTransport

    t = InfluxTransport("http://127.0.0.1:1", api="v2", database="db", retention_policy=None,
                        username=None, password=None, org="o", bucket="b", token="T2",
                        gzip=True, timeout_s=1)
    assert t.write_path.startswith("/api/v2/write?") and "bucket=b" in t.write_path
    assert "org=o" in t.write_path and "precision=ns" in t.write_path
    assert t.headers["Authorization"] == "Token T2"


def test_v1_sends_db_rp_credentials_and_creates_the_database_once(stub, tmp_path):
    exp = _exporter(stub, tmp_path, retention_policy="week", username="u", password="p")
    exp.export(_points(1))
    exp.export(_points(1, 1))
    queries = [r for r in stub.requests if r[0].startswith("/query")]
    writes = [r[0] for r in stub.requests if r[0].startswith("/write")]
    assert len(queries) == 1
    assert all("db=db" in w and "rp=week" in w and "u=u" in w and "p=p" in w for w in writes)
    exp.shutdown(1)


def test_keep_alive_reuses_one_connection(stub, tmp_path):
    exp = _exporter(stub, tmp_path)
    for i in range(5):
        exp.export(_points(1, i))
    assert exp._conn is not None
    sock = exp._conn.sock
    exp.export(_points(1, 9))
    assert exp._conn.sock is sock
    exp.shutdown(1)


def test_a_forked_child_uses_its_own_connection_and_leaves_the_spool_to_the_parent(
        stub, tmp_path):
    exp = _exporter(stub, tmp_path)
    assert exp.export(_points(1)) is ExportResult.SUCCESS
    parent_sock = exp._conn.sock
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        try:
            ok = exp._conn is None and exp.spool is None
            ok = ok and exp.export(_points(1, 7)) is ExportResult.SUCCESS
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"
    assert "m,h=n1 v=7 7" in stub.written()
    # The parent keeps its connection and its spool (still locked against others).
    assert exp._conn.sock is parent_sock and exp.spool is not None
    assert exp.export(_points(1, 8)) is ExportResult.SUCCESS
    exp.shutdown(1)


def test_a_large_batch_is_streamed_in_chunks_and_arrives_in_order(stub, tmp_path):
    exp = _exporter(stub, tmp_path)
    assert exp.export(_points(5000)) is ExportResult.SUCCESS
    sizes = [len(lines) for lines in _write_lines(stub)]
    assert len(sizes) > 1 and max(sizes) <= 2500
    assert stub.written() == [f"m,h=n1 v={i} {i}" for i in range(5000)]
    assert exp.stats()["points_written_total"] == 5000
    exp.shutdown(1)


def test_a_streamed_chunk_that_keeps_failing_takes_the_rest_to_the_spool_in_order(
        stub, tmp_path):
    # First chunk written; the second answered 503 in flight and on both retries after.
    stub.script = [(204, {}, b"")] + [(503, {}, b"down")] * 3
    exp = _exporter(stub, tmp_path, max_retries=1)
    assert exp.export(_points(4000)) is ExportResult.SUCCESS
    stats = exp.stats()
    assert stats["points_written_total"] == 1000
    assert stats["points_spooled_total"] == 3000
    assert exp.flush(5)
    written = stub.written()
    expected = [f"m,h=n1 v={i} {i}" for i in range(4000)]
    # The failed chunk was attempted twice; what the server accepted is every point, in order.
    accepted = written[:1000] + written[-3000:]
    assert accepted == expected
    assert exp.stats()["points_replayed_total"] == 3000
    exp.shutdown(1)


def test_a_refused_line_in_a_streamed_chunk_costs_only_itself(stub, tmp_path):
    # A batch sent as chunks: the chunk with the refused line is isolated on its own.
    stub.refuse = "bad="
    exp = _exporter(stub, tmp_path)
    assert exp.export(_bad_points(4000, {1500})) is ExportResult.SUCCESS
    stats = exp.stats()
    assert stats["points_written_total"] == 3999
    assert stats["points_dropped_total"] == 1 and stats["rejected_server_total"] == 1
    assert sorted(stub.written(), key=lambda line: int(line.rsplit(" ", 1)[1])) == \
        [f"m,h=n1 v={i} {i}" for i in range(4000) if i != 1500]
    exp.shutdown(1)


def test_a_long_retry_after_spools_at_once_and_waits_before_asking_again(stub, tmp_path):
    stub.script = [(503, {"Retry-After": "20"}, b"maintenance")]
    exp = _exporter(stub, tmp_path, max_backoff_s=60)
    start = time.monotonic()
    assert exp.export(_points(2)) is ExportResult.SUCCESS
    assert exp.export(_points(2, 2)) is ExportResult.SUCCESS
    assert time.monotonic() - start < 2  # the worker did not sleep through it
    assert exp.stats()["points_spooled_total"] == 4
    assert len(_write_lines(stub)) == 1  # not asked again before the 20 s
    assert exp.flush(5)  # an explicit flush does try (the server answers 204 now)
    assert stub.written()[-4:] == [f"m,h=n1 v={i} {i}" for i in range(4)]
    exp.shutdown(1)


def test_flush_returns_at_once_when_nothing_listens_and_the_spool_keeps_the_points(tmp_path):
    from provscope.testing.servers import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    exp = InfluxDBExporter(url, database="db", spool_dir=tmp_path, max_retries=0,
                           timeout_s=1)
    assert exp.export(_points(5)) is ExportResult.SUCCESS
    start = time.monotonic()
    assert not exp.flush(10)
    exp.shutdown(10)
    assert time.monotonic() - start < 2.0
    again = InfluxDBExporter(url, database="db", spool_dir=tmp_path)
    assert again.spool is not None and again.spool.pending_count == 5
    again.shutdown(0.1)
