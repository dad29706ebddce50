"""provscope.watch: layer statistics on sampled steps, hook lifecycle, training scalars."""

from __future__ import annotations

import math
import os

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from provscope import catalogue  # noqa: E402
from provscope.errors import ConfigError  # noqa: E402
from provscope.pytorch.watch import unwatch, watch, watched  # noqa: E402
from provscope.records import EntityRecord, Point  # noqa: E402

pytestmark = pytest.mark.torch


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _points(records, measurement="layer"):
    return [r for r in records if isinstance(r, Point) and r.measurement == measurement]


def _train(model, opt, steps, x=None, hook=None):
    torch.manual_seed(1)
    x = torch.randn(32, 8) if x is None else x
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if hook is not None:
            hook()
        opt.step()


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_layer_points_only_on_sampled_steps_with_catalogued_fields():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    with watch(model, every=3, optimizer=opt, emit=records.append) as w:
        _train(model, opt, 7)
    layer = _points(records)
    assert sorted({p.fields["step"] for p in layer}) == [0, 3, 6]
    assert {p.tags["layer"] for p in layer} == {"fc1", "act", "fc2"}
    assert {p.tags["module_type"] for p in layer} == {"Linear", "ReLU"}
    for p in layer:
        assert set(p.tags) == {"run_id", "host", "rank", "layer", "module_type"}
        for name in p.fields:
            assert catalogue.lookup("layer", name) is not None, name
    fc1 = next(p.fields for p in layer if p.tags["layer"] == "fc1")
    for name in ("activation_mean", "activation_std", "forward_seconds", "backward_seconds",
                 "grad_norm", "weight_norm", "update_ratio"):
        assert name in fc1 and math.isfinite(fc1[name]), name
    assert w.stats()["sampled_steps"] == 3 and w.stats()["hook_errors"] == 0


def test_activation_statistics_match_a_direct_computation():
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU())
    x = torch.randn(128, 4)
    records = []
    with watch(model, every=1, emit=records.append, scalars=False):
        model(x)
    with torch.no_grad():
        out = model(x)
    relu = next(p.fields for p in _points(records) if p.tags["layer"] == "1")
    assert relu["activation_mean"] == pytest.approx(out.mean().item(), rel=1e-5)
    assert relu["activation_std"] == pytest.approx(out.std(correction=0).item(), rel=1e-4)
    assert relu["activation_abs_max"] == pytest.approx(out.abs().max().item())
    assert relu["activation_zero_fraction"] == pytest.approx((out == 0).float().mean().item())
    assert relu["activation_nan_elements"] == 0 and relu["activation_inf_elements"] == 0


def test_nan_and_inf_activations_are_counted_not_raised():
    class Poison(nn.Module):
        def forward(self, x):
            y = x.clone()
            y[0, 0] = float("nan")
            y[0, 1] = float("inf")
            y[1, :] = float("-inf")
            return y

    model = nn.Sequential(nn.Linear(4, 4), Poison())
    records = []
    with watch(model, every=1, emit=records.append) as w:
        model(torch.randn(3, 4))
    poison = next(p.fields for p in _points(records) if p.tags["layer"] == "1")
    assert poison["activation_nan_elements"] == 1
    assert poison["activation_inf_elements"] == 5
    assert math.isnan(poison["activation_mean"])
    assert w.stats()["hook_errors"] == 0


def test_gradient_norms_and_update_ratio_match_the_parameters():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    records = []
    seen = {}

    def grab():
        seen["grad"] = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.fc2.parameters()))
        seen["before"] = [p.detach().clone() for p in model.fc2.parameters()]

    with watch(model, every=1, optimizer=opt, emit=records.append, per_param=True):
        _train(model, opt, 1, hook=grab)
    fc2 = next(p.fields for p in _points(records) if p.tags["layer"] == "fc2")
    after = [p.detach() for p in model.fc2.parameters()]
    w_norm = math.sqrt(sum(float(p.pow(2).sum()) for p in after))
    pairs = zip(after, seen["before"], strict=True)
    d_norm = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in pairs))
    assert fc2["grad_norm"] == pytest.approx(seen["grad"], rel=1e-5)
    assert fc2["weight_norm"] == pytest.approx(w_norm, rel=1e-5)
    assert fc2["update_ratio"] == pytest.approx(d_norm / w_norm, rel=1e-4)
    params = {p.tags["param"] for p in _points(records, "layer_param")
              if p.tags["layer"] == "fc2"}
    assert params == {"weight", "bias"}


