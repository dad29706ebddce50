"""The Lightning callback writes one train point per step: its loss, the watcher's lr, grad
norm and step time, and the epoch's metrics share the step numbers the watcher uses."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from provscope import query  # noqa: E402
from provscope.config import load_config  # noqa: E402
from provscope.integrations.lightning import ProvscopeCallback  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_lightning_steps_are_one_train_point_each(tmp_path):
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    settings = {"embedded.path": str(tmp_path / "p.db")}
    callback = ProvscopeCallback(every=100, settings=settings)
    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path),
                         callbacks=[callback], log_every_n_steps=1)
    trainer.fit(Tiny(), loader)
    run = callback.session.run
    assert callback.session.errors == 0 and run.flush(30.0)
    series = query.points("train", run_id=run.run_id,
                          config=load_config(overrides=settings))
    steps = series[series["field"] == "step"]
    assert sorted(steps["value"]) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # 2 epochs x 3 batches
    assert steps["time_ns"].is_unique
    for field in ("loss", "lr", "grad_norm", "step_time_seconds"):
        rows = series[series["field"] == field]
        assert set(rows["time_ns"]) <= set(steps["time_ns"]), field  # no point of its own
    assert len(series[series["field"] == "loss"]) == 6
