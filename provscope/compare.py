"""After the run: what differs between two runs, how to rerun one, and quality against cost.

Three questions answered from the stores ``provscope.query`` reads (the embedded file, or
InfluxDB + SQLite/PostgreSQL), with no join written by the caller:

- ``diff(a, b)``: config, code version, environment, data digests and final metrics side
  by side, as a DataFrame (one row per key).
- ``reproduce(run)``: the command, config, code commit and data digests to rerun a run,
  and what stands in the way (a dirty tree, data changed or gone since), with the local
  files that still exist digested again.
- ``quality_cost(runs)``: each run's final or best metric against GPU-hours, energy,
  wall time and bytes read, with the Pareto front marked.

Every function takes run ids or unambiguous prefixes and ``config=``; each blocks on the
stores it reads. Bad input raises ``ProvscopeError`` with one line: an unknown or ambiguous
id (from ``query.resolve_run_id``), or a run still in progress when ``partial`` is not set
(its final values are not known yet). Results built from a run still in progress are
marked as the query API marks them: ``df.attrs["partial"]`` is True and
``df.attrs["warnings"]`` says why (``Reproduction.partial`` likewise).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

import pandas as pd

from provscope import query
from provscope.errors import ProvscopeError
from provscope.formatting import is_missing as _na

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = [
    "COST_COLUMNS",
    "DIFF_COLUMNS",
    "DataCheck",
    "Reproduction",
    "check_data",
    "diff",
    "final_metrics",
    "pareto_front",
    "quality_cost",
    "reproduce",
    "resolve",
    "series",
    "to_json",
]

#: Columns of ``diff()``.
DIFF_COLUMNS = ["section", "key", "a", "b", "same"]
#: Cost columns of ``quality_cost()``, in the order they are shown.
COST_COLUMNS = ["gpu_hours", "energy_j", "energy_kwh", "wall_s", "read_bytes"]
#: Statuses of a run whose final values are known.
ENDED = ("finished", "failed", "interrupted", "killed", "lost")

_SECTIONS = ("run", "config", "code", "environment", "data", "metrics")


def _config(config: Config | None) -> Config:
    if config is not None:
        return config
    from provscope.config import load_config

    return load_config()




def _plain(value: Any) -> Any:
    """A cell as a plain Python value: None for every missing form (NA, NaN, NaT)."""
    if _na(value):
        return None
    if hasattr(value, "item") and not isinstance(value, str | dict | list):
        try:
            return value.item()
        except (AttributeError, ValueError):
            return value
    return value


# ----------------------------------------------------------------------------- runs

def resolve(run: str, *, partial: bool = False, what: str = "this",
            config: Config | None = None) -> pd.Series:
    """The row of ``query.runs`` for a run id or an unambiguous prefix.

    Args:
        run: a run id or a prefix of one.
        partial: accept a run still in progress (``running``); otherwise that is an error.
        what: the name of the operation, for the error line.

    Raises:
        ProvscopeError: unknown or ambiguous id; a run still running without ``partial``.
    """
    cfg = _config(config)
    run_id = query.resolve_run_id(run, config=cfg)
    rows = query.runs(run_id=run_id, config=cfg)
    if rows.empty:  # removed between the two reads
        raise ProvscopeError(f"run {run_id} is no longer in the lineage store")
    row = rows.iloc[0]
    if row["status"] == "running" and not partial:
        raise ProvscopeError(
            f"run {run_id} is still running, so its final values are not known yet; "
            f"{what} needs an ended run (wait for it, or pass --partial to use what is "
            "recorded so far)")
    return row


def _hosts(run: pd.Series, tasks: pd.DataFrame) -> list[str]:
    hosts = {str(h) for h in tasks["host"].dropna()} if not tasks.empty else set()
    if not _na(run.get("host")):
        hosts.add(str(run["host"]))
    return sorted(hosts)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``optimizer.lr``); other values as they are."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}{key}."))
        if not value and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: value} if prefix else {}


def series(measurement: str, fields: str | Sequence[str] | None = None, *,
           warnings_: list[str] | None = None, **kwargs: Any) -> pd.DataFrame:
    """``query.series`` with its partial-result warnings collected into ``warnings_``
    (when given) instead of issued: the caller reports them once, its own way."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", query.PartialResultWarning)
        df = query.series(measurement, fields, **kwargs)
    if warnings_ is not None:
        warnings_.extend(w for w in df.attrs.get("warnings", []) if w not in warnings_)
    return df


