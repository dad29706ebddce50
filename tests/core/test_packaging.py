"""The wheel: builds, installs into a clean venv, runs, and installs no top-level
``agent`` / ``exporters`` / ``dashboards`` modules that would shadow users' own."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_into_a_clean_venv_and_runs(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(dist.glob("provscope-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert not {"agent", "exporters", "dashboards", "tests", "benchmarks"} & top
    assert "provscope/agent/daemon.py" in names
    assert "provscope/exporters/pipeline.py" in names
    assert "provscope/exporters/influxdb/transport.py" in names
    assert "provscope/exporters/base.py" in names
    assert "provscope/dashboards/__init__.py" in names

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=600)
    out = subprocess.run([str(env_dir / "bin" / "provscope"), "--version"], check=True,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().startswith("provscope ")
    probe = subprocess.run(
        [str(py), "-c", "import importlib.util as u; "
         "print(u.find_spec('agent'), u.find_spec('exporters'), "
         "u.find_spec('provscope.exporters.pipeline') is not None)"],
        check=True, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert probe.stdout.split() == ["None", "None", "True"]
