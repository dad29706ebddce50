"""Read speed of the query API: one million points of one run into a DataFrame.

A point here is one field value at one time (one row of the embedded ``points`` table,
one value of an InfluxDB series): a ``train`` measurement of N/5 steps with five fields
(step, loss, lr, grad_norm, samples_per_second), one host, one rank.

Figures (the best of ``--rounds`` rounds each, the baseline's rounds alternating with
provscope's in the same run):

- ``embedded_points_per_s``: ``query.series("train", FIELDS, run_id=...)`` from the
  embedded SQLite file (a wide frame indexed by step), beside ``pandas.read_sql`` of the
  same rows of the ``points`` table (long, not pivoted: less work than the figure's).
- ``influx_points_per_s``: the same call reading InfluxDB 1.x (a throwaway server), beside
  the same InfluxQL query over HTTP with its (chunked) JSON response parsed by the
  standard library's ``json`` and turned into a DataFrame per series.

Both frames are checked equal to each other and to the data written before any figure
is printed.

Usage: python benchmarks/query.py [--quick] [--points N] [--rounds R]
"""

from __future__ import annotations

import json
import sqlite3
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import _common
import numpy as np
import pandas as pd
from provscope.exporters.embedded import EmbeddedPointsExporter

from provscope import query
from provscope.config import load_config
from provscope.records import Point
from provscope.testing.servers import InfluxServer

BENCH = "query"
FIELDS = ["step", "loss", "lr", "grad_norm", "samples_per_second"]
RUN = "01900000-0000-7000-8000-00000000b0b0"
T0 = 1_780_000_000_000_000_000


def make_points(steps: int) -> list[Point]:
    tags = {"run_id": RUN, "host": "node-001", "rank": "0"}
    return [Point("train", tags, {"step": i, "loss": 1.0 / (i + 1), "lr": 1e-3 * (1 + i % 7),
                                  "grad_norm": 0.5 + i * 1e-6,
                                  "samples_per_second": 1000.0 + i % 13},
                  T0 + i * 10_000_000) for i in range(steps)]


def write_embedded(path: Path, points: list[Point]) -> None:
    exporter = EmbeddedPointsExporter(str(path))
    for i in range(0, len(points), 20_000):
        exporter.write(points[i:i + 20_000])
    exporter.shutdown(5)


def write_influx(url: str, db: str, points: list[Point]) -> None:
    def line(p: Point) -> str:
        f = p.fields
        return (f"train,host=node-001,rank=0,run_id={RUN} step={f['step']}i,"
                f"loss={f['loss']!r},lr={f['lr']!r},grad_norm={f['grad_norm']!r},"
                f"samples_per_second={f['samples_per_second']!r} {p.time_ns}")

    for i in range(0, len(points), 20_000):
        body = "\n".join(line(p) for p in points[i:i + 20_000]).encode()
        req = urllib.request.Request(f"{url}/write?db={db}&precision=ns", data=body,
                                     method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 204


def baseline_read_sql(path: Path) -> pd.DataFrame:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return pd.read_sql("SELECT * FROM points WHERE run_id = ? AND measurement = ?", conn,
                           params=(RUN, "train"))
    finally:
        conn.close()


def baseline_influx_json(url: str, db: str) -> pd.DataFrame:
    """The same InfluxQL query and parameters as provscope sends, the plainest way."""
    q = ('SELECT "step", "loss", "lr", "grad_norm", "samples_per_second" FROM "train" '
         'WHERE "run_id" = $p0 GROUP BY *')
    form = {"db": db, "q": q, "epoch": "ns", "params": json.dumps({"p0": RUN}),
            "chunked": "true", "chunk_size": "50000"}
    req = urllib.request.Request(f"{url}/query", data=urllib.parse.urlencode(form).encode())
    with urllib.request.urlopen(req, timeout=300) as resp:
        body = resp.read().decode()
    frames = []
    for chunk in body.splitlines():
        if chunk.strip():
            for result in json.loads(chunk)["results"]:
                for s in result.get("series", []):
                    frames.append(pd.DataFrame(s["values"], columns=s["columns"]))
    return pd.concat(frames, ignore_index=True)


def best(fn, rounds: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=None, help="points (default 1,000,000)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of each read (default 3)")
    args = p.parse_args()
    n = args.points or (100_000 if args.quick else 1_000_000)
    rounds = args.rounds or (2 if args.quick else 3)
    steps = n // len(FIELDS)
    n = steps * len(FIELDS)
    points = make_points(steps)
    figures = []
    with tempfile.TemporaryDirectory(prefix="provscope-bench-query-") as tmp:
        path = Path(tmp) / "provscope.db"
        t = time.perf_counter()
        write_embedded(path, points)
        print(f"# embedded: {n:,} points written in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
        server = InfluxServer().start()
        try:
            server.create_database("bench")
            write_influx(server.url, "bench", points)
            embedded = load_config(overrides={"embedded.path": str(path)}, environ={})
            influx = load_config(overrides={"influxdb.url": server.url,
                                            "influxdb.database": "bench",
                                            "influxdb.timeout_s": 300}, environ={})

            def ours_embedded():
                return query.series("train", FIELDS, run_id=RUN, config=embedded)

            def ours_influx():
                return query.series("train", FIELDS, run_id=RUN, config=influx)

            got_e = ours_embedded()
            got_i = ours_influx()
            pd.testing.assert_frame_equal(got_i, got_e)
            assert len(got_e) == steps and got_e.index.tolist()[:3] == [0, 1, 2]
            assert np.allclose(got_e["loss"].to_numpy(dtype=float),
                               [1.0 / (i + 1) for i in range(steps)], rtol=0, atol=0)
            rounds_e, rounds_b, rounds_i, rounds_j = [], [], [], []
            for _ in range(rounds):  # alternate provscope's reads with the baselines'
                rounds_b.append(best(lambda: baseline_read_sql(path), 1)[0])
                rounds_e.append(best(ours_embedded, 1)[0])
                rounds_j.append(best(lambda: baseline_influx_json(server.url, "bench"), 1)[0])
                rounds_i.append(best(ours_influx, 1)[0])
            assert len(baseline_read_sql(path)) == n
            assert len(baseline_influx_json(server.url, "bench")) == steps
        finally:
            server.close()
    e, b, i, j = min(rounds_e), min(rounds_b), min(rounds_i), min(rounds_j)
    figures.append(_common.figure(BENCH, "embedded_points_per_s", n / e, "points/s", "higher",
                                  baseline="pandas.read_sql of the points table",
                                  baseline_value=n / b, points=n, seconds=round(e, 3),
                                  baseline_seconds=round(b, 3), target=1_000_000))
    figures.append(_common.figure(BENCH, "influx_points_per_s", n / i, "points/s", "higher",
                                  baseline="InfluxDB HTTP JSON parsed with the json module",
                                  baseline_value=n / j, points=n, seconds=round(i, 3),
                                  baseline_seconds=round(j, 3), target=200_000))
    _common.emit(figures)


if __name__ == "__main__":
    main()
