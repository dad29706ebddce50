"""Schema versions: upgrading an older database in place, refusing a newer one, bad URLs."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa
from provscope.exporters.base import ExportResult
from provscope.exporters.lineage.engine import create_lineage_engine
from provscope.exporters.lineage.exporter import SqlLineageExporter
from provscope.exporters.lineage.schema import (
    ENTITIES,
    METADATA,
    MIGRATIONS,
    RELATIONS,
    SCHEMA_VERSION,
    SCHEMA_VERSION_TABLE,
    current_version,
    migrate,
)
from provscope.exporters.lineage.store import SqlLineageStore

from provscope.config import load_config
from provscope.errors import ConfigError, LineageSchemaError
from provscope.ids import content_id, entity_key, new_id
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
    # Checked when the configuration is loaded, before any exporter exists.
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"lineage.url": bad}, environ={})
    assert "lineage.url" in str(info.value)
    assert "sqlite:///" in str(info.value) and "postgresql://" in str(info.value)
    assert "\n" not in str(info.value)
    # The exporter still refuses one given directly (not through the configuration).
    with pytest.raises(ConfigError):
        SqlLineageExporter(bad)


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


# The version just before entities were keyed by content (found by name, so that steps
# appended later do not move it).
_BEFORE_IDENTITY = next(i for i, step in enumerate(MIGRATIONS)
                        if step.__name__.endswith("_entity_identity"))
_D = "sha256:" + "11" * 32


def test_entity_identity_migration_rekeys_merges_and_links_existing_rows(url):
    """A database of the previous version, written when every use minted an entity, is
    upgraded in place: one entity per content, relations moved (duplicates collapse),
    the old checkpoint->model attribute becomes a ``derived`` relation, and ``informed``
    relations are written for what the old rows imply."""
    engine = create_lineage_engine(url)
    assert migrate(engine, target=_BEFORE_IDENTITY) == _BEFORE_IDENTITY
    t = 1_700_000_000_000_000_000
    runs = [new_id() for _ in range(3)]
    tasks = [new_id() for _ in range(3)]
    copies = [new_id() for _ in range(4)]  # four records of one file's bytes
    model, ckpt, shared, big, remote = (new_id() for _ in range(5))
    producer, consumer = new_id(), new_id()
    entities = [
        *({"entity_id": eid, "kind": "dataset", "uri": f"file:///n{i}/train.csv",
           "name": f"copy-{i}", "digest": _D, "size_bytes": 10,
           "run_id": runs[min(i, 2)], "created_ns": t + (1, 0, 2, 3)[i]}
          for i, eid in enumerate(copies)),
        {"entity_id": model, "kind": "model", "name": "Net", "run_id": runs[0],
         "attributes": {"parameters_total": 9}, "created_ns": t},
        {"entity_id": ckpt, "kind": "checkpoint", "uri": "file:///out/c.pt",
         "digest": "sha256:" + "22" * 32, "run_id": runs[0], "created_ns": t + 5,
         "attributes": {"model_entity_id": model, "step": 4}},
        {"entity_id": shared, "kind": "dataset", "uri": "file:///out/shards",
         "digest": "sha256:" + "33" * 32, "run_id": runs[1], "created_ns": t + 6},
        {"entity_id": big, "kind": "file", "uri": "file:///data/big.bin", "size_bytes": 1 << 40,
         "attributes": {"mtime_ns": 5, "digest_skipped": "too big"}, "run_id": runs[2],
         "created_ns": t + 7},
        {"entity_id": remote, "kind": "dataset", "uri": "s3://bucket/shard-0",
         "run_id": runs[2], "created_ns": t + 8},
    ]
    relations = [
        *({"relation": "used", "subject_id": tasks[min(i, 2) if i < 3 else 0],
           "object_id": eid, "role": "dataset", "run_id": runs[min(i, 2) if i < 3 else 0],
           "time_ns": t + 10 + i} for i, eid in enumerate(copies)),
        {"relation": "used", "subject_id": tasks[0], "object_id": model, "role": "model",
         "run_id": runs[0], "time_ns": t + 20},
        {"relation": "generated", "subject_id": tasks[0], "object_id": ckpt,
         "role": "checkpoint", "run_id": runs[0], "time_ns": t + 21},
        {"relation": "generated", "subject_id": producer, "object_id": shared, "role": "",
         "run_id": runs[1], "time_ns": t + 22},
        {"relation": "used", "subject_id": consumer, "object_id": shared, "role": "",
         "run_id": runs[2], "time_ns": t + 23},
    ]
    with engine.begin() as conn:  # executemany wants every row to name every column
        for table, rows in ((ENTITIES, entities), (RELATIONS, relations)):
            names = {c.name for c in table.columns if not c.name.endswith("time")}
            conn.execute(table.insert(), [dict.fromkeys(names) | row for row in rows])
    engine.dispose()

    store = SqlLineageStore(url)  # writes migrate on first use
    store.write([RunRecord(new_id(), name="after")])
    with store.engine.connect() as conn:
        assert current_version(conn) == SCHEMA_VERSION
        indexes = {i["name"] for i in sa.inspect(conn).get_indexes("relations")}
        assert "ix_relations_object_id_relation" in indexes
        assert "ix_relations_object_id" not in indexes
        ents = {r["entity_id"]: dict(r) for r in conn.execute(
            sa.text("SELECT * FROM entities")).mappings()}
        rels = [dict(r) for r in conn.execute(sa.text(
            "SELECT relation, subject_id, object_id, role, run_id, time_ns FROM relations "
            "ORDER BY relation, time_ns")).mappings()]
    store.close()

    data = content_id(f"digest:{_D}")
    new_ckpt = content_id("digest:sha256:" + "22" * 32)
    new_shared = content_id("digest:sha256:" + "33" * 32)
    new_big = content_id(entity_key(uri="file:///data/big.bin", size_bytes=1 << 40,
                                    mtime_ns=5))
    new_remote = content_id("uri:s3://bucket/shard-0")
    assert set(ents) == {data, model, new_ckpt, new_shared, new_big, new_remote}
    merged = ents[data]
    assert (merged["name"], merged["uri"], merged["run_id"], merged["created_ns"]) == \
        ("copy-1", "file:///n1/train.csv", runs[1], t)  # the earliest record wins
    used = [(r["subject_id"], r["run_id"], r["time_ns"]) for r in rels
            if r["relation"] == "used" and r["object_id"] == data]
    # tasks[0] used two copies of the bytes: one relation, the earlier.
    assert sorted(used) == sorted([(tasks[0], runs[0], t + 10), (tasks[1], runs[1], t + 11),
                                   (tasks[2], runs[2], t + 12)])
    derived = [(r["subject_id"], r["object_id"], r["role"], r["run_id"]) for r in rels
               if r["relation"] == "derived"]
    assert derived == [(new_ckpt, model, "model", runs[0])]
    informed = [(r["subject_id"], r["object_id"], r["run_id"]) for r in rels
                if r["relation"] == "informed"]
    assert informed == [(consumer, producer, runs[2])]
    old_ids = {*copies, ckpt, shared, big, remote}
    assert not old_ids & ({r["object_id"] for r in rels} | {r["subject_id"] for r in rels})
