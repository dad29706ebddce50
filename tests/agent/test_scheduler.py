"""The scheduler: fixed grid, skipped ticks, failing collectors, startup policies."""

from __future__ import annotations

import logging
import threading
import time
from typing import ClassVar

import pytest
from provscope.agent.scheduler import Scheduled, Scheduler

from provscope.errors import CollectorUnavailable
from provscope.records import Point


class Probe:
    """A collector that records when it was sampled; can be slow, failing or unopenable."""

    name: ClassVar[str] = "probe"

    def __init__(self, name="probe", *, sleep_s=0.0, fail=False, unavailable=0,
                 isolated=False, block: threading.Event | None = None) -> None:
        self.name = name
        self.isolated = isolated
        self.block = block
        self.sleep_s = sleep_s
        self.fail = fail
        self.unavailable = unavailable  # open() fails this many times
        self.opens = 0
        self.closed = False
        self.times: list[float] = []
        self.threads: set[str] = set()

    def open(self):
        self.opens += 1
        if self.opens <= self.unavailable:
            raise CollectorUnavailable(f"{self.name}: not here")

    def collect(self, now_ns):
        self.times.append(time.monotonic())
        self.threads.add(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("sensor exploded")
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.block is not None:
            self.block.wait()  # a driver call that does not return
        return [Point("cpu", {"host": "h"}, {"usage_percent": 1.0}, now_ns)]

    def close(self):
        self.closed = True

    def specs(self):
        return []


def _run(entries, seconds, **kw):
    got: list = []
    s = Scheduler(entries, got.extend, **kw)
    s.start()
    time.sleep(seconds)
    s.stop()
    return s, got


def test_samples_stay_on_the_grid_without_drift():
    probe = Probe()
    _, got = _run([Scheduled(probe, 0.05)], 1.0)
    t = probe.times
    assert 12 <= len(t) <= 21
    # Every sample sits near a point of start + k*interval: a late wake-up delays that
    # sample only, never the ones after it.
    deviation = sorted(min(d, 0.05 - d) for d in (((ti - t[0]) % 0.05) for ti in t))
    assert deviation[len(deviation) // 2] < 0.01, deviation
    assert probe.threads == {"provscope-collect"}
    assert len(got) == len(t) and probe.closed


def test_a_slow_collector_skips_missed_ticks_instead_of_bursting():
    slow = Probe("slow", sleep_s=0.12)
    s, _ = _run([Scheduled(slow, 0.05)], 0.65)
    gaps = [b - a for a, b in zip(slow.times, slow.times[1:], strict=False)]
    assert all(g >= 0.12 for g in gaps)  # never two samples back to back
    assert s.ticks_skipped >= 4
    assert s.status()["slow"]["skipped"] == s.ticks_skipped


def test_per_collector_intervals_are_honoured():
    fast, slow = Probe("fast"), Probe("slow")
    _run([Scheduled(fast, 0.05), Scheduled(slow, 0.25)], 0.6)
    assert len(slow.times) >= 2 and len(fast.times) >= 2 * len(slow.times)


def test_a_collector_that_keeps_raising_is_disabled_with_one_log_line(caplog):
    bad, good = Probe("bad", fail=True), Probe("good")
    with caplog.at_level(logging.ERROR, logger="provscope.scheduler"):
        s, got = _run([Scheduled(bad, 0.02), Scheduled(good, 0.02)], 0.5, max_failures=3)
    assert len(bad.times) == 3
    assert s.status()["bad"]["state"] == "disabled"
    assert "RuntimeError: sensor exploded" in s.status()["bad"]["reason"]
    assert len([r for r in caplog.records if "bad" in r.getMessage()]) == 1
    assert len(good.times) >= 8 and len(got) == len(good.times)
    assert s.collector_errors == 3


def test_startup_error_policies_error_ignore_retry(caplog):
    with pytest.raises(CollectorUnavailable, match="strict: not here"):
        Scheduler([Scheduled(Probe("strict", unavailable=1), 0.1, "error")], list).start()
    ignored = Probe("ignored", unavailable=1)
    retried = Probe("retried", unavailable=2)
    with caplog.at_level(logging.WARNING, logger="provscope.scheduler"):
        s, _ = _run([Scheduled(ignored, 0.02, "ignore"), Scheduled(retried, 0.02, "retry")],
                    0.6, retry_s=0.1)
    assert ignored.opens == 1 and not ignored.times
    assert s.status()["ignored"]["state"] == "unavailable"
    assert retried.opens == 3 and retried.times  # third open worked, then it sampled
    assert sum("retried" in r.getMessage() for r in caplog.records) == 1


def test_stop_wakes_the_thread_at_once_even_with_long_intervals():
    s = Scheduler([Scheduled(Probe(), 3600)], list)
    s.start()
    t0 = time.monotonic()
    s.stop()
    assert time.monotonic() - t0 < 0.5


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        Scheduler([Scheduled(Probe(), 0)], list)


# ------------------------------------------------------------------------------- lanes


def test_a_hung_collector_in_its_lane_does_not_stall_the_others(caplog):
    release = threading.Event()
    hung = Probe("hung", isolated=True, block=release)
    cpu = Probe("cpu")
    s = Scheduler([Scheduled(hung, 0.05), Scheduled(cpu, 0.05)], list)
    try:
        with caplog.at_level(logging.WARNING, logger="provscope.scheduler"):
            s.start()
            time.sleep(0.6)
            status = s.status()
            t0 = time.monotonic()
            s.stop(timeout_s=0.3)
            stop_took = time.monotonic() - t0
    finally:
        release.set()
    assert len(hung.times) == 1 and hung.threads == {"provscope-collect-hung"}
    assert len(cpu.times) >= 8 and cpu.threads == {"provscope-collect"}
    assert status["hung"]["lane"] is True and status["hung"]["overruns"] == 1
    assert status["hung"]["busy_s"] > 0.3
    assert "lane" not in status["cpu"]
    assert s.overruns == 1
    assert stop_took < 1.0
    assert not hung.closed and cpu.closed  # never closed under the hung call
    messages = [r.getMessage() for r in caplog.records]
    assert sum("hung: collect running for" in m for m in messages) == 1
    assert any("hung is stuck in collect" in m for m in messages)


def test_a_late_collect_is_counted_and_its_stale_points_dropped():
    slow = Probe("slow", isolated=True, sleep_s=0.12)
    s, got = _run([Scheduled(slow, 0.05)], 0.65)
    st = s.status()["slow"]
    assert st["samples"] >= 3 and got == []  # every collect overran its 0.05 s deadline
    assert st["late_points"] == st["samples"] and st["overruns"] == st["samples"]
    assert st["skipped"] >= 4  # the grid still skips the missed ticks
    ok = Probe("ok", isolated=True, sleep_s=0.12)
    s, got = _run([Scheduled(ok, 0.05, deadline_s=1.0)], 0.4)
    assert got and s.status()["ok"]["overruns"] == 0  # a longer deadline keeps them


def test_a_hung_nvml_call_does_not_stop_cpu_sampling(fake_nvml):
    from provscope.agent.collectors.nvml import NvmlCollector

    nv = fake_nvml()
    nv.hang = threading.Event()  # nvmlDeviceGetUtilizationRates blocks until set
    cpu = Probe("cpu")
    got: list = []
    s = Scheduler([Scheduled(NvmlCollector("h", nv, xid_events=False), 0.05),
                   Scheduled(cpu, 0.05)], got.extend)
    try:
        s.start()
        time.sleep(0.5)
        assert len(cpu.times) >= 6
        assert s.status()["nvml"]["overruns"] == 1
        nv.hang.set()  # the driver answers again: sampling goes on
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not any(p.measurement == "gpu" for p in got):
            time.sleep(0.02)
    finally:
        nv.hang.set()
        s.stop()
    assert any(p.measurement == "gpu" and p.fields["up"] == 1 for p in got)


def test_provscope_status_shows_a_lane_that_overran_or_hangs(sock_path, capsys, monkeypatch):
    import argparse

    from provscope.agent.ingest import IngestServer

    from provscope.commands.agent import run_status

    monkeypatch.delenv("PROVSCOPE_CONFIG", raising=False)
    row = {"state": "active", "interval_s": 1.0, "samples": 10, "errors": 0, "skipped": 40,
           "points": 20, "last_duration_s": 0.01, "reason": ""}
    status = {"pid": 1, "host": "h", "socket": str(sock_path), "uptime_s": 60.0,
              "points_per_s": 1.0, "points_total": 60.0, "dropped": 0.0, "ingest": {},
              "collectors": {"cpu": row, "nvml": {**row, "lane": True, "overruns": 2,
                                                  "late_points": 3, "busy_s": 42.0}}}
    srv = IngestServer(sock_path, on_points=list, on_records=list, status=lambda: status)
    srv.start()
    try:
        args = argparse.Namespace(config=None, overrides=[], socket=str(sock_path), json=False)
        assert run_status(args) == 0
    finally:
        srv.stop()
    out = capsys.readouterr().out
    assert "nvml        active       every 1s, 10 samples, 0 errors, 2 overruns, in a " \
           "collect for 42s" in out
    assert "cpu         active       every 1s, 10 samples, 0 errors\n" in out
