"""The report's figures, drawn as inline SVG (and one PNG inside the heatmap).

Each function takes plain DataFrames and returns the SVG text of one figure, or None
when there is nothing to draw; none reads a store. SVG is written directly rather than
through a plotting library: a figure is a few hundred elements, built in milliseconds,
and the report of a 30-minute run must render in seconds (docs/BENCHMARKS.md). Long
series are thinned to at most ``MAX_POINTS`` points per line (every n-th point, the last
one kept), so a long run costs what a short one does; the heatmap's cells are a PNG
(zlib, no imaging library) stretched over its plot area.
"""

from __future__ import annotations

import base64
import html
import itertools
import math
import struct
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["MAX_POINTS", "cost", "curves", "heatmap", "timeline", "utilisation"]

#: At most this many points of one line are drawn (a panel is ~440 px wide).
MAX_POINTS = 1000
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f"]
#: viridis, sampled: the heatmap's colour scale (dark: low, yellow: high).
_VIRIDIS = np.array([[68, 1, 84], [72, 40, 120], [62, 73, 137], [49, 104, 142],
                     [38, 130, 142], [31, 158, 137], [53, 183, 121], [110, 206, 88],
                     [181, 222, 43], [253, 231, 37]], dtype=float)
_FONT = 'font-family="Helvetica,Arial,sans-serif"'
_W, _H = 440, 230  # one panel
_LEFT, _RIGHT, _TOP, _BOTTOM = 58, 12, 26, 38


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _thin(x: object, y: object) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    if len(xs) > MAX_POINTS:
        idx = np.unique(np.append(np.linspace(0, len(xs) - 1, MAX_POINTS).astype(int),
                                  len(xs) - 1))
        xs, ys = xs[idx], ys[idx]
    return xs, ys


def _numbers(df: pd.DataFrame, name: str) -> np.ndarray:
    return pd.to_numeric(df[name], errors="coerce").astype(float).to_numpy()


def _time_unit(span_ns: float) -> tuple[float, str]:
    """Divisor and axis label for times since the run started: seconds for a run under
    two minutes, hours past three hours, else minutes."""
    if span_ns < 120e9:
        return 1e9, "seconds since the run started"
    if span_ns > 3 * 3600e9:
        return 3600e9, "hours since the run started"
    return 60e9, "minutes since the run started"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out, v = [], first
    while v <= hi + step * 1e-9:
        out.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return out


def _labels(ticks: Sequence[float]) -> list[str]:
    """Tick labels with one scale and as many decimals as the step needs: SI suffixes past
    a thousand (``1.5k``, ``2G``), so ``1000, 1005, 1010`` reads ``1.000k, 1.005k, 1.010k``."""
    if not ticks:
        return []
    top = max(abs(t) for t in ticks)
    div, suffix = next(((d, x) for d, x in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
                        if top >= d), (1.0, ""))
    if div == 1.0 and 0 < top < 1e-3:
        return [f"{t:.1e}" for t in ticks]
    step = min((b - a for a, b in itertools.pairwise(ticks)), default=top or 1.0)
    scaled = abs(step) / div or 1.0
    decimals = max(0, min(6, math.ceil(-math.log10(scaled) - 1e-9)))
    if any(abs(round(t / div, decimals) - t / div) > 1e-9 * max(1.0, abs(t / div))
           for t in ticks):
        decimals = min(6, decimals + 1)  # a step such as 2.5
    return [f"{t / div:.{decimals}f}{suffix}" for t in ticks]


def _fmt(v: float) -> str:
    """One number as a label (SI suffixes past a thousand)."""
    return _labels([v])[0] if v else "0"


def _range(values: Sequence[np.ndarray]) -> tuple[float, float]:
    finite = [v[np.isfinite(v)] for v in values if len(v)]
    finite = [v for v in finite if len(v)]
    if not finite:
        return 0.0, 1.0
    lo = float(min(v.min() for v in finite))
    hi = float(max(v.max() for v in finite))
    if hi == lo:
        pad = abs(lo) * 0.05 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.04
    return lo - pad, hi + pad


