"""The run id rule and the rank detector (provscope.job.identity), one launcher at a time."""

from __future__ import annotations

import logging
import os
import uuid

import pytest
from provscope.exporters.memory import MemoryExporter
from provscope.exporters.pipeline import Pipeline

import provscope
from provscope.ids import new_id
from provscope.job import api as client
from provscope.job import identity, sink
from provscope.records import Point, RunRecord, TaskRecord

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "1",
            "TORCHELASTIC_RUN_ID": "job-7", "TORCHELASTIC_RESTART_COUNT": "0"}
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2",
         "SLURM_PROCID": "1"}


@pytest.fixture
def memory(monkeypatch):
    exporter = MemoryExporter()
    sink.shutdown_all(1.0, forget=True)
    sink.set_factory(lambda config: ("embedded", Pipeline([exporter], flush_interval_s=0.05)))
    monkeypatch.setattr(client, "_implicit", None)
    yield exporter
    sink.shutdown_all(2.0, forget=True)
    sink.set_factory(None)


def records(exporter, cls):
    provscope.flush(5.0)
    return [r for r in exporter.records if isinstance(r, cls)]


def test_the_rule_takes_explicit_then_environment_then_launcher_then_a_new_id():
    environ = {"PROVSCOPE_RUN_ID": "from-env", **SLURM}
    assert identity.resolve("mine", environ) == identity.Identity("mine", "explicit")
    assert identity.resolve(None, environ) == identity.Identity("from-env", "env")
    del environ["PROVSCOPE_RUN_ID"]
    found = identity.resolve(None, environ)
    assert found.source == "slurm" and found.run_id == identity.derived_run_id("slurm:4242.0")
    assert uuid.UUID(found.run_id).version == 5  # UUID format, not time ordered
    fresh = identity.resolve(None, {})
    assert fresh.source == "new" and uuid.UUID(fresh.run_id).version == 7


def test_every_rank_and_node_of_one_launcher_job_derives_the_same_id_and_other_jobs_not():
    ids = {identity.resolve(None, {**SLURM, "SLURM_PROCID": str(r)}).run_id for r in range(4)}
    assert len(ids) == 1
    assert identity.resolve(None, {**SLURM, "SLURM_STEP_ID": "1"}).run_id not in ids
    assert identity.resolve(None, {**SLURM, "SLURM_JOB_ID": "4243"}).run_id not in ids
    ranks = {identity.resolve(None, {**TORCHRUN, "RANK": str(r)}).run_id for r in range(2)}
    assert len(ranks) == 1 and ranks.isdisjoint(ids)
    mpi = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3", "PMIX_NAMESPACE": "ns-9"}
    assert identity.resolve(None, mpi).source == "mpi"


