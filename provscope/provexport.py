"""A run as a W3C PROV document (PROV-JSON, PROV-N or PROV-O Turtle), built with ``prov``.

The mapping (docs/analysis.md has the table):

- the run and its tasks are ``prov:Activity`` (start and end times, name, kind, status,
  resource summary); a task is ``wasStartedBy`` its parent task, a top-level task by the
  run;
- datasets, models, checkpoints, configs and files are ``prov:Entity`` (kind as
  ``prov:type``, URI, digest, size);
- the hosts, the user and the software (the training program at its code commit, and
  provscope, which recorded it) are ``prov:Agent`` (``prov:SoftwareAgent``,
  ``prov:Person``); the run ``wasAssociatedWith`` each, a task with its host (each
  association with its ``prov:role``: host, user, program, recorder), and the program
  ``actedOnBehalfOf`` the user;
- the store's relations become ``used``, ``wasGeneratedBy``, ``wasDerivedFrom`` (role
  kept as ``provscope:role``; a previous checkpoint is a ``prov:Revision``) and
  ``wasInformedBy``. An activity or entity of another run that a relation names is
  declared with what the store knows of it.

``prov`` is imported when a document is built, so reading runs does not need it.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Any

from provscope import query
from provscope._version import __version__
from provscope.formatting import is_missing as _na

if TYPE_CHECKING:
    from prov.model import ProvDocument

    from provscope.config import Config

__all__ = ["FORMATS", "NAMESPACES", "document", "export", "serialize"]

#: ``--format`` values and what ``prov`` calls them (with its keyword arguments).
FORMATS: dict[str, tuple[str, dict[str, str]]] = {
    "prov-json": ("json", {}),
    "prov-n": ("provn", {}),
    "prov-o": ("rdf", {"rdf_format": "turtle"}),
}

#: Prefix -> namespace URI of the identifiers in an exported document.
NAMESPACES = {
    "provscope": "https://provscope.dev/ns#",
    "run": "urn:provscope:run:",
    "task": "urn:provscope:task:",
    "entity": "urn:provscope:entity:",
    "host": "urn:provscope:host:",
    "user": "urn:provscope:user:",
    "software": "urn:provscope:software:",
}

_RESOURCES = ("cpu_seconds", "gpu_seconds", "gpu_energy_joules", "peak_rss_bytes",
              "read_bytes", "write_bytes")




def _config(config: Config | None) -> Config:
    if config is not None:
        return config
    from provscope.config import load_config

    return load_config()


def _time(ns: Any) -> dt.datetime | None:
    if _na(ns):
        return None
    return dt.datetime.fromtimestamp(int(ns) / 1e9, tz=dt.UTC)


def _scalar(value: Any) -> Any:
    """A PROV attribute value: str, int, float or bool; containers as JSON text."""
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    if hasattr(value, "item"):
        value = value.item()
    return value


def _as(role: str) -> dict[Any, Any]:
    """The role of an association. Every association carries one: PROV-O then writes each
    as a qualified ``prov:Association``, which ``prov`` reads back whole (an activity's
    unqualified associations are lost when it also has a qualified one)."""
    from prov.model import PROV_ROLE

    return {PROV_ROLE: f"provscope:{role}"}


def _local(text: Any) -> str:
    """A safe local name: letters, digits, ``-``, ``_`` and ``.``; the rest as ``_``."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))
    return out.strip(".") or "unknown"