class _Panel:
    """One plot area at (x, y) of a figure: axes, grid, lines, points, legend."""

    def __init__(self, x: float, y: float, xr: tuple[float, float],
                 yr: tuple[float, float], *, title: str, x_label: str, y_label: str = "",
                 w: float = _W, h: float = _H, left: float = _LEFT) -> None:
        self.x0, self.y0 = x + left, y + _TOP
        self.w, self.h = w - left - _RIGHT, h - _TOP - _BOTTOM
        self.xr, self.yr = xr, yr
        self.parts: list[str] = []
        self.legend: list[tuple[str, str, bool]] = []
        self.marks: list[np.ndarray] = []  # pixel coordinates drawn, to place the legend
        self._axes(x, y, w, title, x_label, y_label)

    def px(self, v: np.ndarray | float) -> np.ndarray | float:
        return self.x0 + (np.asarray(v) - self.xr[0]) / (self.xr[1] - self.xr[0]) * self.w

    def py(self, v: np.ndarray | float) -> np.ndarray | float:
        return self.y0 + self.h - (np.asarray(v) - self.yr[0]) / (self.yr[1] - self.yr[0]) \
            * self.h

    def _axes(self, x: float, y: float, w: float, title: str, x_label: str,
              y_label: str) -> None:
        p = self.parts
        p.append(f'<text x="{x + w / 2:.1f}" y="{y + 16}" text-anchor="middle" '
                 f'font-size="12" {_FONT}>{_e(title)}</text>')
        yticks = _ticks(*self.yr)
        for t, text in zip(yticks, _labels(yticks), strict=True):
            yy = float(self.py(t))
            p.append(f'<line x1="{self.x0:.1f}" x2="{self.x0 + self.w:.1f}" y1="{yy:.1f}" '
                     f'y2="{yy:.1f}" stroke="#e5e5e5"/>')
            p.append(f'<text x="{self.x0 - 4:.1f}" y="{yy + 3:.1f}" text-anchor="end" '
                     f'font-size="9" {_FONT}>{_e(text)}</text>')
        xticks = _ticks(*self.xr, n=6)
        for t, text in zip(xticks, _labels(xticks), strict=True):
            xx = float(self.px(t))
            p.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{self.y0:.1f}" '
                     f'y2="{self.y0 + self.h:.1f}" stroke="#eeeeee"/>')
            p.append(f'<text x="{xx:.1f}" y="{self.y0 + self.h + 12:.1f}" '
                     f'text-anchor="middle" font-size="9" {_FONT}>{_e(text)}</text>')
        p.append(f'<rect x="{self.x0:.1f}" y="{self.y0:.1f}" width="{self.w:.1f}" '
                 f'height="{self.h:.1f}" fill="none" stroke="#888"/>')
        p.append(f'<text x="{self.x0 + self.w / 2:.1f}" y="{self.y0 + self.h + 28:.1f}" '
                 f'text-anchor="middle" font-size="10" {_FONT}>{_e(x_label)}</text>')
        if y_label:
            cy = self.y0 + self.h / 2
            p.append(f'<text x="{x + 12}" y="{cy:.1f}" text-anchor="middle" font-size="10" '
                     f'transform="rotate(-90 {x + 12} {cy:.1f})" {_FONT}>{_e(y_label)}</text>')

    def no_y_axis(self) -> None:
        """Drop the numeric y axis (grid and labels): rows are named instead."""
        self.parts = [p for p in self.parts if 'stroke="#e5e5e5"' not in p
                      and 'text-anchor="end"' not in p]

    def line(self, xs: np.ndarray, ys: np.ndarray, colour: str, label: str,
             dashed: bool = False) -> None:
        if not len(xs):
            return
        px, py = self.px(xs), self.py(ys)
        self.marks.append(np.column_stack([np.atleast_1d(px), np.atleast_1d(py)]))
        if len(xs) < 5:  # too few to read as a line: mark the points
            for a, b in zip(np.atleast_1d(px), np.atleast_1d(py), strict=True):
                self.parts.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>')
        if len(xs) > 1:
            pairs = zip(np.atleast_1d(px), np.atleast_1d(py), strict=True)
            points = " ".join(f"{a:.1f},{b:.1f}" for a, b in pairs)
            dash = ' stroke-dasharray="5,3"' if dashed else ""
            self.parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" '
                              f'stroke-width="1.3"{dash}/>')
        self.legend.append((label, colour, dashed))

    def points(self, xs: np.ndarray, ys: np.ndarray, colour: str, label: str,
               r: float = 4) -> None:
        self.marks.append(np.column_stack([np.atleast_1d(self.px(xs)),
                                           np.atleast_1d(self.py(ys))]))
        for a, b in zip(np.atleast_1d(self.px(xs)), np.atleast_1d(self.py(ys)), strict=True):
            self.parts.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="{r}" fill="{colour}"/>')
        self.legend.append((label, colour, False))

    def _corner(self, width: float, height: float) -> tuple[float, float]:
        """(right edge, top) of the legend box: the corner of the plot area covering the
        fewest drawn points (top right on a tie)."""
        pts = np.concatenate(self.marks) if self.marks else np.empty((0, 2))
        right, left = self.x0 + self.w - 6, self.x0 + 6 + width
        top, bottom = self.y0 + 6, self.y0 + self.h - 6 - height
        best, where = None, (right, top)
        for cx, cy in ((right, top), (left, top), (right, bottom), (left, bottom)):
            inside = int(((pts[:, 0] >= cx - width) & (pts[:, 0] <= cx)
                          & (pts[:, 1] >= cy) & (pts[:, 1] <= cy + height)).sum())
            if best is None or inside < best:
                best, where = inside, (cx, cy)
        return where

    def render(self) -> str:
        out = list(self.parts)
        if len(self.legend) > 1 or (self.legend and self.legend[0][0]):
            width = max(len(t) for t, _, _ in self.legend) * 5.6 + 26
            height = 12 * len(self.legend) + 6
            lx, ly = self._corner(width, height)
            out.append(f'<rect x="{lx - width:.1f}" y="{ly:.1f}" width="{width:.1f}" '
                       f'height="{height}" fill="white" '
                       'fill-opacity="0.85" stroke="#ccc"/>')
            for i, (label, colour, dashed) in enumerate(self.legend):
                yy = ly + 11 + 12 * i
                dash = ' stroke-dasharray="4,2"' if dashed else ""
                out.append(f'<line x1="{lx - width + 5:.1f}" x2="{lx - width + 19:.1f}" '
                           f'y1="{yy - 3:.1f}" y2="{yy - 3:.1f}" stroke="{colour}" '
                           f'stroke-width="2"{dash}/>')
                out.append(f'<text x="{lx - width + 22:.1f}" y="{yy:.1f}" font-size="9" '
                           f'{_FONT}>{_e(label)}</text>')
        return "\n".join(out)


