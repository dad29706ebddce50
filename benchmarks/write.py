"""Write throughput into a real InfluxDB 1.x, and points lost across an outage.

- ``points_per_s``: narrow points (2-4 fields) per second through the writer, end to
  end: ``Pipeline.submit_many`` of every point until ``flush`` returns (encoded,
  gzip'ed, posted, acknowledged, counted on the server). Baseline: the same points,
  pre-encoded and pre-gzip'ed in the same batch size, posted by minimal loops over
  keep-alive connections: one connection posting in sequence, and 2 and 4 connections
  posting at once (threads sharing the batches); the fastest of these is the baseline
  (the server's own limit on this machine, whichever way it is reached). Every variant
  writes into fresh databases of the same server; the best of the rounds is kept for
  each (the machine is shared).
- ``points_per_s_wide``: the same with the catalogue-shaped points of ``encode.py``
  (8-16 fields each): fewer points/s, the server's cost grows with the field count.
- ``outage_points_lost``: points submitted at a steady rate while influxd is stopped for
  ``--outage-s`` seconds and started again, minus the points the server holds at the end.

Usage: python benchmarks/write.py [--quick] [--url http://127.0.0.1:8086]
"""

from __future__ import annotations

import gzip
import http.client
import sys
import tempfile
import threading
import time
import urllib.parse

import _common
from encode import make_narrow_points, make_points
from provscope.exporters.influxdb.lineprotocol import encode_batch
from provscope.exporters.influxdb.writer import InfluxDBExporter
from provscope.exporters.pipeline import Pipeline

from provscope.records import Point
from provscope.testing.servers import InfluxServer

BATCH = 5000
RAW_BASELINE = ("best of sequential and concurrent (2, 4 connections) raw keep-alive POSTs "
                "of pre-encoded gzip batches")


def _count(server: InfluxServer, db: str) -> int:
    total = 0
    for meas, field in (("gpu", "power_watts"), ("train", "loss"), ("layer", "grad_norm"),
                        ("cpu", "load1")):
        total += server.count(db, meas, field)
    return total


# Raw-post variants tried for the baseline: connections posting at once (1 = sequential).
RAW_CONNECTIONS = (1, 2, 4)


def _throughput(server: InfluxServer, points: list[Point], rounds: int, tag: str
                ) -> tuple[float, int, float]:
    """(best raw-post seconds, the connection count that reached it, best writer seconds)
    for ``points``; rounds alternate the raw variants and the writer."""
    n = len(points)
    bodies = [gzip.compress(encode_batch(points[i:i + BATCH]), compresslevel=1, mtime=0)
              for i in range(0, n, BATCH)]
    raw_s = ours_s = float("inf")
    raw_conns = 1
    for r in range(rounds):
        for conns in RAW_CONNECTIONS:
            db = f"raw_{tag}{r}_{conns}"
            server.create_database(db)
            elapsed = _raw_post(server, db, bodies, conns)
            got = _count(server, db)
            if got != n:
                raise RuntimeError(f"raw post ({conns} connections): server holds {got} of {n}")
            if elapsed < raw_s:
                raw_s, raw_conns = elapsed, conns
        server.create_database(f"ours_{tag}{r}")
        with tempfile.TemporaryDirectory() as spool:
            ours_s = min(ours_s, _writer(server, f"ours_{tag}{r}", points, spool))
        got = _count(server, f"ours_{tag}{r}")
        if got != n:
            raise RuntimeError(f"writer: server holds {got} of {n} points")
    return raw_s, raw_conns, ours_s


