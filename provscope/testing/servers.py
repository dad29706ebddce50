"""Throwaway real servers for tests and benchmarks: InfluxDB 1.x, PostgreSQL, Prometheus,
VictoriaMetrics (which takes InfluxDB's v1 ``/write`` and v2 ``/api/v2/write``).

Each server runs from the Debian binaries in a temp dir on a free 127.0.0.1 port, is
stopped by pid, and can be stopped and started again on the same port and data (to test
outages). A missing binary raises ``ServerUnavailable`` naming the package to install.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

__all__ = [
    "InfluxServer",
    "PostgresServer",
    "PrometheusServer",
    "ServerUnavailable",
    "VictoriaMetricsServer",
    "free_port",
]


class ServerUnavailable(RuntimeError):
    """The server's binary is not installed (the message names the package)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not become ready in {timeout_s:.0f}s\n{tail}")


def _stop_pid(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class InfluxServer:
    """InfluxDB 1.x (``influxd``) on a free port with its data in a temp dir.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
    """

    def __init__(self, root: str | None = None) -> None:
        binary = shutil.which("influxd")
        if not binary:
            raise ServerUnavailable("influxd not found: apt-get install -y influxdb")
        self.binary: str = binary
        self.dir = Path(root or tempfile.mkdtemp(prefix="provscope-influx-"))
        self.port = free_port()
        self.rpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        conf = self.dir / "influxdb.conf"
        conf.write_text(
            f"""reporting-enabled = false
bind-address = "127.0.0.1:{self.rpc_port}"
[meta]
  dir = "{self.dir}/meta"
[data]
  dir = "{self.dir}/data"
  wal-dir = "{self.dir}/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[http]
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
  max-body-size = 0
[logging]
  level = "warn"
"""
        )
        self.conf = conf

    def start(self, timeout_s: float = 30.0) -> InfluxServer:
        """Start (or restart) on the same port and data. Blocks until /ping answers."""
        log = open(self.dir / "influxd.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [self.binary, "run", "-config", str(self.conf)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        _wait(self.ping, timeout_s, "influxd", self.dir / "influxd.log")
        return self

    def ping(self) -> bool:
        with urllib.request.urlopen(self.url + "/ping", timeout=1) as r:
            return r.status == 204

    def stop(self) -> None:
        _stop_pid(self.proc)
        self.proc = None

    def query(self, q: str, db: str | None = None) -> dict:
        """Run InfluxQL through /query; returns the decoded JSON (epoch=ns)."""
        params = {"q": q, "epoch": "ns"}
        if db:
            params["db"] = db
        data = urllib.parse.urlencode(params).encode()
        with urllib.request.urlopen(self.url + "/query", data=data, timeout=30) as r:
            return json.loads(r.read())

    def create_database(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"')

    def count(self, db: str, measurement: str, field: str) -> int:
        """Number of points of ``measurement.field`` in ``db``."""
        res = self.query(f'SELECT count("{field}") FROM "{measurement}"', db)
        series = res["results"][0].get("series")
        return int(series[0]["values"][0][1]) if series else 0

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pg_bin() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise ServerUnavailable("PostgreSQL not found: apt-get install -y postgresql")
    return str(Path(found[-1]).parent)


class PostgresServer:
    """PostgreSQL (Debian binaries) with trust auth on a free port, data in a temp dir.

    Run as root, ``initdb`` and the server run as the ``postgres`` user via ``runuser``.

    Attributes:
        url: ``postgresql://postgres@127.0.0.1:<port>/postgres``.
    """

    def __init__(self, root: str | None = None) -> None:
        self.bin = _pg_bin()
        self.dir = Path(root or tempfile.mkdtemp(prefix="provscope-pg-"))
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-locale")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [f"{self.bin}/{tool}", *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> PostgresServer:
        """Start (or restart) on the same port and data. Blocks until it accepts."""
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "pg.log"), "-w",
                  "start", "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off "
                  "-c max_connections=200")
        return self

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        """Create a database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + "/" + name

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrometheusServer:
    """Prometheus scraping the given targets every ``interval_s``."""

    def __init__(self, targets: list[str], interval_s: float = 1.0) -> None:
        binary = shutil.which("prometheus")
        if not binary:
            raise ServerUnavailable("prometheus not found: apt-get install -y prometheus")
        self.binary: str = binary
        self.dir = Path(tempfile.mkdtemp(prefix="provscope-prom-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = self.dir / "prometheus.yml"
        cfg.write_text(json.dumps({
            # Prometheus durations take no decimals: "1500ms", not "1.5s".
            "global": {"scrape_interval": f"{round(interval_s * 1000)}ms",
                       "scrape_timeout": f"{round(interval_s * 1000)}ms"},
            "scrape_configs": [{"job_name": "provscope",
                                "static_configs": [{"targets": targets}]}],
        }))
        self.config = cfg
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> PrometheusServer:
        log = open(self.dir / "prometheus.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.dir}/tsdb",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        _wait(lambda: urllib.request.urlopen(self.url + "/-/ready", timeout=1).status == 200,
              timeout_s, "prometheus", self.dir / "prometheus.log")
        return self

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def close(self) -> None:
        _stop_pid(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class VictoriaMetricsServer:
    """VictoriaMetrics (Debian's ``victoria-metrics``) on a free port, data in a temp dir.

    It accepts line protocol on ``/write`` (v1) and ``/api/v2/write`` (v2: org, bucket and
    token are accepted and not checked); a field is stored as the series
    ``<measurement>_<field>`` with the tags as labels (v1 adds ``db``). Read back with
    ``export`` (``/api/v1/export``). ``-search.latencyOffset=0s`` makes points queryable
    at once.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
    """

    def __init__(self) -> None:
        binary = shutil.which("victoria-metrics")
        if not binary:
            raise ServerUnavailable("victoria-metrics not found: apt-get install -y "
                                    "victoria-metrics")
        self.binary: str = binary
        self.dir = Path(tempfile.mkdtemp(prefix="provscope-vm-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> VictoriaMetricsServer:
        """Start (or restart) on the same port and data. Blocks until /health answers."""
        log = open(self.dir / "vm.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [self.binary, f"-httpListenAddr=127.0.0.1:{self.port}",
             f"-storageDataPath={self.dir}/data", "-retentionPeriod=100y",
             "-search.latencyOffset=0s", "-search.disableCache", "-loggerLevel=WARN"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        _wait(lambda: urllib.request.urlopen(self.url + "/health", timeout=1).status == 200,
              timeout_s, "victoria-metrics", self.dir / "vm.log")
        return self

    def export(self, match: str = '{__name__!=""}') -> list[dict]:
        """Every stored sample of the series ``match`` selects: one dict per series
        (``metric`` labels, ``values``, ``timestamps`` in milliseconds). Flushes first."""
        with urllib.request.urlopen(self.url + "/internal/force_flush", timeout=10):
            pass
        q = urllib.parse.urlencode({"match[]": match, "start": "0"})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{q}", timeout=30) as r:
            return [json.loads(line) for line in r.read().decode().splitlines() if line]

    def stop(self) -> None:
        _stop_pid(self.proc)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
