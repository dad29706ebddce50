"""The spool's disk full: a size-capped spool directory during an InfluxDB outage. The
oldest spooled points are dropped and counted, exactly; everything else arrives; the
job runs on unaffected."""

from __future__ import annotations

import time

import pytest

from tests.faults.harness import influx_steps, job, result, wait_line

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

JOB = """
    import json, os, random, time
    import provscope

    rate, seconds = int(os.environ["F_RATE"]), float(os.environ["F_SECONDS"])
    rng = random.Random(7)
    with provscope.workflow("spool-full") as run:
        print("RUN", run.run_id, flush=True)
        worst, step, start = 0.0, 0, time.monotonic()
        while time.monotonic() - start < seconds:
            t0 = time.perf_counter()
            # Random digits compress badly: the capped spool fills within the outage.
            run.log(step=step, **{f"v{k}": rng.random() for k in range(8)})
            worst = max(worst, time.perf_counter() - t0)
            step += 1
            time.sleep(max(0.0, start + step / rate - time.monotonic()))
        flushed = run.flush(60.0)
    print(json.dumps({"run_id": run.run_id, "steps": step, "worst_step_s": worst,
                      "flushed": flushed, "errors": run.errors,
                      "influxdb": run._sink.stats()["backend"]["influxdb"]}))
"""


def test_capped_spool_drops_oldest_counted_job_unaffected(influx_own, tmp_path):
    db = "faults_spool_full"
    influx_own.create_database(db)
    proc = job(tmp_path, JOB, F_RATE="400", F_SECONDS="9",
               PROVSCOPE_INFLUXDB_URL=influx_own.url, PROVSCOPE_INFLUXDB_DATABASE=db,
               PROVSCOPE_INFLUXDB_SPOOL_MAX_BYTES=str(64 << 10),
               PROVSCOPE_INFLUXDB_SPOOL_DIR=str(tmp_path / "spool"))
    run_id = wait_line(proc, "RUN").split()[1]
    time.sleep(1.5)
    influx_own.stop()
    time.sleep(5.0)
    influx_own.start()
    out = result(proc, timeout_s=120)
    steps, stats = out["steps"], out["influxdb"]
    assert out["errors"] == 0 and out["flushed"], out
    assert out["worst_step_s"] < 0.100, out
    arrived = influx_steps(influx_own, db, run_id)
    assert arrived == sorted(set(arrived))
    missing = sorted(set(range(steps)) - set(arrived))
    dropped = int(stats["points_dropped_total"])
    # Exactly the counted drops are missing, and they are the oldest of the outage: one
    # block after the steps written before it, followed by everything spooled later.
    assert dropped > 0, stats
    assert len(missing) == dropped, (len(missing), stats)
    assert missing == list(range(missing[0], missing[-1] + 1)), missing
    assert missing[0] > 400  # the steps before the outage were written directly
    assert arrived[-1] == steps - 1
    assert stats["spool_bytes"] == 0, stats
    # Every spooled point was either replayed or is one of the counted drops.
    assert stats["points_replayed_total"] > 0, stats
    assert stats["points_replayed_total"] + dropped == stats["points_spooled_total"], stats
    print(f"spool full (64 KiB cap): {steps} steps, {dropped} oldest dropped and counted "
          f"(steps {missing[0]}..{missing[-1]}), {len(arrived)} arrived, "
          f"{stats['points_spooled_total']:.0f} spooled; worst step "
          f"{out['worst_step_s'] * 1e3:.1f} ms")