def test_hooks_are_attached_only_on_sampled_steps_and_all_removed_by_unwatch():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bare = _hook_count(model)
    w = watch(model, every=2, optimizer=opt, emit=lambda r: None)
    counts = []
    _train(model, opt, 1)  # step 0 sampled; ends at opt.step -> hooks removed
    counts.append(_hook_count(model))
    model(torch.randn(2, 8))  # step 1: not sampled
    counts.append(_hook_count(model))
    assert counts == [bare + 1, bare + 1]  # only the root pre-hook stays
    assert watched(model) is w
    assert unwatch(model) is True
    assert _hook_count(model) == bare
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert unwatch(model) is False


def test_without_optimizer_each_training_forward_is_a_step():
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    w = watch(model, every=2, emit=records.append)
    _train(model, opt, 4)
    with torch.no_grad():
        model(torch.randn(2, 8))  # evaluation forwards do not count as steps
    w.unwatch()
    layer = _points(records)
    assert sorted({p.fields["step"] for p in layer}) == [0, 2]
    fc1 = [p.fields for p in layer if p.tags["layer"] == "fc1"]
    assert all("grad_norm" in f and "update_ratio" in f for f in fc1)
    assert [p.fields["step"] for p in _points(records, "train")] == [0, 1, 2, 3]


def test_training_scalars_infer_batch_and_sequence_from_token_ids():
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    records = []
    tokens = torch.randint(0, 50, (4, 10))
    with watch(model, every=5, optimizer=opt, emit=records.append):
        for _ in range(3):
            opt.zero_grad()
            model(tokens).logsumexp(-1).mean().backward()
            opt.step()
    train = [p.fields for p in _points(records, "train")]
    assert [f["step"] for f in train] == [0, 1, 2]
    for f in train:
        assert f["lr"] == pytest.approx(3e-3)
        assert f["grad_norm"] > 0
        assert f["tokens_per_second"] == pytest.approx(f["samples_per_second"] * 10)
        assert f["samples_per_second"] == pytest.approx(4 / f["step_time_seconds"])
        for name in f:
            assert catalogue.lookup("train", name) is not None, name


def test_layer_selection_by_pattern_and_depth():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 2),
                          nn.Dropout(0.1))
    assert watch(model, emit=lambda r: None, layers="0.*").layers == ["0.0", "0.1"]
    assert watch(model, emit=lambda r: None, layers=["re:[12]"]).layers == ["1", "2"]
    assert watch(model, emit=lambda r: None, depth=1).layers == ["0", "1", "2"]
    assert watch(model, emit=lambda r: None, depth=1, layers="0").layers == ["0"]
    # Default: leaves, without pass-through modules such as Dropout.
    assert watch(model, emit=lambda r: None).layers == ["0.0", "0.1", "1"]


def test_too_many_layers_watches_the_first_and_logs_one_line_naming_count_cap_setting(caplog):
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])
    with caplog.at_level("ERROR"):
        watcher = watch(model, max_layers=4, emit=lambda r: None)
    assert watcher.layers == ["0", "1", "2", "3"]
    lines = [r.getMessage() for r in caplog.records if "layers selected" in r.getMessage()]
    assert len(lines) == 1
    text = lines[0]
    assert "\n" not in text
    assert "6 layers" in text and "cap of 4" in text and "torch.max_layers" in text
    watcher.unwatch()


@pytest.mark.parametrize(("kwargs", "word"), [
    ({"every": 0}, "every"),
    ({"layers": ["re:("]}, "regex"),
    ({"depth": 0}, "depth"),
    ({"optimizer": object()}, "optimizer"),
])
def test_bad_arguments_are_one_clear_line(kwargs, word):
    with pytest.raises(ConfigError) as info:
        watch(MLP(), emit=lambda r: None, **kwargs)
    assert word in str(info.value) and "\n" not in str(info.value)


