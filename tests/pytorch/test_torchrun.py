"""End to end: ``provscope run -- torchrun --nproc_per_node=2 train.py``; both ranks' layer
series and tasks join the one run that ``provscope run`` opened."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")

from provscope import query
from provscope.config import load_config
from provscope.testing.servers import free_port

pytestmark = [pytest.mark.torch, pytest.mark.integration, pytest.mark.slow]

SCRIPT = textwrap.dedent("""
    import torch
    import torch.distributed as dist
    from torch import nn

    import provscope

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with provscope.workflow("ddp-train") as run:
        with run.task("train"):
            with provscope.watch(model, every=1, optimizer=opt):
                for _ in range(3):
                    opt.zero_grad()
                    model(torch.randn(8, 6)).pow(2).mean().backward()
                    opt.step()
        run.flush(30.0)
    dist.destroy_process_group()
""")


def test_provscope_run_torchrun_two_ranks_join_one_run(tmp_path):
    bin_dir = Path(sys.executable).parent
    provscope_cli = shutil.which("provscope", path=str(bin_dir))
    torchrun = shutil.which("torchrun", path=str(bin_dir))
    if provscope_cli is None or torchrun is None:
        pytest.skip("provscope / torchrun entry points are not installed next to python")
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    db = str(tmp_path / "p.db")
    env = {**os.environ, "PROVSCOPE_EMBEDDED_PATH": db,
           "PROVSCOPE_AGENT_SOCKET_PATH": str(tmp_path / "agent.sock"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [provscope_cli, "run", "--name", "ddp", "--", torchrun, "--nproc_per_node=2",
         f"--master_port={free_port()}", str(script)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = load_config(overrides={"embedded.path": db})
    runs = query.runs(config=config)
    assert list(runs["name"]) == ["ddp"]
    run_id = runs["run_id"][0]
    layer = query.series("layer", "grad_norm", run_id=run_id, config=config)
    assert set(layer["rank"]) == {"0", "1"}
    assert len(layer) == 2 * 2 * 3  # ranks x layers x sampled steps
    tasks = query.tasks(run_id, config=config)
    assert sorted(tasks[tasks["name"] == "train"]["rank"].astype(int)) == [0, 1]
