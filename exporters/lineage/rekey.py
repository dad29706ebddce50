"""Schema step: entities keyed by content (migration to the entity-identity version).

Before it, every ``use()`` / ``produce()`` minted a new entity id, so one file recorded by
100 runs was 100 rows. The step gives each existing entity the id a writer of today
would give it (``provscope.ids.entity_key`` over its digest, URI, size and modification
time), merges the rows that now share an id (the one created first wins, field by field,
as the store merges), points the relations at the new ids (duplicates collapse), turns
the ``model_entity_id`` attribute of old checkpoints into ``derived`` relations, and
writes the ``informed`` relations the existing rows imply.

Entities with neither digest nor URI (old ``model`` entities of ``watch()``, values that
were not paths) keep their id: nothing in the row identifies their content.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from provscope.exporters.lineage.links import link_informed
from sqlalchemy.engine import Connection

from provscope.ids import content_id, entity_key

__all__ = ["rekey_entities"]

_CHUNK = 500
_REL_KEY = ("relation", "subject_id", "object_id", "role")


def _attrs(value: Any) -> Mapping[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, Mapping) else {}


def _new_id(row: Mapping[str, Any]) -> str:
    mtime = _attrs(row["attributes"]).get("mtime_ns")
    key = entity_key(digest=row["digest"], uri=row["uri"], size_bytes=row["size_bytes"],
                     mtime_ns=mtime if isinstance(mtime, int) else None)
    return content_id(key) if key else row["entity_id"]


def _earliest_first(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row from several: the earliest created wins, field by field; nulls filled."""
    ordered = sorted(rows, key=lambda r: (r["created_ns"] is None, r["created_ns"] or 0))
    merged = dict(ordered[0])
    for row in ordered[1:]:
        for key, value in row.items():
            if merged.get(key) is None and value is not None:
                merged[key] = value
    return merged


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]


def _insert_ignore(conn: Connection, table: sa.Table) -> sa.Insert:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table).on_conflict_do_nothing()
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table).on_conflict_do_nothing()


def rekey_entities(conn: Connection, entities: sa.Table, relations: sa.Table) -> None:
    """Re-key, merge and re-link entities in place, inside the caller's transaction.

    ``entities`` and ``relations`` describe the tables as they are at this step.
    Blocks on the database; reads the entity rows once (one row per entity).
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    derived: list[dict[str, Any]] = []
    for found in conn.execute(sa.select(entities)).mappings():
        stored = dict(found)
        groups[_new_id(stored)].append(stored)
    moved: dict[str, str] = {}
    for new, rows in groups.items():
        for row in rows:
            if row["entity_id"] != new:
                moved[row["entity_id"]] = new
    if moved:
        affected = {new: rows for new, rows in groups.items()
                    if any(r["entity_id"] in moved for r in rows)}
        stale = [r["entity_id"] for rows in affected.values() for r in rows]
        for part in _chunks(stale):
            conn.execute(entities.delete().where(entities.c.entity_id.in_(part)))
        merged: list[dict[str, Any]] = []
        for new, rows in affected.items():
            first = _earliest_first(rows)
            first["entity_id"] = new
            merged.append(first)
        conn.execute(entities.insert(), merged)
        _move_relations(conn, relations, moved)
    for rows in groups.values():
        for row in rows:
            model = _attrs(row["attributes"]).get("model_entity_id")
            if row["kind"] == "checkpoint" and isinstance(model, str) and model:
                derived.append({
                    "relation": "derived", "subject_id": moved.get(row["entity_id"],
                                                                   row["entity_id"]),
                    "object_id": moved.get(model, model), "role": "model",
                    "run_id": row["run_id"], "time_ns": row["created_ns"],
                    "time": row["created_time"]})
    if derived:
        conn.execute(_insert_ignore(conn, relations), derived)
    link_informed(conn, None)


def _move_relations(conn: Connection, relations: sa.Table, moved: Mapping[str, str]) -> None:
    """Point relations at the new entity ids; relations that now coincide become one
    (the earliest)."""
    old_ids = list(moved)
    found: list[dict[str, Any]] = []
    for part in _chunks(old_ids):
        cond = sa.or_(relations.c.object_id.in_(part), relations.c.subject_id.in_(part))
        found += [dict(r) for r in conn.execute(sa.select(relations).where(cond)).mappings()]
        conn.execute(relations.delete().where(cond))
    if not found:
        return
    keyed: dict[tuple[Any, ...], dict[str, Any]] = {}
    for rel in found:
        rel["object_id"] = moved.get(rel["object_id"], rel["object_id"])
        rel["subject_id"] = moved.get(rel["subject_id"], rel["subject_id"])
        key = tuple(rel[k] for k in _REL_KEY)
        kept = keyed.get(key)
        if kept is None or (rel["time_ns"] is not None
                            and (kept["time_ns"] is None or rel["time_ns"] < kept["time_ns"])):
            keyed[key] = rel
    conn.execute(_insert_ignore(conn, relations), list(keyed.values()))
