"""One train point per step per rank, whichever of run.steps, run.log and watch() add to it."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from provscope.exporters.memory import MemoryExporter  # noqa: E402
from provscope.exporters.pipeline import Pipeline  # noqa: E402
from torch import nn  # noqa: E402

import provscope  # noqa: E402
from provscope import query  # noqa: E402
from provscope.config import load_config  # noqa: E402
from provscope.job import api as client  # noqa: E402
from provscope.job import sink  # noqa: E402
from provscope.pytorch.watch import watch  # noqa: E402
from provscope.records import Point  # noqa: E402

pytestmark = pytest.mark.torch

BATCH = 8


@pytest.fixture
def memory(monkeypatch):
    exporter = MemoryExporter()
    sink.shutdown_all(1.0, forget=True)
    sink.set_factory(lambda config: ("embedded", Pipeline([exporter], flush_interval_s=0.05)))
    monkeypatch.setattr(client, "_implicit", None)
    yield exporter
    sink.shutdown_all(2.0, forget=True)
    sink.set_factory(None)


def _train_points(exporter):
    provscope.flush(5.0)
    return [r.fields for r in exporter.records
            if isinstance(r, Point) and r.measurement == "train"]


def _setup(lr=0.05):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return model, opt, sched


def _batches(n):
    return [torch.randn(BATCH, 4) for _ in range(n)]


def test_the_readme_loop_writes_exactly_one_train_point_per_step_to_the_store(tmp_path):
    db = str(tmp_path / "p.db")
    model, opt, sched = _setup()
    with provscope.workflow("readme", settings={"embedded.path": db}) as run:
        with run.task("train"), provscope.watch(model, every=2, optimizer=opt):
            for _step, x in run.steps(_batches(5)):
                opt.zero_grad()
                loss = model(x).pow(2).mean()
                loss.backward()
                opt.step()
                sched.step()  # the lr logged is the next step's: not what the optimizer used
                run.log(loss=loss.detach(), lr=sched.get_last_lr()[0])
        assert run.flush(30.0)
    config = load_config(overrides={"embedded.path": db})
    series = query.points("train", run_id=run.run_id, config=config)
    by_field = series.groupby("field")
    for field in ("step", "loss", "lr", "step_time_seconds", "samples_per_second",
                  "grad_norm"):
        rows = by_field.get_group(field)
        assert len(rows) == 5, field  # one value per step: one point per step
        assert rows["time_ns"].is_unique, field
    assert sorted(by_field.get_group("step")["value"]) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert series.groupby("time_ns")["field"].apply(set).map(len).min() >= 6
    # The script's lr wins over the one the watcher reads from the optimizer.
    lrs = by_field.get_group("lr").sort_values("time_ns")["value"].tolist()
    assert lrs == pytest.approx([0.05 * 0.5 ** (k + 1) for k in range(5)])


def test_one_step_time_and_samples_per_second_from_it(memory):
    model, opt, _ = _setup()
    with provscope.workflow("one-time") as run, watch(model, every=100, optimizer=opt):
        for _step, x in run.steps(_batches(4)):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
    points = _train_points(memory)
    assert [p["step"] for p in points] == [0, 1, 2, 3]
    for p in points:
        assert p["samples_per_second"] == pytest.approx(BATCH / p["step_time_seconds"])
        assert p["lr"] == pytest.approx(0.05) and p["grad_norm"] > 0


def test_without_run_steps_the_watcher_counts_steps_and_run_log_joins_them(memory):
    model, opt, _ = _setup()
    with provscope.workflow("no-loop") as run, watch(model, every=100, optimizer=opt):
        for x in _batches(4):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            run.log(loss=loss.detach())  # no step given: the watcher's step
            assert run.step is not None
    points = _train_points(memory)
    assert [p["step"] for p in points] == [0, 1, 2, 3]
    for p in points:
        assert {"loss", "lr", "grad_norm", "step_time_seconds"} <= set(p)


def test_gradient_accumulation_counts_every_micro_batch_of_the_optimizer_step(memory):
    model, opt, _ = _setup()
    with provscope.workflow("accumulate"), watch(model, every=100, optimizer=opt):
        batches = _batches(6)
        for i in range(0, 6, 2):
            opt.zero_grad()
            for x in batches[i:i + 2]:
                model(x).sum().backward()
            opt.step()
    points = _train_points(memory)
    assert [p["step"] for p in points] == [0, 1, 2]
    for p in points:
        assert p["samples_per_second"] == pytest.approx(2 * BATCH / p["step_time_seconds"])


def test_accumulation_over_run_steps_puts_the_optimizer_scalars_on_its_micro_step(memory):
    model, opt, _ = _setup()
    with provscope.workflow("micro") as run, watch(model, every=100, optimizer=opt):
        for step, x in run.steps(_batches(6)):
            model(x).sum().backward()
            if step % 2 == 1:
                opt.step()
                opt.zero_grad()
    points = _train_points(memory)
    assert [p["step"] for p in points] == list(range(6))
    assert [("grad_norm" in p) for p in points] == [False, True] * 3
    for p in points:
        assert p["samples_per_second"] == pytest.approx(BATCH / p["step_time_seconds"])


def test_late_gradient_norms_still_land_in_their_steps_point(memory):
    """The CUDA path: gradient norms stay on the device and cross in batches."""
    model, opt, _ = _setup()
    with provscope.workflow("late") as run:
        w = watch(model, every=100, optimizer=opt)
        w._clock.cuda = True  # defer the norms as on CUDA (the tensors here are CPU ones)
        w._clock._batch_every = 3
        for _step, x in run.steps(_batches(7)):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
            run.log(loss=1.0)
        w.unwatch()
    points = _train_points(memory)
    assert [p["step"] for p in points] == list(range(7))
    assert all(p["grad_norm"] > 0 and p["loss"] == 1.0 for p in points)


def test_without_an_optimizer_each_forward_is_a_step_and_steps_are_followed(memory):
    model, opt, _ = _setup()
    with provscope.workflow("forward-steps") as run, watch(model, every=2):
        for _step, x in run.steps(_batches(3)):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
            run.log(loss=1.0)
    points = _train_points(memory)
    assert [p["step"] for p in points] == [0, 1, 2]
    for p in points:
        assert p["samples_per_second"] == pytest.approx(BATCH / p["step_time_seconds"])
    layer = [r.fields["step"] for r in memory.records
             if isinstance(r, Point) and r.measurement == "layer"]
    assert sorted(set(layer)) == [0, 2]
