"""The in-job API: runs, tasks, nesting (sync, async, threads), errors, joining, no-ops."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from provscope.exporters.memory import MemoryExporter
from provscope.exporters.pipeline import Pipeline

import provscope
from provscope.job import api as client
from provscope.job import sink
from provscope.records import EntityRecord, Point, RelationRecord, RunRecord, TaskRecord

ENV = ("PROVSCOPE_RUN_ID", "PROVSCOPE_PARENT_TASK_ID", "PROVSCOPE_RANK", "RANK",
       "PROVSCOPE_ENABLED", "PROVSCOPE_CONFIG")


@pytest.fixture
def memory(monkeypatch):
    """Every sink writes into one MemoryExporter; nothing is shared between tests."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
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


def merged_tasks(exporter) -> dict[str, dict]:
    """Start and end records merged by task id, as the stores do."""
    out: dict[str, dict] = {}
    for r in records(exporter, TaskRecord):
        row = out.setdefault(r.task_id, {})
        row.update({k: v for k, v in r.to_dict().items() if v is not None})
    return out


def by_name(tasks: dict[str, dict], name: str) -> dict:
    [row] = [t for t in tasks.values() if t.get("name") == name]
    return row


def test_workflow_writes_start_and_end_records_that_merge(memory):
    with provscope.workflow("train", config={"lr": 0.1, "layers": [1, 2]}) as run:
        assert provscope.current_run() is run
    assert provscope.current_run() is None
    start, end = records(memory, RunRecord)
    assert start.run_id == end.run_id == run.run_id
    assert start.status == "running" and start.name == "train"
    assert start.config == {"lr": 0.1, "layers": [1, 2]}
    assert start.environment["python"] and "provscope" in start.environment["packages"]
    assert start.command and start.host == run.host
    assert end.status == "finished" and end.end_ns >= start.start_ns


def test_failed_workflow_is_recorded_and_the_exception_goes_on(memory):
    with pytest.raises(KeyError), provscope.workflow("boom"):
        raise KeyError("x")
    assert records(memory, RunRecord)[-1].status == "failed"


def test_decorated_tasks_nest_and_record_arguments_and_results(memory):
    @provscope.task
    def inner(x, scale=2):
        return x * scale

    @provscope.task(name="outer", kind="data")
    def outer(values):
        return [inner(v) for v in values]

    with provscope.workflow("nest") as run:
        assert outer([1, 2]) == [2, 4]
    tasks = merged_tasks(memory)
    top = by_name(tasks, "outer")
    assert top["task_kind"] == "data" and top.get("parent_task_id") is None
    assert top["params"] == {"values": [1, 2]} and top["result"] == {"return": [2, 4]}
    inners = [t for t in tasks.values() if t["name"].endswith("inner")]
    assert len(inners) == 2
    assert all(t["parent_task_id"] == top["task_id"] for t in inners)
    assert {t["params"]["x"] for t in inners} == {1, 2}
    assert all(t["status"] == "finished" and t["run_id"] == run.run_id for t in tasks.values())
    assert all("cpu_seconds" in t["resources"] for t in tasks.values())


def test_async_tasks_nest_under_the_task_that_awaits_them(memory):
    @provscope.task
    async def leaf(i):
        await asyncio.sleep(0.01)
        return i

    @provscope.task
    async def parent():
        return await asyncio.gather(leaf(1), leaf(2))

    with provscope.workflow("async"):
        assert asyncio.run(parent()) == [1, 2]
    tasks = merged_tasks(memory)
    top = next(t for t in tasks.values() if t["name"].endswith("parent"))
    leaves = [t for t in tasks.values() if t["name"].endswith("leaf")]
    assert len(leaves) == 2 and all(t["parent_task_id"] == top["task_id"] for t in leaves)


def test_threads_inherit_the_open_task_via_wrap_and_the_process_fallback(memory):
    @provscope.task
    def work(tag):
        return tag

    with provscope.workflow("threads"), provscope.task("main") as main:
        plain = threading.Thread(target=work, args=("plain",))
        plain.start()
        plain.join()
        with ThreadPoolExecutor(2) as pool:
            assert pool.submit(provscope.wrap(work), "wrapped").result() == "wrapped"
    tasks = merged_tasks(memory)
    children = [t for t in tasks.values() if t["name"].endswith("work")]
    assert {t["params"]["tag"] for t in children} == {"plain", "wrapped"}
    assert all(t["parent_task_id"] == main.task_id for t in children)


def test_task_exception_is_recorded_and_reraised_unchanged(memory):
    class Boom(Exception):
        pass

    error = Boom("bad batch 7")

    @provscope.task
    def fails():
        raise error

    with provscope.workflow("err"):
        with pytest.raises(Boom) as caught:
            fails()
        assert caught.value is error
        with pytest.raises(ZeroDivisionError), provscope.current_run().task("div"):
            _ = 1 / 0
    tasks = merged_tasks(memory)
    assert by_name(tasks, "div")["status"] == "failed"
    failed = next(t for t in tasks.values() if t["name"].endswith("fails"))
    assert failed["status"] == "failed" and "Boom: bad batch 7" in failed["error"]


