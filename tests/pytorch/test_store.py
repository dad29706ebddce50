"""watch() inside a real workflow: layer series, the model entity and checkpoints reach the
embedded store (SQLite) and read back through provscope.query; two gloo ranks both arrive."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import provscope  # noqa: E402
from provscope import query  # noqa: E402
from provscope.config import load_config  # noqa: E402
from provscope.ids import new_id  # noqa: E402
from provscope.testing.servers import free_port  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.integration]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 1))


def _train(model, opt, steps):
    x = torch.randn(16, 6)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_layer_series_model_entity_and_checkpoint_lineage_in_the_store(tmp_path):
    db = str(tmp_path / "p.db")
    settings = {"embedded.path": db}
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = tmp_path / "model.pt"
    with provscope.workflow("watch-store", settings=settings) as run:
        with run.task("train", kind="task"):
            w = provscope.watch(model, every=2, optimizer=opt, hyperparameters={"lr": 0.1})
            _train(model, opt, 4)
            torch.save(model.state_dict(), ckpt)
            ckpt_id = w.checkpoint(str(ckpt))
            w.unwatch()
        assert run.flush(30.0)
    config = load_config(overrides=settings)
    layer = query.points("layer", "grad_norm", run_id=run.run_id, config=config)
    assert set(layer["tags"].map(lambda t: t["layer"])) == {"0", "2"}
    steps = query.points("layer", "step", run_id=run.run_id, config=config)
    assert sorted(set(steps["value"])) == [0.0, 2.0]
    train = query.points("train", "grad_norm", run_id=run.run_id, config=config)
    assert len(train) == 4 and (train["value"] > 0).all()

    entities = query.entities(run.run_id, config=config)
    model_row = entities[entities["kind"] == "model"].iloc[0]
    assert model_row["entity_id"] == w.model_entity_id
    ckpt_row = entities[entities["entity_id"] == ckpt_id].iloc[0]
    assert ckpt_row["kind"] == "checkpoint"
    attrs = ckpt_row["attributes"]
    attrs = attrs if isinstance(attrs, dict) else json.loads(attrs)
    assert attrs["step"] == 4 and "model_entity_id" not in attrs

    relations = query.relations(run.run_id, config=config)
    derived = relations[relations["relation"] == "derived"]
    assert list(zip(derived["subject_id"], derived["object_id"], derived["role"],
                    strict=True)) == [(ckpt_id, w.model_entity_id, "model")]
    train_task = query.tasks(run.run_id, config=config).query("name == 'train'").iloc[0]
    used = relations[(relations["relation"] == "used")
                     & (relations["object_id"] == w.model_entity_id)]
    assert list(used["subject_id"]) == [train_task["task_id"]]
    generated = relations[(relations["relation"] == "generated")
                          & (relations["object_id"] == ckpt_id)]
    assert list(generated["subject_id"]) == [train_task["task_id"]]


def _rank_worker(rank: int, world: int, port: int, db: str, run_id: str) -> None:
    import torch.distributed as dist

    os.environ["PROVSCOPE_RUN_ID"] = run_id
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with provscope.workflow("ddp", settings={"embedded.path": db}) as run:
            assert run.rank == rank
            with run.task("train"), provscope.watch(model, every=1, optimizer=opt):
                _train(model, opt, 2)
            run.flush(30.0)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_write_their_own_layer_series_and_tasks(tmp_path):
    import torch.multiprocessing as mp

    db = str(tmp_path / "ddp.db")
    run_id = new_id()
    mp.spawn(_rank_worker, args=(2, free_port(), db, run_id), nprocs=2, join=True)
    config = load_config(overrides={"embedded.path": db})
    layer = query.points("layer", "grad_norm", run_id=run_id, config=config)
    assert set(layer["rank"]) == {"0", "1"}
    for rank in ("0", "1"):
        mine = layer[layer["rank"] == rank]
        assert set(mine["tags"].map(lambda t: t["layer"])) == {"0", "2"}
        assert len(mine) == 4  # two layers x two sampled steps
    # DDP averages gradients: both ranks see the same gradient norms.
    by_rank = {r: sorted(layer[layer["rank"] == r]["value"]) for r in ("0", "1")}
    assert by_rank["0"] == pytest.approx(by_rank["1"], rel=1e-5)
    tasks = query.tasks(run_id, config=config)
    assert sorted(tasks[tasks["name"] == "train"]["rank"].astype(int)) == [0, 1]
