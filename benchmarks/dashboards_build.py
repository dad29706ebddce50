"""``provscope dashboards build`` wall time, as a user runs it: a fresh process writing
every dashboard and the provider into an empty directory (interpreter start and imports
included), then again into the same directory (nothing changes). The two outputs are
compared byte for byte. Must reach: under 2 s, byte-for-byte reproducible.

Usage: python benchmarks/dashboards_build.py [--quick]
"""

from __future__ import annotations

import filecmp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

REPO = Path(__file__).resolve().parent.parent


def _build(out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "provscope.cli", "dashboards", "build", "--out",
                    str(out)], check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - t0


def _same(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def main() -> None:
    args = _common.parser(__doc__.splitlines()[0]).parse_args()
    rounds = 3 if args.quick else 10
    fresh, again = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(rounds):
            out = root / f"r{i}"
            fresh.append(_build(out))
            again.append(_build(out))
        reproducible = all(_same(root / "r0", root / f"r{i}") for i in range(1, rounds))
    fresh.sort()
    again.sort()
    _common.emit([
        _common.figure("dashboards_build", "fresh_median_s", fresh[len(fresh) // 2], "s",
                       "lower", max_s=round(fresh[-1], 4), rounds=rounds,
                       reproducible=reproducible),
        _common.figure("dashboards_build", "unchanged_median_s", again[len(again) // 2], "s",
                       "lower", max_s=round(again[-1], 4), rounds=rounds),
    ])


if __name__ == "__main__":
    main()
