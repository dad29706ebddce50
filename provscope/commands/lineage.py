"""``provscope runs`` (recent runs) and ``provscope show RUN_ID`` (one run's lineage).

Both read the lineage store the configuration points at (the embedded file by default)
through ``provscope.query`` and print plain aligned text, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping
from typing import Any

from provscope import jsonsafe
from provscope.formatting import format_bytes, format_duration
from provscope.formatting import is_missing as _na

__all__ = ["format_bytes", "format_duration", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``runs`` and ``show`` subcommands."""
    p = sub.add_parser(
        "runs", help="list recent runs",
        description="Table of recent runs: id, name, status, start, duration, host, tasks.")
    p.add_argument("-n", "--limit", type=int, default=20, metavar="N",
                   help="show at most N runs, most recent first (default 20; 0: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--lineage-url", metavar="URL",
                   help="read this lineage store (sqlite:///PATH or postgresql://...)")
    p.set_defaults(handler=run_runs)

    s = sub.add_parser(
        "show", help="show one run: task tree, entities, resources",
        description="A run's task tree (durations, status, resources) and the entities its "
        "tasks used and generated. RUN_ID may be any unambiguous prefix; without it, the "
        "latest run.")
    s.add_argument("run_id", metavar="RUN_ID", nargs="?", default="latest",
                   help="run id, an unambiguous prefix of it, or 'latest' (the default: "
                   "the most recently started run)")
    s.add_argument("--max-children", type=int, default=20, metavar="N",
                   help="children listed per task before the rest are summarised (default 20)")
    s.add_argument("--all", action="store_true", help="list every task")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.add_argument("--lineage-url", metavar="URL",
                   help="read this lineage store (sqlite:///PATH or postgresql://...)")
    s.set_defaults(handler=run_show)


# ----------------------------------------------------------------------------- formatting







def _num(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if _na(value) else fmt.format(float(value))


def _time(ts: Any) -> str:
    return "-" if _na(ts) else ts.strftime("%Y-%m-%d %H:%M:%S")


def _text(value: Any) -> str:
    return "-" if _na(value) or value == "" else str(value)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)


def _row(row: Mapping[Hashable, Any]) -> dict[str, Any]:
    """One DataFrame row as JSON: a missing cell (None, NaN, NA, NaT) is null."""
    return {str(k): None if _na(v) else jsonsafe.jsonable(v) for k, v in row.items()}


def _records(df: Any) -> list[dict[str, Any]]:
    return [_row(r) for r in df.to_dict(orient="records")]


# ----------------------------------------------------------------------------- runs

def run_runs(args: argparse.Namespace) -> int:
    """``provscope runs``: print the recent runs. Returns the exit code."""
    from provscope import query
    from provscope.commands import load_from_args

    config = load_from_args(args, **{"lineage.url": args.lineage_url})
    df = query.runs(limit=args.limit or None, config=config)
    if args.json:
        print(json.dumps(_records(df), indent=2))
        return 0
    if df.empty:
        print(f"no runs recorded in {query._safe(config.lineage_url)} "
              "(`provscope demo` records one)")
        return 0
    rows = [[str(r.run_id), _text(r.name), _text(r.status), _time(r.start_time),
             format_duration(r.duration_s), _text(r.host), str(r.task_count)]
            for r in df.itertuples()]
    print(_table(["RUN ID", "NAME", "STATUS", "START (UTC)", "DURATION", "HOST", "TASKS"], rows))
    return 0


# ----------------------------------------------------------------------------- show

def run_show(args: argparse.Namespace) -> int:
    """``provscope show``: print one run. Unknown or ambiguous id: ProvscopeError (exit 1)."""
    from provscope import query
    from provscope.commands import load_from_args

    config = load_from_args(args, **{"lineage.url": args.lineage_url})
    run_id = query.resolve_run_id(args.run_id, config=config)
    run = query.runs(run_id=run_id, config=config).iloc[0]
    tasks = query.tasks(run_id, config=config)
    entities = query.entities(run_id, config=config)
    relations = query.relations(run_id, config=config)
    if args.json:
        print(json.dumps({"run": _row(run.to_dict()), "tasks": _records(tasks),
                          "entities": _records(entities), "relations": _records(relations)},
                         indent=2))
        return 0
    limit = math.inf if args.all else max(1, args.max_children)
    out = sys.stdout
    out.write(_run_header(run) + "\n")
    out.write("\n" + _task_tree(tasks, limit) + "\n")
    ent = _entity_sections(entities, relations, tasks, run_id)
    if ent:
        out.write("\n" + ent + "\n")
    out.write("\n" + _resources(tasks) + "\n")
    return 0


def _run_header(run: Any) -> str:
    lines = [
        f"run       {run.run_id}  {_text(run['name'])}",
        f"status    {_text(run.status)}   start {_time(run.start_time)} UTC   "
        f"end {_time(run.end_time)}   duration {format_duration(run.duration_s)}",
        f"host      {_text(run.host)}   user {_text(run.user_name)}   "
        f"campaign {_text(run.campaign)}   parent run {_text(run.parent_run_id)}",
    ]
    if not _na(run.command):
        lines.append(f"command   {run.command}")
    if not _na(run.code_commit):
        dirty = " (dirty)" if not _na(run.code_dirty) and bool(run.code_dirty) else ""
        lines.append(f"code      {run.code_commit}{dirty}")
    if isinstance(run.config, dict) and run.config:
        text = json.dumps(run.config, default=str, separators=(", ", ": "))
        lines.append(f"config    {text if len(text) <= 100 else text[:97] + '...'}")
    return "\n".join(lines)