def test_decorated_function_outside_a_workflow_records_into_an_implicit_run(memory):
    @provscope.task
    def lonely(n):
        return n + 1

    assert lonely(1) == 2
    provscope.log(loss=0.5)
    implicit = provscope.current_run()
    assert implicit is not None and implicit.implicit
    client._close_implicit()
    runs = records(memory, RunRecord)
    assert [r.status for r in runs] == ["running", "finished"]
    [task] = [t for t in merged_tasks(memory).values() if t["name"].endswith("lonely")]
    assert task["run_id"] == implicit.run_id == runs[0].run_id
    [point] = records(memory, Point)
    assert point.tags["run_id"] == implicit.run_id


def test_log_writes_a_train_point_tagged_by_run_host_rank_with_step_as_field(memory):
    torch = pytest.importorskip("torch")
    with provscope.workflow("log") as run:
        run.log(step=3, loss=torch.tensor(0.25), lr=1e-3, note="warmup", bad=object())
    [point] = records(memory, Point)
    assert point.measurement == "train"
    assert point.tags == {"run_id": run.run_id, "host": run.host, "rank": "0"}
    assert point.fields == {"step": 3, "loss": 0.25, "loss_nonfinite": 0.0, "lr": 1e-3,
                            "note": "warmup"}
    assert run.errors == 1  # the unconvertible value was skipped and counted


def test_a_nan_or_infinite_loss_is_flagged_in_a_field_line_protocol_can_carry(memory):
    """InfluxDB cannot store NaN/Inf, so the loss_nonfinite alert reads this flag."""
    from provscope.exporters.influxdb.lineprotocol import encode_point

    with provscope.workflow("nan") as run:
        run.log(step=1, loss=float("nan"))
        run.log(step=2, loss=float("inf"))
        run.log(step=3, loss=2.0)
        run.log(step=4, lr=0.1)
    points = records(memory, Point)
    flags = {p.fields["step"]: p.fields.get("loss_nonfinite") for p in points}
    assert flags == {1: 1.0, 2: 1.0, 3: 0.0, 4: None}
    line = encode_point(points[0])
    assert "loss_nonfinite=1" in line and "loss=" not in line.replace("loss_nonfinite", "")


def test_steps_log_step_time_and_record_sampled_step_tasks(memory):
    with provscope.workflow("loop") as run:
        seen = []
        for epoch in run.epochs(2):
            for step, item in run.steps(range(5), task_every=4):
                seen.append((epoch, step, item))
                run.log(loss=1.0)
    assert [s for _, s, _ in seen] == list(range(10))  # the step counter spans epochs
    tasks = merged_tasks(memory)
    epochs = [t for t in tasks.values() if t["task_kind"] == "epoch"]
    steps = [t for t in tasks.values() if t["task_kind"] == "step"]
    assert len(epochs) == 2 and all(t["status"] == "finished" for t in epochs)
    assert sorted(t["params"]["step"] for t in steps) == [0, 4, 8]
    epoch_ids = {t["task_id"] for t in epochs}
    assert all(t["parent_task_id"] in epoch_ids for t in steps)
    timed = [p for p in records(memory, Point) if "step_time_seconds" in p.fields]
    assert [p.fields["step"] for p in timed] == list(range(10))
    assert all(p.fields["step_time_seconds"] >= 0 for p in timed)
    logged = [p for p in records(memory, Point) if "loss" in p.fields]
    assert [p.fields["epoch"] for p in logged] == [0] * 5 + [1] * 5


def test_breaking_out_of_epochs_closes_the_open_epoch(memory):
    with provscope.workflow("early") as run:
        for epoch in run.epochs(10):
            if epoch == 1:
                break
    epochs = [t for t in merged_tasks(memory).values() if t["task_kind"] == "epoch"]
    assert len(epochs) == 2 and all(t["status"] == "finished" for t in epochs)


def test_workflow_joins_the_run_named_in_the_environment(memory, monkeypatch):
    monkeypatch.setenv("PROVSCOPE_RUN_ID", "run-from-provscope-run")
    monkeypatch.setenv("PROVSCOPE_PARENT_TASK_ID", "command-task")
    with provscope.workflow("joined") as run, run.task("prep"):
        pass
    assert run.run_id == "run-from-provscope-run" and not run.owner
    # The job's own name and config go into the launcher's run (origin job wins there).
    start, end = records(memory, RunRecord)
    assert (start.run_id, start.name, start.origin, start.status) == \
        ("run-from-provscope-run", "joined", "job", "running")
    assert (end.run_id, end.status) == ("run-from-provscope-run", "finished")
    task = by_name(merged_tasks(memory), "prep")
    assert task["run_id"] == "run-from-provscope-run"
    assert task["parent_task_id"] == "command-task"


