"""InfluxDB stopped during an instrumented run with a node agent: every point arrives,
in order per series, with the agent's and the job's memory bounded.

The outage lasts ``OUTAGE_S`` (15 s by default, 60 s under ``--long``): the property is
the same at any length, because the agent's InfluxDB writer moves what the server does
not take to the on-disk spool after a few retries, so memory does not grow with the
outage's length; the figure that grows is the spool, on disk.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.harness import Agent, RssSampler, influx_steps, job, result, wait_line, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

MiB = 1 << 20
RATE = 200  # training steps per second
SERIES = 10  # probe series besides train: one point each per step

JOB = """
    import json, os, resource, time
    import provscope
    from provscope.records import Point

    rate, seconds, series = int(os.environ["F_RATE"]), float(os.environ["F_SECONDS"]), \\
        int(os.environ["F_SERIES"])
    with provscope.workflow("influx-outage") as run:
        print("RUN", run.run_id, flush=True)
        worst, step, period = 0.0, 0, 1.0 / rate
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            t0 = time.perf_counter()
            run.log(step=step, loss=1.0 / (step + 1))
            for k in range(series):
                run.emit(Point("fault_probe", {"run_id": run.run_id, "k": str(k)},
                               {"seq": float(step)}, time.time_ns()))
            worst = max(worst, time.perf_counter() - t0)
            step += 1
            time.sleep(max(0.0, start + step * period - time.monotonic()))
        flushed = run.flush(30.0)
    print(json.dumps({"run_id": run.run_id, "steps": step, "worst_step_s": worst,
                      "flushed": flushed, "errors": run.errors,
                      "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _probe_series(server, db: str, run_id: str) -> dict[str, list[int]]:
    res = server.query(f"SELECT seq FROM fault_probe WHERE run_id = '{run_id}' GROUP BY k", db)
    out = {}
    for s in res["results"][0].get("series") or []:
        out[s["tags"]["k"]] = [int(v[1]) for v in s["values"]]
    return out


def test_influx_stopped_every_point_arrives_in_order_memory_bounded(influx_own, tmp_path,
                                                                     long_run):
    outage_s = 60.0 if long_run else 15.0
    db = "faults_outage"
    agent = Agent(tmp_path, PROVSCOPE_INFLUXDB_URL=influx_own.url,
                  PROVSCOPE_INFLUXDB_DATABASE=db, PROVSCOPE_AGENT_INTERVAL_S="1").start()
    agent_rss = RssSampler(agent.proc.pid)
    try:
        proc = job(tmp_path, JOB, F_RATE=str(RATE), F_SECONDS=str(outage_s + 8.0),
                   F_SERIES=str(SERIES))
        run_id = wait_line(proc, "RUN").split()[1]
        job_rss = RssSampler(proc.pid)
        time.sleep(3.0)
        down = time.monotonic()
        influx_own.stop()
        time.sleep(outage_s)
        influx_own.start()
        up = time.monotonic()
        out = result(proc, timeout_s=outage_s + 120)
        job_rss.stop()
        steps = out["steps"]
        wait_until(lambda: len(influx_steps(influx_own, db, run_id)) >= steps, 120,
                   "every train point in InfluxDB")
        wait_until(lambda: sum(map(len, _probe_series(influx_own, db, run_id).values()))
                   >= steps * SERIES, 60, "every probe point in InfluxDB")
        status = agent.status()
    finally:
        agent_rss.stop()
        rc = agent.stop()
    assert rc == 0, agent.log()
    assert out["errors"] == 0 and out["flushed"]
    # Zero lost, zero duplicated, in order: time order is step order in every series.
    assert influx_steps(influx_own, db, run_id) == list(range(steps))
    probes = _probe_series(influx_own, db, run_id)
    assert sorted(probes) == [str(k) for k in range(SERIES)]
    for k, seqs in probes.items():
        assert seqs == list(range(steps)), f"probe series {k}"
    influx = status["exporters"]["influxdb"]
    assert influx["points_dropped_total"] == 0, influx
    # The outage really went through the spool (and out of it again).
    assert influx["points_spooled_total"] > RATE * (SERIES + 1) * outage_s * 0.5, influx
    assert influx["points_replayed_total"] == influx["points_spooled_total"], influx
    assert influx["spool_bytes"] == 0, influx
    # Memory bounded: what the outage held went to disk, not into the agent or the job.
    base = max(agent_rss.between(down - 2.5, down))
    peak = max(agent_rss.between(down, up + 5.0))
    spooled = int(influx["points_spooled_total"])
    print(f"outage {outage_s:.0f}s: {steps} steps, {steps * (SERIES + 1)} points, "
          f"{spooled} spooled and replayed, agent RSS {base / MiB:.1f} -> peak "
          f"{peak / MiB:.1f} MiB, job peak RSS {max(r for _, r in job_rss.samples) / MiB:.1f}"
          f" MiB, worst job step {out['worst_step_s'] * 1e3:.1f} ms")
    assert peak - base < 32 * MiB, (base, peak)
    job_base = max(job_rss.between(down - 2.5, down))
    job_peak = max(job_rss.between(down, up))
    assert job_peak - job_base < 16 * MiB, (job_base, job_peak)
