"""``provscope report``: one self-contained HTML file about one or more runs.

For each run: the summary (status, times, hosts, command, code, config), the task
timeline, loss and throughput curves, GPU/CPU/memory/IO utilisation of its hosts during
its time window, a heatmap of per-layer statistics and the resource summary. For
several runs: their differences (``compare.diff`` against the first), their curves on
one plot and quality against cost with the Pareto front (``compare.quality_cost``).

Figures are inline SVG (``provscope.plots``) and the style sheet is inline: the file
fetches nothing when it is opened, and can be mailed or attached to a ticket. Building it
blocks on the stores; ``progress=True`` shows a progress bar (on stderr) while it
gathers each run's data, the long part for a long run.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from provscope import compare, plots, query
from provscope._version import __version__
from provscope.errors import ProvscopeError
from provscope.formatting import format_bytes, format_duration
from provscope.formatting import is_missing as _na

if TYPE_CHECKING:
    from provscope.config import Config

__all__ = ["RunData", "build", "gather", "render", "write"]

#: Train fields drawn, by panel.
TRAIN_PANELS = (("loss", ("loss", "eval_loss")),
                ("throughput (per second)", ("tokens_per_second", "samples_per_second")),
                ("learning rate", ("lr",)), ("gradient norm", ("grad_norm",)))
#: Node panels: (title, unit, measurement, field, rate): ``rate`` turns a counter into
#: a per-second rate.
NODE_PANELS = (
    ("GPU utilisation", "%", "gpu", "utilization_percent", False),
    ("GPU memory used", "bytes", "gpu", "memory_used_bytes", False),
    ("CPU utilisation", "%", "cpu", "usage_percent", False),
    ("memory used", "%", "memory", "used_percent", False),
    ("disk read", "bytes/s", "disk", "read_bytes_total", True),
    ("disk written", "bytes/s", "disk", "written_bytes_total", True),
)
#: Node series are read this far (ns) before the run's start and after its end.
NODE_MARGIN_NS = 2_000_000_000
#: Layer statistics tried for the heatmap, first present wins.
LAYER_FIELDS = ("grad_norm", "activation_std", "weight_norm", "activation_abs_max")


@dataclass
class RunData:
    """Everything the report shows about one run (frames as the query API returns them)."""

    run: pd.Series
    tasks: pd.DataFrame
    train: pd.DataFrame  # wide: time_ns, step and one column per train field
    node: list[tuple[str, str, dict[str, pd.DataFrame]]]  # utilisation panels
    layers: pd.DataFrame  # layer x step matrix
    layer_field: str | None
    entities: pd.DataFrame
    relations: pd.DataFrame
    warnings: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return str(self.run["run_id"])

    @property
    def label(self) -> str:
        name = self.run.get("name")
        return f"{'' if _na(name) else name} {self.run_id[:8]}".strip()




# ----------------------------------------------------------------------------- gather

def _first_rank(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the lowest rank (curves are drawn for one rank, rank 0 normally)."""
    if "rank" not in df or not df["rank"].notna().any():
        return df
    ranks = sorted(df["rank"].dropna().unique(), key=lambda r: (len(str(r)), str(r)))
    return df[(df["rank"] == ranks[0]).fillna(False).to_numpy(dtype=bool)]


def _train(run_id: str, cfg: Config, warnings: list[str]) -> pd.DataFrame:
    """The run's ``train`` fields, one row per step (columns ``step``, ``time_ns``, ...)."""
    df = _first_rank(compare.series("train", run_id=run_id, index="time", config=cfg,
                                    warnings_=warnings))
    out = df.reset_index(drop=True)
    out["time_ns"] = pd.DatetimeIndex(df.index).asi8
    if "step" in out and out["step"].notna().any():
        out["step"] = out["step"].astype("Float64").ffill()
    else:
        out["step"] = range(len(out))
    return out


