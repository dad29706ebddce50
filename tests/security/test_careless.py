"""Careless use gets one clear line and nothing lost: provscope run always runs the
command, URLs are checked at load, a corrupt or unreachable store is one line, and
spooled data is visible, replayable and droppable (`provscope spool`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _cli(args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "provscope.cli", *args], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("url", ["localhost:8086", "htp:/x", "http://:8086", "http://h:99999"])
def test_a_bad_influxdb_url_is_one_line_at_load(tmp_path, url):
    r = _cli(["--set", f"influxdb.url={url}", "config"], tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "influxdb.url" in lines[0] and "allowed:" in lines[0], r.stderr


def test_a_bad_lineage_url_is_one_line_at_load(tmp_path):
    r = _cli(["--set", "lineage.url=postgres:/x", "config"], tmp_path)
    assert r.returncode == 2 and "lineage.url" in r.stderr and len(r.stderr.splitlines()) == 1


def test_provscope_run_always_runs_the_command(tmp_path):
    marker = tmp_path / "ran"
    r = _cli(["--set", "influxdb.url=localhost:8086", "--set", "prometheus.port=0", "run", "--",
              sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x'); raise SystemExit(3)"],
             tmp_path)
    assert marker.exists()
    assert r.returncode == 3  # the command's own code
    assert "influxdb.url" in r.stderr and "Traceback" not in r.stderr


def test_a_corrupt_store_is_one_line_and_no_traceback(tmp_path):
    (tmp_path / "bad.db").write_bytes(b"not a database " * 100)
    for cmd in (["runs"], ["show", "abc"]):
        r = _cli([*cmd, "--lineage-url", f"sqlite:///{tmp_path / 'bad.db'}"], tmp_path)
        assert r.returncode == 1
        assert r.stderr.count("\n") == 1 and "not a database" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    r = _cli(["-v", "runs", "--lineage-url", f"sqlite:///{tmp_path / 'bad.db'}"], tmp_path)
    assert "Traceback" in r.stderr  # -v shows it


def test_an_empty_file_stays_empty_after_provscope_runs(tmp_path):
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    r = _cli(["runs", "--lineage-url", f"sqlite:///{empty}"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert empty.stat().st_size == 0
    assert not (tmp_path / "empty.db-wal").exists()


def test_an_unreachable_postgresql_is_one_line(tmp_path):
    from provscope.testing.servers import free_port

    r = _cli(["runs", "--lineage-url", f"postgresql://u:Spw-1234@127.0.0.1:{free_port()}/db"],
             tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and "Spw-1234" not in r.stderr


def test_spooled_points_are_reported_listed_replayed_and_dropped(tmp_path, influx_server,
                                                                influx_db):
    from provscope.testing.servers import free_port

    spool = tmp_path / "spool"
    wrong = f"http://127.0.0.1:{free_port()}"  # a mistyped port: nothing listens
    env = {"PROVSCOPE_INFLUXDB_SPOOL_DIR": str(spool), "PROVSCOPE_INFLUXDB_DATABASE": influx_db,
           "PROVSCOPE_PROMETHEUS_ENABLED": "false", "PROVSCOPE_CLIENT_TELEMETRY": "false"}
    job = ("import provscope\n"
           "with provscope.workflow('spooled') as run:\n"
           "    for i in range(25):\n"
           "        run.log(i, loss=1.0 / (i + 1))\n")
    (tmp_path / "job.py").write_text(job)
    r = subprocess.run([sys.executable, "job.py"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, **env, "PROVSCOPE_INFLUXDB_URL": wrong,
                            "PROVSCOPE_INFLUXDB_MAX_RETRIES": "0"}, timeout=120)
    assert r.returncode == 0, r.stderr
    left = [line for line in r.stderr.splitlines() if "still spooled" in line]
    assert len(left) == 1 and str(spool) in left[0], r.stderr
    spooled = int(left[0].split("provscope: ")[-1].split()[0])
    assert spooled >= 25  # every train point, plus the job's own telemetry if any

    status = _cli(["spool", "--json"], tmp_path, env)
    import json

    entries = json.loads(status.stdout)["spools"]
    influx = [e for e in entries if e["kind"] == "influxdb"]
    assert len(influx) == 1 and influx[0]["items"] == spooled and not influx[0]["busy"]
    assert influx[0]["destination"] == wrong
    name = os.path.basename(influx[0]["path"])

    # Not a store of this configuration: skipped with the hint, nothing lost.
    r = _cli(["spool", "replay"], tmp_path, {**env, "PROVSCOPE_INFLUXDB_URL": influx_server.url})
    assert "skipped" in r.stdout and "--influx-url" in r.stdout
    r = _cli(["spool", "replay", name, "--influx-url", influx_server.url], tmp_path, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{spooled} points replayed, 0 refused (dropped), 0 left" in r.stdout
    assert influx_server.count(influx_db, "train", "loss") == 25

    # drop: what is left of a lineage spool (none here) or of another job
    r = _cli(["spool", "drop", name], tmp_path, env)
    assert r.returncode == 0 and "dropped 0 points" in r.stdout
    assert json.loads(_cli(["spool", "--json"], tmp_path, env).stdout)["spools"] == [
        e for e in entries if e["kind"] != "influxdb"]