def _task_tree(tasks: Any, limit: float) -> str:
    if tasks.empty:
        return "tasks: none recorded"
    rows_by_id = {r["task_id"]: r for r in tasks.to_dict(orient="records")}
    children: dict[Any, list[str]] = defaultdict(list)
    for tid, r in rows_by_id.items():
        parent = r["parent_task_id"]
        children[parent if parent in rows_by_id else None].append(tid)
    table: list[list[str]] = []

    def line(r: dict[str, Any], depth: int) -> list[str]:
        name = _text(r["name"])
        return ["  " * depth + (name if len(name) <= 40 else name[:37] + "..."),
                _text(r["kind"]), _text(r["status"]) + ("*" if not _na(r["error"]) else ""),
                format_duration(r["duration_s"]), _num(r["cpu_seconds"]),
                format_bytes(r["peak_rss_bytes"]), _num(r["gpu_seconds"]),
                _num(r["gpu_energy_joules"], "{:.0f}"), _text(r["rank"])]

    def walk(parent: Any, depth: int) -> None:
        kids = children.get(parent, [])
        for i, tid in enumerate(kids):
            if i >= limit:
                rest = [rows_by_id[t] for t in kids[i:]]
                kinds = Counter(_text(r["kind"]) for r in rest)
                statuses = Counter(_text(r["status"]) for r in rest)
                durations = [float(r["duration_s"]) for r in rest if not _na(r["duration_s"])]
                mean = format_duration(sum(durations) / len(durations)) if durations else "-"
                table.append(["  " * depth + f"... {len(rest)} more: "
                              + ", ".join(f"{n} {k}" for k, n in kinds.items())
                              + " (" + ", ".join(f"{n} {s}" for s, n in statuses.items())
                              + f"; mean {mean})", "", "", "", "", "", "", "", ""])
                return
            table.append(line(rows_by_id[tid], depth))
            walk(tid, depth + 1)

    walk(None, 0)
    head = ["TASK", "KIND", "STATUS", "DURATION", "CPU S", "PEAK RSS", "GPU S", "ENERGY J",
            "RANK"]
    text = f"tasks ({len(rows_by_id)})\n" + _table(head, table)
    errors = [r for r in rows_by_id.values() if not _na(r["error"])]
    for r in errors[:5]:
        err = str(r["error"]).strip().splitlines()
        text += f"\n* {_text(r['name'])}: {err[-1] if err else ''}"
    return text


def _entity_sections(entities: Any, relations: Any, tasks: Any, run_id: str) -> str:
    if entities.empty:
        return ""
    by_id = {r["entity_id"]: r for r in entities.to_dict(orient="records")}
    names = dict(zip(tasks.task_id, tasks.name, strict=True))
    names[run_id] = "(run)"  # relations recorded on the run itself
    sections: dict[str, list[list[str]]] = {"used": [], "generated": []}
    related: set[str] = set()
    seen: set[tuple[str, str, str]] = set()
    for rel in relations.to_dict(orient="records"):
        ent = by_id.get(rel["object_id"])
        if rel["relation"] not in sections or ent is None:
            continue
        task = _text(names.get(rel["subject_id"]))
        key = (rel["relation"], rel["object_id"], task)
        if key in seen:
            continue
        seen.add(key)
        related.add(rel["object_id"])
        sections[rel["relation"]].append(_entity_row(ent, task, rel["role"]))
    other = [_entity_row(e, "-", "") for eid, e in by_id.items() if eid not in related]
    head = ["KIND", "URI", "DIGEST", "SIZE", "TASK", "ROLE"]
    parts = []
    for title, rows in (("used", sections["used"]), ("generated", sections["generated"]),
                        ("other entities of the run", other)):
        if rows:
            parts.append(f"{title} ({len(rows)})\n" + _table(head, rows))
    return "\n\n".join(parts)


def _entity_row(e: dict[str, Any], task: str, role: Any) -> list[str]:
    digest = _text(e["digest"])
    if len(digest) > 23:
        digest = digest[:23] + "..."
    uri = _text(e["uri"] if not _na(e["uri"]) else e["name"])
    return [_text(e["kind"]), uri, digest, format_bytes(e["size_bytes"]), task, _text(role)]


def _resources(tasks: Any) -> str:
    if tasks.empty:
        return "resources: none recorded"
    ids = set(tasks.task_id)
    top = tasks[~tasks.parent_task_id.isin(ids)]  # avoid counting nested tasks twice

    def total(col: str) -> Any:
        values = top[col].dropna()
        return values.sum() if len(values) else None

    peak = top["peak_rss_bytes"].dropna()
    return ("resources (top-level tasks): "
            f"cpu {_num(total('cpu_seconds'))} s, "
            f"peak RSS {format_bytes(peak.max() if len(peak) else None)}, "
            f"GPU {_num(total('gpu_seconds'))} s, "
            f"energy {_num(total('gpu_energy_joules'), '{:.0f}')} J, "
            f"read {format_bytes(total('read_bytes'))}, "
            f"written {format_bytes(total('write_bytes'))}")
