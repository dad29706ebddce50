"""The report's figures: matplotlib (Agg, no display) drawn into PNG bytes.

Each function takes plain DataFrames and returns the PNG of one figure, or None when
there is nothing to draw; none reads a store. matplotlib is imported on the first call
(``pip install 'provscope[report]'``); ``available()`` says whether it is installed.
Figures are drawn at a fixed size and resolution so that a report of a long run costs
what a short one does: long series are thinned to at most ``MAX_POINTS`` points per line
(every n-th point, the last one kept) before they are drawn.
"""

from __future__ import annotations

import importlib.util
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["MAX_POINTS", "available", "cost", "curves", "heatmap", "timeline", "utilisation"]

#: At most this many points of one line are drawn (a figure is ~900 px wide).
MAX_POINTS = 2000
_DPI = 100
_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
            "#17becf", "#bcbd22", "#7f7f7f"]


def available() -> bool:
    """True when matplotlib is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # never a window, whatever the user's backend
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _thin(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) > MAX_POINTS:
        idx = np.unique(np.append(np.linspace(0, len(x) - 1, MAX_POINTS).astype(int),
                                  len(x) - 1))
        x, y = x[idx], y[idx]
    return x, y


def _time_unit(span_ns: float) -> tuple[float, str]:
    """Divisor and axis label for times since the run started: seconds for a run under
    two minutes, hours past three hours, else minutes."""
    if span_ns < 120e9:
        return 1e9, "seconds since the run started"
    if span_ns > 3 * 3600e9:
        return 3600e9, "hours since the run started"
    return 60e9, "minutes since the run started"


def _column(df: pd.DataFrame, name: str) -> np.ndarray:
    return pd.to_numeric(df[name], errors="coerce").astype(float).to_numpy()


def curves(frames: Mapping[str, pd.DataFrame], panels: Sequence[tuple[str, Sequence[str]]],
           *, x: str = "step", x_label: str = "step") -> bytes | None:
    """Lines of several fields against ``x``, one panel per ``(title, fields)``.

    ``frames`` maps a label (a run) to a wide frame with column ``x`` and the fields; a
    panel whose fields no frame holds is left out. None when no panel has data.
    """
    drawn = [(title, fields) for title, fields in panels
             if any(f in df and df[f].notna().any() for df in frames.values() for f in fields)]
    if not drawn:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(drawn), figsize=(4.6 * len(drawn), 3.2), squeeze=False)
    several = len(frames) > 1
    for ax, (title, fields) in zip(axes[0], drawn, strict=True):
        for i, (label, df) in enumerate(frames.items()):
            if x not in df:
                continue
            for j, f in enumerate(fields):
                if f not in df or not df[f].notna().any():
                    continue
                xs, ys = _thin(_column(df, x), _column(df, f))
                name = f"{label} {f}" if several else f
                colour = _COLOURS[(i if several else j) % len(_COLOURS)]
                ax.plot(xs, ys, lw=1.1, color=colour, label=name,
                        ls="-" if j == 0 else "--", marker="o" if len(xs) < 3 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x_label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig)


def utilisation(panels: Sequence[tuple[str, str, Mapping[str, pd.DataFrame]]],
                *, start_ns: int | None = None) -> bytes | None:
    """Node series against the time since the run started, one panel per
    ``(title, unit, {label: frame with time_ns and value})``; empty panels are left out.
    """
    drawn = [(t, u, lines) for t, u, lines in panels
             if any(len(df) and df["value"].notna().any() for df in lines.values())]
    if not drawn:
        return None
    t0 = start_ns if start_ns is not None else min(
        int(df["time_ns"].min()) for _, _, lines in drawn for df in lines.values() if len(df))
    last = max(int(df["time_ns"].max()) for _, _, lines in drawn for df in lines.values()
               if len(df))
    scale, x_label = _time_unit(last - t0)
    plt = _plt()
    cols = min(2, len(drawn))
    rows = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 2.7 * rows), squeeze=False)
    for ax in axes.flat[len(drawn):]:
        ax.set_visible(False)
    for ax, (title, unit, lines) in zip(axes.flat, drawn, strict=False):
        for i, (label, df) in enumerate(lines.items()):
            if not len(df):
                continue
            xs, ys = _thin((_column(df, "time_ns") - t0) / scale, _column(df, "value"))
            ax.plot(xs, ys, lw=1.0, color=_COLOURS[i % len(_COLOURS)], label=label,
                    marker="o" if len(xs) < 5 else None, ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.set_xlabel(x_label, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if len(lines) > 1:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig)


def timeline(tasks: pd.DataFrame, *, start_ns: int | None = None,
             max_rows: int = 40) -> bytes | None:
    """The task timeline: one bar per task (name and kind), by start time; ``step``
    tasks share one row per parent (many small bars). Rows past ``max_rows`` are left
    out (the text report says how many)."""
    if tasks.empty:
        return None
    df = tasks[tasks["start_ns"].notna()].copy()
    if df.empty:
        return None
    t0 = start_ns if start_ns is not None else int(df["start_ns"].min())
    end = df["end_ns"].astype("Float64").fillna(float(df["start_ns"].max()))
    scale, x_label = _time_unit(float(end.max()) - t0)
    df["x0"] = (df["start_ns"].astype(float) - t0) / scale
    df["x1"] = (end.astype(float) - t0) / scale
    kinds = sorted({str(k) for k in df["kind"].dropna()})
    colour = {k: _COLOURS[i % len(_COLOURS)] for i, k in enumerate(kinds)}
    rows: list[tuple[str, list[tuple[float, float]], str]] = []
    steps = df[df["kind"] == "step"]
    others = df[df["kind"] != "step"]
    for name, kind, x0, x1 in zip(others["name"], others["kind"], others["x0"].to_numpy(float),
                                  others["x1"].to_numpy(float), strict=True):
        rows.append((str(name), [(float(x0), max(float(x1 - x0), 1e-4))],
                     colour.get(str(kind), "#777")))
    if len(steps):
        rows.append((f"steps ({len(steps)})", list(zip(steps["x0"], (steps["x1"] - steps["x0"])
                                                       .clip(lower=1e-4), strict=True)),
                     colour["step"]))
    rows = rows[:max_rows]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9.5, 0.6 + 0.26 * len(rows)))
    for i, (_name, spans, c) in enumerate(rows):
        ax.broken_barh(spans, (i - 0.35, 0.7), facecolors=c)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([n if len(n) <= 32 else n[:29] + "..." for n, _, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(x_label, fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="x", labelsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[k]) for k in kinds]
    ax.legend(handles, kinds, fontsize=7, loc="upper right", ncol=min(len(kinds), 6))
    fig.tight_layout()
    return _png(fig)


def heatmap(matrix: pd.DataFrame, *, title: str, log: bool = True) -> bytes | None:
    """A layer x step matrix (rows: layers, columns: steps) as a heatmap; with ``log``
    the colour is log10 of the value (norms span orders of magnitude)."""
    if matrix.empty or not np.isfinite(matrix.to_numpy(dtype=float, na_value=np.nan)).any():
        return None
    values = matrix.to_numpy(dtype=float, na_value=np.nan)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(values > 0, np.log10(values), np.nan)
    if values.shape[1] > MAX_POINTS:  # columns thinned like lines
        idx = np.linspace(0, values.shape[1] - 1, MAX_POINTS).astype(int)
        values, steps = values[:, idx], matrix.columns[idx]
    else:
        steps = matrix.columns
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9.5, 1.2 + 0.2 * len(matrix)))
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(matrix)))
    ax.set_yticklabels([str(n)[-40:] for n in matrix.index], fontsize=6)
    ticks = np.linspace(0, len(steps) - 1, min(8, len(steps))).astype(int)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(int(steps[i])) for i in ticks], fontsize=7)
    ax.set_xlabel("step", fontsize=8)
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(image, ax=ax, pad=0.01)
    bar.set_label("log10" if log else "", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


def cost(df: pd.DataFrame, *, cost_column: str, cost_label: str, metric: str) -> bytes | None:
    """Quality against cost: one point per run, the Pareto front joined by a line."""
    if df.empty or cost_column not in df:
        return None
    data = df[df["value"].notna() & df[cost_column].notna()]
    if data.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    xs, ys = _column(data, cost_column), _column(data, "value")
    front = data["pareto"].to_numpy(dtype=bool)
    ax.scatter(xs[~front], ys[~front], color="#999", s=24, label="dominated")
    ax.scatter(xs[front], ys[front], color="#d62728", s=30, label="Pareto front")
    order = np.argsort(xs[front])
    ax.plot(xs[front][order], ys[front][order], color="#d62728", lw=1, ls="--")
    for x_, y_, name in zip(xs, ys, data["name"].astype(str), strict=True):
        ax.annotate(name[:16], (x_, y_), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(cost_label, fontsize=9)
    ax.set_ylabel(metric, fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)