def _window(run: pd.Series, tasks: pd.DataFrame) -> tuple[int | None, int | None]:
    start = run.get("start_ns")
    end = run.get("end_ns")
    if _na(end):
        end = run.get("heartbeat_ns")
    if _na(end) and len(tasks) and tasks["end_ns"].notna().any():
        end = tasks["end_ns"].max()
    return (None if _na(start) else int(start),  # type: ignore[arg-type]
            None if _na(end) else int(end))  # type: ignore[arg-type]


def _node(run: pd.Series, tasks: pd.DataFrame,
          cfg: Config) -> list[tuple[str, str, dict[str, pd.DataFrame]]]:
    """The utilisation panels: each node field over the run's window on its hosts, one
    line per host (and GPU or disk device)."""
    start, end = _window(run, tasks)
    hosts = compare._hosts(run, tasks)
    if start is None or not hosts:
        return []
    # a sample or two either side: node series are sampled every second or so, and a
    # rate needs two samples
    start, end = start - NODE_MARGIN_NS, (end + NODE_MARGIN_NS if end is not None else None)
    panels: list[tuple[str, str, dict[str, pd.DataFrame]]] = []
    for title, unit, measurement, fld, rate in NODE_PANELS:
        lines: dict[str, pd.DataFrame] = {}
        df = compare.series(measurement, [fld], host=hosts, start=start, end=end,
                            index="time", config=cfg)
        if len(df) and df[fld].notna().any():
            df = df.assign(time_ns=pd.DatetimeIndex(df.index).asi8)
            df = df[df[fld].notna().to_numpy(dtype=bool)]
            extra = [c for c in ("gpu", "device") if c in df]  # one line per device
            for key, part in df.groupby(["host", *extra], sort=True, dropna=False):
                keys = key if isinstance(key, tuple) else (key,)
                label = str(keys[0]) + "".join(
                    f" {c} {v}" for c, v in zip(extra, keys[1:], strict=True) if not _na(v))
                part = pd.DataFrame({"time_ns": part["time_ns"].to_numpy(),
                                     "value": part[fld].astype(float).to_numpy()})
                if rate:
                    dt_s = part["time_ns"].diff() / 1e9
                    part = part.assign(value=(part["value"].diff() / dt_s).clip(lower=0))
                    part = part.iloc[1:]
                lines[label] = part
        panels.append((title, unit, lines))
    return panels


def _layers(run_id: str, cfg: Config, warnings: list[str]) -> tuple[pd.DataFrame, str | None]:
    """A layer x step matrix of the first statistic of ``LAYER_FIELDS`` recorded."""
    for fld in LAYER_FIELDS:
        df = compare.series("layer", [fld], run_id=run_id, index="step", config=cfg)
        if df.empty or fld not in df or "layer" not in df or not df[fld].notna().any():
            continue
        df = _first_rank(df)
        frame = pd.DataFrame({"step": df.index.to_numpy(),
                              "layer": df["layer"].astype(str).to_numpy(),
                              "time_ns": pd.DatetimeIndex(df["time"]).asi8,
                              "value": df[fld].astype(float).to_numpy()})
        order = list(dict.fromkeys(frame.sort_values(["step", "time_ns"])["layer"]))
        matrix = frame.pivot_table(index="layer", columns="step", values="value",
                                   aggfunc="last").reindex(order)
        return matrix, fld
    warnings.append(f"no layer statistics of run {run_id} ({', '.join(LAYER_FIELDS)}): "
                    "provscope.watch(model) records them")
    return pd.DataFrame(), None


