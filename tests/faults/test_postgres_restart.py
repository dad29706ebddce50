"""PostgreSQL restarted while a job writes lineage: every row arrives, exactly once."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from provscope.testing.required import unavailable
from provscope.testing.servers import PostgresServer, ServerUnavailable
from tests.faults.harness import job, result, wait_line

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

RATE = 100  # tasks per second, each with one used entity

JOB = """
    import json, os, time
    import provscope

    rate, seconds = int(os.environ["F_RATE"]), float(os.environ["F_SECONDS"])
    with provscope.workflow("pg-restart") as run:
        print("RUN", run.run_id, flush=True)
        n, start = 0, time.monotonic()
        while time.monotonic() - start < seconds:
            with run.task(f"t{n}", kind="task", n=n) as task:
                task.use(f"s3://bucket/{run.run_id}/{n}", kind="dataset")
            n += 1
            time.sleep(max(0.0, start + n / rate - time.monotonic()))
    # The end record goes out at exit: the pipeline drains at shutdown.
    provscope.flush(30.0)
    print(json.dumps({"run_id": run.run_id, "tasks": n, "errors": run.errors,
                      "lineage": run._sink.stats()["backend"]["lineage"]}))
"""


@pytest.fixture
def postgres_own():
    try:
        server = PostgresServer()
    except ServerUnavailable as exc:
        unavailable(exc)
    server.start()
    yield server
    server.close()


def test_postgres_restarted_every_lineage_row_arrives(postgres_own, tmp_path):
    url = postgres_own.create_database("faults")
    proc = job(tmp_path, JOB, F_RATE=str(RATE), F_SECONDS="8", PROVSCOPE_LINEAGE_URL=url)
    wait_line(proc, "RUN")
    time.sleep(2.5)
    postgres_own.stop()
    time.sleep(3.0)
    postgres_own.start()
    out = result(proc, timeout_s=120)
    n, run_id = out["tasks"], out["run_id"]
    assert out["errors"] == 0
    lineage = out["lineage"]
    # The outage really happened: batches went to the spool and came back out of it.
    assert lineage["points_spooled_total"] > 0, lineage
    assert lineage["points_replayed_total"] == lineage["points_spooled_total"], lineage
    assert lineage["points_dropped_total"] == 0, lineage
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        def one(q: str) -> object:
            return conn.execute(sa.text(q), {"r": run_id}).scalar()

        assert one("SELECT status FROM runs WHERE run_id = :r") == "finished"
        assert one("SELECT count(*) FROM tasks WHERE run_id = :r") == n
        assert one("SELECT count(*) FROM tasks WHERE run_id = :r AND status = 'finished' "
                   "AND end_ns IS NOT NULL") == n
        assert one("SELECT count(DISTINCT name) FROM tasks WHERE run_id = :r") == n
        assert one("SELECT count(*) FROM entities WHERE run_id = :r") == n
        assert one("SELECT count(*) FROM relations WHERE run_id = :r AND relation = 'used'") \
            == n
    engine.dispose()
    print(f"postgres restart: {n} tasks, {n} entities, {n} relations, all present once; "
          f"{lineage['points_spooled_total']:.0f} records spooled and replayed")
    assert n >= RATE * 6  # the job really ran through the outage
