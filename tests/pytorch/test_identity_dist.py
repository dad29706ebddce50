"""Rule 4 of the run identity: with no launcher job id (``torch.multiprocessing.spawn``),
the ranks take rank 0's run id over torch.distributed's default store, whether the
workflow is opened after ``init_process_group`` or before it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import provscope
from provscope import query
from provscope.config import load_config
from provscope.testing.servers import free_port

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def _worker(rank: int, world: int, port: int, db: str, before: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    settings = {"embedded.path": db, "agent.socket_path": db + ".none.sock"}

    def init() -> None:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)

    if before:
        # The launcher said how many processes there are but gave no job id.
        os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank)})
        run = provscope.workflow("spawned", config={"lr": 0.5}, settings=settings).start()
        init()
    else:
        init()
        run = provscope.workflow("spawned", config={"lr": 0.5}, settings=settings).start()
    try:
        run.log(step=0, loss=float(rank))
        # A training step's collective: without one, rank 0 may end the process group
        # (and the store it hosts) before the others have read the id.
        dist.barrier()
        with run.task("shard"):
            pass
        run.finish()
        run.flush(30.0)
        Path(f"{db}.{rank}").write_text(f"{run.run_id} {run.id_source}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("before", [False, True], ids=["after-init", "before-init"])
def test_spawned_ranks_share_rank_0s_run(tmp_path, before):
    import torch.multiprocessing as mp

    db = str(tmp_path / "spawn.db")
    mp.spawn(_worker, args=(2, free_port(), db, before), nprocs=2, join=True)
    seen = [Path(f"{db}.{r}").read_text().split() for r in range(2)]
    assert seen[0][0] == seen[1][0] and {s[1] for s in seen} == {"dist"}
    run_id = seen[0][0]
    config = load_config(overrides={"embedded.path": db})
    runs = query.runs(config=config)
    assert list(runs["run_id"]) == [run_id]
    assert (runs["name"][0], runs["config"][0], runs["origin"][0]) == \
        ("spawned", {"lr": 0.5}, "job")
    train = query.points("train", "loss", config=config)
    assert set(zip(train["run_id"], train["rank"], strict=True)) == {(run_id, "0"),
                                                                      (run_id, "1")}
    tasks = query.tasks(run_id, config=config)
    assert sorted(tasks[tasks["name"] == "shard"]["rank"].astype(int)) == [0, 1]
