"""The clock stepped back and records delivered twice: no duplicate rows or points, no
crash, every record present once.

The job's wall clock steps back one hour in the middle of the run (``time.time_ns``
replaced in the job's process: the only way to step a clock without root), and every
time-series point and lineage record is submitted twice (what an at-least-once retry or
a spool replayed after a crash between write and acknowledgement does).
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.faults.harness import influx_steps, job, result

pytestmark = [pytest.mark.faults, pytest.mark.integration]

JOB = """
    import json, time
    import provscope
    from provscope.ids import new_id
    from provscope.records import Point, TaskRecord

    real = time.time_ns
    steps, back_at = 400, 200
    with provscope.workflow("clock") as run:
        for step in range(steps):
            if step == back_at:
                time.time_ns = lambda: real() - 3_600_000_000_000  # one hour back
            run.log(step=step, loss=1.0)
            point = Point("fault_dup", {"run_id": run.run_id}, {"seq": float(step)},
                          time.time_ns())
            run.emit(point)
            run.emit(point)  # delivered twice
            if step % 10 == 0:
                task_id = new_id()
                start = time.time_ns()
                for record in (
                    TaskRecord(task_id, run.run_id, name=f"t{step}", task_kind="task",
                               start_ns=start, status="running"),
                    TaskRecord(task_id, run.run_id, end_ns=start + 1000, status="finished"),
                ):
                    run.emit(record)
                    run.emit(record)  # delivered twice
            if step == back_at + 1:
                run.heartbeat()  # a heartbeat from the stepped-back clock
        flushed = run.flush(30.0)
    print(json.dumps({"run_id": run.run_id, "steps": steps, "tasks": steps // 10,
                      "errors": run.errors, "flushed": flushed}))
"""


def test_clock_back_and_duplicates(influx_server, influx_db, tmp_path):
    proc = job(tmp_path, JOB, PROVSCOPE_INFLUXDB_URL=influx_server.url,
               PROVSCOPE_INFLUXDB_DATABASE=influx_db, PROVSCOPE_CLIENT_HEARTBEAT_S="0.05")
    out = result(proc, timeout_s=120)
    run_id, steps, tasks = out["run_id"], out["steps"], out["tasks"]
    assert out["errors"] == 0 and out["flushed"]
    train = influx_steps(influx_server, influx_db, run_id)
    assert len(train) == steps and sorted(train) == list(range(steps))
    # Time order: the hour-earlier steps come first, each half in step order.
    assert train == list(range(200, steps)) + list(range(200))
    dup = influx_steps(influx_server, influx_db, run_id, "fault_dup", "seq")
    assert len(dup) == steps and sorted(dup) == list(range(steps))
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'provscope.db'}")
    with engine.connect() as conn:
        def one(q: str) -> object:
            return conn.execute(sa.text(q), {"r": run_id}).scalar()

        assert one("SELECT count(*) FROM runs WHERE run_id = :r") == 1
        assert one("SELECT status FROM runs WHERE run_id = :r") == "finished"
        assert one("SELECT count(*) FROM tasks WHERE run_id = :r") == tasks
        assert one("SELECT count(*) FROM tasks WHERE run_id = :r AND status = 'finished'") \
            == tasks
        # The latest heartbeat wins: the stepped-back one did not move it backwards.
        start, heartbeat = conn.execute(
            sa.text("SELECT start_ns, heartbeat_ns FROM runs WHERE run_id = :r"),
            {"r": run_id}).one()
        assert heartbeat >= start
    engine.dispose()
