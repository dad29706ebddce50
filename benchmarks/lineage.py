"""Lineage write speed: task rows per second into SQLite and a real PostgreSQL.

N tasks are each delivered as a start record and an end record. Batches of
``--batch`` records mix the start records of one group of tasks with the end records of
the group before, so half of every batch inserts new rows and half merges into rows an
earlier transaction wrote (the database-side COALESCE merge, not only the in-memory one).
The figure is N / elapsed: finished task rows per second. Every row is checked (N rows,
all with start, end and status ``finished``) before any figure is printed.

Baseline, measured in the same run: the same store writing one record per transaction
(what an unbatched writer does), on fewer tasks.

PostgreSQL: a throwaway server started here (fsync off, like the test servers), unless
``--postgres-url`` names one.

Usage: python benchmarks/lineage.py [--quick] [--tasks N] [--postgres-url URL]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import _common
import sqlalchemy as sa
from provscope.exporters.lineage.store import SqlLineageStore

from provscope.ids import new_id
from provscope.records import RunRecord, TaskRecord

BENCH = "lineage"


def make_batches(n: int, batch: int) -> tuple[str, list[list[TaskRecord]]]:
    """(run_id, batches): start records of group g with end records of group g - 1."""
    run_id = new_id()
    half = max(1, batch // 2)
    t0 = 1_795_544_890_000_000_000
    ids = [new_id() for _ in range(n)]
    starts = [TaskRecord(tid, run_id, name=f"step {i}", task_kind="step", host="node-001",
                         rank=i % 8, pid=4242, start_ns=t0 + i * 1000, status="running",
                         params={"step": i}) for i, tid in enumerate(ids)]
    ends = [TaskRecord(tid, run_id, end_ns=t0 + i * 1000 + 900, status="finished",
                       result={"loss": 1.0 / (i + 1)},
                       resources={"cpu_seconds": 0.01, "peak_rss_bytes": 1 << 30,
                                  "read_bytes": 4096, "write_bytes": 0})
            for i, tid in enumerate(ids)]
    groups = [slice(i, i + half) for i in range(0, n, half)]
    batches: list[list[TaskRecord]] = []
    prev: slice | None = None
    for g in groups:
        batches.append(starts[g] + (ends[prev] if prev else []))
        prev = g
    batches.append(list(ends[prev]))
    return run_id, batches


def check(store: SqlLineageStore, run_id: str, n: int) -> None:
    with store.engine.connect() as conn:
        done = conn.execute(sa.text(
            "SELECT count(*) FROM tasks WHERE run_id = :r AND status = 'finished' "
            "AND start_ns IS NOT NULL AND end_ns IS NOT NULL AND cpu_seconds IS NOT NULL"),
            {"r": run_id}).scalar_one()
    if done != n:
        sys.exit(f"lineage bench: expected {n} merged task rows, found {done}")


def rows_per_s(url: str, n: int, batch: int, rounds: int) -> float:
    """Best of ``rounds`` runs of N tasks in batches (each round a new run)."""
    store = SqlLineageStore(url)
    store.ensure_schema()
    store.write([RunRecord(new_id(), name="warm-up")])
    best = 0.0
    for _ in range(rounds):
        run_id, batches = make_batches(n, batch)
        started = time.perf_counter()
        for b in batches:
            store.write(b)
        elapsed = time.perf_counter() - started
        check(store, run_id, n)
        best = max(best, n / elapsed)
    store.close()
    return best


def unbatched_rows_per_s(url: str, n: int) -> float:
    """The same records, one transaction per record."""
    store = SqlLineageStore(url)
    store.ensure_schema()
    run_id, batches = make_batches(n, 2)
    started = time.perf_counter()
    for b in batches:
        for record in b:
            store.write([record])
    elapsed = time.perf_counter() - started
    check(store, run_id, n)
    store.close()
    return n / elapsed


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, help="tasks per round (default 200000; quick 20000)")
    p.add_argument("--batch", type=int, default=1000, help="records per transaction")
    p.add_argument("--postgres-url", help="use this PostgreSQL database instead of a "
                   "throwaway server (tables are created in it)")
    args = p.parse_args()
    n = args.tasks or (20_000 if args.quick else 200_000)
    rounds = 2 if args.quick else 3
    n_base = 2_000 if args.quick else 5_000
    figures = []

    with tempfile.TemporaryDirectory(prefix="provscope-bench-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'lineage.db'}"
        value = rows_per_s(url, n, args.batch, rounds)
        base = unbatched_rows_per_s(f"sqlite:///{Path(tmp) / 'unbatched.db'}", n_base)
        figures.append(_common.figure(BENCH, "sqlite_rows_per_s", value, "rows/s", "higher",
                                      baseline="one transaction per record",
                                      baseline_value=base, tasks=n, batch=args.batch))

    server = None
    pg_url = args.postgres_url
    if pg_url is None:
        from provscope.testing.servers import PostgresServer, ServerUnavailable

        try:
            server = PostgresServer().start()
        except ServerUnavailable as exc:
            print(f"# postgres skipped: {exc}", file=sys.stderr)
    try:
        if server is not None:
            pg_url = server.create_database("bench")
        if pg_url is not None:
            value = rows_per_s(pg_url, n, args.batch, rounds)
            base = unbatched_rows_per_s(pg_url, n_base)
            figures.append(_common.figure(BENCH, "postgres_rows_per_s", value, "rows/s",
                                          "higher", baseline="one transaction per record",
                                          baseline_value=base, tasks=n, batch=args.batch))
    finally:
        if server is not None:
            server.close()
    _common.emit(figures)


if __name__ == "__main__":
    main()
