"""Runs recorded through the real in-job API into a real embedded store (and servers).

``record_run`` trains nothing: it records what a short training job records (config,
a dataset used, per-step ``train`` points, an eval task, a checkpoint produced) through
``provscope.workflow`` into the store the given settings name, and returns the run id.
"""

from __future__ import annotations

import pytest

import provscope
from provscope.config import load_config


def record_run(settings, data_file, out_dir, *, name="train", lr=0.1, steps=20,
               loss0=2.0, campaign=None) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    with provscope.workflow(name, config={"lr": lr, "model": {"layers": 2}},
                            settings=settings, campaign=campaign) as run:
        run.use(data_file, kind="dataset", name=data_file.name)
        with run.task("fit", kind="task"):
            for step, _ in run.steps(range(steps)):
                loss = loss0 / (1 + step * lr)
                run.log(loss=loss, tokens_per_second=1000.0 + step, lr=lr)
        with run.task("eval", kind="eval"):
            run.log(eval_loss=loss0 / (1 + steps * lr))
        ckpt = out_dir / "model.pt"
        ckpt.write_bytes(f"weights lr={lr} steps={steps}".encode())
        with run.task("save", kind="checkpoint"):
            run.produce(ckpt, kind="checkpoint", step=steps)
    assert run.flush(20)
    return run.run_id


@pytest.fixture
def store(tmp_path):
    """Settings for a fresh embedded store under tmp_path, and the data file runs use."""
    db = tmp_path / "provscope.db"
    settings = load_config(overrides={"embedded.path": str(db)}, environ={})
    data = tmp_path / "data.txt"
    data.write_text("to be or not to be\n" * 100)
    return settings, data
