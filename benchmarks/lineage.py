"""Lineage write speed: task rows per second into SQLite and a real PostgreSQL.

N tasks are each delivered as a start record and an end record. Batches of
``--batch`` records mix the start records of one group of tasks with the end records of
the group before, so half of every batch inserts new rows and half merges into rows an
earlier transaction wrote (the database-side COALESCE merge, not only the in-memory one).
The figure is N / elapsed: finished task rows per second. Every row is checked (N rows,
all with start, end and status ``finished``) before any figure is printed.

Baseline, measured in the same run on the same batches and database settings, its rounds
alternating with the store's (best of each kept): a
plain batched ``executemany``, what a developer writes with SQLAlchemy without tuning:
one transaction per batch, one ``INSERT .. ON CONFLICT (task_id) DO UPDATE SET col =
COALESCE(excluded.col, tasks.col)`` executed with the batch's rows as its parameter list
(SQLAlchemy's own JSON and timestamp binding; ``cursor.executemany`` underneath). The
store differs by merging records in memory, binding pre-converted tuples and, on
PostgreSQL, ``COPY`` into a staging table plus one merging ``INSERT .. SELECT``.

PostgreSQL: a throwaway server started here (fsync off, like the test servers), unless
``--postgres-url`` names one.

Usage: python benchmarks/lineage.py [--quick] [--tasks N] [--postgres-url URL]
"""

from __future__ import annotations

import datetime
import sys
import tempfile
import time
from pathlib import Path

import _common
import sqlalchemy as sa
from provscope.exporters.lineage.schema import RESOURCE_COLUMNS, TASKS

try:  # the store's module, wherever the lineage package keeps it
    from provscope.exporters.lineage.store import SqlLineageStore
except ImportError:  # pragma: no cover
    from provscope.exporters.lineage import SqlLineageStore  # type: ignore[attr-defined,no-redef]

from provscope.ids import new_id
from provscope.records import RunRecord, TaskRecord

BENCH = "lineage"
BASELINE = "plain batched executemany upsert, one transaction per batch"


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


def _store_round(store: SqlLineageStore, n: int, batch: int) -> float:
    """One round of N tasks through the store (a new run); rows per second."""
    run_id, batches = make_batches(n, batch)
    started = time.perf_counter()
    for b in batches:
        store.write(b)
    elapsed = time.perf_counter() - started
    check(store, run_id, n)
    return n / elapsed


def _plain_upsert(dialect: str) -> sa.Insert:
    """INSERT .. ON CONFLICT DO UPDATE SET col = COALESCE(new, old): the textbook merge."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = insert(TASKS)
    sets = {c.name: sa.func.coalesce(stmt.excluded[c.name], c)
            for c in TASKS.columns if c.name != "task_id"}
    return stmt.on_conflict_do_update(index_elements=["task_id"], set_=sets)


def _plain_row(r: TaskRecord) -> dict:
    """One record as the parameter dict of the plain upsert (every column, None if unknown)."""
    res = r.resources or {}
    row = {
        "task_id": r.task_id, "run_id": r.run_id, "parent_task_id": r.parent_task_id,
        "name": r.name, "kind": r.task_kind, "host": r.host, "rank": r.rank, "pid": r.pid,
        "start_ns": r.start_ns, "end_ns": r.end_ns,
        "start_time": _dt(r.start_ns), "end_time": _dt(r.end_ns),
        "status": r.status, "error": r.error, "params": r.params, "result": r.result,
        "resources": r.resources,
    }
    for key in RESOURCE_COLUMNS:
        row[key] = res.get(key)
    return row


def _dt(ns: int | None) -> datetime.datetime | None:
    return None if ns is None else datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC)


def _plain_round(store: SqlLineageStore, stmt: sa.Insert, n: int, batch: int) -> float:
    """One round of the same batches, each one transaction of one executemany."""
    engine = store.engine  # the store's engine: the same connection settings and schema
    run_id, batches = make_batches(n, batch)
    started = time.perf_counter()
    for b in batches:
        with engine.begin() as conn:
            conn.execute(stmt, [_plain_row(r) for r in b])
    elapsed = time.perf_counter() - started
    check(store, run_id, n)
    return n / elapsed


def compare(url: str, plain_url: str, n: int, batch: int, rounds: int) -> tuple[float, float]:
    """(store rows/s, plain executemany rows/s): best of ``rounds`` each, the two
    alternating round by round so both see the same load on a shared machine."""
    store = SqlLineageStore(url)
    store.ensure_schema()
    store.write([RunRecord(new_id(), name="warm-up")])
    plain = SqlLineageStore(plain_url) if plain_url != url else store
    plain.ensure_schema()
    stmt = _plain_upsert(plain.engine.dialect.name)
    ours = base = 0.0
    for _ in range(rounds):
        ours = max(ours, _store_round(store, n, batch))
        base = max(base, _plain_round(plain, stmt, n, batch))
    store.close()
    plain.close()
    return ours, base


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, help="tasks per round (default 200000; quick 20000)")
    p.add_argument("--batch", type=int, default=1000, help="records per transaction")
    p.add_argument("--postgres-url", help="use this PostgreSQL database instead of a "
                   "throwaway server (tables are created in it)")
    args = p.parse_args()
    n = args.tasks or (20_000 if args.quick else 200_000)
    rounds = 2 if args.quick else 3
    figures = []

    with tempfile.TemporaryDirectory(prefix="provscope-bench-") as tmp:
        value, base = compare(f"sqlite:///{Path(tmp) / 'lineage.db'}",
                              f"sqlite:///{Path(tmp) / 'plain.db'}", n, args.batch, rounds)
        figures.append(_common.figure(BENCH, "sqlite_rows_per_s", value, "rows/s", "higher",
                                      baseline=BASELINE,
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
            value, base = compare(pg_url, pg_url, n, args.batch, rounds)
            figures.append(_common.figure(BENCH, "postgres_rows_per_s", value, "rows/s",
                                          "higher", baseline=BASELINE,
                                          baseline_value=base, tasks=n, batch=args.batch))
    finally:
        if server is not None:
            server.close()
    _common.emit(figures)


if __name__ == "__main__":
    main()
