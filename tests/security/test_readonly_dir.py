"""A job started where its embedded store cannot be written loses nothing and waits for
nothing: its records go to a stand-in under the state directory (one line says where),
and the next provscope process that can write the named file moves them in."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = """
import provscope
with provscope.workflow("readonly-dir") as run:
    for step, _ in run.steps(range(5)):
        run.log(loss=1.0 / (step + 1))
"""


def _read_only(path: Path) -> None:
    """Make ``path`` read-only for this process: its mode when not root, else a
    read-only bind mount over it (skipped where mounting is not allowed)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    done = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount as root here: {done.stderr.decode().strip()}")
    done = subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True)
    if done.returncode != 0:
        subprocess.run(["umount", str(path)], check=False)
        pytest.skip(f"cannot remount read-only here: {done.stderr.decode().strip()}")


def _writable(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o755)
    else:
        subprocess.run(["umount", str(path)], check=True)


def _job(cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - t0


def _train_points(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(DISTINCT time_ns) FROM points "
                            "WHERE measurement = 'train'").fetchone()[0]


def test_a_read_only_directory_gets_a_stand_in_that_is_moved_back(tmp_path):
    workdir = tmp_path / "ro"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVSCOPE_")}
    env.update(XDG_STATE_HOME=str(tmp_path / "state"),
               PROVSCOPE_AGENT_SOCKET_PATH=str(tmp_path / "no-agent.sock"),
               PROVSCOPE_CLIENT_TELEMETRY="false")
    _read_only(workdir)
    try:
        done, seconds = _job(workdir, env)
    finally:
        _writable(workdir)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "cannot write" in line]
    assert len(lines) == 1, done.stderr
    assert "read-only file system" in lines[0] or "permission denied" in lines[0]
    assert "Traceback" not in done.stderr
    assert seconds < 8, f"the job waited {seconds:.1f} s at exit"  # no retry deadline
    (stand_in,) = (tmp_path / "state" / "provscope" / "fallback").glob("*/provscope.db")
    assert str(stand_in) in lines[0]
    assert stand_in.stat().st_mode & 0o777 == 0o600
    assert _train_points(stand_in) == 5
    assert not (workdir / "provscope.db").exists()

    # The directory can be written again: the next job there moves the records in.
    done, _ = _job(workdir, env)
    assert done.returncode == 0, done.stderr
    assert "moved" in done.stderr and not stand_in.exists()
    assert _train_points(workdir / "provscope.db") == 10
    with sqlite3.connect(workdir / "provscope.db") as conn:
        names = [n for (n,) in conn.execute("SELECT name FROM runs")]
    assert names.count("readonly-dir") == 2
