"""The records that flow through the pipeline: time-series points and lineage records.

``Point`` is one line of line protocol. The lineage records follow W3C PROV: a run is a
workflow (``prov:Plan`` + ``prov:Activity``), a task is an ``prov:Activity``, an entity is a
``prov:Entity`` (dataset, model, checkpoint, config, file, artifact), and a relation is
``used`` / ``wasGeneratedBy`` (task <-> entity), ``wasInformedBy`` (task -> task) or
``wasDerivedFrom`` (entity -> entity). Entities are keyed by content
(``provscope.ids.entity_key``): the same bytes are one entity in every run.

Lineage records are *partial*: a field left ``None`` means "not known by this record".
Stores merge records with the same id (a task's start record and end record become one
row, whichever arrives first), so a record never erases what another one set.

All times are Unix nanoseconds (``int``). Every record is immutable and picklable, and
converts to and from a plain JSON-able dict (``to_dict`` / ``record_from_dict``) for the
socket, the spool and the stores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "ENTITY_KINDS",
    "RELATIONS",
    "RUN_ORIGINS",
    "RUN_STATUSES",
    "TASK_KINDS",
    "EntityRecord",
    "FieldValue",
    "LineageRecord",
    "Point",
    "RelationRecord",
    "RunRecord",
    "TaskRecord",
    "record_from_dict",
]

FieldValue = float | int | bool | str


@dataclass(frozen=True, slots=True)
class Point:
    """One time-series sample: ``measurement,tags fields time_ns``.

    Args:
        measurement: series name, e.g. ``"gpu"`` (see ``provscope.catalogue``).
        tags: bounded-cardinality labels (``host``, ``gpu``, ``run_id``, ``rank``, ``layer``).
        fields: values; numbers are written as floats unless the catalogue says integer.
        time_ns: Unix time in nanoseconds.
    """

    measurement: str
    tags: Mapping[str, str]
    fields: Mapping[str, FieldValue]
    time_ns: int

    kind: ClassVar[str] = "point"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "point",
            "measurement": self.measurement,
            "tags": dict(self.tags),
            "fields": dict(self.fields),
            "time_ns": self.time_ns,
        }


TASK_KINDS = ("run", "task", "epoch", "step", "eval", "checkpoint", "data", "command", "other")
ENTITY_KINDS = ("dataset", "model", "checkpoint", "config", "file", "artifact")
RELATIONS = ("used", "generated", "informed", "derived")
#: Run statuses, from the least to the most severe. Several processes report on one run
#: (every rank, every node's ``provscope run``); the stores keep the most severe status
#: reported, and ``running`` never replaces another. ``lost``: no heartbeat arrived for
#: ``lineage.lost_after_s`` (the job died without a word, e.g. SIGKILL); any end record
#: that arrives later replaces it.
RUN_STATUSES = ("running", "lost", "finished", "interrupted", "killed", "failed")
#: Who wrote a run record, from the weakest to the strongest claim on the run's name,
#: config, code, environment, host, user and command: ``launcher`` (``provscope run``: the
#: program name as placeholder), ``implicit`` (the implicit run: the script's name),
#: ``worker`` (a workflow on a rank other than 0), ``job`` (the workflow on rank 0).
#: The stores let a stronger record's values win whichever arrives first.
RUN_ORIGINS = ("launcher", "implicit", "worker", "job")


def _record_to_dict(record: Any) -> dict[str, Any]:
    """A lineage record as a plain JSON-able dict (``record_from_dict`` reverses it)."""
    out: dict[str, Any] = {"type": record.kind}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if value is not None:
            out[f.name] = dict(value) if isinstance(value, Mapping) else value
    return out


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A workflow run, or what one process knows of it (every rank and launcher of a job
    writes a partial record; ``origin``, one of ``RUN_ORIGINS``, says whose values win)."""

    run_id: str
    name: str | None = None
    parent_run_id: str | None = None
    campaign: str | None = None
    user: str | None = None
    host: str | None = None
    start_ns: int | None = None
    end_ns: int | None = None
    status: str | None = None  # one of RUN_STATUSES
    config: Mapping[str, Any] | None = None
    code: Mapping[str, Any] | None = None  # {"commit": ..., "dirty": bool, "repo": ...}
    environment: Mapping[str, Any] | None = None  # python, torch, cuda, driver, packages
    command: str | None = None
    origin: str | None = None  # one of RUN_ORIGINS; None: the weakest claim
    #: Last sign of life of a process of the run (Unix ns); the stores keep the latest.
    heartbeat_ns: int | None = None

    kind: ClassVar[str] = "run"
    to_dict = _record_to_dict


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """An activity inside a run: a task, epoch, step, eval, checkpoint, data load, command.

    ``resources`` is the summary attached at task end, keys in base units:
    ``cpu_seconds``, ``peak_rss_bytes``, ``gpu_seconds``, ``gpu_energy_joules``,
    ``read_bytes``, ``write_bytes``.
    """

    task_id: str
    run_id: str
    parent_task_id: str | None = None
    name: str | None = None
    task_kind: str | None = None  # one of TASK_KINDS
    host: str | None = None
    rank: int | None = None
    pid: int | None = None
    start_ns: int | None = None
    end_ns: int | None = None
    status: str | None = None  # running | finished | interrupted | killed | failed | lost
    error: str | None = None
    params: Mapping[str, Any] | None = None
    result: Mapping[str, Any] | None = None
    resources: Mapping[str, float] | None = None

    kind: ClassVar[str] = "task"
    to_dict = _record_to_dict


