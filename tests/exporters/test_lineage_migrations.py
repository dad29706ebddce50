"""Schema versions: upgrading an older database in place, refusing a newer one, bad URLs."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa
from provscope.exporters.base import ExportResult
from provscope.exporters.lineage.engine import create_lineage_engine
from provscope.exporters.lineage.exporter import SqlLineageExporter
from provscope.exporters.lineage.schema import (
    METADATA,
    SCHEMA_VERSION,
    SCHEMA_VERSION_TABLE,
    current_version,
    migrate,
)
from provscope.exporters.lineage.store import SqlLineageStore

from provscope.config import load_config
from provscope.errors import ConfigError, LineageSchemaError
from provscope.ids import new_id
from provscope.records import RunRecord, TaskRecord


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lineage.db'}"
    return request.getfixturevalue("postgres_url")


def test_fresh_database_gets_the_current_schema(url):
    engine = create_lineage_engine(url)
    assert migrate(engine) == SCHEMA_VERSION
    assert migrate(engine) == SCHEMA_VERSION  # a second run is a no-op
    inspector = sa.inspect(engine)
    for table in METADATA.sorted_tables:
        got = {c["name"] for c in inspector.get_columns(table.name)}
        assert got == {c.name for c in table.columns}, table.name
    indexes = {i["name"] for i in inspector.get_indexes("tasks")}
    assert {"ix_tasks_run_id", "ix_tasks_run_id_start_ns"} <= indexes
    with engine.connect() as conn:
        versions = conn.execute(sa.select(SCHEMA_VERSION_TABLE.c.version)).scalars().all()
    assert sorted(versions) == list(range(1, SCHEMA_VERSION + 1))
    engine.dispose()


def test_version1_database_is_upgraded_in_place_keeping_its_rows(url):
    engine = create_lineage_engine(url)
    assert migrate(engine, target=1) == 1
    run_id, task_id = new_id(), new_id()
    with engine.begin() as conn:
        assert "cpu_seconds" not in {c["name"] for c in sa.inspect(conn).get_columns("tasks")}
        conn.execute(sa.text("INSERT INTO runs (run_id, name) VALUES (:r, 'old')"), {"r": run_id})
        conn.execute(sa.text("INSERT INTO tasks (task_id, run_id, name, start_ns, status) "
                             "VALUES (:t, :r, 'train', 5, 'running')"),
                     {"t": task_id, "r": run_id})
    engine.dispose()

    store = SqlLineageStore(url)  # writes migrate on first use
    store.write([TaskRecord(task_id, run_id, status="finished", end_ns=9,
                            resources={"cpu_seconds": 3.0})])
    with store.engine.connect() as conn:
        assert current_version(conn) == SCHEMA_VERSION
        row = conn.execute(sa.text("SELECT * FROM tasks")).mappings().one()
        assert conn.execute(sa.text("SELECT name FROM runs")).scalar_one() == "old"
    assert (row["name"], row["start_ns"], row["end_ns"], row["status"], row["cpu_seconds"]) \
        == ("train", 5, 9, "finished", 3.0)
    store.close()


def _make_newer(url: str) -> None:
    engine = create_lineage_engine(url)
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(SCHEMA_VERSION_TABLE.insert().values(version=SCHEMA_VERSION + 1,
                                                          applied_ns=1))
    engine.dispose()


def test_newer_schema_raises_one_line_error_naming_both_versions(url):
    _make_newer(url)
    engine = create_lineage_engine(url)
    with pytest.raises(LineageSchemaError) as info:
        migrate(engine)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"version {SCHEMA_VERSION + 1}" in msg and f"({SCHEMA_VERSION})" in msg
    assert "upgrade provscope" in msg
    engine.dispose()


def test_exporter_keeps_records_while_schema_is_newer_and_logs_once(url, caplog):
    _make_newer(url)
    exporter = SqlLineageExporter(url)
    batch = [RunRecord(new_id(), name="kept")]
    with caplog.at_level(logging.ERROR, logger="provscope.lineage"):
        assert exporter.export(batch) is ExportResult.RETRY
        assert exporter.export(batch) is ExportResult.RETRY
    errors = [r for r in caplog.records if "newer than this provscope" in r.getMessage()]
    assert len(errors) == 1
    assert "newer than this provscope" in exporter.last_error

    # Once the database is usable again (here: the newer version row removed), the kept
    # batch goes through.
    engine = create_lineage_engine(url)
    with engine.begin() as conn:
        conn.execute(SCHEMA_VERSION_TABLE.delete().where(
            SCHEMA_VERSION_TABLE.c.version > SCHEMA_VERSION))
    assert exporter.export(batch) is ExportResult.SUCCESS
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT name FROM runs")).scalar_one() == "kept"
    engine.dispose()
    exporter.shutdown(1)


@pytest.mark.parametrize("bad", ["mysql://u@h/db", "not a url", "mongodb://h/x"])
def test_unsupported_lineage_url_is_a_one_line_config_error(bad):
    config = load_config(overrides={"lineage.url": bad}, environ={})
    with pytest.raises(ConfigError) as info:
        SqlLineageExporter.from_config(config)
    assert "sqlite:///" in str(info.value) and "postgresql://" in str(info.value)
    assert "\n" not in str(info.value)


def test_postgresql_url_maps_to_the_psycopg3_driver():
    engine = create_lineage_engine("postgresql://u@127.0.0.1:1/db")
    assert engine.url.drivername == "postgresql+psycopg"
    engine.dispose()


def test_default_lineage_url_is_the_embedded_file(tmp_path):
    config = load_config(overrides={"embedded.path": str(tmp_path / "e.db")}, environ={})
    exporter = SqlLineageExporter.from_config(config)
    assert exporter.export([RunRecord(new_id(), name="x")]) is ExportResult.SUCCESS
    assert (tmp_path / "e.db").exists()
    assert (exporter.batch_size, exporter.flush_interval_s) == (
        config.lineage.batch_size, config.lineage.flush_interval_s)
    exporter.shutdown(1)
