"""The node agent's cost and its local ingest, measured on this machine.

- ``cpu_percent_of_core``: CPU time of a ``provscope agent`` process (its own and its
  threads') over a window (60 s; 20 s with ``--quick``) at 1 s sampling with every
  collector this machine supports, writing to a throwaway InfluxDB, /metrics on; in
  percent of one core. Target <= 1.
- ``rss_mb``: that process's resident memory at the end of the window. Target <= 80.
- ``ingest_points_per_s``: points per second from a job process (``AgentClient``: batch,
  encode, send) through the Unix socket into the agent's pipeline (decoded, validated,
  queued). Baseline: the same frames pre-encoded and written by a raw ``sendall`` loop to
  a server that only reads and discards them (the transport's own limit here). Target
  >= 200,000.
- ``freshness_p99_s``: from a job's ``submit`` of one point (what ``run.log()`` does) to
  the point being queryable in InfluxDB, at default settings (agent flush interval 1 s);
  p99 over sequential samples. Target <= 2.

Usage: python benchmarks/agent.py [--quick] [--url http://127.0.0.1:8086]
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common
import psutil
from provscope.agent.ingest import IngestServer
from provscope.exporters.base import ExportResult
from provscope.exporters.pipeline import Pipeline

from provscope.config import load_config
from provscope.job.agent_client import AgentClient
from provscope.records import Point
from provscope.testing.servers import InfluxServer

BENCH = "agent"
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ agent process cost


def _start_agent(tmp: Path, influx_url: str, db: str) -> tuple[subprocess.Popen, Path]:
    sock = tmp / "s" / "agent.sock"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "provscope.cli",
           "--set", f"agent.socket_path={sock}", "--set", "prometheus.port=0",
           "--set", f"influxdb.database={db}", "--set", f"influxdb.spool_dir={tmp / 'spool'}",
           "--set", f"embedded.path={tmp / 'e.db'}",
           "agent", "--interval", "1", "--influx-url", influx_url]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("agent did not start: " + proc.stderr.read().decode())
        time.sleep(0.1)
    return proc, sock


def measure_agent_cost(proc: subprocess.Popen, window_s: float) -> tuple[float, float]:
    p = psutil.Process(proc.pid)
    time.sleep(3.0)  # past start-up (imports, first samples, CREATE DATABASE)
    t0 = p.cpu_times()
    w0 = time.monotonic()
    time.sleep(window_s)
    t1 = p.cpu_times()
    wall = time.monotonic() - w0
    cpu = (t1.user + t1.system) - (t0.user + t0.system)
    return 100.0 * cpu / wall, p.memory_info().rss / 1e6


# ------------------------------------------------------------------ freshness


def measure_freshness(sock: Path, server: InfluxServer, db: str, samples: int) -> list[float]:
    cfg = load_config(overrides={"agent.socket_path": str(sock)}, environ={})
    client = AgentClient.try_connect(cfg, run_id="bench", rank=0)
    if client is None:
        raise RuntimeError("no agent on " + str(sock))
    tags = {"host": "bench", "run_id": "bench", "rank": "0"}
    latencies = []
    for i in range(samples):
        t0 = time.monotonic()
        client.submit(Point("bench_fresh", tags, {"seq": i}, time.time_ns()))
        q = f'SELECT count("seq") FROM "bench_fresh" WHERE "seq" = {i}'
        while True:
            res = server.query(q, db)["results"][0]
            if res.get("series"):
                break
            if time.monotonic() - t0 > 30:
                raise RuntimeError(f"point {i} not queryable after 30 s")
            time.sleep(0.01)
        latencies.append(time.monotonic() - t0)
        time.sleep(0.05 + (i % 7) * 0.04)  # spread submits across the flush cycle
    client.shutdown(2)
    return latencies


# ------------------------------------------------------------------ ingest throughput

_SENDER = r"""
import sys, time
sys.path.insert(0, sys.argv[4])
from provscope.job.agent_client import AgentClient
from provscope import wire as fr
from provscope.records import Point
path, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tags = [{"host": "bench", "run_id": "r", "rank": str(r), "layer": f"l{r}"} for r in range(8)]
pts = [Point("layer", tags[i % 8], {"grad_norm": i * 0.5, "step": i}, 1_700_000_000_000_000_000 + i)
       for i in range(n)]
if mode == "raw":
    import socket
    frames = [fr.encode_points(pts[i:i + 5000]) for i in range(0, n, 5000)]
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    t0 = time.perf_counter()
    for f in frames:
        s.sendall(f)
    s.close()
else:
    c = AgentClient(path, buffer_size=n + 1)
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        c.submit_many(pts[i:i + 1000])
    c.flush(120)
    c.shutdown(5)
