"""Processes for the fault suite: a node agent and instrumented jobs in their own
processes (so they can be stopped, killed and measured), their RSS, and reading back.

Every process inherits the test's isolated environment (``tests/conftest.py``: private
socket, state directories under ``tmp_path``) plus the settings given here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from provscope import wire

#: Fast retries, so that an outage ends in seconds, not in the default 30 s backoff cap.
FAST = {
    "PROVSCOPE_INFLUXDB_MAX_BACKOFF_S": "0.5",
    "PROVSCOPE_INFLUXDB_RETRY_BACKOFF_S": "0.05",
    "PROVSCOPE_INFLUXDB_FLUSH_INTERVAL_S": "0.2",
    "PROVSCOPE_LINEAGE_FLUSH_INTERVAL_S": "0.2",
    "PROVSCOPE_PROMETHEUS_ENABLED": "false",
    "PROVSCOPE_CLIENT_TELEMETRY": "false",
}


def environ(**settings: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FAST)
    env.update(settings)
    return env


class Agent:
    """``provscope agent`` in the foreground, in its own process."""

    def __init__(self, tmp: Path, **settings: str) -> None:
        self.tmp = tmp
        self.env = environ(**settings)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout_s: float = 30.0) -> Agent:
        self.starts += 1
        log = open(self.tmp / f"agent-{self.starts}.log", "wb")  # noqa: SIM115
        code = "import sys; from provscope.cli import main; sys.exit(main(['agent']))"
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}: {self.log()}")
            try:
                if wire.request(self.socket, wire.STATUS, None, timeout_s=1.0):
                    return self
            except Exception:
                time.sleep(0.1)
        raise RuntimeError(f"agent did not answer: {self.log()}")

    @property
    def socket(self) -> str:
        return self.env["PROVSCOPE_AGENT_SOCKET_PATH"]

    def status(self) -> dict[str, Any]:
        return wire.request(self.socket, wire.STATUS, None, timeout_s=5.0)

    def log(self) -> str:
        return "".join((p.read_text(errors="replace")[-3000:])
                       for p in sorted(self.tmp.glob("agent-*.log")))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def job(tmp: Path, body: str, name: str = "job", **settings: str) -> subprocess.Popen[str]:
    """Start ``body`` (Python, dedented) as an instrumented job; stdout is a pipe."""
    script = tmp / f"{name}.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.Popen([sys.executable, str(script)], env=environ(**settings),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp)


def wait_line(proc: subprocess.Popen[str], prefix: str, timeout_s: float = 30.0) -> str:
    """The first stdout line of ``proc`` starting with ``prefix`` (blocks)."""
    found: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(prefix):
                found.append(line.strip())
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout_s)
    if not found:
        raise AssertionError(f"no {prefix!r} line from the job in {timeout_s}s")
    return found[0]


def result(proc: subprocess.Popen[str], timeout_s: float = 120.0) -> dict[str, Any]:
    """Wait for the job; its last stdout line is a JSON result. Asserts exit 0."""
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, f"job exited {proc.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"no result line\n{out[-2000:]}\n{err[-4000:]}"
    return json.loads(lines[-1])


class RssSampler:
    """Samples the resident set size of a process every ``every_s`` on a thread."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._every = every_s
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.proc.memory_info().rss))
            except psutil.Error:
                return
            self._stop.wait(self._every)

    def between(self, t0: float, t1: float) -> list[int]:
        return [rss for t, rss in self.samples if t0 <= t <= t1]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def influx_steps(server: Any, db: str, run_id: str, measurement: str = "train",
                 field: str = "step") -> list[int]:
    """The ``field`` values of a run's points in time order."""
    res = server.query(f"SELECT \"{field}\" FROM \"{measurement}\" WHERE run_id = '{run_id}'",
                       db)
    series = res["results"][0].get("series") or []
    return [int(v[1]) for s in series for v in s["values"]]


def wait_until(predicate: Any, timeout_s: float, what: str, step_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
