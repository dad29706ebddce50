"""Shared helpers for the benchmark scripts: argument parsing and the one output format.

Every benchmark prints, last, one JSON object per figure, one per line::

    {"bench": "encode", "metric": "points_per_s", "value": 1234567.0, "unit": "points/s",
     "baseline": "influxdb-client", "baseline_value": 210000.0, "ratio": 5.88,
     "better": "higher"}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

# Benchmarks run from a checkout; make `import provscope` work without installing.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the common ``--quick`` flag."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, under 60 s")
    return p


def figure(
    bench: str,
    metric: str,
    value: float,
    unit: str,
    better: str,
    *,
    baseline: str | None = None,
    baseline_value: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One result line (``ratio = value / baseline_value`` when a baseline is given)."""
    out: dict[str, Any] = {"bench": bench, "metric": metric, "value": round(float(value), 6),
                           "unit": unit}
    if baseline is not None and baseline_value is not None:
        out["baseline"] = baseline
        out["baseline_value"] = round(float(baseline_value), 6)
        out["ratio"] = round(float(value) / float(baseline_value), 4) if baseline_value else None
    out["better"] = better
    out.update(extra)
    return out


def emit(figures: list[dict[str, Any]]) -> None:
    """Print the machine line and then the figures, one JSON object per line, last."""
    print(f"# machine: {platform.machine()} {os.cpu_count()} cpus, python "
          f"{platform.python_version()}", file=sys.stderr)
    for f in figures:
        print(json.dumps(f), flush=True)
