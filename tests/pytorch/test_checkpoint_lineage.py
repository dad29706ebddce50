"""Checkpoints derive from the watched model and from the run's previous checkpoint
(``derived`` relations), into the embedded SQLite store and a real PostgreSQL; the model
entity is keyed by its architecture; ``query.origin`` walks the chain in one call."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import provscope  # noqa: E402
from provscope import query  # noqa: E402
from provscope.config import load_config  # noqa: E402
from provscope.pytorch.model import architecture_digest, model_entity_id  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.integration]


@pytest.fixture(params=["embedded", "postgresql"])
def settings(request, tmp_path, monkeypatch):
    monkeypatch.delenv("PROVSCOPE_RUN_ID", raising=False)
    overrides = {"embedded.path": str(tmp_path / "provscope.db"),
                 "agent.socket_path": str(tmp_path / "none.sock")}
    if request.param == "postgresql":
        overrides["lineage.url"] = request.getfixturevalue("postgres_url")
    return load_config(environ={}, overrides=overrides)


def _model(hidden: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def _step(model, opt) -> None:
    opt.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()


def test_model_entity_is_keyed_by_architecture_not_weights():
    a, b = _model(), _model()
    assert architecture_digest(a) == architecture_digest(b)  # other weights, same layers
    assert architecture_digest(_model(9)) != architecture_digest(a)
    assert architecture_digest(a.to(torch.float64)) == architecture_digest(b)
    assert model_entity_id(architecture_digest(a)) != model_entity_id(
        architecture_digest(_model(9)))


def test_checkpoints_derive_from_the_model_and_the_previous_checkpoint(settings, tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    paths = [tmp_path / f"ckpt-{i}.pt" for i in range(3)]
    with provscope.workflow("ckpt-chain", settings=settings) as run, run.task("train"):
        w = provscope.watch(model, every=1, optimizer=opt)
        ids = []
        for i, path in enumerate(paths):
            _step(model, opt)
            torch.save(model.state_dict(), path)
            # Through the watcher and through plain run.produce: the same rule.
            ids.append(w.checkpoint(str(path)) if i % 2 == 0
                       else run.produce(path, kind="checkpoint"))
        w.unwatch()
    assert run.flush(30)
    model_id = w.model_entity_id
    assert model_id == model_entity_id(architecture_digest(model))

    rels = query.relations(run.run_id, config=settings)
    derived = rels[rels["relation"] == "derived"]
    got = sorted(zip(derived["subject_id"], derived["object_id"], derived["role"],
                     strict=True))
    assert got == sorted([
        (ids[0], model_id, "model"),
        (ids[1], model_id, "model"), (ids[1], ids[0], "previous_checkpoint"),
        (ids[2], model_id, "model"), (ids[2], ids[1], "previous_checkpoint")])
    assert set(derived["run_id"]) == {run.run_id}

    origin = query.origin(paths[2], config=settings)
    nearest = origin[origin["depth"] <= 1]
    assert sorted(zip(nearest["depth"], nearest["entity_id"], nearest["role"].fillna(""),
                      strict=True)) == sorted([
        (0, ids[2], ""), (1, model_id, "model"), (1, ids[1], "previous_checkpoint")])
    assert set(origin["entity_id"]) == {*ids, model_id}  # the whole chain back to ckpt 0
    first = origin[origin["entity_id"] == ids[0]].iloc[0]
    assert (first["depth"], first["task_name"], first["run_id"], first["kind"]) == \
        (2, "train", run.run_id, "checkpoint")


def test_one_model_entity_across_runs_with_checkpoints_of_each(settings, tmp_path):
    runs, ckpts = [], []
    for i in range(2):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with provscope.workflow(f"seed-{i}", settings=settings) as run:
            w = provscope.watch(model, optimizer=opt)
            _step(model, opt)
            path = tmp_path / f"run{i}.pt"
            torch.save(model.state_dict(), path)
            ckpts.append(w.checkpoint(str(path)))
            w.unwatch()
        assert run.flush(30)
        runs.append(run)
    models = query.sql("SELECT entity_id FROM entities WHERE kind = 'model'", config=settings)
    assert list(models["entity_id"]) == [w.model_entity_id]
    assert set(query.runs_using(w.model_entity_id, config=settings)["run_id"]) == \
        {r.run_id for r in runs}
    # The second run's first checkpoint derives from the model only: the previous
    # checkpoint is per run.
    second = query.relations(runs[1].run_id, config=settings)
    derived = second[second["relation"] == "derived"]
    assert list(zip(derived["subject_id"], derived["object_id"], strict=True)) == \
        [(ckpts[1], w.model_entity_id)]