@dataclass(frozen=True, slots=True)
class EntityRecord:
    """A thing a task used or generated: dataset, model, checkpoint, config, file, artifact.

    ``entity_id`` is derived from the content (``provscope.ids.content_id``), so records
    of one entity by many runs merge; ``run_id`` is the recording run (the store keeps
    the first one's).
    """

    entity_id: str
    entity_kind: str  # one of ENTITY_KINDS
    uri: str | None = None
    run_id: str | None = None
    name: str | None = None
    digest: str | None = None  # "sha256:<hex>"
    size_bytes: int | None = None
    attributes: Mapping[str, Any] | None = None
    created_ns: int | None = None

    kind: ClassVar[str] = "entity"
    to_dict = _record_to_dict


@dataclass(frozen=True, slots=True)
class RelationRecord:
    """A PROV relation: task ``used`` entity, task ``generated`` entity, task ``informed``
    by task (prov:wasInformedBy), entity ``derived`` from entity (prov:wasDerivedFrom).

    ``subject_id`` is the task (or the run, for entities recorded outside any task), or
    for ``derived`` the derived entity; ``object_id`` the entity, the informing task, or
    the entity derived from. The stores write ``informed`` themselves from ``used`` and
    ``generated`` (see docs/lineage.md).
    """

    relation: str  # one of RELATIONS
    subject_id: str
    object_id: str
    run_id: str | None = None
    role: str | None = None
    time_ns: int | None = None

    kind: ClassVar[str] = "relation"
    to_dict = _record_to_dict


LineageRecord = RunRecord | TaskRecord | EntityRecord | RelationRecord

_BY_KIND: dict[str, type] = {
    "run": RunRecord,
    "task": TaskRecord,
    "entity": EntityRecord,
    "relation": RelationRecord,
}


def record_from_dict(data: Mapping[str, Any]) -> Point | LineageRecord:
    """Rebuild a record from ``to_dict()`` output.

    Raises:
        ValueError: unknown ``type`` or missing/unknown keys (one line, naming them).
    """
    kind = data.get("type")
    if kind == "point":
        try:
            return Point(data["measurement"], data.get("tags") or {}, data["fields"],
                         int(data["time_ns"]))
        except KeyError as exc:
            raise ValueError(f"point record: missing key {exc.args[0]!r}") from None
    cls = _BY_KIND.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"record type {kind!r} is not one of point, run, task, entity, relation")
    kwargs = {k: v for k, v in data.items() if k != "type"}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"{kind} record: {exc}") from None


