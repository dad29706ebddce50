"""Awkward models never break the training step: recorded, or skipped with a reason."""

from __future__ import annotations

import logging
import os

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from provscope.pytorch import stats as torch_stats  # noqa: E402
from provscope.pytorch.watch import watch  # noqa: E402
from provscope.records import EntityRecord, Point  # noqa: E402
from provscope.testing.servers import free_port  # noqa: E402

pytestmark = pytest.mark.torch


def _layers(records):
    return {r.tags["layer"]: r.fields for r in records
            if isinstance(r, Point) and r.measurement == "layer"}


def _run_steps(model, x, steps=2, every=1, **kwargs):
    records = []
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    w = watch(model, every=every, optimizer=opt, emit=records.append, **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        loss = out if isinstance(out, torch.Tensor) else out["y"]
        loss.float().sum().backward()
        opt.step()
    w.unwatch()
    return w, records


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return (None, self.lin(x), "label")


class DictOut(nn.Module):
    def forward(self, x):
        return {"mask": x > 0, "y": x * 2}


class NoneOut(nn.Module):
    def forward(self, x):
        return None


class Pipeline(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tup = TupleOut()
        self.dic = DictOut()
        self.none = NoneOut()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.tup(x)[1]
        y.sub_(1.0)  # in-place on a watched output, after its hook read it
        self.none(y)
        y = self.relu(y)  # in-place module
        return self.dic(y)


def test_tuple_dict_none_outputs_and_in_place_ops_are_recorded_or_skipped():
    torch.manual_seed(0)
    w, records = _run_steps(Pipeline(), torch.randn(8, 4))
    layers = _layers(records)
    assert "activation_mean" in layers["tup.lin"]
    # Dict output: the first floating-point value ("y"), not the boolean mask.
    assert layers["dic"]["activation_zero_fraction"] == pytest.approx(
        layers["relu"]["activation_zero_fraction"])
    assert "activation_mean" in layers["relu"]
    assert layers["relu"]["activation_zero_fraction"] > 0
    # A None output has nothing to measure; its forward time is still recorded.
    assert "activation_mean" not in layers["none"] and "forward_seconds" in layers["none"]
    assert w.stats()["hook_errors"] == 0


class Sparse(nn.Module):
    def forward(self, x):
        return x.to_sparse()


class Argmax(nn.Module):
    def forward(self, x):
        return x.argmax(-1)


class Half(nn.Module):
    def forward(self, x):
        return x.to(torch.bfloat16)


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bf16 = Half()
        self.sparse = Sparse()
        self.argmax = Argmax()

    def forward(self, x):
        y = self.lin(x)
        self.bf16(y), self.sparse(y), self.argmax(y)
        return y


def test_sparse_integer_and_low_precision_outputs_never_raise():
    w, records = _run_steps(Branches(), torch.randn(3, 4))
    layers = _layers(records)
    assert "activation_mean" in layers["bf16"]  # bfloat16 is reduced in float32
    assert "activation_mean" not in layers["sparse"]  # sparse: skipped
    assert "activation_mean" not in layers["argmax"]  # integer: skipped
    assert "forward_seconds" in layers["argmax"]
    assert w.stats()["hook_errors"] == 0


def test_sparse_gradients_are_normed():
    model = nn.Sequential(nn.Embedding(20, 4, sparse=True), nn.Linear(4, 1))
    w, records = _run_steps(model, torch.randint(0, 20, (5, 3)))
    emb = _layers(records)["0"]
    assert emb["grad_norm"] > 0 and w.stats()["hook_errors"] == 0


def test_frozen_and_parameter_free_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    _, records = _run_steps(model, torch.randn(6, 4))
    layers = _layers(records)
    # A frozen weight never changes: no norm is taken of it each sampled step.
    assert "grad_norm" not in layers["0"] and "weight_norm" not in layers["0"]
    assert "activation_mean" in layers["0"]
    assert "grad_norm" not in layers["1"] and "activation_mean" in layers["1"]
    assert layers["2"]["grad_norm"] > 0


def test_a_failing_statistic_is_counted_and_logged_once(monkeypatch, caplog):
    def broken(self, layer, x):
        raise RuntimeError("device lost")

    monkeypatch.setattr(torch_stats.ActivationStats, "add", broken)
    caplog.set_level(logging.WARNING, logger="provscope.torch")
    w, records = _run_steps(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), torch.randn(2, 4),
                            steps=3)
    assert w.stats()["hook_errors"] == 6  # two layers x three steps
    messages = [r.getMessage() for r in caplog.records if "device lost" in r.getMessage()]
    assert len(messages) == 2  # once per layer hook kind, not once per call
    # Timing and parameter statistics still arrive.
    assert "forward_seconds" in _layers(records)["0"]


def test_compiled_model_trains_and_records_parameter_statistics_with_a_reason():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    compiled = torch.compile(model, backend="eager")
    w, records = _run_steps(compiled, torch.randn(5, 4), steps=3)
    # Sampled steps add no hooks inside the graph: compiled once, never recompiled.
    assert counters["stats"]["unique_graphs"] == 1
    layers = _layers(records)
    assert layers["0"]["grad_norm"] > 0 and "update_ratio" in layers["0"]
    assert "activation_mean" not in layers["0"]
    entity = next(r for r in records if isinstance(r, EntityRecord))
    assert entity.attributes["layer_hooks"].startswith("skipped: model is compiled")
    assert w.stats()["hook_errors"] == 0
    torch._dynamo.reset()


def test_ddp_wrapped_model_is_watched_through_its_module(tmp_path):
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
        w, records = _run_steps(model, torch.randn(3, 4))
    finally:
        dist.destroy_process_group()
    layers = _layers(records)
    assert set(layers) == {"0", "1"}  # names without the "module." prefix
    assert layers["0"]["grad_norm"] > 0 and "activation_mean" in layers["1"]
    assert w.stats()["hook_errors"] == 0


def test_a_model_without_submodules_is_its_own_single_layer():
    w, records = _run_steps(nn.Linear(3, 2), torch.randn(4, 3))
    layers = _layers(records)
    assert w.layers == ["Linear"]
    assert {"activation_mean", "grad_norm", "update_ratio"} <= set(layers["Linear"])


def test_a_model_without_parameters_is_watched_for_activations():
    records = []
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    with watch(model, every=1, emit=records.append) as w:
        model(torch.randn(5))
    layers = _layers(records)
    assert set(layers) == {"0", "1"} and "grad_norm" not in layers["0"]
    assert w.stats()["hook_errors"] == 0