def document(run_id: str, *, config: Config | None = None) -> ProvDocument:
    """The PROV document of one run (a full run id; see ``query.resolve_run_id``).

    Blocks on the lineage store (a few reads).

    Raises:
        ProvscopeError: the run is not in the store.
    """
    from prov.model import PROV_LABEL, PROV_ROLE, PROV_TYPE, ProvDocument

    from provscope.errors import ProvscopeError

    cfg = _config(config)
    runs = query.runs(run_id=run_id, config=cfg)
    if runs.empty:
        raise ProvscopeError(f"run {run_id} is not in the lineage store; "
                             "`provscope runs` lists the recorded runs")
    run = runs.iloc[0]
    tasks = query.tasks(run_id, config=cfg)
    entities = query.entities(run_id, config=cfg)
    relations = query.relations(run_id, config=cfg)

    doc = ProvDocument()
    for prefix, uri in NAMESPACES.items():
        doc.add_namespace(prefix, uri)

    def q(prefix: str, local: Any) -> str:
        return f"{prefix}:{_local(local)}"

    def attrs(pairs: dict[str, Any]) -> dict[str, Any]:
        return {(k if ":" in k else f"provscope:{k}"): _scalar(v) for k, v in pairs.items()
                if not _na(v) and v != ""}

    run_ref = q("run", run_id)
    code = run["code"] if isinstance(run.get("code"), dict) else {}
    run_attrs = {PROV_TYPE: "provscope:run", PROV_LABEL: run.get("name"),
                 "status": run.get("status"), "campaign": run.get("campaign"),
                 "command": run.get("command"), "config": run.get("config") or None,
                 "code_commit": code.get("commit") or run.get("code_commit"),
                 "code_dirty": code.get("dirty")}
    doc.activity(run_ref, _time(run["start_ns"]), _time(run["end_ns"]),
                 attrs({str(k): v for k, v in run_attrs.items()}))

    task_ids = set(tasks["task_id"])
    activities = {run_id: run_ref}
    for t in tasks.to_dict(orient="records"):
        error = str(t["error"]).strip().splitlines()[-1] if not _na(t["error"]) else None
        ref = q("task", t["task_id"])
        activities[t["task_id"]] = ref
        doc.activity(ref, _time(t["start_ns"]), _time(t["end_ns"]), attrs({
            str(PROV_TYPE): f"provscope:{_local(t['kind'] or 'task')}",
            str(PROV_LABEL): t["name"], "status": t["status"], "rank": t["rank"],
            "host": t["host"], "error": error,
            **{col: t[col] for col in _RESOURCES}}))

    # Hierarchy: a task is started by its parent (a top-level task by the run).
    for t in tasks.to_dict(orient="records"):
        parent = t["parent_task_id"]
        starter = activities[parent] if parent in task_ids else run_ref
        doc.wasStartedBy(activities[t["task_id"]], starter=starter,
                         time=_time(t["start_ns"]))

    # Agents: hosts, user, the program at its commit, provscope.
    hosts = sorted({str(h) for h in tasks["host"].dropna()}
                   | ({str(run["host"])} if not _na(run.get("host")) else set()))
    for h in hosts:
        doc.agent(q("host", h), {PROV_TYPE: "provscope:Host", PROV_LABEL: h})
        doc.wasAssociatedWith(run_ref, q("host", h), other_attributes=_as("host"))
    for t in tasks.to_dict(orient="records"):
        if not _na(t["host"]):
            doc.wasAssociatedWith(activities[t["task_id"]], q("host", t["host"]),
                                  other_attributes=_as("host"))
    user = None if _na(run.get("user_name")) else str(run["user_name"])
    if user:
        doc.agent(q("user", user), {PROV_TYPE: "prov:Person", PROV_LABEL: user})
        doc.wasAssociatedWith(run_ref, q("user", user), other_attributes=_as("user"))
    env = run["environment"] if isinstance(run.get("environment"), dict) else {}
    commit = str(code.get("commit") or "unknown")[:12]
    program = q("software", f"{run.get('name') or 'program'}-{commit}")
    doc.agent(program, attrs({str(PROV_TYPE): "prov:SoftwareAgent",
                              str(PROV_LABEL): run.get("name"), "command": run.get("command"),
                              "code_commit": code.get("commit"),
                              "code_dirty": code.get("dirty"),
                              "code_repo": code.get("repo"), "python": env.get("python"),
                              "packages": env.get("packages") or None,
                              "torch": env.get("torch"), "cuda": env.get("cuda")}))
    doc.wasAssociatedWith(run_ref, program, other_attributes=_as("program"))
    if user:
        doc.actedOnBehalfOf(program, q("user", user))
    recorder = q("software", f"provscope-{__version__}")
    doc.agent(recorder, {PROV_TYPE: "prov:SoftwareAgent", PROV_LABEL: "provscope",
                         "provscope:version": __version__})
    doc.wasAssociatedWith(run_ref, recorder, other_attributes=_as("recorder"))

    # Entities of the run, then the ones its relations name from elsewhere.
    declared: set[str] = set()
    for e in entities.to_dict(orient="records"):
        declared.add(e["entity_id"])
        doc.entity(q("entity", e["entity_id"]), attrs({
            str(PROV_TYPE): f"provscope:{_local(e['kind'] or 'entity')}",
            str(PROV_LABEL): e["name"], "uri": e["uri"], "digest": e["digest"],
            "size_bytes": e["size_bytes"], "run": e["run_id"]}))

    def activity(ref_id: str) -> str:
        if ref_id not in activities:
            activities[ref_id] = _foreign_activity(doc, ref_id, cfg)
        return activities[ref_id]

    def entity(ref_id: str) -> str:
        if ref_id not in declared:
            declared.add(ref_id)
            doc.entity(q("entity", ref_id))
        return q("entity", ref_id)

    for r in relations.to_dict(orient="records"):
        kind, subject, obj = r["relation"], str(r["subject_id"]), str(r["object_id"])
        role = r["role"] or None
        when = _time(r["time_ns"])
        if kind == "used":
            doc.used(activity(subject), entity(obj), when,
                     other_attributes={PROV_ROLE: f"provscope:{_local(role)}"} if role else None)
        elif kind == "generated":
            doc.wasGeneratedBy(entity(obj), activity(subject), when)
        elif kind == "derived":
            extra: dict[Any, Any] = {"provscope:role": role} if role else {}
            if role == "previous_checkpoint":
                extra[PROV_TYPE] = "prov:Revision"
            doc.wasDerivedFrom(entity(subject), entity(obj), other_attributes=extra or None)
        elif kind == "informed":
            doc.wasInformedBy(activity(subject), activity(obj))
    return doc