def gather(runs: Sequence[str], *, partial: bool = False, progress: bool = False,
           config: Config | None = None) -> list[RunData]:
    """Read what the report shows about each run (ids or unambiguous prefixes).

    Blocks on the stores: per run a few lineage reads and one series read per figure.
    ``progress`` draws a bar on stderr (tqdm) advancing per part read.

    Raises:
        ProvscopeError: an unknown or ambiguous id; a run still running without
            ``partial``; a store unreachable (one line each).
    """
    from tqdm import tqdm

    cfg = compare._config(config)
    rows = [compare.resolve(r, partial=partial, what="report", config=cfg) for r in runs]
    out: list[RunData] = []
    bar = tqdm(total=len(rows) * 4, desc="provscope report", unit="part", disable=not progress,
               leave=False, dynamic_ncols=True)
    try:
        for row in rows:
            run_id = str(row["run_id"])
            bar.set_postfix_str(f"{run_id[:8]} lineage")
            tasks = query.tasks(run_id, config=cfg)
            entities = query.entities(run_id, config=cfg)
            relations = query.relations(run_id, config=cfg)
            bar.update()
            bar.set_postfix_str(f"{run_id[:8]} train")
            warnings: list[str] = []
            train = _train(run_id, cfg, warnings)
            bar.update()
            bar.set_postfix_str(f"{run_id[:8]} nodes")
            node = _node(row, tasks, cfg)
            bar.update()
            bar.set_postfix_str(f"{run_id[:8]} layers")
            layers, layer_field = _layers(run_id, cfg, warnings)
            bar.update()
            if row["status"] == "running":
                warnings.insert(0, f"run {run_id} is still running: this shows what was "
                                "recorded so far (partial)")
            out.append(RunData(row, tasks, train, node, layers, layer_field, entities,
                               relations, warnings))
    finally:
        bar.close()
    return out


