"""Forked children (DataLoader workers) record through their own pipeline, no deadlock."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

import provscope
from provscope import query
from provscope.config import load_config
from provscope.job import api as client
from provscope.job import sink

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    """Settings that write to a private embedded SQLite file, with no agent."""
    for name in ("PROVSCOPE_RUN_ID", "PROVSCOPE_PARENT_TASK_ID", "PROVSCOPE_RANK", "RANK",
                 "PROVSCOPE_ENABLED", "PROVSCOPE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    sink.shutdown_all(1.0, forget=True)
    sink.set_factory(None)
    monkeypatch.setattr(client, "_implicit", None)
    overrides = {"embedded.path": str(tmp_path / "prov.db"),
                 "agent.socket_path": str(tmp_path / "no-agent.sock"),
                 "lineage.flush_interval_s": 0.1}
    yield load_config(overrides=overrides, environ={})
    sink.shutdown_all(5.0, forget=True)


def _worker(tag: str) -> None:
    run = provscope.current_run()
    with run.task(f"worker {tag}", kind="data"):
        run.log(step=1, worker_items=3.0)


def test_multiprocessing_fork_children_log_without_deadlock(embedded):
    ctx = multiprocessing.get_context("fork")
    with provscope.workflow("forks", settings=embedded) as run:
        run.log(loss=1.0)  # no step: written at once, so the pipeline threads run at the fork
        with run.task("load") as load:
            procs = [ctx.Process(target=_worker, args=(str(i),)) for i in range(2)]
            for proc in procs:
                proc.start()
            for proc in procs:
                proc.join(60)
    assert [p.exitcode for p in procs] == [0, 0], "a forked child hung or failed"
    assert run.flush(10)
    tasks = query.tasks(run.run_id, config=embedded)
    workers = tasks[tasks["name"].str.startswith("worker")]
    assert len(workers) == 2
    assert set(workers["pid"]) == {p.pid for p in procs}
    assert set(workers["parent_task_id"]) == {load.task_id}
    assert (workers["status"] == "finished").all()
    values = query.points("train", "worker_items", run_id=run.run_id, config=embedded)
    assert len(values) == 2


def test_raw_fork_child_that_flushes_before_os_exit_keeps_its_records(embedded):
    with provscope.workflow("rawfork", settings=embedded) as run:
        run.log(step=0, loss=1.0)
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                run.log(step=1, child_loss=0.5)
                code = 0 if provscope.flush(20) else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            pytest.fail("forked child did not finish: deadlock")
    assert os.waitstatus_to_exitcode(status) == 0
    run.flush(10)
    child = query.points("train", "child_loss", run_id=run.run_id, config=embedded)
    assert child["value"].tolist() == [0.5]
