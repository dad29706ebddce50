"""Where records go, in words: URLs without credentials, relative paths anchored."""

from __future__ import annotations

from pathlib import Path

import pytest

from provscope.config import load_config
from provscope.destinations import (
    absolute_paths,
    describe,
    destinations,
    names_destination,
    safe_url,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://alice:s3cret@db:5432/lineage?sslmode=require",
         "postgresql://db:5432/lineage?sslmode=require"),
        ("postgresql://alice@db/lineage", "postgresql://db/lineage"),
        ("http://admin:pw@influx:8086/", "http://influx:8086/"),
        ("https://influx:8086/?u=me&p=pw&token=t0k&db=x", "https://influx:8086/?u=me&db=x"),
        ("postgresql+psycopg://u:p@[::1]:5432/db", "postgresql+psycopg://[::1]:5432/db"),
        ("sqlite:////abs/provscope.db", "sqlite:////abs/provscope.db"),
        ("http://127.0.0.1:8086", "http://127.0.0.1:8086"),
    ],
)
def test_safe_url_drops_user_password_and_secret_parameters(url, expected):
    assert safe_url(url) == expected


def test_the_lineage_store_and_the_demo_use_the_one_helper():
    from provscope.exporters.lineage import engine

    from provscope.commands import demo

    assert engine.safe_url is safe_url
    assert demo.destinations is destinations


def test_absolute_paths_anchor_every_relative_path_to_the_base(tmp_path):
    config = load_config(environ={}, overrides={
        "embedded.path": "data/p.db",
        "lineage.url": "sqlite:///lin.db?timeout=5",
        "influxdb.spool_dir": "spool",
        "agent.socket_path": "run/agent.sock",
        "agent.collectors.filesystem.paths": ["/", "ckpt"],
    })
    out = absolute_paths(config, tmp_path)
    assert out.embedded.path == str(tmp_path / "data" / "p.db")
    assert out.lineage.url == f"sqlite:///{tmp_path / 'lin.db'}?timeout=5"
    assert out.influxdb.spool_dir == str(tmp_path / "spool")
    assert out.agent.socket_path == str(tmp_path / "run" / "agent.sock")
    assert out.agent.collectors.filesystem.paths == ("/", str(tmp_path / "ckpt"))
    # Everything else is untouched, and absolute input stays as it is.
    assert out.model_copy(update={"embedded": config.embedded, "lineage": config.lineage,
                                  "influxdb": config.influxdb, "agent": config.agent}) == config
    assert absolute_paths(out, "/elsewhere") == out


def test_absolute_paths_leave_server_urls_and_memory_databases_alone(tmp_path):
    for url in ("postgresql://u@db/x", "sqlite://", "sqlite:///:memory:"):
        config = load_config(environ={}, overrides={"lineage.url": url})
        assert absolute_paths(config, tmp_path).lineage.url == url


def test_destinations_name_stores_without_credentials_and_with_absolute_paths(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = destinations(load_config(environ={}))
    assert default["time_series"] == f"SQLite {tmp_path / 'provscope.db'}"
    assert default["lineage"] == f"SQLite {tmp_path / 'provscope.db'}"
    assert Path(default["spool"]).is_absolute()
    servers = destinations(load_config(environ={}, overrides={
        "influxdb.url": "http://writer:pw@influx:8086/", "influxdb.database": "runs",
        "lineage.url": "postgresql://bob:hunter2@pg:5432/lineage"}))
    assert servers["time_series"] == "InfluxDB http://influx:8086 (v1, database runs)"
    assert servers["lineage"] == "postgresql://pg:5432/lineage"
    line = describe(servers)
    assert "pw" not in line and "hunter2" not in line and "bob" not in line
    assert line.startswith("time series -> InfluxDB http://influx:8086")


def test_a_config_names_a_destination_when_any_destination_setting_differs(tmp_path):
    assert not names_destination(load_config(environ={}))
    assert not names_destination(load_config(environ={}, overrides={"torch.every": 3}))
    assert names_destination(load_config(environ={}, overrides={"embedded.path": "x.db"}))
    assert names_destination(load_config(environ={"PROVSCOPE_INFLUXDB_URL": "http://i:8086"}))
    path = tmp_path / "c.yaml"
    path.write_text("lineage:\n  url: sqlite:///l.db\n")
    assert names_destination(load_config(path, environ={}))