def test_model_entity_describes_parameters_and_architecture():
    model = MLP()
    records = []
    w = watch(model, emit=records.append, hyperparameters={"hidden": 16})
    entity = next(r for r in records if isinstance(r, EntityRecord))
    assert entity.entity_kind == "model" and entity.entity_id == w.model_entity_id
    attrs = entity.attributes
    assert attrs["parameters_total"] == sum(p.numel() for p in model.parameters())
    assert attrs["trainable_parameters"] == attrs["parameters_total"]
    assert attrs["parameters_per_layer"] == {"fc1": 8 * 16 + 16, "act": 0, "fc2": 16 * 4 + 4}
    assert attrs["dtype"] == "float32" and attrs["device"] == "cpu"
    assert attrs["architecture"].startswith("MLP(fc1: Linear(")
    assert attrs["hyperparameters"] == {"hidden": 16}
    w.unwatch()


def test_emit_failures_are_counted_and_never_reach_the_training_step():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def broken(record):
        raise OSError("sink gone")

    w = watch(model, every=1, optimizer=opt, emit=broken)
    _train(model, opt, 3)
    w.unwatch()
    assert w.stats()["emit_errors"] > 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_trains_without_running_the_parents_hooks():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    w = watch(model, every=1, optimizer=opt, emit=records.append)
    pid = os.fork()
    if pid == 0:  # child: train; any exception or recorded step is a non-zero exit
        code = 1
        try:
            # What DataLoader workers do: GNU OpenMP's thread pool does not survive a fork,
            # and a child that runs a parallel kernel with the parent's pool size waits
            # forever on threads it does not have (docs/torch.md, "Forked processes").
            torch.set_num_threads(1)
            before = (w.stats()["sampled_steps"], len(records))
            _train(model, opt, 2)
            code = 0 if (w.stats()["sampled_steps"], len(records)) == before else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    _train(model, opt, 1)  # the parent still records
    w.unwatch()
    assert w.stats()["sampled_steps"] == 1


def test_disabled_provscope_attaches_no_hooks(monkeypatch):
    monkeypatch.setenv("PROVSCOPE_ENABLED", "0")
    model = MLP()
    bare = _hook_count(model)
    w = watch(model)
    assert not w.active and _hook_count(model) == bare
    model(torch.randn(2, 8))
    assert w.stats()["points_emitted"] == 0


def test_update_ratio_rotates_over_layers_when_the_weight_copy_budget_is_small():
    model = MLP()  # fc1: 576 bytes of weights, fc2: 272 bytes
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    with watch(model, every=1, optimizer=opt, emit=records.append, snapshot_max_bytes=600):
        _train(model, opt, 3)
    with_ratio = {}
    for p in _points(records):
        if "update_ratio" in p.fields:
            with_ratio.setdefault(p.fields["step"], []).append(p.tags["layer"])
        assert "weight_norm" in p.fields or p.tags["layer"] == "act"
    assert with_ratio == {0: ["fc1"], 1: ["fc2"], 2: ["fc1"]}


def test_watching_a_model_twice_records_one_model_and_one_set_of_hooks():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bare = _hook_count(model)
    records = []
    first = watch(model, every=1, optimizer=opt, emit=records.append)
    _train(model, opt, 1)
    second = watch(model, every=2, optimizer=opt, emit=records.append)
    assert not first.active and watched(model) is second
    assert _hook_count(model) == bare + 1
    assert len(opt._optimizer_step_pre_hooks) == len(opt._optimizer_step_post_hooks) == 1
    _train(model, opt, 3)
    second.unwatch()
    models = [r for r in records if isinstance(r, EntityRecord) and r.entity_kind == "model"]
    assert len(models) == 1 and second.model_entity_id == first.model_entity_id
    # The second watcher continues the first one's step count: one point per step.
    assert [p.fields["step"] for p in _points(records, "train")] == [0, 1, 2, 3]
    assert sorted({p.fields["step"] for p in _points(records)}) == [0, 2]