def _svg(width: float, height: float, body: str, label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" role="img" '
            f'aria-label="{_e(label)}" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}"><rect width="100%" height="100%" '
            f'fill="white"/>{body}</svg>')


def curves(frames: Mapping[str, pd.DataFrame], panels: Sequence[tuple[str, Sequence[str]]],
           *, x: str = "step", x_label: str = "step") -> str | None:
    """Lines of several fields against ``x``, one panel per ``(title, fields)``.

    ``frames`` maps a label (a run) to a wide frame with column ``x`` and the fields; a
    panel whose fields no frame holds is left out. None when no panel has data.
    """
    drawn = [(title, fields) for title, fields in panels
             if any(f in df and df[f].notna().any() for df in frames.values() for f in fields)]
    if not drawn:
        return None
    several = len(frames) > 1
    cols = min(3, len(drawn))
    rows = math.ceil(len(drawn) / cols)
    body = []
    for n, (title, fields) in enumerate(drawn):
        lines = []
        for i, (label, df) in enumerate(frames.items()):
            if x not in df:
                continue
            for j, f in enumerate(fields):
                if f in df and df[f].notna().any():
                    xs, ys = _thin(_numbers(df, x), _numbers(df, f))
                    lines.append((xs, ys, COLOURS[(i if several else j) % len(COLOURS)],
                                  f"{label} {f}" if several else f, j > 0))
        panel = _Panel((n % cols) * _W, (n // cols) * _H, _range([ln[0] for ln in lines]),
                       _range([ln[1] for ln in lines]), title=title, x_label=x_label)
        for xs, ys, colour, label, dashed in lines:
            panel.line(xs, ys, colour, label, dashed)
        body.append(panel.render())
    return _svg(cols * _W, rows * _H, "\n".join(body), "training curves")


def utilisation(panels: Sequence[tuple[str, str, Mapping[str, pd.DataFrame]]],
                *, start_ns: int | None = None) -> str | None:
    """Node series against the time since the run started, one panel per
    ``(title, unit, {label: frame with time_ns and value})``; empty panels are left out.
    """
    drawn = [(t, u, lines) for t, u, lines in panels
             if any(len(df) and df["value"].notna().any() for df in lines.values())]
    if not drawn:
        return None
    frames = [df for _, _, lines in drawn for df in lines.values() if len(df)]
    t0 = start_ns if start_ns is not None else min(int(df["time_ns"].min()) for df in frames)
    last = max(int(df["time_ns"].max()) for df in frames)
    scale, x_label = _time_unit(last - t0)
    cols = min(2, len(drawn))
    rows = math.ceil(len(drawn) / cols)
    width = 560
    body = []
    for n, (title, unit, lines) in enumerate(drawn):
        data = [(label, *_thin((_numbers(df, "time_ns") - t0) / scale, _numbers(df, "value")))
                for label, df in lines.items() if len(df)]
        panel = _Panel((n % cols) * width, (n // cols) * _H, _range([d[1] for d in data]),
                       _range([d[2] for d in data]), title=title, x_label=x_label,
                       y_label=unit, w=width)
        for i, (label, xs, ys) in enumerate(data):
            panel.line(xs, ys, COLOURS[i % len(COLOURS)], label if len(data) > 1 else "")
        body.append(panel.render())
    return _svg(cols * width, rows * _H, "\n".join(body), "utilisation")


def timeline(tasks: pd.DataFrame, *, start_ns: int | None = None,
             max_rows: int = 40) -> str | None:
    """The task timeline: one bar per task, by start time; ``step`` tasks share one row.
    Rows past ``max_rows`` are left out (the resource table lists the tasks)."""
    if tasks.empty or not tasks["start_ns"].notna().any():
        return None
    df = tasks[tasks["start_ns"].notna().to_numpy(dtype=bool)]
    starts = df["start_ns"].astype(float).to_numpy()
    ends = df["end_ns"].astype("Float64").fillna(float(np.nanmax(starts))).astype(float) \
        .to_numpy()
    t0 = float(start_ns) if start_ns is not None else float(starts.min())
    scale, x_label = _time_unit(float(ends.max()) - t0)
    x0, x1 = (starts - t0) / scale, (ends - t0) / scale
    kinds = [str(k) for k in df["kind"].fillna("task")]
    names = [str(n) for n in df["name"].fillna("")]
    palette = {k: COLOURS[i % len(COLOURS)] for i, k in enumerate(sorted(set(kinds)))}
    rows: list[tuple[str, list[tuple[float, float]], str]] = []
    step_spans = [(a, b) for a, b, k in zip(x0, x1, kinds, strict=True) if k == "step"]
    for a, b, k, name in zip(x0, x1, kinds, names, strict=True):
        if k != "step":
            rows.append((name, [(a, b)], palette[k]))
    if step_spans:
        rows.append((f"steps ({len(step_spans)})", step_spans, palette["step"]))
    rows = rows[:max_rows]
    left, row_h = 190, 16
    width, height = 1000, _TOP + _BOTTOM + row_h * len(rows) + 4
    lo, hi = float(min(x0.min(), 0.0)), float(x1.max())
    panel = _Panel(0, 0, (lo, hi if hi > lo else lo + 1), (0.0, 1.0), title="",
                   x_label=x_label, w=width, h=height, left=left)
    panel.no_y_axis()
    span = panel.w / (panel.xr[1] - panel.xr[0])
    for i, (name, spans, colour) in enumerate(rows):
        y = panel.y0 + 2 + i * row_h
        label = name if len(name) <= 30 else name[:27] + "..."
        panel.parts.append(f'<text x="{left - 6}" y="{y + row_h - 5}" text-anchor="end" '
                           f'font-size="9" {_FONT}>{_e(label)}</text>')
        for a, b in spans:
            xa = float(panel.px(a))
            panel.marks.append(np.array([[xa, y + row_h / 2],
                                         [xa + max((b - a) * span, 1.0), y + row_h / 2]]))
            panel.parts.append(f'<rect x="{xa:.1f}" y="{y + 2}" width="'
                               f'{max((b - a) * span, 1.0):.1f}" height="{row_h - 4}" '
                               f'fill="{colour}"><title>{_e(name)}</title></rect>')
    for k in sorted(palette):
        panel.legend.append((k, palette[k], False))
    return _svg(width, height, panel.render(), "task timeline")


def _png(rgb: np.ndarray) -> bytes:
    """An RGB uint8 array (rows, columns, 3) as PNG bytes."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _colour(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (NaN: grey) as viridis RGB."""
    pos = np.clip(np.nan_to_num(values, nan=0.0), 0, 1) * (len(_VIRIDIS) - 1)
    low = np.floor(pos).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (pos - low)[..., None]
    rgb = _VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac
    rgb[np.isnan(values)] = (235, 235, 235)
    return rgb.round().astype(np.uint8)


def heatmap(matrix: pd.DataFrame, *, title: str, log: bool = True) -> str | None:
    """A layer x step matrix (rows: layers, columns: steps) as a heatmap; with ``log``
    the colour is log10 of the value (norms span orders of magnitude)."""
    values = matrix.to_numpy(dtype=float, na_value=np.nan) if not matrix.empty else None
    if values is None or not np.isfinite(values).any():
        return None
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(values > 0, np.log10(values), np.nan)
    steps = np.asarray(matrix.columns, dtype=float)
    if values.shape[1] > MAX_POINTS:  # columns thinned like lines
        idx = np.linspace(0, values.shape[1] - 1, MAX_POINTS).astype(int)
        values, steps = values[:, idx], steps[idx]
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    scaled = (values - lo) / (hi - lo) if hi > lo else np.where(np.isnan(values), np.nan, 0.5)
    image = base64.b64encode(_png(_colour(scaled))).decode("ascii")
    left, row_h = 170, 14
    width = 1000
    height = _TOP + _BOTTOM + max(row_h * len(matrix), 60)
    panel = _Panel(0, 0, (float(steps.min()), float(steps.max()) or 1.0), (0.0, 1.0),
                   title=title, x_label="step", w=width - 70, h=height, left=left)
    panel.no_y_axis()
    panel.parts.insert(1, f'<image x="{panel.x0:.1f}" y="{panel.y0:.1f}" '
                       f'width="{panel.w:.1f}" height="{panel.h:.1f}" '
                       'preserveAspectRatio="none" style="image-rendering:pixelated" '
                       f'href="data:image/png;base64,{image}"/>')
    n = len(matrix)
    for i, name in enumerate(matrix.index):
        y = panel.y0 + (i + 0.5) * panel.h / n + 3
        panel.parts.append(f'<text x="{left - 5}" y="{y:.1f}" text-anchor="end" '
                           f'font-size="8" {_FONT}>{_e(str(name)[-36:])}</text>')
    # the colour scale
    bx, by, bh = width - 52, panel.y0, panel.h
    stops = "".join(f'<stop offset="{i / (len(_VIRIDIS) - 1):.3f}" '
                    f'stop-color="rgb({r:.0f},{g:.0f},{b:.0f})"/>'
                    for i, (r, g, b) in enumerate(_VIRIDIS))
    panel.parts.append(f'<defs><linearGradient id="viridis" x1="0" y1="1" x2="0" y2="0">'
                       f'{stops}</linearGradient></defs><rect x="{bx}" y="{by:.1f}" '
                       f'width="12" height="{bh:.1f}" fill="url(#viridis)"/>')
    for v in (lo, (lo + hi) / 2, hi):
        y = by + bh - (v - lo) / ((hi - lo) or 1) * bh
        panel.parts.append(f'<text x="{bx + 15}" y="{y + 3:.1f}" font-size="8" '
                           f'{_FONT}>{_e(_fmt(v))}</text>')
    if log:
        panel.parts.append(f'<text x="{bx}" y="{by - 4:.1f}" font-size="8" '
                           f'{_FONT}>log10</text>')
    return _svg(width, height, panel.render(), "layer statistics heatmap")


def cost(df: pd.DataFrame, *, cost_column: str, cost_label: str, metric: str) -> str | None:
    """Quality against cost: one point per run, the Pareto front joined by a line."""
    if df.empty or cost_column not in df:
        return None
    data = df[(df["value"].notna() & df[cost_column].notna()).to_numpy(dtype=bool)]
    if data.empty:
        return None
    xs, ys = _numbers(data, cost_column), _numbers(data, "value")
    front = data["pareto"].to_numpy(dtype=bool)
    width = 620
    panel = _Panel(0, 0, _range([xs]), _range([ys]), title=f"{metric} against {cost_label}",
                   x_label=cost_label, y_label=metric, w=width, h=300)
    order = np.argsort(xs[front])
    panel.line(xs[front][order], ys[front][order], "#d62728", "Pareto front", dashed=True)
    panel.points(xs[~front], ys[~front], "#999999", "dominated")
    panel.points(xs[front], ys[front], "#d62728", "")
    panel.legend = [x for x in panel.legend if x[0]]
    for a, b, name in zip(np.atleast_1d(panel.px(xs)), np.atleast_1d(panel.py(ys)),
                          data["name"].astype(str), strict=True):
        panel.parts.append(f'<text x="{a + 5:.1f}" y="{b - 5:.1f}" font-size="9" '
                           f'{_FONT}>{_e(name[:20])}</text>')
    return _svg(width, 300, panel.render(), "quality against cost")
