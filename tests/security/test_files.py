"""Files and sockets safe by construction (docs/security.md): the local attacks of the
temp-directory fallback are refused, and what provscope creates is owner-only."""

from __future__ import annotations

import os
import socket
import stat
import tempfile

import pytest
from provscope.agent.daemon import Agent, read_pid
from provscope.exporters.embedded import EmbeddedPointsExporter
from provscope.exporters.spool import Spool

from provscope.config import Config, load_config
from provscope.job.agent_client import AgentClient
from provscope.records import Point
from provscope.safefs import UnsafePath, open_private, private_dir
from provscope.wire import default_socket_path


def _config(sock) -> Config:
    return load_config(overrides={"agent.socket_path": str(sock), "prometheus.enabled": False,
                                  "embedded.path": str(sock.parent.parent / "p.db")})


@pytest.fixture
def tmp_fallback(tmp_path, monkeypatch):
    """No XDG_RUNTIME_DIR: the socket goes to <tmp>/provscope-<uid>, <tmp> = a fresh dir."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp: world-writable and sticky
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.delenv("PROVSCOPE_AGENT_SOCKET_PATH")
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    return shared / f"provscope-{os.getuid()}"


def test_the_fallback_directory_is_the_tmp_one(tmp_fallback):
    assert default_socket_path() == tmp_fallback / "agent.sock"


def test_a_world_writable_runtime_directory_is_refused_before_anything_is_written(tmp_fallback):
    tmp_fallback.mkdir(mode=0o777)
    os.chmod(tmp_fallback, 0o777)
    agent = Agent(load_config(overrides={"prometheus.enabled": False}))
    with pytest.raises(UnsafePath) as err:
        agent.start()
    line = str(err.value)
    assert "\n" not in line and str(tmp_fallback) in line and "writable by other users" in line
    assert os.listdir(tmp_fallback) == []  # no pid file, no socket


def test_a_symlinked_pid_file_is_refused_and_its_target_untouched(tmp_fallback, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("root-only contents\n")
    os.chmod(victim, 0o600)
    private_dir(tmp_fallback)
    (tmp_fallback / "agent.pid").symlink_to(victim)
    agent = Agent(load_config(overrides={"prometheus.enabled": False}))
    with pytest.raises(UnsafePath, match="symbolic link"):
        agent.start()
    assert victim.read_text() == "root-only contents\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert not (tmp_fallback / "agent.sock").exists()
    # `provscope stop` never reads a pid through the link either
    os.unlink(tmp_fallback / "agent.pid")
    victim.write_text(f"{os.getpid()}\n")
    (tmp_fallback / "agent.pid").symlink_to(victim)
    assert read_pid(tmp_fallback / "agent.sock") is None


def test_a_symlinked_runtime_directory_is_refused(tmp_fallback, tmp_path):
    elsewhere = tmp_path / "attacker-chosen"
    elsewhere.mkdir(mode=0o700)
    tmp_fallback.symlink_to(elsewhere)
    with pytest.raises(UnsafePath, match="symbolic link"):
        Agent(load_config(overrides={"prometheus.enabled": False})).start()
    assert os.listdir(elsewhere) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another uid")
def test_a_runtime_directory_of_another_user_is_refused(tmp_fallback):
    tmp_fallback.mkdir(mode=0o700)
    os.chown(tmp_fallback, 65534, 65534)
    with pytest.raises(UnsafePath, match="belongs to uid 65534"):
        Agent(load_config(overrides={"prometheus.enabled": False})).start()
    assert os.listdir(tmp_fallback) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another uid")
def test_a_pid_file_of_another_user_is_refused(tmp_fallback):
    private_dir(tmp_fallback)
    pid = tmp_fallback / "agent.pid"
    pid.write_text("1\n")
    os.chown(pid, 65534, 65534)
    with pytest.raises(UnsafePath, match="belongs to uid 65534"):
        Agent(load_config(overrides={"prometheus.enabled": False})).start()
    assert pid.read_text() == "1\n"


def test_the_agent_makes_its_directory_private_and_its_files_owner_only(tmp_fallback):
    old = os.umask(0)
    try:
        agent = Agent(load_config(overrides={"prometheus.enabled": False})).start()
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.lstat(tmp_fallback).st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(tmp_fallback / "agent.pid").st_mode) == 0o600
        assert stat.S_IMODE(os.lstat(tmp_fallback / "agent.sock").st_mode) == 0o600
    finally:
        agent.stop(2.0)


def test_a_regular_file_in_the_sockets_place_is_not_deleted(tmp_path):
    sock = tmp_path / "rt" / "agent.sock"
    private_dir(sock.parent)
    sock.write_text("not a socket")
    with pytest.raises(UnsafePath, match="not a socket"):
        Agent(_config(sock)).start()
    assert sock.read_text() == "not a socket"


def test_a_job_does_not_send_to_a_socket_in_a_directory_others_can_write(tmp_path):
    rt = tmp_path / "rt"
    rt.mkdir()
    os.chmod(rt, 0o777)
    sock = rt / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(1)
    try:
        assert AgentClient.try_connect(_config(sock)) is None
        os.chmod(rt, 0o700)
        client = AgentClient.try_connect(_config(sock))
        assert client is not None  # the same listener, now in a private directory
        client.shutdown(0.1)
    finally:
        listener.close()


def test_spool_files_are_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        with Spool(tmp_path / "spool" / "influxdb-x", max_bytes=1 << 20) as spool:
            spool.append(b"payload", 1)
            spool.label(kind="influxdb", destination="http://h:1", unit="points")
            spool.append(b"payload2", 1)
            assert spool.peek() is not None
            spool.ack()
    finally:
        os.umask(old)
    d = tmp_path / "spool" / "influxdb-x"
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
    files = list(d.iterdir())
    assert {p.suffix for p in files} >= {".seg", ".ack", ".json"}
    for p in files:
        assert stat.S_IMODE(os.lstat(p).st_mode) == 0o600, p


def test_a_planted_spool_symlink_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    d = tmp_path / "spool"
    private_dir(d)
    (d / "lock").symlink_to(victim)
    with pytest.raises(UnsafePath):
        Spool(d)
    assert victim.read_text() == "keep"
    with pytest.raises(UnsafePath):
        open_private(d / "lock")


def test_sqlite_file_wal_and_shm_are_owner_only_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        exporter = EmbeddedPointsExporter(str(tmp_path / "data" / "p.db"))
        exporter.write([Point("m", {"host": "h"}, {"v": 1.0}, 1)])
        paths = [tmp_path / "data" / n for n in ("p.db", "p.db-wal", "p.db-shm")]
        assert all(p.exists() for p in paths)
        for p in paths:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        exporter.shutdown(1.0)
    finally:
        os.umask(old)


def test_an_existing_world_readable_sqlite_file_is_made_owner_only(tmp_path):
    db = tmp_path / "old.db"
    exporter = EmbeddedPointsExporter(str(db))
    exporter.write([Point("m", {}, {"v": 1.0}, 1)])
    exporter.shutdown(1.0)
    os.chmod(db, 0o644)
    exporter = EmbeddedPointsExporter(str(db))
    exporter.write([Point("m", {}, {"v": 2.0}, 2)])
    exporter.shutdown(1.0)
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_listeners_bind_loopback_unless_configured():
    assert Config().prometheus.address == "127.0.0.1"
