"""Session fixtures: real InfluxDB and PostgreSQL servers, started once per test session.

Outside CI a missing server binary skips the tests that need it (with the reason); with
CI=true it fails them, so a CI machine without the servers cannot pass silently.
"""

from __future__ import annotations

import uuid

import pytest

from provscope.testing.required import unavailable
from provscope.testing.servers import (
    InfluxServer,
    PostgresServer,
    ServerUnavailable,
    VictoriaMetricsServer,
)


def _running(server_class):
    try:
        server = server_class()
    except ServerUnavailable as exc:
        unavailable(exc)
    return server.start()


@pytest.fixture(scope="session")
def influx_server():
    """A running InfluxDB 1.x shared by the session (do not stop it; use ``influx_own``)."""
    server = _running(InfluxServer)
    yield server
    server.close()


@pytest.fixture
def influx_own():
    """A private InfluxDB a test may stop and restart (outage tests)."""
    server = _running(InfluxServer)
    yield server
    server.close()


@pytest.fixture
def influx_db(influx_server) -> str:
    """A fresh, empty database name on the shared InfluxDB."""
    name = "t_" + uuid.uuid4().hex[:12]
    influx_server.create_database(name)
    return name


@pytest.fixture(scope="session")
def victoria_server():
    """A running VictoriaMetrics shared by the session: InfluxDB's v2 write API
    (``/api/v2/write``) and v1 ``/write`` on a real server."""
    server = _running(VictoriaMetricsServer)
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres_server():
    """A running PostgreSQL shared by the session."""
    server = _running(PostgresServer)
    yield server
    server.close()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """URL of a fresh, empty database on the shared PostgreSQL."""
    return postgres_server.create_database("t_" + uuid.uuid4().hex[:12])


@pytest.fixture(autouse=True)
def _outside_any_launcher(monkeypatch):
    """Every test starts outside any launcher job (torchrun, SLURM, MPI) and run: the
    run id rule (provscope.job.identity) would otherwise join the suite's own job.
    Tests that simulate a launcher set its variables themselves."""
    from provscope.job.identity import LAUNCHER_VARS

    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _isolated_from_this_machine(tmp_path, monkeypatch):
    """Every test runs as if alone on the machine: no agent that happens to listen on the
    default socket is reachable, nothing is written into the user's directories or the
    repository, and no PROVSCOPE_* variable of the caller's shell applies.

    - ``XDG_RUNTIME_DIR`` is a fresh short directory (AF_UNIX paths are <= 107 bytes) and
      ``PROVSCOPE_AGENT_SOCKET_PATH`` points into it: the default socket is private.
    - ``HOME`` and the ``XDG_*`` state, cache, config and data directories (the spools)
      live under the test's ``tmp_path``; the working directory is ``tmp_path`` too, so a
      relative ``provscope.db`` lands there.
    - What provscope reports once per process (bad settings, unknown variables) is
      reported once per test.
    """
    import os
    import shutil
    import tempfile

    from provscope import config as config_module
    from provscope.job import run as run_module

    for name in list(os.environ):
        if name.startswith("PROVSCOPE_"):
            monkeypatch.delenv(name)
    runtime = tempfile.mkdtemp(prefix="ps-rt-", dir="/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    monkeypatch.setenv("PROVSCOPE_AGENT_SOCKET_PATH",
                       os.path.join(runtime, "provscope", "agent.sock"))
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    for var, sub in (("XDG_STATE_HOME", ".local/state"), ("XDG_CACHE_HOME", ".cache"),
                     ("XDG_CONFIG_HOME", ".config"), ("XDG_DATA_HOME", ".local/share")):
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config_module, "_reported_env", set())
    monkeypatch.setattr(run_module, "_reported_settings", set())
    yield
    shutil.rmtree(runtime, ignore_errors=True)


def pytest_addoption(parser):
    """``--long``: the fault suite's full outage lengths and many more fuzzing cases."""
    parser.addoption("--long", action="store_true", default=False,
                     help="long fault timings (60 s outages) and x20 fuzzing cases")


@pytest.fixture(scope="session")
def long_run(request) -> bool:
    """True under ``--long``."""
    return bool(request.config.getoption("--long"))
