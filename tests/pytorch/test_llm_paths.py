"""The paths a real LLM job takes, exercised on the CPU: compiled models, FSDP2 shards,
GradScaler-skipped steps, activation checkpointing, device values without per-step
synchronisation, and a step end that fails."""

from __future__ import annotations

import copy
import io
import os
import pickle

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from provscope.job.stepbuffer import StepBuffer  # noqa: E402
from provscope.pytorch import steps as steps_module  # noqa: E402
from provscope.pytorch.watch import watch  # noqa: E402
from provscope.records import Point  # noqa: E402
from provscope.testing.servers import free_port  # noqa: E402

pytestmark = pytest.mark.torch


def _points(records, measurement):
    return [r for r in records if isinstance(r, Point) and r.measurement == measurement]


def _layers(records):
    out: dict[str, list[dict]] = {}
    for r in _points(records, "layer"):
        out.setdefault(r.tags["layer"], []).append(r.fields)
    return out


def _blocks(n=3, width=16):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU())
                           for _ in range(n)])


def _train(model, opt, steps, width=16):
    for _ in range(steps):
        loss = model(torch.randn(8, width)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


# ----------------------------------------------------------------------------- compile


def _dynamo_counts():
    from torch._dynamo.utils import counters

    return (counters["frames"]["total"], counters["frames"]["ok"],
            sum(counters["graph_break"].values()))


def _compile(kind):
    model = _blocks()
    if kind == "model.compile()":
        model.compile(backend="eager")
    elif kind == "torch.compile(block)":
        for i in range(len(model)):
            model[i] = torch.compile(model[i], backend="eager")
    else:  # block.compile()
        for block in model:
            block.compile(backend="eager")
    return model


# Dynamo itself reads .grad of the non-leaf input of a compiled block (unwatched too).
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("kind", ["model.compile()", "torch.compile(block)",
                                  "block.compile()"])
def test_watching_a_compiled_model_adds_no_recompile_and_no_graph_break(kind):
    """The dynamo counters of a watched compiled model equal an unwatched one's after
    warm-up, and stay there over 50 more steps (every=2: hooks come and go)."""
    from torch._dynamo.utils import counters

    results = {}
    for watched in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = _compile(kind)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        records: list = []
        w = watch(model, every=2, optimizer=opt, emit=records.append) if watched else None
        _train(model, opt, 6)
        warm = _dynamo_counts()
        _train(model, opt, 50)
        results[watched] = (warm, _dynamo_counts())
        if w is not None:
            stats = w.stats()
            w.unwatch()
            assert stats["hook_errors"] == 0 and stats["sampled_steps"] == 28
            layers = _layers(records)
            # Parameters inside compiled code still get their statistics.
            assert all("grad_norm" in f[-1] and "update_ratio" in f[-1]
                       for name, f in layers.items() if name.endswith(".0"))
            if kind != "model.compile()":
                # Each compiled block is described from outside its compiled code.
                for block in ("0", "1", "2"):
                    assert "forward_seconds" in layers[block][-1]
                    assert "activation_std" in layers[block][-1]
    torch._dynamo.reset()
    (warm_bare, end_bare), (warm_watched, end_watched) = results[False], results[True]
    assert end_watched == warm_watched, "recompiled after warm-up"
    assert warm_watched == warm_bare and end_watched == end_bare


def test_a_compiled_model_keeps_its_compiled_call_after_unwatch_and_pickles():
    model = _compile("block.compile()")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    originals = [block._compiled_call_impl for block in model]
    w = watch(model, every=1, optimizer=opt, emit=lambda r: None)
    _train(model, opt, 2)
    torch.save(model.state_dict(), io.BytesIO())
    pickle.loads(pickle.dumps(model))  # PyTorch drops the compiled call when pickling
    w.unwatch()
    assert [block._compiled_call_impl for block in model] == originals
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- FSDP2


def _fsdp_worker(rank, port, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        records: list = []
        w = watch(model, every=1, optimizer=opt, emit=records.append)
        torch.manual_seed(1 + rank)
        for _ in range(3):
            loss = model(torch.randn(4, 8)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        stats = w.stats()
        w.unwatch()
        full = [model[0].weight.full_tensor(), model[0].bias.full_tensor()]
        full_norm2 = sum(float(t.double().square().sum()) for t in full)
        last = _layers(records)["0"][-1]
        out.put((rank, stats["hook_errors"], stats["sampled_steps"], last["weight_norm"],
                 full_norm2, sorted(last)))
    finally:
        dist.destroy_process_group()


def test_fsdp2_shards_get_layer_statistics_of_the_local_shard():
    mp = torch.multiprocessing.get_context("spawn")
    out = mp.Queue()
    port = free_port()
    procs = [mp.Process(target=_fsdp_worker, args=(rank, port, out)) for rank in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for _rank, errors, sampled, _norm, _full, fields in results:
        assert errors == 0 and sampled == 3
        assert {"grad_norm", "weight_norm", "update_ratio", "activation_std"} <= set(fields)
    # Local shards: the shards' squared norms add up to the full weight's.
    shard_norm2 = sum(norm ** 2 for _, _, _, norm, _, _ in results)
    assert shard_norm2 == pytest.approx(results[0][4], rel=1e-4)


# ----------------------------------------------------------------------------- GradScaler


def test_a_gradscaler_skipped_step_is_ended_and_flagged():
    model = _blocks(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    records: list = []
    w = watch(model, every=1, optimizer=opt, scaler=scaler, emit=records.append)
    for step in range(4):
        loss = model(torch.randn(8, 16)).square().mean()
        scaler.scale(loss).backward()
        if step == 2:
            model[0][0].weight.grad[0, 0] = float("inf")  # an overflow
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    # A scaler copied or saved while watched carries no watcher, only its own method.
    copied = copy.deepcopy(scaler)
    assert copied.__dict__["step"].args == (copied,)
    loaded = pickle.loads(pickle.dumps(scaler))
    assert loaded.__dict__["step"].args == (loaded,)
    w.unwatch()
    assert "step" not in scaler.__dict__  # the scaler's own method again
    train = {p.fields["step"]: p.fields for p in _points(records, "train")}
    assert [train[s]["optimizer_step_skipped"] for s in range(4)] == [0, 0, 1, 0]
    assert w.stats()["step"] == 4 and w.stats()["hook_errors"] == 0


# ----------------------------------------------------------------------------- checkpointing


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.inner = _blocks(2)
        self.head = nn.Linear(16, 16)
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        x = x.requires_grad_(True) if self.reentrant else x
        return self.head(checkpoint(self.inner, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_neither_doubles_forward_nor_loses_backward(reentrant):
    model = Checkpointed(reentrant)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    records: list = []
    w = watch(model, every=1, optimizer=opt, emit=records.append)
    calls = {"n": 0}
    counter = model.inner[0][0].register_forward_hook(
        lambda *a: calls.__setitem__("n", calls["n"] + 1))
    _train(model, opt, 2)
    counter.remove()
    w.unwatch()
    assert calls["n"] == 4  # the rerun in backward happened: two forwards per step
    layer = _layers(records)["inner.0.0"]
    assert w.stats()["hook_errors"] == 0
    for fields in layer:
        assert "backward_seconds" in fields and "forward_seconds" in fields
        assert "activation_std" in fields


# ----------------------------------------------------------------------------- device values


def test_unsampled_steps_copy_device_values_to_the_host_in_batches(monkeypatch):
    """With every value treated as a device tensor, the host copies happen once per batch
    of ten steps (and at sampled steps), never once per step."""
    import provscope.job.run as run_module

    monkeypatch.setattr(steps_module, "on_device", lambda t: True)
    monkeypatch.setattr(run_module, "on_device", lambda t: hasattr(t, "detach"))
    copies = {"n": 0}
    original_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        copies["n"] += 1
        return original_cpu(self, *args, **kwargs)

    model = _blocks(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    records: list = []
    w = watch(model, every=1000, optimizer=opt, emit=records.append)
    _train(model, opt, 1)  # step 0: the sampled one
    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    _train(model, opt, 30)  # steps 1..30, none sampled
    per_batch = copies["n"]
    monkeypatch.setattr(torch.Tensor, "cpu", original_cpu)
    w.unwatch()
    assert per_batch == 3  # steps 1-10, 11-20, 21-30: one copy each
    train = {p.fields["step"]: p.fields for p in _points(records, "train")}
    assert all("grad_norm" in train[s] for s in range(1, 31))


def test_run_log_of_a_device_loss_waits_for_the_batch_and_arrives_exact(monkeypatch, tmp_path):
    import provscope
    import provscope.job.run as run_module

    monkeypatch.setattr(run_module, "on_device", lambda t: isinstance(t, torch.Tensor))
    copies = {"n": 0}
    original = run_module._to_floats

    def counting(tensors):
        copies["n"] += 1
        return original(tensors)

    monkeypatch.setattr(run_module, "_to_floats", counting)
    settings = {"embedded.path": str(tmp_path / "p.db"),
                "agent.socket_path": str(tmp_path / "none.sock"), "client.telemetry": False}
    seen = []
    with provscope.workflow("device-loss", settings=settings) as run:
        original_write = run.step_buffer._write

        def write(fields, time_ns):
            seen.append(dict(fields))
            original_write(fields, time_ns)

        run.step_buffer._write = write
        for step, _ in run.steps(range(25)):
            run.log(loss=torch.tensor(float(step) / 4))
        during = copies["n"]
    assert during == 2  # after steps 0-10 and 11-21; the rest at the end of the run
    losses = {f["step"]: f["loss"] for f in seen}
    assert losses == {s: s / 4 for s in range(25)}
    assert all(f["loss_nonfinite"] == 0.0 for f in seen)


# ----------------------------------------------------------------------------- step end


def test_a_failing_step_end_still_advances_the_step_and_the_sampling(monkeypatch):
    model = _blocks(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    records: list = []
    w = watch(model, every=5, optimizer=opt, emit=records.append)
    original = StepBuffer.add_default
    failures = {"n": 0}

    def failing(self, step, fields):
        if step == 5 and "lr" in fields:
            failures["n"] += 1
            raise RuntimeError("sink broke")
        return original(self, step, fields)

    monkeypatch.setattr(StepBuffer, "add_default", failing)
    _train(model, opt, 20)
    w.unwatch()
    assert failures["n"] == 1 and w.step == 20
    assert w.stats()["sampled_steps"] == 4  # steps 0, 5, 10, 15: not every step after 5
    assert w.stats()["hook_errors"] == 1
