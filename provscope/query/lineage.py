"""Lineage walks over the entity graph, both ways: ``runs_using`` and ``used_by``
(forward: who used this, what came of it), ``produced_by``, ``origin`` and
``derived_from`` (backward: where this came from, back to data and code).

Every walk is one SQL statement (recursive CTEs where it recurses, the same text on
SQLite and PostgreSQL) with every value bound as a parameter."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import sqlalchemy as sa

from provscope.ids import content_id, entity_key
from provscope.query._base import (
    TEXT,
    complete,
    connect,
    has_tables,
    mark_partial,
    schema_note,
    settings,
    typed,
    utc,
)

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = ["derived_from", "origin", "produced_by", "runs_using", "used_by"]

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _entity_match(what: str | os.PathLike[str], config: Config) -> tuple[str, dict[str, Any]]:
    """A SQL condition on ``e`` (entities) selecting what ``what`` names, with its params.

    An entity id, a digest, a URI, or a local path keyed as the job keys it
    (``provscope.ids.entity_key``): its sha256 up to ``client.hash_max_bytes``, else its
    URI, size and modification time; a path that does not exist: its URI.
    """
    text = os.fspath(what).strip()
    if _UUID.fullmatch(text.lower()):
        return "e.entity_id = :what", {"what": text.lower()}
    if text.startswith("sha256:"):
        return "e.digest = :what", {"what": text.lower()}
    if "://" in text and not text.startswith("file://"):
        return "e.uri = :what", {"what": text}
    path = Path(text.removeprefix("file://")).expanduser().absolute()
    uri = path.as_uri()
    try:
        st = path.stat()
    except (OSError, ValueError):
        return "e.uri = :what", {"what": uri}
    if path.is_dir():  # keyed by the total size of its files: every version at the path
        return "e.uri = :what", {"what": uri}
    digest = None
    if st.st_size <= config.client.hash_max_bytes:
        with open(path, "rb") as fh:
            digest = "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()
    key = entity_key(digest=digest, uri=uri, size_bytes=st.st_size, mtime_ns=st.st_mtime_ns)
    return "e.entity_id = :what", {"what": content_id(key) if key else ""}


def _graph_frame(config: Config, statement: str, params: Mapping[str, Any],
                 dtypes: Mapping[str, Any]) -> pd.DataFrame:
    columns = list(dtypes)
    rows: list[tuple[Any, ...]] = []
    note = None
    with connect(config) as conn:
        if conn is not None and has_tables(conn, "entities", "relations", "tasks", "runs"):
            note = schema_note(conn)
            rows = [tuple(r) for r in conn.execute(sa.text(statement), params)]
    df = typed(rows, columns, dtypes)
    for col in columns:
        if col.endswith("_ns"):
            df["time" if col == "time_ns" else col.removesuffix("_ns") + "_time"] = \
                utc(df[col])
    complete(df)
    if note:
        mark_partial(df, note)
    return df.reset_index(drop=True)


def _dt(*names: str, kind: Any = TEXT) -> dict[str, Any]:
    return dict.fromkeys(names, kind)


_USES = (
    "SELECT COALESCE(rel.run_id, t.run_id) AS run_id, r.name AS run_name,"
    " r.status AS run_status, r.start_ns AS run_start_ns, rel.subject_id AS task_id,"
    " t.name AS task_name, e.entity_id, e.kind, e.name, e.uri, e.digest, rel.role,"
    " rel.time_ns"
    " FROM entities e"
    " JOIN relations rel ON rel.object_id = e.entity_id AND rel.relation = 'used'"
    " LEFT JOIN tasks t ON t.task_id = rel.subject_id"
    " LEFT JOIN runs r ON r.run_id = COALESCE(rel.run_id, t.run_id)"
    " WHERE {match}"
    " ORDER BY rel.time_ns IS NULL, rel.time_ns DESC, rel.subject_id"
)
_USES_TYPES = {**_dt("run_id", "run_name", "run_status"), "run_start_ns": "Int64",
               **_dt("task_id", "task_name", "entity_id", "kind", "name", "uri", "digest",
                     "role"), "time_ns": "Int64"}


def runs_using(what: str | os.PathLike[str], *, config: Config | None = None) -> pd.DataFrame:
    """Which runs used an entity (a dataset, file, model, checkpoint): one row per use.

    Args:
        what: an entity id; a digest (``"sha256:<hex>"``: the same bytes wherever they
            lay); a URI (``s3://...``); or a local path, identified as the job identifies
            it (its sha256 up to ``client.hash_max_bytes``, hashed here, so this blocks
            while it reads; else its size and modification time). A path that does not
            exist, and a directory, match every entity recorded at that path.

    Returns:
        Columns ``run_id``, ``run_name``, ``run_status``, ``run_start_ns`` /
        ``run_start_time``, ``task_id`` (the task, or the run for a use outside any
        task), ``task_name``, ``entity_id``, ``kind``, ``name``, ``uri``, ``digest``,
        ``role``, ``time_ns`` / ``time``; the most recent use first.
        ``df.run_id.unique()`` lists the runs.
    """
    config = settings(config)
    match, params = _entity_match(what, config)
    return _graph_frame(config, _USES.format(match=match), params, _USES_TYPES)


_PRODUCED = (
    "SELECT e.entity_id, e.kind, e.name, e.uri, e.digest, g.subject_id AS task_id,"
    " t.name AS task_name, t.kind AS task_kind, COALESCE(g.run_id, t.run_id) AS run_id,"
    " r.name AS run_name, r.status AS run_status, r.code_commit, r.code_dirty, g.role,"
    " g.time_ns"
    " FROM entities e"
    " JOIN relations g ON g.object_id = e.entity_id AND g.relation = 'generated'"
    " LEFT JOIN tasks t ON t.task_id = g.subject_id"
    " LEFT JOIN runs r ON r.run_id = COALESCE(g.run_id, t.run_id)"
    " WHERE {match}"
    " ORDER BY g.time_ns IS NULL, g.time_ns, g.subject_id"
)
_PRODUCED_TYPES = {**_dt("entity_id", "kind", "name", "uri", "digest", "task_id",
                         "task_name", "task_kind", "run_id", "run_name", "run_status",
                         "code_commit"), "code_dirty": "boolean", "role": TEXT,
                   "time_ns": "Int64"}


def produced_by(what: str | os.PathLike[str], *,
                config: Config | None = None) -> pd.DataFrame:
    """Which tasks and runs generated an entity (usually one; the same bytes saved by
    several runs: several). Blocks on the lineage store.

    Args:
        what: as for ``runs_using``.

    Returns:
        One row per generation, oldest first: ``entity_id``, ``kind``, ``name``, ``uri``,
        ``digest``, ``task_id`` (the run's id for an output recorded outside any task),
        ``task_name``, ``task_kind``, ``run_id``, ``run_name``, ``run_status``,
        ``code_commit``, ``code_dirty``, ``role``, ``time_ns`` / ``time``.
    """
    config = settings(config)
    match, params = _entity_match(what, config)
    return _graph_frame(config, _PRODUCED.format(match=match), params, _PRODUCED_TYPES)


# The entity, then what it was derived from, recursively, each with what generated it.
# UNION (not UNION ALL) and the depth bound keep a cycle (bytes saved again after a
# change) finite; the CASTs type the NULLs of the first row as PostgreSQL requires.
_ORIGIN = (
    "WITH RECURSIVE chain(entity_id, depth, source_of, role) AS ("
    " SELECT e.entity_id, 0, CAST(NULL AS VARCHAR(64)), CAST(NULL AS VARCHAR(64))"
    " FROM entities e WHERE {match}"
    " UNION"
    " SELECT d.object_id, c.depth + 1, c.entity_id, d.role"
    " FROM chain c JOIN relations d ON d.relation = 'derived' AND d.subject_id = c.entity_id"
    " WHERE c.depth < :max_depth)"
    " SELECT c.depth, c.entity_id, e.kind, e.name, e.uri, e.digest, e.size_bytes,"
    " e.created_ns, c.source_of, c.role, g.subject_id AS generated_by, t.name AS task_name,"
    " COALESCE(g.run_id, t.run_id) AS run_id, r.name AS run_name"
    " FROM chain c"
    " LEFT JOIN entities e ON e.entity_id = c.entity_id"
    " LEFT JOIN relations g ON g.object_id = c.entity_id AND g.relation = 'generated'"
    " LEFT JOIN tasks t ON t.task_id = g.subject_id"
    " LEFT JOIN runs r ON r.run_id = COALESCE(g.run_id, t.run_id)"
    " ORDER BY c.depth, c.entity_id, g.time_ns"
)
_ORIGIN_TYPES = {"depth": "Int64", **_dt("entity_id", "kind", "name", "uri", "digest"),
                 "size_bytes": "Int64", "created_ns": "Int64",
                 **_dt("source_of", "role", "generated_by", "task_name", "run_id",
                       "run_name")}


def origin(what: str | os.PathLike[str], *, max_depth: int = 10_000,
           config: Config | None = None) -> pd.DataFrame:
    """Where an entity (typically a checkpoint) came from along ``derived`` relations:
    the entity, what it was derived from (the model, the previous checkpoint, ...),
    recursively, and the task and run that generated each. ``derived_from`` also
    follows the data the generating tasks used.

    Args:
        what: as for ``runs_using``.
        max_depth: longest chain of ``derived`` relations followed.

    Returns:
        One row per (entity, source_of, generator), nearest first: ``depth`` (0: the
        entity itself), ``entity_id``, ``kind``, ``name``, ``uri``, ``digest``,
        ``size_bytes``, ``created_ns`` / ``created_time``, ``source_of`` (the entity one
        step nearer that was derived from this one), ``role`` (``model``,
        ``previous_checkpoint``, ``source``), ``generated_by`` (task id, or run id for an
        output recorded outside any task), ``task_name``, ``run_id``, ``run_name``.
    """
    config = settings(config)
    match, params = _entity_match(what, config)
    params = {**params, "max_depth": int(max_depth)}
    df = _graph_frame(config, _ORIGIN.format(match=match), params, _ORIGIN_TYPES)
    # A cycle reaches an entity again further down: keep its nearest occurrence.
    keys = ["entity_id", "source_of", "role", "generated_by"]
    return _dedupe(df, keys)


def _dedupe(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    attrs = dict(df.attrs)
    out = df.drop_duplicates(subset=keys, keep="first").reset_index(drop=True)
    out.attrs.update(attrs)
    return out


# One step back from an entity: the entity it was derived from (how = 'derived'), or an
# entity the task or run that generated it used (how = 'used'). The edges are one
# non-recursive CTE so that the recursive term names the chain once (PostgreSQL's rule).
_BACK = (
    "WITH RECURSIVE edges(child, parent, how, role, via) AS ("
    " SELECT d.subject_id, d.object_id, CAST('derived' AS VARCHAR(64)), d.role,"
    " CAST(NULL AS VARCHAR(64))"
    " FROM relations d WHERE d.relation = 'derived'"
    " UNION ALL"
    " SELECT g.object_id, u.object_id, CAST('used' AS VARCHAR(64)), u.role, g.subject_id"
    " FROM relations g JOIN relations u ON u.subject_id = g.subject_id"
    " AND u.relation = 'used' WHERE g.relation = 'generated'),"
    " chain(entity_id, depth, source_of, how, role, via) AS ("
    " SELECT e.entity_id, 0, CAST(NULL AS VARCHAR(64)), CAST(NULL AS VARCHAR(64)),"
    " CAST(NULL AS VARCHAR(64)), CAST(NULL AS VARCHAR(64))"
    " FROM entities e WHERE {match}"
    " UNION"
    " SELECT x.parent, c.depth + 1, c.entity_id, x.how, x.role, x.via"
    " FROM chain c JOIN edges x ON x.child = c.entity_id WHERE c.depth < :max_depth)"
    " SELECT c.depth, c.entity_id, e.kind, e.name, e.uri, e.digest, e.size_bytes,"
    " c.source_of, c.how, c.role, c.via AS via_task, g.subject_id AS generated_by,"
    " t.name AS task_name, COALESCE(g.run_id, t.run_id) AS run_id, r.name AS run_name,"
    " r.code_commit, r.code_dirty"
    " FROM chain c"
    " LEFT JOIN entities e ON e.entity_id = c.entity_id"
    " LEFT JOIN relations g ON g.object_id = c.entity_id AND g.relation = 'generated'"
    " LEFT JOIN tasks t ON t.task_id = g.subject_id"
    " LEFT JOIN runs r ON r.run_id = COALESCE(g.run_id, t.run_id)"
    " ORDER BY c.depth, c.entity_id, c.source_of, g.time_ns"
)
_BACK_TYPES = {"depth": "Int64", **_dt("entity_id", "kind", "name", "uri", "digest"),
               "size_bytes": "Int64",
               **_dt("source_of", "how", "role", "via_task", "generated_by", "task_name",
                     "run_id", "run_name", "code_commit"), "code_dirty": "boolean"}


def derived_from(what: str | os.PathLike[str], *, max_depth: int = 100,
                 config: Config | None = None) -> pd.DataFrame:
    """Everything an entity came from, back to data and code: the entities it was
    derived from, and the entities the task (or run) that generated it used (datasets,
    configs, the model it started from), recursively; with the generating task and run
    and that run's code commit. Blocks on the lineage store.

    Args:
        what: as for ``runs_using``.
        max_depth: longest chain followed.

    Returns:
        One row per (entity, the entity one step nearer, generator), nearest first:
        ``depth`` (0: the entity itself), ``entity_id``, ``kind``, ``name``, ``uri``,
        ``digest``, ``size_bytes``, ``source_of`` (the nearer entity), ``how``
        (``derived``: ``source_of`` was derived from this entity; ``used``: the task
        ``via_task`` used this entity and generated ``source_of``), ``role``,
        ``via_task``, ``generated_by``, ``task_name``, ``run_id``, ``run_name``,
        ``code_commit``, ``code_dirty`` (of the run that generated this entity).
        The data at the root of the chain are the rows with no ``generated_by``.
    """
    config = settings(config)
    match, params = _entity_match(what, config)
    params = {**params, "max_depth": int(max_depth)}
    df = _graph_frame(config, _BACK.format(match=match), params, _BACK_TYPES)
    return _dedupe(df, ["entity_id", "source_of", "how", "role", "via_task", "generated_by"])


# One step forward: an entity derived from this one, or an entity generated by a task
# (or run) that used this one.
_FORWARD = (
    "WITH RECURSIVE edges(parent, child, how, role, via) AS ("
    " SELECT d.object_id, d.subject_id, CAST('derived' AS VARCHAR(64)), d.role,"
    " CAST(NULL AS VARCHAR(64))"
    " FROM relations d WHERE d.relation = 'derived'"
    " UNION ALL"
    " SELECT u.object_id, g.object_id, CAST('used' AS VARCHAR(64)), u.role, u.subject_id"
    " FROM relations u JOIN relations g ON g.subject_id = u.subject_id"
    " AND g.relation = 'generated' WHERE u.relation = 'used'),"
    " chain(entity_id, depth, source, how, role, via) AS ("
    " SELECT e.entity_id, 0, CAST(NULL AS VARCHAR(64)), CAST(NULL AS VARCHAR(64)),"
    " CAST(NULL AS VARCHAR(64)), CAST(NULL AS VARCHAR(64))"
    " FROM entities e WHERE {match}"
    " UNION"
    " SELECT x.child, c.depth + 1, c.entity_id, x.how, x.role, x.via"
    " FROM chain c JOIN edges x ON x.parent = c.entity_id WHERE c.depth < :max_depth)"
    " SELECT c.depth, c.entity_id, e.kind, e.name, e.uri, e.digest, c.source, c.how,"
    " c.role, c.via AS task_id, t.name AS task_name,"
    " COALESCE(t.run_id, r2.run_id) AS run_id, COALESCE(r.name, r2.name) AS run_name"
    " FROM chain c"
    " LEFT JOIN entities e ON e.entity_id = c.entity_id"
    " LEFT JOIN tasks t ON t.task_id = c.via"
    " LEFT JOIN runs r ON r.run_id = t.run_id"
    " LEFT JOIN runs r2 ON r2.run_id = c.via"
    " ORDER BY c.depth, c.entity_id, c.source, c.via"
)
_FORWARD_TYPES = {"depth": "Int64",
                  **_dt("entity_id", "kind", "name", "uri", "digest", "source", "how",
                        "role", "task_id", "task_name", "run_id", "run_name")}


def used_by(what: str | os.PathLike[str], *, max_depth: int = 100,
            config: Config | None = None) -> pd.DataFrame:
    """Everything that came of an entity (e.g. every checkpoint trained on a dataset):
    the tasks that used it and what they generated, and what was derived from that,
    recursively. ``runs_using`` lists the uses themselves. Blocks on the lineage store.

    Args:
        what: as for ``runs_using``.
        max_depth: longest chain followed.

    Returns:
        One row per (entity, source, task), nearest first: ``depth`` (0: the entity
        itself), ``entity_id``, ``kind``, ``name``, ``uri``, ``digest``, ``source`` (the
        entity one step nearer), ``how`` (``used``: task ``task_id`` used ``source`` and
        generated this entity; ``derived``: this entity was derived from ``source``),
        ``role``, ``task_id``, ``task_name``, ``run_id``, ``run_name``.
    """
    config = settings(config)
    match, params = _entity_match(what, config)
    params = {**params, "max_depth": int(max_depth)}
    df = _graph_frame(config, _FORWARD.format(match=match), params, _FORWARD_TYPES)
    return _dedupe(df, ["entity_id", "source", "how", "role", "task_id"])