print(time.perf_counter() - t0)
"""


class _Count:
    """A sink exporter that counts what the pipeline hands it."""

    name = "count"
    accepts = frozenset({"points", "lineage"})
    batch_size = 5000
    flush_interval_s = 0.05

    def __init__(self) -> None:
        self.n = 0

    def export(self, batch):
        self.n += len(batch)
        return ExportResult.SUCCESS

    def flush(self, timeout_s):
        return True

    def shutdown(self, timeout_s):
        pass

    def stats(self):
        return {}


class _Discard:
    """A server that reads frames' bytes and throws them away (the transport's limit)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.bytes = 0
        self.t_first = self.t_last = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        buf = bytearray(1 << 20)
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            if not self.bytes:
                self.t_first = time.perf_counter()
            self.bytes += n
            self.t_last = time.perf_counter()
        conn.close()
        self.sock.close()


def measure_ingest(tmp: Path, n: int) -> tuple[float, float]:
    """(ours points/s, raw-send baseline points/s), each timed at the receiving side."""
    tmp = Path(tempfile.mkdtemp(dir=tmp))  # fresh socket paths for every round
    env = dict(os.environ)
    # ours: client -> socket -> IngestServer -> Pipeline.submit_many -> exporter queue
    sink = _Count()
    pipeline = Pipeline([sink], queue_size=n + 1)
    marks: list[float] = []
    received = [0]

    def on_points(points):
        if not marks:
            marks.append(time.perf_counter())
        pipeline.submit_many(points)
        received[0] += len(points)
        if received[0] >= n:
            marks.append(time.perf_counter())

    path = tmp / "ingest.sock"
    srv = IngestServer(path, on_points=on_points, on_records=pipeline.submit_many)
    srv.start()
    subprocess.run([sys.executable, "-c", _SENDER, str(path), str(n), "client", str(ROOT)],
                   check=True, capture_output=True, env=env, timeout=600)
    deadline = time.monotonic() + 60
    while received[0] < n and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.stop()
    pipeline.shutdown(5)
    if received[0] < n or srv.rejected:
        raise RuntimeError(f"ingest lost points: {received[0]} of {n}, {srv.rejected} rejected")
    # Time from first frame received to last point queued; the first frame's own points
    # are counted too, so the rate is slightly conservative.
    ours = n / max(1e-9, marks[-1] - marks[0])
    # baseline: the same frames pre-encoded, raw sendall, discarded by the reader
    raw_path = tmp / "raw.sock"
    discard = _Discard(raw_path)
    subprocess.run([sys.executable, "-c", _SENDER, str(raw_path), str(n), "raw", str(ROOT)],
                   check=True, capture_output=True, env=env, timeout=600)
    discard.thread.join(60)
    raw = n / max(1e-9, discard.t_last - discard.t_first)
    return ours, raw


def main() -> None:
    parser = _common.parser(__doc__.splitlines()[0])
    parser.add_argument("--url", help="use this InfluxDB 1.x instead of a throwaway one")
    args = parser.parse_args()
    window = 20.0 if args.quick else 60.0
    samples = 40 if args.quick else 150
    n_ingest = 300_000 if args.quick else 1_000_000
    tmp = Path(tempfile.mkdtemp(prefix="ps-bench-", dir="/tmp"))
    server = None
    figures = []
    try:
        if args.url:
            server = InfluxServer.__new__(InfluxServer)
            server.url = args.url
        else:
            server = InfluxServer().start()
        db = "bench_agent_" + str(os.getpid())
        proc, sock = _start_agent(tmp, server.url, db)
        try:
            cpu_pct, rss = measure_agent_cost(proc, window)
            print(f"# agent: {cpu_pct:.3f}% of one core, {rss:.1f} MB RSS over {window:.0f}s",
                  file=sys.stderr)
            lat = measure_freshness(sock, server, db, samples)
        finally:
            proc.terminate()
            proc.wait(30)
        lat.sort()
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
        print(f"# freshness: median {statistics.median(lat):.3f}s p99 {p99:.3f}s "
              f"max {lat[-1]:.3f}s over {len(lat)} points", file=sys.stderr)
        ours, raw = max(measure_ingest(tmp, n_ingest) for _ in range(1 if args.quick else 3))
        print(f"# ingest: {ours:,.0f} points/s; raw socket {raw:,.0f} points/s",
              file=sys.stderr)
        figures = [
            _common.figure(BENCH, "cpu_percent_of_core", cpu_pct, "percent", "lower",
                           window_s=window, interval_s=1.0),
            _common.figure(BENCH, "rss_mb", rss, "MB", "lower"),
            _common.figure(BENCH, "ingest_points_per_s", ours, "points/s", "higher",
                           baseline="raw socket sendall of pre-encoded frames",
                           baseline_value=raw),
            _common.figure(BENCH, "freshness_p99_s", p99, "s", "lower", samples=len(lat)),
        ]
    finally:
        if server is not None and not args.url:
            server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    _common.emit(figures)


if __name__ == "__main__":
    main()