# ----------------------------------------------------------------------------- render

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;border-bottom:1px solid #ddd;
padding-bottom:4px;margin-top:32px}h3{font-size:15px;margin:20px 0 6px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
code,pre{font-family:Menlo,Consolas,monospace;font-size:12px}
pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:240px}
.figure{overflow-x:auto;margin:6px 0}svg.plot{display:block;max-width:100%;height:auto}
.muted{color:#777}.warn{background:#fff4d6;border:1px solid #f0c36d;padding:6px 10px}
.diff td.b{background:#fff1f0}nav a{margin-right:12px}
"""


def _e(value: Any) -> str:
    if _na(value):
        return "-"
    if isinstance(value, dict | list):
        return html.escape(json.dumps(value, default=str))
    if isinstance(value, float):
        return html.escape(f"{value:.6g}")
    return html.escape(str(value))


def _img(svg: str | None, alt: str) -> str:
    """A figure (inline SVG from ``provscope.plots``), or a line saying it has no data."""
    if svg is None:
        return f'<p class="muted">{html.escape(alt)}: nothing recorded</p>'
    return f'<div class="figure">{svg}</div>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *,
           num: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in num else f"<td>{c}</td>"
                         for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"






def _ts(ns: Any) -> str:
    if _na(ns):
        return "-"
    return dt.datetime.fromtimestamp(int(ns) / 1e9, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _summary(d: RunData) -> str:
    r = d.run
    code = r["code"] if isinstance(r.get("code"), dict) else {}
    env = r["environment"] if isinstance(r.get("environment"), dict) else {}
    start, end = _window(r, d.tasks)
    duration = None if start is None or end is None else (end - start) / 1e9
    packages: dict[str, Any] = env["packages"] if isinstance(env.get("packages"), dict) else {}
    rows = [
        ("run", f"<code>{_e(r['run_id'])}</code> {_e(r.get('name'))}"),
        ("status", _e(r.get("status"))),
        ("start / end (UTC)", f"{_ts(r.get('start_ns'))} / {_ts(r.get('end_ns'))}"),
        ("duration", _e(format_duration(duration))),
        ("hosts", _e(", ".join(compare._hosts(r, d.tasks)))),
        ("user", _e(r.get("user_name"))),
        ("command", f"<code>{_e(r.get('command'))}</code>"),
        ("code", _e(code.get("commit")) + (" (dirty)" if code.get("dirty") else "")),
        ("software", _e(", ".join(([f"python {env['python']}"] if env.get("python") else [])
                                  + [f"{k} {v}" for k, v in sorted(packages.items())]))),
    ]
    text = _table(["", ""], rows)
    config = r.get("config")
    if isinstance(config, dict) and config:
        pretty = html.escape(json.dumps(config, indent=2, default=str))
        text += f"<h3>config</h3><pre>{pretty}</pre>"
    return text


def _data_table(d: RunData) -> str:
    if d.entities.empty:
        return '<p class="muted">no datasets, models or checkpoints recorded</p>'
    rel = d.relations
    how: dict[str, set[str]] = {}
    for r in rel.itertuples():
        if r.relation in ("used", "generated"):
            how.setdefault(str(r.object_id), set()).add(str(r.relation))
    rows = [[_e(e["kind"]), _e(e["uri"] if not _na(e["uri"]) else e["name"]),
             f"<code>{_e(e['digest'])[:23]}</code>", _e(format_bytes(e["size_bytes"])),
             _e(", ".join(sorted(how.get(e["entity_id"], ()))))]
            for e in d.entities.to_dict(orient="records")]
    return _table(["kind", "uri", "digest", "size", "relation"], rows, num=(3,))


def _resources(d: RunData) -> str:
    tasks = d.tasks
    if tasks.empty:
        return '<p class="muted">no tasks recorded</p>'
    ids = set(tasks["task_id"])
    top = tasks[~tasks["parent_task_id"].isin(ids)]

    def total(col: str) -> Any:
        v = top[col].dropna()
        return v.sum() if len(v) else None

    costs = compare._run_costs(d.run, tasks)
    peak = top["peak_rss_bytes"].dropna()
    head = _table(["wall", "CPU s", "GPU h", "energy J", "energy kWh", "peak RSS", "read",
                   "written"],
                  [[_e(format_duration(costs["wall_s"])), _e(total("cpu_seconds")),
                    _e(costs["gpu_hours"]), _e(costs["energy_j"]), _e(costs["energy_kwh"]),
                    _e(format_bytes(peak.max() if len(peak) else None)),
                    _e(format_bytes(total("read_bytes"))),
                    _e(format_bytes(total("write_bytes")))]], num=range(8))
    shown = tasks[tasks["kind"] != "step"].head(50)
    rows = [[_e(t["name"]), _e(t["kind"]), _e(t["status"]),
             _e(format_duration(t["duration_s"])), _e(t["cpu_seconds"]), _e(t["gpu_seconds"]),
             _e(t["gpu_energy_joules"]), _e(format_bytes(t["peak_rss_bytes"])),
             _e(format_bytes(t["read_bytes"]))] for t in shown.to_dict(orient="records")]
    steps = int((tasks["kind"] == "step").sum())
    more = len(tasks[tasks["kind"] != "step"]) - len(shown)
    note = ""
    if steps or more > 0:
        note = (f'<p class="muted">{steps} step tasks'
                + (f" and {more} more tasks" if more > 0 else "") + " not listed</p>")
    return ("<h3>run (top-level tasks)</h3>" + head + "<h3>per task</h3>"
            + _table(["task", "kind", "status", "duration", "CPU s", "GPU s", "energy J",
                      "peak RSS", "read"], rows, num=range(3, 9)) + note)


def _run_section(d: RunData) -> str:
    start, _ = _window(d.run, d.tasks)
    parts = [f'<h2 id="run-{d.run_id}">{_e(d.label)}</h2>']
    parts += [f'<p class="warn">{html.escape(w)}</p>' for w in d.warnings]
    parts.append(_summary(d))
    parts.append("<h3>task timeline</h3>" + _img(plots.timeline(d.tasks, start_ns=start),
                                                 "task timeline"))
    parts.append("<h3>training curves</h3>"
                 + _img(plots.curves({d.label: d.train}, TRAIN_PANELS), "training curves"))
    parts.append("<h3>utilisation of its hosts</h3>"
                 + _img(plots.utilisation(d.node, start_ns=start), "utilisation"))
    title = f"layer {d.layer_field} (log10), by step" if d.layer_field else "layers"
    parts.append("<h3>layer statistics</h3>"
                 + _img(plots.heatmap(d.layers, title=title), "layer statistics heatmap"))
    parts.append("<h3>data, models and checkpoints</h3>" + _data_table(d))
    parts.append("<h3>resources</h3>" + _resources(d))
    return "\n".join(parts)


def _comparison(data: list[RunData], cfg: Config, partial: bool) -> str:
    first = data[0]
    parts = ['<h2 id="comparison">comparison</h2>']
    for other in data[1:]:
        df = compare.diff(first.run_id, other.run_id, only_differences=True,
                          partial=partial, config=cfg)
        rows = [[_e(r.section), _e(r.key), _e(r.a), _e(r.b)] for r in df.itertuples()]
        parts.append(f"<h3>{_e(first.label)} (a) vs {_e(other.label)} (b)</h3>")
        parts.append(_table(["section", "key", "a", "b"], rows) if rows
                     else '<p class="muted">no differences</p>')
    parts.append("<h3>training curves</h3>" + _img(
        plots.curves({d.label: d.train for d in data}, TRAIN_PANELS[:2]), "curves of the runs"))
    cost = compare.quality_cost([d.run_id for d in data], partial=partial, config=cfg)
    cost["name"] = [next(d.label for d in data if d.run_id == r) for r in cost["run_id"]]
    axis = next(((c, label) for c, label in (("gpu_hours", "GPU-hours"),
                                             ("energy_kwh", "energy (kWh)"),
                                             ("wall_s", "wall time (s)"))
                 if cost[c].notna().any()), ("wall_s", "wall time (s)"))
    parts.append("<h3>quality against cost</h3>" + _img(
        plots.cost(cost, cost_column=axis[0], cost_label=axis[1],
                   metric=f"final {cost.attrs['metric']}"), "quality against cost"))
    rows = [["*" if r["pareto"] else "", _e(r["name"]), _e(r["value"]), _e(r["gpu_hours"]),
             _e(r["energy_kwh"]), _e(r["wall_s"]), _e(r["read_bytes"])]
            for r in cost.astype(object).where(cost.notna(), None).to_dict(orient="records")]
    parts.append(_table(["front", "run", f"final {cost.attrs['metric']}", "GPU h", "kWh",
                         "wall s", "read bytes"], rows, num=range(2, 7)))
    return "\n".join(parts)


def render(data: list[RunData], *, partial: bool = False,
           config: Config | None = None) -> str:
    """The HTML text of the report of ``data`` (``gather``'s result). Draws every figure
    (CPU-bound, a fraction of a second per run); for several runs, reads their
    comparison."""
    cfg = compare._config(config)
    title = ("provscope report: " + ", ".join(d.label for d in data))[:200]
    nav = "".join(f'<a href="#run-{d.run_id}">{_e(d.label)}</a>' for d in data)
    if len(data) > 1:
        nav += '<a href="#comparison">comparison</a>'
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="muted">made {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by '
            f"provscope {html.escape(__version__)}</p><nav>{nav}</nav>"]
    if len(data) > 1:
        body.append(_comparison(data, cfg, partial))
    body += [_run_section(d) for d in data]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def build(runs: Sequence[str], *, partial: bool = False, progress: bool = False,
          config: Config | None = None) -> str:
    """``gather`` then ``render``: the HTML text of the report of ``runs``."""
    cfg = compare._config(config)
    return render(gather(runs, partial=partial, progress=progress, config=cfg),
                  partial=partial, config=cfg)


def write(runs: Sequence[str], output: str | os.PathLike[str], *, partial: bool = False,
          progress: bool = False, config: Config | None = None) -> dict[str, Any]:
    """Write the report of ``runs`` to ``output`` (one HTML file; its directory must
    exist). Returns ``{"path", "bytes", "seconds", "runs"}``. Blocks."""
    t0 = time.perf_counter()
    cfg = compare._config(config)
    data = gather(runs, partial=partial, progress=progress, config=cfg)
    text = render(data, partial=partial, config=cfg)
    path = Path(output)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ProvscopeError(f"cannot write the report to {path}: "
                             f"{exc.strerror or exc}") from None
    return {"path": str(path.resolve()), "bytes": len(text.encode()),
            "seconds": time.perf_counter() - t0, "runs": [d.run_id for d in data]}
