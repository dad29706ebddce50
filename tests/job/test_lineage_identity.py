"""Lineage identity through the job API, into the embedded SQLite store and a real
PostgreSQL: one file is one entity across runs, a changed file is a new one, tasks are
informed by the tasks whose outputs they used, and the query API answers "which runs
used this" in one call."""

from __future__ import annotations

import os

import pytest

import provscope
from provscope import query
from provscope.config import load_config
from provscope.job import api as client
from provscope.job import sink


@pytest.fixture(autouse=True)
def fresh_sinks(monkeypatch):
    for name in ("PROVSCOPE_RUN_ID", "PROVSCOPE_PARENT_TASK_ID", "PROVSCOPE_RANK", "RANK",
                 "PROVSCOPE_ENABLED", "PROVSCOPE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    sink.shutdown_all(1.0, forget=True)
    sink.set_factory(None)
    monkeypatch.setattr(client, "_implicit", None)
    yield
    sink.shutdown_all(5.0, forget=True)


@pytest.fixture(params=["embedded", "postgresql"])
def stores(request, tmp_path) -> dict[str, str]:
    overrides = {"embedded.path": str(tmp_path / "provscope.db"),
                 "agent.socket_path": str(tmp_path / "none.sock")}
    if request.param == "postgresql":
        overrides["lineage.url"] = request.getfixturevalue("postgres_url")
    return overrides


@pytest.fixture
def settings(stores):
    return load_config(environ={}, overrides=stores)


def _run(settings, name, body) -> provscope.Run:
    with provscope.workflow(name, settings=settings) as run:
        body(run)
    assert run.flush(20), "records were not all written"
    return run


def test_one_dataset_used_by_three_runs_is_one_entity_with_three_used_relations(
        settings, tmp_path):
    data = tmp_path / "train.csv"
    data.write_text("x,y\n1,2\n")

    def train(run):
        with run.task("train"):
            run.use(data, kind="dataset")

    runs = [_run(settings, f"r{i}", train) for i in range(3)]
    ids = {run.run_id for run in runs}
    found = query.sql("SELECT entity_id, digest FROM entities", config=settings)
    assert len(found) == 1
    (entity_id,) = found["entity_id"]
    used = query.sql("SELECT run_id FROM relations WHERE relation = 'used' "
                     "AND object_id = :e", {"e": entity_id}, config=settings)
    assert sorted(used["run_id"]) == sorted(ids)
    for what in (data, str(data), found["digest"][0], entity_id):
        uses = query.runs_using(what, config=settings)
        assert set(uses["run_id"]) == ids and len(uses) == 3, what
    assert list(uses["run_id"]) == [run.run_id for run in reversed(runs)]  # newest first
    assert set(uses["task_name"]) == {"train"} and set(uses["role"]) == {"dataset"}
    assert set(uses["run_name"]) == {"r0", "r1", "r2"}
    assert uses["time"].notna().all() and uses["run_start_time"].notna().all()
    for run in runs:  # each run still lists it among its entities
        assert list(query.entities(run.run_id, config=settings)["entity_id"]) == [entity_id]


def test_a_changed_file_is_a_new_entity(settings, tmp_path):
    data = tmp_path / "train.csv"
    data.write_text("v1\n")
    first = _run(settings, "before", lambda run: run.use(data))
    old = query.runs_using(data, config=settings)
    data.write_text("v2, longer\n")
    second = _run(settings, "after", lambda run: run.use(data))
    ents = query.sql("SELECT entity_id, uri, digest FROM entities ORDER BY created_ns",
                     config=settings)
    assert len(ents) == 2 and ents["uri"].nunique() == 1 and ents["digest"].nunique() == 2
    assert list(query.runs_using(data, config=settings)["run_id"]) == [second.run_id]
    assert list(query.runs_using(old["digest"][0], config=settings)["run_id"]) == \
        [first.run_id]


def test_a_file_too_big_to_hash_is_keyed_by_path_size_and_mtime(stores, tmp_path):
    settings = load_config(environ={}, overrides={**stores, "client.hash_max_bytes": 4})
    big = tmp_path / "shard.bin"
    big.write_bytes(b"0123456789")
    a = _run(settings, "a", lambda run: run.use(big))
    b = _run(settings, "b", lambda run: run.use(big))
    assert set(query.runs_using(big, config=settings)["run_id"]) == {a.run_id, b.run_id}
    os.utime(big, ns=(1, 1))  # rewritten in place (same size): a new entity
    c = _run(settings, "c", lambda run: run.use(big))
    assert list(query.runs_using(big, config=settings)["run_id"]) == [c.run_id]
    ents = query.sql("SELECT digest FROM entities", config=settings)
    assert len(ents) == 2 and ents["digest"].isna().all()
    remote = _run(settings, "s3", lambda run: run.use("s3://bucket/shard-0000.tar"))
    again = _run(settings, "s3-again", lambda run: run.use("s3://bucket/shard-0000.tar"))
    assert set(query.runs_using("s3://bucket/shard-0000.tar", config=settings)["run_id"]) \
        == {remote.run_id, again.run_id}


def test_consumer_task_is_informed_by_the_producer_task_in_this_and_another_run(
        settings, tmp_path):
    shards = tmp_path / "shards.txt"
    tasks: dict[str, str] = {}

    def produce_then_consume(run):
        with run.task("prepare", kind="data") as prep:
            shards.write_text("a\nb\n")
            run.produce(shards, kind="dataset")
        with run.task("train") as train:
            run.use(shards, kind="dataset")
        tasks.update(prepare=prep.task_id, train=train.task_id)

    def evaluate(run):
        with run.task("eval", kind="eval") as ev:
            run.use(shards, kind="file")
        tasks["eval"] = ev.task_id

    producer = _run(settings, "producer", produce_then_consume)
    consumer = _run(settings, "consumer", evaluate)
    informed = query.sql("SELECT subject_id, object_id, run_id FROM relations "
                         "WHERE relation = 'informed' ORDER BY time_ns", config=settings)
    assert [tuple(r) for r in informed.itertuples(index=False)] == [
        (tasks["train"], tasks["prepare"], producer.run_id),
        (tasks["eval"], tasks["prepare"], consumer.run_id)]
    prep_id = tasks["prepare"]
    rels = query.relations(consumer.run_id, config=settings)
    assert list(rels[rels["relation"] == "informed"]["object_id"]) == [prep_id]
