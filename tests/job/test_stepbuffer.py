"""StepBuffer: every source's fields of one step become one train point, written once."""

from __future__ import annotations

import os

import pytest
from provscope.exporters.memory import MemoryExporter
from provscope.exporters.pipeline import Pipeline

import provscope
from provscope.job import api as client
from provscope.job import sink
from provscope.job.stepbuffer import MAX_WAITING, StepBuffer
from provscope.records import Point


def _buffer():
    out: list[tuple[dict, int]] = []
    return StepBuffer(lambda fields, t: out.append((dict(fields), t))), out


def test_fields_of_one_step_merge_and_a_new_step_number_completes_it():
    buf, out = _buffer()
    buf.add(0, {"loss": 1.0})
    buf.add_default(0, {"lr": 0.1, "loss": 9.0})  # a default never replaces a logged value
    buf.add(0, {"step_time_seconds": 0.5})
    assert out == []
    buf.add(1, {"loss": 0.5})
    assert [f for f, _ in out] == [{"loss": 1.0, "lr": 0.1, "step_time_seconds": 0.5,
                                    "step": 0}]
    buf.complete()
    assert [f for f, _ in out][1] == {"loss": 0.5, "step": 1}
    buf.complete()  # nothing open: nothing written twice
    assert len(out) == 2 and buf.written == 2


def test_samples_become_rates_over_the_steps_one_step_time():
    buf, out = _buffer()
    buf.count(3, 8, 80)
    buf.count(3, 8, 80)  # two forwards in the step (gradient accumulation)
    buf.add(3, {"step_time_seconds": 0.25})
    buf.advance(4)
    [(fields, _)] = out
    assert fields["samples_per_second"] == pytest.approx(16 / 0.25)
    assert fields["tokens_per_second"] == pytest.approx(160 / 0.25)
    buf.count(4, 8)  # samples but no step time: no rate, and no point of its own
    buf.complete()
    assert len(out) == 1


def test_a_logged_rate_is_kept_and_the_epoch_is_the_one_the_step_began_in():
    buf, out = _buffer()
    buf.epoch = 2
    buf.add(0, {"step_time_seconds": 1.0, "samples_per_second": 7.0})
    buf.count(0, 100)
    buf.epoch = 3  # the next epoch begins before step 0's point is written
    buf.advance(1)
    assert out[0][0]["samples_per_second"] == 7.0 and out[0][0]["epoch"] == 2


def test_held_steps_wait_for_the_late_source_then_go_out_in_order():
    buf, out = _buffer()
    calls = []

    def resolver():
        calls.append(1)

    buf.add(0, {"loss": 1.0})
    buf.hold(resolver, 0)
    for step in (1, 2):
        buf.add(step, {"loss": float(step)})
    assert out == []  # 0 and 1 closed but held
    buf.add_default(0, {"grad_norm": 3.0})
    buf.add_default(1, {"grad_norm": 4.0})
    buf.release(resolver)
    assert [(f["step"], f.get("grad_norm")) for f, _ in out] == [(0, 3.0), (1, 4.0)]
    buf.hold(resolver, 2)
    buf.complete()  # flush: the late source is asked to deliver first
    assert calls == [1] and [f["step"] for f, _ in out] == [0, 1, 2]


def test_past_the_waiting_cap_the_oldest_held_step_is_written_and_counted():
    buf, out = _buffer()
    buf.hold(lambda: None, 0)
    for step in range(MAX_WAITING + 3):
        buf.add(step, {"loss": 1.0})
    assert buf.forced == 2 and [f["step"] for f, _ in out] == [0, 1]


def test_a_writer_that_raises_is_counted_never_raised():
    def broken(fields, t):
        raise OSError("gone")

    buf = StepBuffer(broken)
    buf.add(0, {"loss": 1.0})
    buf.advance(1)
    assert buf.errors == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_forgets_the_parents_open_step():
    buf, out = _buffer()
    buf.add(0, {"loss": 1.0})
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            buf.complete()
            code = 0 if out == [] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    buf.complete()
    assert len(out) == 1


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


def test_run_steps_and_run_log_write_one_point_per_step(memory):
    with provscope.workflow("merge") as run:
        for _epoch in run.epochs(2):
            for _step, _item in run.steps(range(3)):
                run.log(loss=1.0)
                run.log(accuracy=0.5)
            run.log(eval_loss=2.0)  # after the loop: still the epoch's last step
    points = _train_points(memory)
    assert [p["step"] for p in points] == [0, 1, 2, 3, 4, 5]
    for p in points:
        assert {"loss", "accuracy", "step_time_seconds", "epoch"} <= set(p)
    assert [p["epoch"] for p in points] == [0, 0, 0, 1, 1, 1]
    assert [p.get("eval_loss") for p in points] == [None, None, 2.0, None, None, 2.0]


def test_log_without_any_step_is_written_at_once(memory):
    with provscope.workflow("nostep") as run:
        run.log(loss=1.0)
        assert run.step_buffer.written == 0
    assert [p for p in _train_points(memory)] == [{"loss": 1.0, "loss_nonfinite": 0.0}]


def test_flush_writes_the_open_step(memory):
    with provscope.workflow("flush") as run:
        run.log(step=7, loss=1.0)
        assert run.flush(5.0)
        assert [p["step"] for p in _train_points(memory)] == [7]
        run.log(step=8, loss=0.5)
    assert [p["step"] for p in _train_points(memory)] == [7, 8]  # the end of the run