def _foreign_activity(doc: ProvDocument, ref_id: str, cfg: Config) -> str:
    """Declare a task or run of another run that a relation names; its reference."""
    from prov.model import PROV_LABEL, PROV_TYPE

    task = query.sql("SELECT name, kind, run_id FROM tasks WHERE task_id = :id",
                     {"id": ref_id}, config=cfg)
    if len(task):
        ref = f"task:{_local(ref_id)}"
        row = task.iloc[0]
        doc.activity(ref, other_attributes={
            PROV_TYPE: f"provscope:{_local(row['kind'] or 'task')}",
            PROV_LABEL: str(row["name"]), "provscope:run": str(row["run_id"])})
        return ref
    ref = f"run:{_local(ref_id)}"
    run = query.sql("SELECT name FROM runs WHERE run_id = :id", {"id": ref_id}, config=cfg)
    attributes: dict[Any, Any] = {PROV_TYPE: "provscope:run"}
    if len(run):
        attributes[PROV_LABEL] = str(run.iloc[0]["name"])
    doc.activity(ref, other_attributes=attributes)
    return ref


def serialize(doc: ProvDocument, fmt: str) -> str:
    """The document as text in one of ``FORMATS`` (``prov-json``, ``prov-n``, ``prov-o``).

    Raises:
        ProvscopeError: an unknown format (one line naming the allowed ones).
    """
    from provscope.errors import ProvscopeError

    if fmt not in FORMATS:
        raise ProvscopeError(f"format {fmt!r} is not allowed; use one of "
                             f"{', '.join(FORMATS)}")
    name, kwargs = FORMATS[fmt]
    text = str(doc.serialize(format=name, **kwargs))
    if name == "json":  # stable, readable output
        text = json.dumps(json.loads(text), indent=2, sort_keys=True)
    return text


def export(run: str, fmt: str = "prov-json", *, config: Config | None = None) -> str:
    """A run (id or unambiguous prefix) as PROV text in ``fmt``. Blocks on the store."""
    from provscope.errors import ProvscopeError

    if fmt not in FORMATS:
        raise ProvscopeError(f"format {fmt!r} is not allowed; use one of "
                             f"{', '.join(FORMATS)}")
    cfg = _config(config)
    run_id = query.resolve_run_id(run, config=cfg)
    return serialize(document(run_id, config=cfg), fmt)
