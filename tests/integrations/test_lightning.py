"""ProvscopeCallback for Lightning: one line gives workflow, epoch, eval, layer and
checkpoint records, read back from the embedded store."""

from __future__ import annotations

import json
import logging

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import provscope  # noqa: E402
from provscope import query  # noqa: E402
from provscope.config import load_config  # noqa: E402
from provscope.integrations.lightning import ProvscopeCallback  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    pytest.mark.integration,
    # Lightning's own advice (few DataLoader workers) and its torch deprecation notices.
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


class Regressor(pl.LightningModule):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


@pytest.fixture(autouse=True)
def _quiet_lightning():
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def test_one_callback_records_workflow_epochs_layers_and_checkpoints(tmp_path):
    settings = {"embedded.path": str(tmp_path / "p.db")}
    callback = ProvscopeCallback(every=2, settings=settings)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), callbacks=[callback],
                         log_every_n_steps=1, num_sanity_val_steps=0)
    trainer.fit(Regressor(), _loader(), _loader())
    run = callback.session.run
    assert callback.session.errors == 0 and not callback.session.owned
    assert run.flush(30.0)
    config = load_config(overrides=settings)

    runs = query.runs(config=config)
    assert list(runs["name"]) == ["Regressor"] and list(runs["status"]) == ["finished"]
    tasks = query.tasks(run.run_id, config=config)
    names = list(tasks["name"])
    assert names.count("fit") == 1 and "epoch 0" in names and "epoch 1" in names
    assert names.count("validation") == 2
    assert set(tasks["status"]) == {"finished"}

    layers = query.points("layer", "grad_norm", run_id=run.run_id, config=config)
    assert set(layers["tags"].map(lambda t: t["layer"])) == {"net.0", "net.2"}
    assert sorted(set(query.points("layer", "step", run_id=run.run_id,
                                   config=config)["value"])) == [0, 2, 4, 6]
    loss = query.points("train", "loss", run_id=run.run_id, config=config)
    assert len(loss) == 8
    assert len(query.points("train", "val_loss", run_id=run.run_id, config=config)) == 2

    entities = query.entities(run.run_id, config=config)
    model = entities[entities["kind"] == "model"].iloc[0]
    ckpts = entities[entities["kind"] == "checkpoint"]
    assert len(ckpts) >= 1
    attrs = [a if isinstance(a, dict) else json.loads(a) for a in ckpts["attributes"]]
    assert {a["step"] for a in attrs} <= {4, 8}
    relations = query.relations(run.run_id, config=config)
    derived = relations[(relations["relation"] == "derived") & (relations["role"] == "model")]
    assert set(derived["subject_id"]) == set(ckpts["entity_id"])
    assert set(derived["object_id"]) == {model["entity_id"]}
    hp = model["attributes"]
    hp = hp if isinstance(hp, dict) else json.loads(hp)
    assert hp["hyperparameters"] == {"hidden": 8}


def test_callback_joins_an_open_workflow_and_leaves_it_open(tmp_path):
    settings = {"embedded.path": str(tmp_path / "p.db")}
    callback = ProvscopeCallback(watch=False)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[callback],
                         num_sanity_val_steps=0)
    with provscope.workflow("outer", settings=settings) as run:
        trainer.fit(Regressor(), _loader())
        assert callback.session.run is run and run.status == "running"
        run.flush(30.0)
    tasks = query.tasks(run.run_id, config=load_config(overrides=settings))
    assert {"fit", "epoch 0"} <= set(tasks["name"])