def test_a_single_process_or_a_batch_script_is_no_shared_job():
    # One task in a step (sequential commands in an interactive step stay apart) and the
    # batch script (no step) mint their own ids; so does a torchrun of one process.
    assert identity.launcher_key({**SLURM, "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert identity.launcher_key({"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8"}) is None
    assert identity.launcher_key({**TORCHRUN, "WORLD_SIZE": "1"}) is None
    assert identity.resolve(None, {**SLURM, "SLURM_STEP_NUM_TASKS": "1"}).source == "new"


def test_torchruns_none_placeholder_is_keyed_by_the_local_launch_and_never_shared_across_jobs():
    static = {**TORCHRUN, "TORCHELASTIC_RUN_ID": "none", "MASTER_PORT": "29500"}
    launcher, key, _ = identity.launcher_key(static)
    # The workers' parent (the torchrun process: pid and start time) names the launch.
    assert launcher == "torchelastic" and f":{os.getppid()}@" in key
    # Across nodes there is no launch id: the id comes from rank 0 over torch.distributed.
    assert identity.launcher_key({**static, "GROUP_WORLD_SIZE": "2"}) is None


def test_each_elastic_restart_is_its_own_run_with_the_first_attempt_as_parent():
    first = identity.resolve(None, TORCHRUN)
    again = identity.resolve(None, {**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "2"})
    assert again.run_id != first.run_id and again.parent_run_id == first.run_id
    assert first.parent_run_id is None


def test_one_rank_detector_with_override_then_torchrun_then_launchers():
    assert identity.detect_rank({}) == 0 and identity.env_rank({}) is None
    assert identity.env_rank({"SLURM_PROCID": "3"}) == 3
    assert identity.env_rank({"SLURM_PROCID": "3", "RANK": "5"}) == 5  # torchrun inside srun
    assert identity.env_rank({"PROVSCOPE_RANK": "7", "RANK": "5"}) == 7
    assert identity.env_rank({"OMPI_COMM_WORLD_RANK": "2"}) == 2
    assert identity.env_rank({"PMI_RANK": "4"}) == 4
    assert identity.env_rank({"LOCAL_RANK": "1"}) is None  # a local rank is no global rank
    assert identity.env_rank({"RANK": "x"}) is None


def test_workflow_run_id_argument_wins_and_every_rank_writes_into_it(memory, monkeypatch):
    monkeypatch.setenv("PROVSCOPE_RUN_ID", "from-env")
    with provscope.workflow("given", run_id="chosen") as run:
        run.log(loss=1.0)
    assert run.run_id == "chosen" and run.id_source == "explicit"
    assert {r.run_id for r in records(memory, RunRecord)} == {"chosen"}


def test_workflows_of_ranks_under_one_launcher_share_the_run_and_nested_ones_a_child(
        memory, monkeypatch):
    seen = {}
    for rank in ("0", "1"):
        for k, v in {**SLURM, "SLURM_PROCID": rank}.items():
            monkeypatch.setenv(k, v)
        with provscope.workflow("train", config={"lr": 0.1}) as run:
            run.log(loss=0.5)
            with run.task("shard"):
                pass
            with provscope.workflow("eval") as child:
                pass
        seen[rank] = (run.run_id, child.run_id, child.parent_run_id, run.origin)
    assert seen["0"][:3] == seen["1"][:3]
    assert seen["0"][2] == seen["0"][0] != seen["0"][1]
    assert (seen["0"][3], seen["1"][3]) == ("job", "worker")
    run_id = seen["0"][0]
    points = [p for p in records(memory, Point) if p.measurement == "train"]
    assert {(p.tags["run_id"], p.tags["rank"]) for p in points} == {(run_id, "0"),
                                                                     (run_id, "1")}
    shards = [t for t in records(memory, TaskRecord) if t.name == "shard"]
    assert {(t.run_id, t.rank) for t in shards} == {(run_id, 0), (run_id, 1)}


def test_ctrl_c_in_a_workflow_marks_the_run_and_open_task_interrupted(memory):
    with pytest.raises(KeyboardInterrupt), provscope.workflow("stopped") as run, \
            run.task("train"):
        raise KeyboardInterrupt
    ends = [r for r in records(memory, RunRecord) if r.end_ns is not None]
    assert [r.status for r in ends] == ["interrupted"]
    [task_end] = [t for t in records(memory, TaskRecord) if t.end_ns is not None]
    assert task_end.status == "interrupted"
    assert run.status == "interrupted"


def test_a_log_after_the_workflow_ended_is_counted_reported_once_and_not_written(
        memory, caplog):
    with provscope.workflow("done") as run:
        run.log(loss=1.0)
    with caplog.at_level(logging.WARNING, logger="provscope.client"):
        run.log(loss=2.0)
        run.log(loss=3.0)
        run.produce("late.pt")
    assert run.counts["late"] == 4  # two points, the entity and its relation
    lines = [r.getMessage() for r in caplog.records if "has ended" in r.getMessage()]
    assert len(lines) == 1 and run.run_id in lines[0] and "counts['late']" in lines[0]
    losses = [p.fields["loss"] for p in records(memory, Point) if p.measurement == "train"]
    assert losses == [1.0]


def test_a_status_outside_the_allowed_ones_is_one_line_and_recorded_failed(memory, caplog):
    run = provscope.workflow("odd").start()
    with caplog.at_level(logging.WARNING, logger="provscope.client"):
        run.finish("done")
    assert run.status == "failed"
    assert any("'done' is not one of finished, interrupted, killed, failed" in r.getMessage()
               for r in caplog.records)


def test_rank_0s_id_reaches_the_other_ranks_over_the_default_store(monkeypatch):
    dist = pytest.importorskip("torch.distributed")
    from datetime import timedelta

    from provscope.testing.servers import free_port

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 2, True, timedelta(seconds=10),
                           wait_for_workers=False)
    other = dist.TCPStore("127.0.0.1", port, 2, False, timedelta(seconds=10))
    stores = iter([server, other, other])
    monkeypatch.setattr(identity.DistShare, "_store", staticmethod(lambda: next(stores)))
    rank0, rank1 = identity.DistShare(), identity.DistShare()
    own = new_id()
    assert rank0.exchange(own, 0, 5.0) == own
    assert rank1.exchange(None, 1, 5.0) == own
    # Rank 0 opened no second shared run: the other waits its bounded time and goes on.
    assert rank1.fetch(0.2) is None