def _raw_post(server: InfluxServer, db: str, bodies: list[bytes], connections: int = 1
              ) -> float:
    """Seconds to post every body, ``connections`` keep-alive connections at once."""
    parts = urllib.parse.urlsplit(server.url)
    path = f"/write?db={db}&precision=ns"
    headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain"}
    conns = [http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
             for _ in range(connections)]
    for conn in conns:
        conn.connect()  # outside the timed part, as the writer's connection is
    todo = iter(range(len(bodies)))
    lock = threading.Lock()
    errors: list[str] = []

    def post(conn: http.client.HTTPConnection) -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            conn.request("POST", path, body=bodies[i], headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 204:
                errors.append(f"raw post: HTTP {resp.status}")
                return

    start = time.perf_counter()
    if connections == 1:
        post(conns[0])
    else:
        threads = [threading.Thread(target=post, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elapsed = time.perf_counter() - start
    for conn in conns:
        conn.close()
    if errors:
        raise RuntimeError(errors[0])
    return elapsed


def _writer(server: InfluxServer, db: str, points: list, spool: str) -> float:
    exp = InfluxDBExporter(server.url, database=db, spool_dir=spool, batch_size=BATCH)
    pipeline = Pipeline([exp], queue_size=len(points) + 1)
    start = time.perf_counter()
    pipeline.submit_many(points)
    if not pipeline.flush(300):
        raise RuntimeError("writer did not drain in 300 s")
    elapsed = time.perf_counter() - start
    pipeline.shutdown(5)
    return elapsed


def _outage(server: InfluxServer, outage_s: float, rate: int, spool: str) -> dict:
    server.create_database("outage")
    exp = InfluxDBExporter(server.url, database="outage", spool_dir=spool, batch_size=BATCH,
                           max_backoff_s=2.0, timeout_s=2.0)
    pipeline = Pipeline([exp])
    sent = 0
    stop = threading.Event()
    t0 = 1_795_544_890_000_000_000

    def produce():
        nonlocal sent
        chunk = max(1, rate // 20)
        while not stop.is_set():
            pts = make_narrow_points(chunk, seed=sent)
            pts = [type(p)(p.measurement, p.tags, p.fields, t0 + sent + j)
                   for j, p in enumerate(pts)]
            pipeline.submit_many(pts)
            sent += len(pts)
            time.sleep(0.05)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    time.sleep(2.0)
    server.stop()
    time.sleep(outage_s)
    server.start()
    time.sleep(2.0)
    stop.set()
    producer.join()
    drained = pipeline.flush(300)
    stats = pipeline.stats()["influxdb"]
    pipeline.shutdown(5)
    arrived = _count(server, "outage")
    return {"sent": sent, "arrived": arrived, "drained": drained,
            "spooled": stats.get("points_spooled_total", 0.0),
            "dropped": stats.get("points_dropped_total", 0.0)}


def main() -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--outage-s", type=float, default=None, help="outage length, seconds")
    args = p.parse_args()
    n = 100_000 if args.quick else 500_000
    rounds = 1 if args.quick else 2
    outage_s = args.outage_s if args.outage_s is not None else (5.0 if args.quick else 30.0)
    points = make_narrow_points(n)
    wide = make_points(20_000 if args.quick else 100_000)
    server = InfluxServer().start()
    try:
        raw_s, raw_conns, ours_s = _throughput(server, points, rounds, "n")
        wide_raw_s, wide_raw_conns, wide_ours_s = _throughput(server, wide, 1, "w")
        with tempfile.TemporaryDirectory() as spool:
            out = _outage(server, outage_s, 5_000 if args.quick else 20_000, spool)
        print(f"# outage: {out}", file=sys.stderr)
    finally:
        server.close()
    _common.emit([
        _common.figure("write", "points_per_s", n / ours_s, "points/s", "higher",
                       baseline=RAW_BASELINE, baseline_value=n / raw_s, points=n,
                       batch_size=BATCH, baseline_connections=raw_conns),
        _common.figure("write", "points_per_s_wide", len(wide) / wide_ours_s, "points/s",
                       "higher", baseline=RAW_BASELINE,
                       baseline_value=len(wide) / wide_raw_s, points=len(wide),
                       fields_per_point=13, baseline_connections=wide_raw_conns),
        _common.figure("write", "outage_points_lost", out["sent"] - out["arrived"], "points",
                       "lower", outage_s=outage_s, points_sent=out["sent"],
                       points_spooled=out["spooled"]),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
