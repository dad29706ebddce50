"""`provscope report`: one self-contained HTML file, rendered in headless Chromium.

The runs are recorded through the real in-job API into a real embedded store (and layer
statistics and node series written as the watcher and the collectors write them). The
page is loaded by Debian's ``chromium``: a check script added to a copy of the page
records every script error and console error, that nothing was fetched over the
network, and the drawn size of every figure into the DOM, which ``--dump-dom`` returns.
A screenshot is written for a person to look at (and copied to ``$PROVSCOPE_ARTIFACTS``
when that is set).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import struct
import subprocess
import time
import zlib

from provscope.exporters.embedded import EmbeddedPointsExporter
from provscope.exporters.pipeline import Pipeline

from provscope import query, report
from provscope.cli import main
from provscope.records import Point
from provscope.testing.required import require_binary

from .conftest import record_run

# Read at import: the suite's isolation fixture removes every PROVSCOPE_* variable.
ARTIFACTS = os.environ.get("PROVSCOPE_ARTIFACTS")
LAYERS = ("tok", "blocks.0.attn", "blocks.0.ffn", "blocks.1.attn", "blocks.1.ffn", "head")

CHECK = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push("error: " + e.message), true);
for (const level of ["error", "warn"]) {
  const original = console[level];
  console[level] = (...args) => { window.__errors.push(level + ": " + args.join(" "));
                                   original.apply(console, args); };
}
window.addEventListener("load", () => {
  // every top-level figure: its laid-out size and how many shapes it drew
  const figures = [...document.querySelectorAll("img, body svg:not(svg svg)")].map(el => {
    const box = el.getBoundingClientRect();
    // data shapes: lines, points, bars, the heatmap image (not frames or backgrounds)
    const data = "polyline, circle, rect[fill^='#'], rect[fill^='url'], image";
    const shapes = el.tagName === "IMG" ? 1 : el.querySelectorAll(data).length;
    let drawn = el.tagName === "IMG" && el.complete && el.naturalWidth > 0 ? 1 : 0;
    for (const shape of el.querySelectorAll(data)) {
      const b = shape.getBoundingClientRect();
      if (b.width > 0 || b.height > 0) drawn++;
    }
    return {label: el.getAttribute("aria-label") || el.getAttribute("alt") || el.tagName,
            tag: el.tagName, width: box.width, height: box.height, shapes, drawn};
  });
  // the heatmap's cells: an <image> whose PNG must decode
  const images = [...document.querySelectorAll("svg image")].map(im => im.getAttribute("href"));
  const fetched = performance.getEntriesByType("resource").map(r => r.name);
  const out = document.createElement("pre");
  out.id = "__check";
  out.textContent = JSON.stringify({errors: window.__errors, figures, fetched, images});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    return require_binary("chromium", "chromium")


def _chromium_flags(tmp_path) -> list[str]:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-extensions", "--disable-background-networking",
            f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=10000"]


def _load(path, tmp_path) -> tuple[dict, str]:
    """Load ``path`` (a copy with the check script) in Chromium: the check's findings and
    Chromium's log."""
    page = path.read_text(encoding="utf-8")
    checked = tmp_path / ("checked-" + path.name)
    checked.write_text(page.replace("<head>", "<head>" + CHECK, 1), encoding="utf-8")
    proc = subprocess.run([_chromium(), *_chromium_flags(tmp_path), "--dump-dom",
                           checked.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<pre id="__check">(.*?)</pre>', proc.stdout, re.S)
    assert found, ("the check script did not run", proc.stdout[-1000:], proc.stderr[-2000:])
    return json.loads(html.unescape(found.group(1))), proc.stderr


def _screenshot(path, tmp_path, name: str):
    shot = tmp_path / name
    proc = subprocess.run([_chromium(), *_chromium_flags(tmp_path), "--hide-scrollbars",
                           "--window-size=1280,5000", f"--screenshot={shot}", path.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 10_000  # a page, not a blank PNG
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if ARTIFACTS:
        os.makedirs(ARTIFACTS, exist_ok=True)
        shutil.copy(shot, os.path.join(ARTIFACTS, name))
    return shot


def _telemetry(settings, run_id: str, *, steps: int = 20, host: str | None = None):
    """Layer statistics every 5 steps and node series at 1 Hz over the run's window,
    written as the watcher and the collectors write them."""
    row = query.runs(run_id=run_id, config=settings).iloc[0]
    host = host or str(row["host"])
    start, end = int(row["start_ns"]), int(row["end_ns"])
    points = []
    for step in range(0, steps, 5):
        t = start + (end - start) * step // steps
        for i, layer in enumerate(LAYERS):
            points.append(Point("layer", {"run_id": run_id, "host": host, "rank": "0",
                                          "layer": layer},
                                {"step": step, "grad_norm": 10.0 ** (i - 2) / (1 + step)},
                                t + i))
    seconds = max(3, (end - start) // 1_000_000_000 + 2)
    for s in range(seconds):
        t = start - 1_000_000_000 + s * 1_000_000_000
        points.append(Point("cpu", {"host": host}, {"usage_percent": 40.0 + s % 7}, t))
        points.append(Point("memory", {"host": host}, {"used_percent": 55.0}, t))
        points.append(Point("disk", {"host": host, "device": "sda"},
                            {"read_bytes_total": 1e6 * s, "written_bytes_total": 5e5 * s}, t))
        points.append(Point("gpu", {"host": host, "gpu": "0"},
                            {"utilization_percent": 90.0, "memory_used_bytes": 2e9}, t))
    with Pipeline([EmbeddedPointsExporter.from_config(settings)]) as pipeline:
        pipeline.submit_many(points)
        assert pipeline.flush(10)


def _figures_drawn(check: dict, expected: list[str]) -> None:
    assert check["errors"] == []
    assert check["fetched"] == []  # self-contained: nothing was fetched
    figures = check["figures"]
    assert [f["label"] for f in figures] == expected, figures
    for fig in figures:
        assert fig["tag"] == "svg"
        assert fig["width"] > 300 and fig["height"] > 50, fig  # laid out
        assert fig["shapes"] >= 2 and fig["drawn"] == fig["shapes"], fig  # all laid out
    for href in check["images"]:  # the heatmap cells: a PNG that decodes
        data = base64.b64decode(href.split(",", 1)[1])
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert width > 0 and height > 0
        body = io.BytesIO(data[8:])
        chunks = {}
        while True:
            n = struct.unpack(">I", body.read(4))[0]
            kind = body.read(4)
            chunks[kind] = body.read(n)
            body.read(4)
            if kind == b"IEND":
                break
        assert len(zlib.decompress(chunks[b"IDAT"])) == height * (1 + 3 * width)


RUN_FIGURES = ["task timeline", "training curves", "utilisation", "layer statistics heatmap"]


def _console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line)]


def test_report_of_one_run_renders_in_chromium(store, tmp_path):
    settings, data = store
    run_id = record_run(settings, data, tmp_path / "a", steps=20)
    _telemetry(settings, run_id)
    out = tmp_path / "report.html"
    done = report.write([run_id[:10]], out, config=settings)
    assert done["runs"] == [run_id] and done["bytes"] == out.stat().st_size
    page = out.read_text(encoding="utf-8")
    # nothing outside the file: no http(s) URL in any src/href, no script, no link
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<svg" in page and "<img" not in page
    assert "<script" not in page and "<link" not in page
    for heading in ("task timeline", "training curves", "utilisation of its hosts",
                    "layer statistics", "data, models and checkpoints", "resources"):
        assert f"<h3>{heading}</h3>" in page
    assert "nothing recorded" not in page  # every figure of the run has data
    assert run_id in page and "data.txt" in page
    check, log = _load(out, tmp_path)
    _figures_drawn(check, RUN_FIGURES)
    assert _console_errors(log) == []
    _screenshot(out, tmp_path, "report-one-run.png")


def test_report_of_several_runs_has_comparison_and_cost(store, tmp_path, capsys):
    settings, data = store
    a = record_run(settings, data, tmp_path / "a", lr=0.1, name="small")
    b = record_run(settings, data, tmp_path / "b", lr=0.3, name="large")
    _telemetry(settings, a)
    _telemetry(settings, b)
    out = tmp_path / "compare.html"
    flags = ["--set", f"embedded.path={settings.embedded.path}"]
    assert main([*flags, "report", a, b, "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert '<h2 id="comparison">comparison</h2>' in page
    assert "<h3>quality against cost</h3>" in page and "<td>lr</td>" in page
    check, log = _load(out, tmp_path)
    _figures_drawn(check, ["training curves", "quality against cost", *RUN_FIGURES,
                           *RUN_FIGURES])
    assert _console_errors(log) == []
    _screenshot(out, tmp_path, "report-two-runs.png")


def test_report_without_telemetry_says_what_is_missing(store, tmp_path):
    settings, data = store
    run_id = record_run(settings, data, tmp_path / "a", steps=3)
    out = tmp_path / "r.html"
    report.write([run_id], out, config=settings)
    page = out.read_text(encoding="utf-8")
    assert "layer statistics heatmap: nothing recorded" in page
    check, _ = _load(out, tmp_path)
    assert check["errors"] == [] and check["fetched"] == []
    assert [f["label"] for f in check["figures"]] == ["task timeline", "training curves",
                                                      "utilisation"]  # the job's own samples
    assert all(1 <= f["drawn"] == f["shapes"] for f in check["figures"]), check["figures"]


def test_report_bad_input_is_one_line(store, tmp_path, capsys):
    settings, data = store
    flags = ["--set", f"embedded.path={settings.embedded.path}"]
    record_run(settings, data, tmp_path / "a")
    assert main([*flags, "report", "0000", "-o", str(tmp_path / "x.html")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run id starts with '0000'" in err[0]
    assert not (tmp_path / "x.html").exists()
    missing_dir = tmp_path / "no" / "such" / "r.html"
    assert main([*flags, "report", "latest", "-o", str(missing_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"provscope: cannot write the report to "
                                               f"{missing_dir}")


def test_report_progress_bar_advances_per_part(store, tmp_path, capsys):
    settings, data = store
    run_id = record_run(settings, data, tmp_path / "a", steps=3)
    t0 = time.perf_counter()
    report.gather([run_id], progress=True, config=settings)
    assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err
    assert "provscope report" in err and "0/4" in err  # four parts per run
    assert f"{run_id[:8]} layers" in err  # it reached the last part
