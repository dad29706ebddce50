"""The lineage schema (SQLAlchemy Core), identical on SQLite and PostgreSQL, and its migrations.

Tables (W3C PROV terms in brackets):

- ``runs`` [prov:Activity + prov:Plan]: one row per workflow run (every rank and launcher
  of a job writes into it; ``origin`` says whose values it holds).
- ``tasks`` [prov:Activity]: tasks, epochs, steps, evals, ... of a run, with the resource
  summary filled at task end.
- ``entities`` [prov:Entity]: datasets, models, checkpoints, configs, files, artifacts,
  keyed by content (``provscope.ids.entity_key``): one row per file content, however
  many runs recorded it; ``run_id`` is the run that recorded it first.
- ``relations``: ``used`` (prov:used, task -> entity), ``generated`` (prov:wasGeneratedBy,
  entity <- task), ``informed`` (prov:wasInformedBy, task -> task) and ``derived``
  (prov:wasDerivedFrom, entity -> entity), with a role.
- ``schema_version``: one row per applied migration step.

Times are stored twice: ``*_ns`` BIGINT Unix nanoseconds (exact, the same unit as the
InfluxDB series, what joins and sorting use) and ``*_time`` TIMESTAMP WITH TIME ZONE
(derived at write time, what Grafana's ``$__timeFilter`` and people typing SQL use).

Migrations are a numbered list of steps; ``migrate(engine)`` applies the missing ones in
one transaction each and records them in ``schema_version``. A database written by a
newer provscope (a version above ``SCHEMA_VERSION``) raises ``LineageSchemaError``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa
from provscope.exporters.lineage.rekey import rekey_entities
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.schema import SchemaItem

from provscope.errors import LineageSchemaError

__all__ = [
    "ENTITIES",
    "JSON_COLUMNS",
    "METADATA",
    "MIGRATIONS",
    "RELATIONS",
    "RESOURCE_COLUMNS",
    "RUNS",
    "SCHEMA_VERSION",
    "SCHEMA_VERSION_TABLE",
    "TASKS",
    "TIME_COLUMNS",
    "current_version",
    "migrate",
]

# none_as_null: a record that does not know its config must store SQL NULL (so that the
# merge's COALESCE keeps the other record's value), not the JSON literal 'null'.
_JSON = sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
_TS = sa.DateTime(timezone=True)

# Task resource summary keys (TaskRecord.resources) that get their own column.
RESOURCE_COLUMNS = (
    "cpu_seconds", "peak_rss_bytes", "gpu_seconds", "gpu_energy_joules", "read_bytes",
    "write_bytes",
)
_RESOURCE_TYPES = {
    "cpu_seconds": sa.Float, "peak_rss_bytes": sa.BigInteger, "gpu_seconds": sa.Float,
    "gpu_energy_joules": sa.Float, "read_bytes": sa.BigInteger, "write_bytes": sa.BigInteger,
}

# Columns added by migration step 2 (absent from a version-1 database).
_V2_TASK_COLUMNS = (*RESOURCE_COLUMNS, "resources")


def _runs(md: sa.MetaData, version: int) -> sa.Table:
    cols: list[SchemaItem] = [
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("name", sa.Text),
        sa.Column("parent_run_id", sa.String(64)),
        sa.Column("campaign", sa.Text),
        # "user" is a reserved word in PostgreSQL (SELECT user returns the session user).
        sa.Column("user_name", sa.Text),
        sa.Column("host", sa.Text),
        sa.Column("start_ns", sa.BigInteger),
        sa.Column("end_ns", sa.BigInteger),
        sa.Column("start_time", _TS),
        sa.Column("end_time", _TS),
        sa.Column("status", sa.String(32)),
        sa.Column("config", _JSON),
        sa.Column("code_commit", sa.String(64)),
        sa.Column("code_dirty", sa.Boolean),
        sa.Column("code", _JSON),
        sa.Column("environment", _JSON),
        sa.Column("command", sa.Text),
        sa.Index("ix_runs_start_ns", "start_ns"),
        sa.Index("ix_runs_parent_run_id", "parent_run_id"),
    ]
    if version >= 3:
        # Whose values the row holds (provscope.records.RUN_ORIGINS): the merge lets the
        # job's name and config win over a launcher's placeholders in any arrival order.
        cols.append(sa.Column("origin", sa.String(16)))
    if version >= 5:
        # The last heartbeat of a process of the run: a run still "running" whose
        # heartbeat is older than lineage.lost_after_s is "lost" (the job died silently).
        cols.append(sa.Column("heartbeat_ns", sa.BigInteger))
    return sa.Table("runs", md, *cols)


def _tasks(md: sa.MetaData, version: int) -> sa.Table:
    cols: list[SchemaItem] = [
        sa.Column("task_id", sa.String(64), primary_key=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("parent_task_id", sa.String(64)),
        sa.Column("name", sa.Text),
        sa.Column("kind", sa.String(32)),
        sa.Column("host", sa.Text),
        sa.Column("rank", sa.Integer),
        sa.Column("pid", sa.Integer),
        sa.Column("start_ns", sa.BigInteger),
        sa.Column("end_ns", sa.BigInteger),
        sa.Column("start_time", _TS),
        sa.Column("end_time", _TS),
        sa.Column("status", sa.String(32)),
        sa.Column("error", sa.Text),
        sa.Column("params", _JSON),
        sa.Column("result", _JSON),
        sa.Index("ix_tasks_run_id", "run_id"),
        sa.Index("ix_tasks_parent_task_id", "parent_task_id"),
    ]
    if version >= 2:
        cols += [sa.Column(name, _RESOURCE_TYPES[name]) for name in RESOURCE_COLUMNS]
        cols += [sa.Column("resources", _JSON),
                 sa.Index("ix_tasks_run_id_start_ns", "run_id", "start_ns")]
    return sa.Table("tasks", md, *cols)


def _entities(md: sa.MetaData) -> sa.Table:
    return sa.Table(
        "entities", md,
        sa.Column("entity_id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(32)),
        sa.Column("uri", sa.Text),
        sa.Column("name", sa.Text),
        sa.Column("digest", sa.String(80)),  # "sha256:<64 hex>"
        sa.Column("size_bytes", sa.BigInteger),
        sa.Column("attributes", _JSON),
        sa.Column("run_id", sa.String(64)),
        sa.Column("created_ns", sa.BigInteger),
        sa.Column("created_time", _TS),
        sa.Index("ix_entities_run_id", "run_id"),
        sa.Index("ix_entities_digest", "digest"),
    )


def _relations(md: sa.MetaData, version: int) -> sa.Table:
    # Version 4: (object_id, relation), so that "who used / generated this entity" (the
    # store's informed links, query.runs_using) searches by entity, not by relation kind.
    by_object = sa.Index("ix_relations_object_id_relation", "object_id", "relation") \
        if version >= 4 else sa.Index("ix_relations_object_id", "object_id")
    return sa.Table(
        "relations", md,
        sa.Column("relation", sa.String(16), primary_key=True),
        sa.Column("subject_id", sa.String(64), primary_key=True),
        sa.Column("object_id", sa.String(64), primary_key=True),
        # '' when no role, so that the primary key deduplicates (NULLs are all distinct).
        sa.Column("role", sa.String(64), primary_key=True, server_default=""),
        sa.Column("run_id", sa.String(64)),
        sa.Column("time_ns", sa.BigInteger),
        sa.Column("time", _TS),
        sa.Index("ix_relations_run_id", "run_id"),
        by_object,
    )


def _version_table(md: sa.MetaData) -> sa.Table:
    return sa.Table(
        "schema_version", md,
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("applied_ns", sa.BigInteger, nullable=False),
    )


def _metadata(version: int) -> sa.MetaData:
    md = sa.MetaData()
    _runs(md, version)
    _tasks(md, version)
    _entities(md)
    _relations(md, version)
    _version_table(md)
    return md


#: The current schema (what the store writes and the query API reads).
METADATA = _metadata(5)
RUNS = METADATA.tables["runs"]
TASKS = METADATA.tables["tasks"]
ENTITIES = METADATA.tables["entities"]
RELATIONS = METADATA.tables["relations"]
SCHEMA_VERSION_TABLE = METADATA.tables["schema_version"]

JSON_COLUMNS = {
    "runs": ("config", "code", "environment"),
    "tasks": ("params", "result", "resources"),
    "entities": ("attributes",),
}
#: ``*_ns`` column -> its derived timestamp column, per table.
TIME_COLUMNS = {
    "runs": {"start_ns": "start_time", "end_ns": "end_time"},
    "tasks": {"start_ns": "start_time", "end_ns": "end_time"},
    "entities": {"created_ns": "created_time"},
    "relations": {"time_ns": "time"},
}


# ----------------------------------------------------------------------------- migrations


def _step1_create(conn: Connection) -> None:
    """Version 1: runs, tasks (without resource summary), entities, relations."""
    _metadata(1).create_all(conn, checkfirst=True)


def _step2_task_resources(conn: Connection) -> None:
    """Version 2: the task resource summary columns and the (run_id, start_ns) index."""
    present = {c["name"] for c in sa.inspect(conn).get_columns("tasks")}
    table = _tasks(sa.MetaData(), 2)
    prep = conn.dialect.identifier_preparer
    for name in _V2_TASK_COLUMNS:
        if name in present:
            continue
        coltype = table.c[name].type.compile(dialect=conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE tasks ADD COLUMN {prep.quote(name)} {coltype}")
    index = next(i for i in table.indexes if i.name == "ix_tasks_run_id_start_ns")
    index.create(conn, checkfirst=True)


def _step3_run_origin(conn: Connection) -> None:
    """Version 3: ``runs.origin``, who wrote the run's values (rows before it: NULL, the
    weakest claim, so any record of a job fills them)."""
    present = {c["name"] for c in sa.inspect(conn).get_columns("runs")}
    if "origin" not in present:
        conn.exec_driver_sql("ALTER TABLE runs ADD COLUMN origin VARCHAR(16)")


def _step4_entity_identity(conn: Connection) -> None:
    """Version 4: entities keyed by content; old rows re-keyed and merged, their relations
    moved, ``derived`` and ``informed`` relations written (``rekey``); the relations'
    entity index becomes (object_id, relation)."""
    relations = _relations(sa.MetaData(), 4)
    index = next(i for i in relations.indexes if i.name == "ix_relations_object_id_relation")
    index.create(conn, checkfirst=True)
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_relations_object_id")
    rekey_entities(conn, _entities(sa.MetaData()), relations)


def _step5_run_heartbeat(conn: Connection) -> None:
    """Version 5: ``runs.heartbeat_ns``, the last sign of life of the run's processes
    (rows before it: NULL, never marked ``lost``)."""
    present = {c["name"] for c in sa.inspect(conn).get_columns("runs")}
    if "heartbeat_ns" not in present:
        conn.exec_driver_sql("ALTER TABLE runs ADD COLUMN heartbeat_ns BIGINT")


#: Numbered steps: MIGRATIONS[i] upgrades version i to version i + 1.
MIGRATIONS: list[Callable[[Connection], None]] = [_step1_create, _step2_task_resources,
                                                  _step3_run_origin, _step4_entity_identity,
                                                  _step5_run_heartbeat]
SCHEMA_VERSION = len(MIGRATIONS)


def current_version(conn: Connection) -> int:
    """The schema version of the database (0: empty, no provscope tables)."""
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    value = conn.execute(sa.select(sa.func.max(SCHEMA_VERSION_TABLE.c.version))).scalar()
    return int(value or 0)


def _newer_error(found: int) -> LineageSchemaError:
    return LineageSchemaError(
        f"lineage database has schema version {found}, newer than this provscope supports "
        f"({SCHEMA_VERSION}); upgrade provscope to write to it"
    )


def migrate(engine: Engine, *, target: int = SCHEMA_VERSION) -> int:
    """Bring the database to schema version ``target`` in place. Blocks on the database.

    Each step runs in its own transaction and is recorded in ``schema_version``; several
    processes migrating at once serialise on a lock (PostgreSQL advisory lock, SQLite
    write lock), so each step is applied once.

    Returns:
        The version the database is at afterwards.

    Raises:
        LineageSchemaError: the database is newer than this code.
        sqlalchemy.exc.OperationalError: the database is unreachable or locked.
    """
    with engine.connect() as conn:
        found = current_version(conn)
    if found > SCHEMA_VERSION:
        raise _newer_error(found)
    while found < target:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Serialise concurrent migrations (many ranks starting at once).
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7203617413)"))
            found = current_version(conn)
            if found > SCHEMA_VERSION:
                raise _newer_error(found)
            if found >= target:
                break
            MIGRATIONS[found](conn)
            conn.execute(SCHEMA_VERSION_TABLE.insert().values(version=found + 1,
                                                              applied_ns=time.time_ns()))
            found += 1
    return found
