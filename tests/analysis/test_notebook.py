"""examples/analysis.ipynb runs from top to bottom (nbclient, a real kernel), so the
walk-through cannot rot: each of its cells checks what it shows."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "analysis.ipynb"


@pytest.mark.slow
@pytest.mark.torch
def test_analysis_notebook_executes(tmp_path):
    pytest.importorskip("torch")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert errors == []
    outputs = {i: c.outputs for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    svg = [o for outs in outputs.values() for o in outs
           if "image/svg+xml" in o.get("data", {})]
    assert len(svg) == 1  # the loss curves of both runs
    html = [o["data"]["text/html"] for outs in outputs.values() for o in outs
            if "text/html" in o.get("data", {})]
    assert any("wrote " in h and "report.html" in h for h in html)