def final_metrics(run_id: str, *, measurement: str = "train",
                  fields: Sequence[str] | None = None,
                  config: Config | None = None) -> dict[str, float]:
    """The last recorded value of each numeric field of ``measurement`` in a run.

    Reads the run's points of that measurement (all ranks; the latest point wins). The
    ``step`` and ``epoch`` fields are reported too, so the caller sees where it ended.
    """
    df = series(measurement, fields, run_id=run_id, index="time", config=config)
    out: dict[str, float] = {}
    for name in df.attrs.get("fields") or []:
        if name not in df or df[name].dtype == object or str(df[name].dtype) == "string":
            continue
        values = df[name].dropna()  # rows are in time order: the last is the latest
        if len(values):
            out[str(name)] = float(values.iloc[-1])
    return dict(sorted(out.items()))


def _used_data(run_id: str, cfg: Config) -> dict[str, dict[str, Any]]:
    """The entities the run or its tasks used, keyed by what names them (URI or name)."""
    ents = query.entities(run_id, config=cfg)
    rels = query.relations(run_id, config=cfg)
    if ents.empty or rels.empty:
        return {}
    used_ids = set(rels.loc[rels["relation"] == "used", "object_id"])
    roles: dict[str, str] = {}
    for r in rels[rels["relation"] == "used"].itertuples():
        if r.role and r.object_id not in roles:
            roles[str(r.object_id)] = str(r.role)
    out: dict[str, dict[str, Any]] = {}
    for e in ents.to_dict(orient="records"):
        if e["entity_id"] not in used_ids:
            continue
        key = _plain(e["uri"]) or _plain(e["name"]) or e["entity_id"]
        out[str(key)] = {"entity_id": e["entity_id"], "kind": _plain(e["kind"]),
                         "name": _plain(e["name"]), "uri": _plain(e["uri"]),
                         "digest": _plain(e["digest"]), "size_bytes": _plain(e["size_bytes"]),
                         "attributes": e["attributes"] if isinstance(e["attributes"], dict)
                         else {}, "role": roles.get(e["entity_id"], "")}
    return out


def _facts(run: pd.Series, cfg: Config) -> dict[str, dict[str, Any]]:
    """One run's comparable values, by section, each a flat ``{key: value}``."""
    run_id = str(run["run_id"])
    tasks = query.tasks(run_id, config=cfg)
    env = run.get("environment")
    env = env if isinstance(env, dict) else {}
    code = run.get("code")
    code = dict(code) if isinstance(code, dict) else {}
    if "commit" not in code and not _na(run.get("code_commit")):
        code["commit"] = run["code_commit"]
    if "dirty" not in code and not _na(run.get("code_dirty")):
        code["dirty"] = bool(run["code_dirty"])
    environment = {k: v for k, v in _flatten(env).items()}
    environment["hosts"] = ", ".join(_hosts(run, tasks)) or None
    data = {key: (d["digest"] or f"no digest (size {d['size_bytes']})")
            for key, d in _used_data(run_id, cfg).items()}
    duration = _plain(run.get("duration_s"))
    return {
        "run": {"name": _plain(run.get("name")), "status": _plain(run.get("status")),
                "command": _plain(run.get("command")),
                "duration_s": None if duration is None else round(float(duration), 3),
                "tasks": len(tasks)},
        "config": _flatten(run.get("config") if isinstance(run.get("config"), dict) else {}),
        "code": _flatten(code),
        "environment": environment,
        "data": data,
        "metrics": final_metrics(run_id, config=cfg),
    }


def _same(a: Any, b: Any) -> bool:
    if _na(a) and _na(b):
        return True
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


