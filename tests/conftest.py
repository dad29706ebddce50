"""Session fixtures: real InfluxDB and PostgreSQL servers, started once per test session.

Outside CI a missing server binary skips the tests that need it (with the reason); with
CI=true it fails them, so a CI machine without the servers cannot pass silently.
"""

from __future__ import annotations

import uuid

import pytest

from provscope.testing.required import unavailable
from provscope.testing.servers import InfluxServer, PostgresServer, ServerUnavailable


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
