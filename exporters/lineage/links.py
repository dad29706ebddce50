"""Relations the store derives from the ones it was given: ``informed`` (prov:wasInformedBy).

A task that used an entity another task generated was informed by that task. The job
cannot know it when the generator ran in another process or another run, so the store
writes the link: whenever a batch brings a ``used`` or a ``generated`` relation, every
pair (user, generator) over the same entity gets ``informed(user, generator)``, in the
same transaction. Either side may arrive first; the pair is linked when the second one
is written. A generator that recorded its output after the use (by the clocks of the
two records) is not linked: a task cannot be informed by what came after it. A task
that used what it generated itself is not linked to itself.

The relation takes the user's ``run_id`` and the time of the earliest use; its role is
``''``, so one pair of tasks has one ``informed`` row however many entities link them.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

__all__ = ["link_informed"]

_CHUNK = 500  # bound parameters per statement (SQLite allows 32,766 since 3.32)

# The pairs over the batch's entities, looked up by (object_id, relation) on both sides.
# The statement differs per database because each planner needs its own hint to do that
# (measured on relation-heavy batches: 2 to 10 times slower writes without them, growing
# with the relations stored):
# - SQLite compares the kind as ``relation || ''``; a plain comparison lets it walk every
#   ``used`` row through the primary key (relation, ...) instead.
# - PostgreSQL joins the ids as ``unnest(array)``: with ``object_id IN (...500 values)`` it
#   scans the table (or the primary key by kind) rather than probe the index per id.
_PAIRS = {
    "sqlite": """
FROM relations u
JOIN relations g ON g.object_id = u.object_id AND g.relation || '' = 'generated'
WHERE u.relation || '' = 'used' AND u.object_id IN :ids AND g.object_id IN :ids""",
    "postgresql": """
FROM unnest(CAST(:ids AS VARCHAR[])) AS batch(id)
JOIN relations u ON u.object_id = batch.id AND u.relation = 'used'
JOIN relations g ON g.object_id = batch.id AND g.relation = 'generated'
WHERE TRUE""",
    None: """
FROM relations u
JOIN relations g ON g.object_id = u.object_id AND g.relation = 'generated'
WHERE u.relation = 'used'""",
}

_SELECT = """
SELECT 'informed', u.subject_id, g.subject_id, '', MIN(u.run_id), MIN(u.time_ns), MIN(u.time)
{pairs}
  AND g.subject_id <> u.subject_id
  AND (g.time_ns IS NULL OR u.time_ns IS NULL OR g.time_ns <= u.time_ns)
GROUP BY u.subject_id, g.subject_id
"""

_INSERT = ("INSERT INTO relations (relation, subject_id, object_id, role, run_id, time_ns, "
           "time) {select} ON CONFLICT DO NOTHING")


def link_informed(conn: Connection, entity_ids: Iterable[str] | None) -> None:
    """Write the ``informed`` relations over ``entity_ids`` (None: over every entity).

    Runs inside the caller's transaction. Idempotent: existing relations are left as
    they are. Blocks on the database.
    """
    if entity_ids is None:
        conn.execute(sa.text(_INSERT.format(select=_SELECT.format(pairs=_PAIRS[None]))))
        return
    ids = sorted(set(entity_ids))
    dialect = conn.dialect.name
    stmt = sa.text(_INSERT.format(select=_SELECT.format(pairs=_PAIRS[dialect])))
    if dialect == "sqlite":
        stmt = stmt.bindparams(sa.bindparam("ids", expanding=True))
    for start in range(0, len(ids), _CHUNK):
        conn.execute(stmt, {"ids": ids[start:start + _CHUNK]})