def diff(run_a: str, run_b: str, *, only_differences: bool = False, partial: bool = False,
         config: Config | None = None) -> pd.DataFrame:
    """What differs between two runs: config, code version, environment, data, metrics.

    Args:
        run_a, run_b: run ids or unambiguous prefixes.
        only_differences: leave out the keys whose values are the same.
        partial: accept runs still in progress (their metrics are the latest so far).

    Returns:
        Columns ``DIFF_COLUMNS``: ``section`` (run, config, code, environment, data,
        metrics), ``key`` (dotted for nested config, ``packages.torch`` for versions, the
        URI for data, the field for metrics), ``a`` and ``b`` (None where a run has no
        such key), ``same``. Data values are digests (``sha256:...``) of the entities
        each run used; metrics the last recorded value of each ``train`` field.
        ``df.attrs``: ``run_a``, ``run_b`` (full ids), ``partial`` (True when a run is
        still running), ``warnings`` (one line each), ``running`` (those ids).
        Blocks on the stores.
    """
    cfg = _config(config)
    a = resolve(run_a, partial=partial, what="diff", config=cfg)
    b = resolve(run_b, partial=partial, what="diff", config=cfg)
    fa, fb = _facts(a, cfg), _facts(b, cfg)
    rows: list[tuple[str, str, Any, Any, bool]] = []
    for section in _SECTIONS:
        va, vb = fa[section], fb[section]
        keys = list(va) + [k for k in vb if k not in va]
        if section != "run":
            keys.sort()
        for key in keys:
            x, y = va.get(key), vb.get(key)
            same = _same(x, y)
            if only_differences and same:
                continue
            rows.append((section, key, x, y, same))
    df = pd.DataFrame(rows, columns=DIFF_COLUMNS)
    df["same"] = df["same"].astype(bool)
    df.attrs.update(run_a=str(a["run_id"]), run_b=str(b["run_id"]))
    _mark(df, [str(r["run_id"]) for r in (a, b) if r["status"] == "running"])
    return df


def _mark(df: pd.DataFrame, running: Sequence[str]) -> None:
    """The query API's convention: ``attrs["partial"]`` (bool), one line per reason in
    ``attrs["warnings"]``; and ``attrs["running"]``, the ids still in progress."""
    df.attrs["running"] = list(running)
    df.attrs["partial"] = bool(running)
    df.attrs["warnings"] = [f"run {r} is still running: its values are those recorded so "
                            "far" for r in running]


# ----------------------------------------------------------------------------- reproduce

@dataclass
class DataCheck:
    """One entity a run used, checked against what lies at its URI today."""

    uri: str | None
    name: str | None
    kind: str | None
    role: str
    digest: str | None
    size_bytes: int | None
    #: ``same``, ``changed``, ``missing``, ``unchecked`` (a remote URI: provscope cannot
    #: see its bytes) or ``no digest`` (recorded by size and time only, and those differ).
    status: str
    current_digest: str | None = None
    detail: str = ""


