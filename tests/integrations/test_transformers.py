"""ProvscopeTrainerCallback for transformers.Trainer: a tiny config-initialised GPT-2 on the
CPU (no downloads) gives workflow, epoch, scalar, layer and checkpoint records."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

from provscope import query  # noqa: E402
from provscope.config import load_config  # noqa: E402
from provscope.integrations.transformers import ProvscopeTrainerCallback  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, seq: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_callback_records_workflow_layers_scalars_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=2,
        logging_steps=1, save_strategy="epoch", report_to=[], use_cpu=True,
        disable_tqdm=True, learning_rate=1e-3,
    )
    settings = {"embedded.path": str(tmp_path / "p.db")}
    callback = ProvscopeTrainerCallback(every=2, settings=settings, layers="transformer.h.*")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                   callbacks=[callback])
    trainer.train()
    session = callback.session
    assert session.errors == 0 and session.watcher.stats()["hook_errors"] == 0
    run = session.run
    assert run.flush(30.0)
    cfg = load_config(overrides=settings)

    assert list(query.runs(config=cfg)["name"]) == ["GPT2LMHeadModel"]
    tasks = query.tasks(run.run_id, config=cfg)
    assert {"train", "epoch 0", "epoch 1"} <= set(tasks["name"])
    assert set(tasks["status"]) == {"finished"}

    layer = query.points("layer", "grad_norm", run_id=run.run_id, config=cfg)
    names = set(layer["tags"].map(lambda t: t["layer"]))
    assert names and all(n.startswith("transformer.h.0.") for n in names)
    steps = sorted(set(query.points("layer", "step", run_id=run.run_id, config=cfg)["value"]))
    assert steps == [0, 2, 4, 6]
    tokens = query.points("train", "tokens_per_second", run_id=run.run_id, config=cfg)
    assert len(tokens) == 8 and (tokens["value"] > 0).all()
    loss = query.points("train", "loss", run_id=run.run_id, config=cfg)
    assert len(loss) >= 8
    assert len(query.points("train", "lr", run_id=run.run_id, config=cfg)) >= 8

    entities = query.entities(run.run_id, config=cfg)
    model_row = entities[entities["kind"] == "model"].iloc[0]
    attrs = model_row["attributes"]
    attrs = attrs if isinstance(attrs, dict) else json.loads(attrs)
    assert attrs["hyperparameters"]["n_embd"] == 16
    ckpts = entities[entities["kind"] == "checkpoint"]
    assert sorted(ckpts["name"]) == ["checkpoint-4", "checkpoint-8"]
