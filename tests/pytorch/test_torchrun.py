"""End to end: ``torchrun --nproc_per_node=2 train.py``, plain and under ``provscope run``:
both ranks' points, layer series and tasks are in ONE run whose row has the job's own
name and config (``workflow("ddp-train", config=...)``), not the launcher's."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")

from provscope import query
from provscope.config import load_config
from provscope.testing.required import require_binary
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
    with provscope.workflow("ddp-train", config={"lr": 0.1, "world": dist.get_world_size()}) \
            as run:
        run.log(step=0, loss=1.0)
        with run.task("train"):
            with provscope.watch(model, every=1, optimizer=opt):
                for _ in range(3):
                    opt.zero_grad()
                    model(torch.randn(8, 6)).pow(2).mean().backward()
                    opt.step()
        run.flush(30.0)
    dist.destroy_process_group()
""")


def _entry_points() -> tuple[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return (require_binary("provscope", "provscope (pip install -e .)", bin_dir),
            require_binary("torchrun", "torch", bin_dir))


def _env(tmp_path: Path, db: str) -> dict[str, str]:
    return {**os.environ, "PROVSCOPE_EMBEDDED_PATH": db,
            "PROVSCOPE_AGENT_SOCKET_PATH": str(tmp_path / "agent.sock"),
            "PROVSCOPE_PROMETHEUS_ENABLED": "false", "OMP_NUM_THREADS": "1"}


def _check_one_run_of_the_job(db: str) -> str:
    config = load_config(overrides={"embedded.path": db})
    runs = query.runs(config=config)
    assert list(runs["name"]) == ["ddp-train"]  # the job's name, not the launcher's
    assert runs["config"][0] == {"lr": 0.1, "world": 2}
    assert runs["status"][0] == "finished" and runs["origin"][0] == "job"
    run_id = runs["run_id"][0]
    layer = query.points("layer", "grad_norm", run_id=run_id, config=config)
    assert set(layer["rank"]) == {"0", "1"}
    assert len(layer) == 2 * 2 * 3  # ranks x layers x sampled steps
    train = query.points("train", "loss", config=config)
    assert set(zip(train["run_id"], train["rank"], strict=True)) == {(run_id, "0"),
                                                                      (run_id, "1")}
    tasks = query.tasks(run_id, config=config)
    assert sorted(tasks[tasks["name"] == "train"]["rank"].astype(int)) == [0, 1]
    all_tasks = query.sql("SELECT DISTINCT run_id FROM tasks", config=config)
    assert list(all_tasks["run_id"]) == [run_id]  # no task of any rank under another run
    return run_id


@pytest.mark.parametrize("rendezvous", ["static", "standalone"])
def test_plain_torchrun_two_ranks_write_one_run_with_the_jobs_name(tmp_path, rendezvous):
    _, torchrun = _entry_points()
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    db = str(tmp_path / "p.db")
    # static: torchrun's run id is the placeholder "none"; standalone: a random id.
    launch = [f"--master_port={free_port()}"] if rendezvous == "static" else ["--standalone"]
    proc = subprocess.run([torchrun, "--nproc_per_node=2", *launch, str(script)],
                          env=_env(tmp_path, db), cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_one_run_of_the_job(db)


def test_provscope_run_torchrun_two_ranks_join_one_run_named_by_the_job(tmp_path):
    provscope_cli, torchrun = _entry_points()
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    db = str(tmp_path / "p.db")
    proc = subprocess.run(
        [provscope_cli, "run", "--name", "ddp", "--", torchrun, "--nproc_per_node=2",
         f"--master_port={free_port()}", str(script)],
        env=_env(tmp_path, db), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = _check_one_run_of_the_job(db)
    config = load_config(overrides={"embedded.path": db})
    tasks = query.tasks(run_id, config=config)
    [command] = tasks[tasks["kind"] == "command"].to_dict("records")
    assert command["status"] == "finished"
    # Each rank's top-level tasks sit under the launcher's command task.
    train = tasks[tasks["name"] == "train"]
    assert set(train["parent_task_id"]) == {command["task_id"]}