@dataclass
class Reproduction:
    """What is needed to rerun a run, and what stands in the way (``missing``)."""

    run_id: str
    name: str | None
    status: str | None
    command: str | None
    config: dict[str, Any]
    code: dict[str, Any]
    environment: dict[str, Any]
    hosts: list[str]
    data: list[DataCheck] = field(default_factory=list)
    #: One line per obstacle: a dirty tree, an unknown commit or command, changed data.
    missing: list[str] = field(default_factory=list)
    partial: bool = False

    @property
    def ready(self) -> bool:
        """True when nothing is missing: the same command on the same code and data."""
        return not self.missing

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``provscope reproduce --json``)."""
        from dataclasses import asdict

        out = asdict(self)
        out["ready"] = self.ready
        return out


def _file_digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()


def check_data(entity: Mapping[str, Any], *, hash_max_bytes: int) -> DataCheck:
    """Compare one recorded entity with the file at its URI now (hashes it: blocks)."""
    uri = entity.get("uri")
    check = DataCheck(uri=uri, name=entity.get("name"), kind=entity.get("kind"),
                      role=str(entity.get("role") or ""), digest=entity.get("digest"),
                      size_bytes=entity.get("size_bytes"), status="unchecked")
    if not uri:
        check.detail = "not a file (a model's architecture, a value): nothing to read again"
        return check
    if not str(uri).startswith("file://"):
        check.detail = "not a local file; provscope cannot see whether it changed"
        return check
    path = Path(unquote(urlsplit(str(uri)).path))
    try:
        st = path.stat()
    except OSError as exc:
        check.status, check.detail = "missing", exc.strerror or str(exc)
        return check
    attrs = entity.get("attributes") or {}
    if path.is_dir():
        check.status = "unchecked"
        check.detail = "a directory; recorded by total size only"
        return check
    if check.digest and st.st_size <= hash_max_bytes:
        try:
            check.current_digest = _file_digest(path)
        except OSError as exc:
            check.status, check.detail = "missing", f"cannot read: {exc.strerror or exc}"
            return check
        check.status = "same" if check.current_digest == check.digest else "changed"
        return check
    if check.digest:  # grown past the hashing bound: the size alone can tell a change
        check.status = "changed" if st.st_size != check.size_bytes else "unchecked"
        check.detail = f"size {st.st_size} bytes is over client.hash_max_bytes"
        return check
    same_size = check.size_bytes is None or st.st_size == check.size_bytes
    same_time = attrs.get("mtime_ns") in (None, st.st_mtime_ns)
    check.status = "same" if same_size and same_time else "changed"
    check.detail = "no digest recorded; compared by size and modification time"
    return check


def _commit_known(repo: str, commit: str) -> bool | None:
    """Whether ``repo`` (a local path) holds ``commit``; None when it cannot be asked."""
    if not os.path.isdir(repo):
        return None
    try:
        proc = subprocess.run(["git", "-C", repo, "cat-file", "-e", f"{commit}^{{commit}}"],
                              capture_output=True, timeout=5, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.returncode == 0


def reproduce(run: str, *, check_files: bool = True, partial: bool = False,
              config: Config | None = None) -> Reproduction:
    """The exact command, config, code and data of a run, and what is missing to rerun it.

    Args:
        run: a run id or an unambiguous prefix.
        check_files: digest again the local files the run used that still exist (blocks
            while it reads them; files over ``client.hash_max_bytes`` are compared by
            size) and look the commit up in the recorded repository.
        partial: accept a run still in progress.

    Returns:
        A ``Reproduction``; ``missing`` lists each obstacle in one line (no command or
        commit recorded, a dirty working tree, a commit the repository no longer has,
        data changed or gone since).
    """
    cfg = _config(config)
    row = resolve(run, partial=partial, what="reproduce", config=cfg)
    run_id = str(row["run_id"])
    tasks = query.tasks(run_id, config=cfg)
    code = row.get("code")
    code = dict(code) if isinstance(code, dict) else {}
    if "commit" not in code and not _na(row.get("code_commit")):
        code["commit"] = row["code_commit"]
    if "dirty" not in code and not _na(row.get("code_dirty")):
        code["dirty"] = bool(row["code_dirty"])
    env = row.get("environment")
    rep = Reproduction(
        run_id=run_id, name=_plain(row.get("name")), status=_plain(row.get("status")),
        command=_plain(row.get("command")),
        config=row["config"] if isinstance(row.get("config"), dict) else {},
        code=code, environment=env if isinstance(env, dict) else {},
        hosts=_hosts(row, tasks), partial=row["status"] == "running")
    if not rep.command:
        rep.missing.append("no command line was recorded for this run")
    commit = code.get("commit")
    if not commit:
        rep.missing.append("no code commit was recorded (the script was not in a git "
                           "repository, or git was not found)")
    else:
        if code.get("dirty"):
            rep.missing.append(f"the working tree had uncommitted changes at commit "
                               f"{str(commit)[:12]}; they were not recorded")
        repo = code.get("repo")
        if check_files and repo and _commit_known(str(repo), str(commit)) is False:
            rep.missing.append(f"commit {str(commit)[:12]} is not in {repo} any more")
    for entity in _used_data(run_id, cfg).values():
        if check_files:
            check = check_data(entity, hash_max_bytes=cfg.client.hash_max_bytes)
        else:
            check = DataCheck(uri=entity["uri"], name=entity["name"], kind=entity["kind"],
                              role=entity["role"], digest=entity["digest"],
                              size_bytes=entity["size_bytes"], status="unchecked",
                              detail="not checked")
        rep.data.append(check)
        label = check.uri or check.name or "an entity"
        if check.status == "changed":
            rep.missing.append(f"{label} changed since the run (recorded "
                               f"{check.digest or 'size/time'}, now "
                               f"{check.current_digest or 'different size/time'})")
        elif check.status == "missing":
            rep.missing.append(f"{label} is gone ({check.detail})")
    return rep


# ----------------------------------------------------------------------------- cost

def pareto_front(df: pd.DataFrame, metric: str, costs: Sequence[str],
                 mode: Literal["min", "max"] = "min") -> pd.Series:
    """True for each row no other row dominates: at least as good on ``metric`` and no
    more expensive on every cost, and strictly better on one.

    Rows without the metric are never on the front. A cost column with no value at all
    is left out; a missing cost in a row counts as infinitely expensive (unknown cost
    cannot be shown to be cheap).
    """
    sign = 1.0 if mode == "min" else -1.0
    known = [c for c in costs if c in df and df[c].notna().any()]
    q = [sign * float(v) if not _na(v) else math.nan for v in df[metric]]
    cost_rows = [[float(v) if not _na(v) else math.inf for v in df[c]] for c in known]
    points = [(q[i], [col[i] for col in cost_rows]) for i in range(len(df))]
    flags: list[bool] = []
    for i, (qi, ci) in enumerate(points):
        if math.isnan(qi):
            flags.append(False)
            continue
        dominated = False
        for j, (qj, cj) in enumerate(points):
            if i == j or math.isnan(qj):
                continue
            no_worse = qj <= qi and all(x <= y for x, y in zip(cj, ci, strict=True))
            better = qj < qi or any(x < y for x, y in zip(cj, ci, strict=True))
            if no_worse and better:
                dominated = True
                break
        flags.append(not dominated)
    return pd.Series(flags, index=df.index, dtype=bool)


def _run_costs(run: pd.Series, tasks: pd.DataFrame) -> dict[str, float | None]:
    """GPU-hours, energy, wall time and bytes read of a run: sums over its top-level
    tasks (nested tasks are inside their parents' figures)."""
    def total(col: str) -> float | None:
        if tasks.empty or col not in tasks:
            return None
        top = tasks[~tasks["parent_task_id"].isin(set(tasks["task_id"]))]
        values = top[col].dropna()
        return float(values.sum()) if len(values) else None

    gpu_s = total("gpu_seconds")
    energy = total("gpu_energy_joules")
    return {"gpu_hours": None if gpu_s is None else gpu_s / 3600.0,
            "energy_j": energy, "energy_kwh": None if energy is None else energy / 3.6e6,
            "wall_s": _plain(run.get("duration_s")), "read_bytes": total("read_bytes"),
            "cpu_seconds": total("cpu_seconds")}


def _metric(run_id: str, metric: str, measurement: str, which: str, mode: str,
            cfg: Config) -> tuple[float | None, float | None]:
    """(value, step) of the final or best ``metric`` of a run; (None, None) if absent."""
    df = series(measurement, run_id=run_id, index="time", config=cfg)
    if metric not in df or not df[metric].notna().any():
        return None, None
    values = df[metric].reset_index(drop=True)
    steps = df["step"].reset_index(drop=True) if "step" in df else None
    values = values.dropna()
    if which == "final":
        at = values.index[-1]
    else:
        at = values.idxmin() if mode == "min" else values.idxmax()
    step = None if steps is None else steps.get(at)
    return float(values[at]), None if _na(step) else float(step)  # type: ignore[arg-type]


def quality_cost(runs: Iterable[str] | pd.DataFrame | None = None, *, metric: str = "loss",
                 mode: Literal["min", "max"] = "min", which: Literal["final", "best"] = "final",
                 measurement: str = "train", name: str | None = None,
                 pareto_on: Sequence[str] = ("gpu_hours", "energy_j", "wall_s", "read_bytes"),
                 partial: bool = False, limit: int | None = None,
                 config: Config | None = None) -> pd.DataFrame:
    """Each run's quality (``metric``) against what it cost, with the Pareto front marked.

    Args:
        runs: run ids or prefixes, a frame from ``query.runs()``, or None for every ended
            run (``name`` and ``limit`` filter them; runs still running are left out).
        metric: a numeric field of ``measurement`` (``loss``, ``eval_loss``, ``accuracy``).
        mode: ``min`` when lower is better (a loss), ``max`` when higher is (accuracy).
        which: ``final`` (the last value recorded) or ``best`` (lowest or highest).
        pareto_on: the cost columns the front is computed on (those with no value in
            any run are left out).
        partial: accept runs still in progress among ``runs``.

    Returns:
        One row per run, best quality first: ``run_id``, ``name``, ``status``,
        ``metric`` (the name), ``value``, ``step`` (where that value was recorded),
        ``gpu_hours``, ``energy_j``, ``energy_kwh``, ``wall_s``, ``read_bytes``,
        ``cpu_seconds`` (Float64, NA when not recorded) and ``pareto`` (bool).
        ``df.attrs``: ``metric``, ``mode``, ``which``, ``partial``, ``warnings`` and
        ``running`` (as for ``diff``).
        Blocks on the stores (one series read per run).
    """
    if mode not in ("min", "max"):
        raise ProvscopeError(f"mode {mode!r} is not allowed; use 'min' (lower is better) "
                             "or 'max' (higher is better)")
    if which not in ("final", "best"):
        raise ProvscopeError(f"which {which!r} is not allowed; use 'final' or 'best'")
    cfg = _config(config)
    if runs is None:
        table = query.runs(name=name, config=cfg)
        table = table[table["status"].isin(ENDED)]
        rows = [r for _, r in table.iterrows()]
    elif isinstance(runs, pd.DataFrame):
        rows = [resolve(str(r), partial=partial, what="cost", config=cfg)
                for r in runs["run_id"]]
    elif isinstance(runs, str):
        rows = [resolve(runs, partial=partial, what="cost", config=cfg)]
    else:
        rows = [resolve(str(r), partial=partial, what="cost", config=cfg) for r in runs]
    if limit is not None:
        rows = rows[: int(limit)]
    out: list[dict[str, Any]] = []
    for row in rows:
        run_id = str(row["run_id"])
        value, step = _metric(run_id, metric, measurement, which, mode, cfg)
        costs = _run_costs(row, query.tasks(run_id, config=cfg))
        out.append({"run_id": run_id, "name": _plain(row.get("name")),
                    "status": _plain(row.get("status")), "metric": metric, "value": value,
                    "step": step, **costs})
    columns = ["run_id", "name", "status", "metric", "value", "step", *COST_COLUMNS,
               "cpu_seconds"]
    df = pd.DataFrame(out, columns=columns)
    for col in ["value", "step", *COST_COLUMNS, "cpu_seconds"]:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Float64")
    df["pareto"] = pareto_front(df, "value", list(pareto_on), mode) if len(df) else \
        pd.Series(dtype=bool)
    df = df.sort_values("value", ascending=mode == "min", na_position="last",
                        kind="stable").reset_index(drop=True)
    df.attrs.update(metric=metric, mode=mode, which=which)
    _mark(df, [r for r, s in zip(df["run_id"], df["status"], strict=True) if s == "running"])
    return df


def to_json(value: Any) -> str:
    """JSON text of a diff/cost frame or a ``Reproduction`` (missing values as null)."""
    from provscope import jsonsafe

    if isinstance(value, pd.DataFrame):
        records = [{str(k): _plain(v) for k, v in r.items()}
                   for r in value.to_dict(orient="records")]
        return json.dumps(jsonsafe.jsonable({"attrs": dict(value.attrs), "rows": records}),
                          indent=2)
    return json.dumps(jsonsafe.jsonable(value.to_dict()), indent=2)
