"""A watched model stays picklable and copyable: torch.save, deepcopy, state_dict, DDP."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from provscope.pytorch.watch import watch, watched  # noqa: E402
from provscope.records import Point  # noqa: E402
from provscope.testing.servers import free_port  # noqa: E402

pytestmark = pytest.mark.torch


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _step(model, opt=None):
    if opt is not None:
        opt.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    if opt is not None:
        opt.step()


def _layer_points(records):
    return [r for r in records if isinstance(r, Point) and r.measurement == "layer"]


def test_torch_save_of_a_watched_model_loads_where_provscope_is_not_installed(tmp_path):
    model = _model()
    records = []
    w = watch(model, every=1, emit=records.append)  # no optimizer: layer hooks stay on
    _step(model)  # a sampled step is open: every kind of hook sits in the model
    assert any(len(m._forward_hooks) for m in model.modules())
    path = tmp_path / "model.pt"
    torch.save(model, path)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["provscope"] = None  # any import of provscope fails
        import torch
        model = torch.load({str(path)!r}, weights_only=False)
        out = model(torch.ones(2, 4))
        out.sum().backward()
        print(tuple(out.shape))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(2, 2)"
    _step(model)
    w.unwatch()
    assert w.stats()["hook_errors"] == 0 and w.stats()["sampled_steps"] == 2


def test_deepcopy_gives_a_model_that_records_nothing_and_the_original_still_does():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    w = watch(model, every=1, optimizer=opt, emit=records.append)
    _step(model, opt)
    clone = copy.deepcopy(model)
    opt_clone = copy.deepcopy(opt)  # the optimizer's step hooks are copied too
    before = len(records)
    _step(clone, torch.optim.SGD(clone.parameters(), lr=0.1))
    _step(clone, opt_clone)
    assert len(records) == before and watched(clone) is None
    for a, b in zip(clone.parameters(), model.parameters(), strict=True):
        assert a.shape == b.shape
    _step(model, opt)
    w.unwatch()
    assert sorted({p.fields["step"] for p in _layer_points(records)}) == [0, 1]


def test_state_dict_round_trips_through_torch_save_while_watched():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    w = watch(model, every=1, optimizer=opt, emit=records.append)
    _step(model, opt)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    other = _model()
    other.load_state_dict(saved["model"])
    for a, b in zip(other.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    model.load_state_dict(saved["model"])  # loading into the watched model keeps it watched
    opt.load_state_dict(saved["opt"])
    _step(model, opt)
    w.unwatch()
    assert sorted({p.fields["step"] for p in _layer_points(records)}) == [0, 1]
    assert w.stats()["hook_errors"] == 0


def test_ddp_wraps_a_watched_model_and_its_steps_are_recorded():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        model = _model()
        records = []
        w = watch(model, every=1, emit=records.append)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for _ in range(2):
            _step(ddp, opt)
        w.unwatch()
    finally:
        dist.destroy_process_group()
    assert {p.tags["layer"] for p in _layer_points(records)} == {"0", "1", "2"}
    assert w.stats()["hook_errors"] == 0 and w.stats()["sampled_steps"] == 2