def test_non_zero_rank_writes_a_partial_run_record_and_no_end_when_it_finishes(memory,
                                                                              monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("PROVSCOPE_RUN_ID", "shared-run")
    with provscope.workflow("ddp", config={"lr": 0.1}) as run, run.task("shard"):
        pass
    assert run.rank == 3
    [start] = records(memory, RunRecord)  # its success says nothing of the other ranks
    assert (start.run_id, start.name, start.config, start.origin) == \
        ("shared-run", "ddp", {"lr": 0.1}, "worker")
    assert by_name(merged_tasks(memory), "shard")["rank"] == 3


def test_non_zero_rank_that_fails_writes_the_runs_end(memory, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError), provscope.workflow("ddp"):
        raise ValueError("rank 1 broke")
    start, end = records(memory, RunRecord)
    assert (end.status, end.origin) == ("failed", "worker") and end.run_id == start.run_id


def test_nested_workflow_records_its_parent_run(memory):
    with provscope.workflow("outer") as outer, provscope.workflow("inner") as inner:
        assert provscope.current_run() is inner
    starts = [r for r in records(memory, RunRecord) if r.status == "running"]
    assert {r.name: r.parent_run_id for r in starts} == {"outer": None, "inner": outer.run_id}


def test_disabled_instrumentation_is_a_no_op(memory, monkeypatch):
    monkeypatch.setenv("PROVSCOPE_ENABLED", "0")

    @provscope.task
    def f(x):
        return x * 3

    with provscope.workflow("off") as run:
        assert f(2) == 6
        run.log(loss=1.0)
        assert run.use("/etc/hostname")
        with run.task("t"):
            pass
    assert memory.records == [] and run.sink_mode == "disabled"


def test_use_and_produce_record_entities_and_prov_relations(memory, tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("abc")
    with provscope.workflow("ents") as run, run.task("save") as save:
        used = run.use(data, kind="dataset")
        made = run.produce(tmp_path / "ckpt.pt", kind="checkpoint", step=7, loss=0.1)
        remote = run.use("s3://bucket/shard-0000.tar", kind="dataset")
    ents = {e.entity_id: e for e in records(memory, EntityRecord)}
    assert ents[used].digest.startswith("sha256:") and ents[used].size_bytes == 3
    assert ents[made].attributes["step"] == 7 and ents[made].attributes["exists"] is False
    assert ents[remote].uri == "s3://bucket/shard-0000.tar" and ents[remote].digest is None
    rels = {(r.relation, r.object_id): r for r in records(memory, RelationRecord)}
    assert rels[("used", used)].subject_id == save.task_id
    assert rels[("generated", made)].subject_id == save.task_id
    assert all(r.run_id == run.run_id for r in rels.values())


def test_drop_mode_counts_records_when_no_agent_listens(memory, tmp_path):
    sink.set_factory(None)  # the real choice: agent socket, else client.no_agent
    settings = {"client.no_agent": "drop", "agent.socket_path": str(tmp_path / "none.sock")}
    with provscope.workflow("dropped", settings=settings) as run:
        run.log(loss=1.0)
    assert run.sink_mode == "drop"
    assert run._sink.stats()["backend"]["drop"]["points_dropped_total"] >= 2


def test_a_pipeline_that_cannot_start_is_counted_not_raised(memory):
    def broken(config):
        raise RuntimeError("database is locked")

    sink.set_factory(broken)
    with provscope.workflow("broken") as run, run.task("still runs"):
        run.log(loss=1.0)
    assert run.sink_mode == "failed"
    assert run._sink.errors == 1


def test_bad_settings_fall_back_to_defaults_with_one_log_line(memory, caplog):
    with provscope.workflow("cfg", settings={"client.no_agent": "maybe"}) as run:
        pass
    assert run.config.client.no_agent == "embedded"
    assert any("client.no_agent" in r.getMessage() for r in caplog.records)


def test_tensor_huge_list_and_open_file_arguments_are_summarised_not_stored(memory, tmp_path):
    torch = pytest.importorskip("torch")

    @provscope.task
    def consume(batch, ids, handle, note):
        return torch.ones(2, 2)

    with open(tmp_path / "log.txt", "w") as fh, provscope.workflow("summaries"):
        consume(torch.zeros(8, 128), list(range(100_000)), fh, "n" * 10_000)
    task = next(t for t in merged_tasks(memory).values() if t["name"].endswith("consume"))
    params = task["params"]
    assert params["batch"]["shape"] == [8, 128] and params["batch"]["dtype"] == "torch.float32"
    assert params["ids"] == {"type": "list", "len": 100_000, "first": [0, 1, 2]}
    assert params["handle"]["name"].endswith("log.txt")
    assert params["note"]["len"] == 10_000
    assert task["result"]["return"]["shape"] == [2, 2]


def test_hash_cap_from_the_settings_applies_to_use(memory, tmp_path):
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(b"s" * 100)
    big.write_bytes(b"b" * 5000)
    with provscope.workflow("cap", settings={"client.hash_max_bytes": 1000}) as run:
        small_id = run.use(small)
        big_id = run.use(big)
    ents = {e.entity_id: e for e in records(memory, EntityRecord)}
    assert ents[small_id].digest.startswith("sha256:")
    assert ents[big_id].digest is None and ents[big_id].size_bytes == 5000
    assert "hash_max_bytes=1000" in ents[big_id].attributes["digest_skipped"]
