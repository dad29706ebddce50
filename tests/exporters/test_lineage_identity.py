"""Entity identity in the store, against real SQLite files and a real PostgreSQL: records
of one entity by many runs merge (the earliest wins), and ``informed`` relations are
written from ``used`` + ``generated`` whichever arrives first."""

from __future__ import annotations

import json
import uuid

import pytest
import sqlalchemy as sa
from provscope.exporters.lineage.store import SqlLineageStore

from provscope.ids import content_id, entity_key, new_id
from provscope.records import EntityRecord, RelationRecord

T0 = 1_700_000_000_000_000_000
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'lineage.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    s = SqlLineageStore(url)
    yield s
    s.close()


def rows(store: SqlLineageStore, statement: str, **params) -> list[dict]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(statement), params).mappings()]


def test_entity_ids_are_uuid5_of_the_content_key():
    key = entity_key(digest=DIGEST, uri="file:///a/x.csv", size_bytes=3, mtime_ns=5)
    assert key == f"digest:{DIGEST}"  # the digest wins over where the bytes lay
    assert content_id(key) == content_id(f"digest:{DIGEST}")
    assert uuid.UUID(content_id(key)).version == 5
    big = entity_key(uri="file:///a/big.bin", size_bytes=10, mtime_ns=7)
    assert big != entity_key(uri="file:///a/big.bin", size_bytes=10, mtime_ns=8)
    assert entity_key(uri="s3://bucket/shard-0") == "uri:s3://bucket/shard-0"
    assert entity_key(uri="file:///missing") == "uri:file:///missing"
    assert entity_key() is None


@pytest.mark.parametrize("batches", ["later_first", "earlier_first", "one_batch"])
def test_one_entity_recorded_by_three_runs_keeps_the_earliest_record(store, batches):
    eid = content_id(f"digest:{DIGEST}")
    runs = [new_id() for _ in range(3)]
    records = [EntityRecord(eid, "dataset", uri=f"file:///n{i}/train.csv", run_id=run,
                            name=f"train-{i}.csv", digest=DIGEST, size_bytes=100,
                            attributes={"seen_by": i} if i else None, created_ns=T0 + i)
               for i, run in enumerate(runs)]
    uses = [RelationRecord("used", new_id(), eid, run_id=run, role="dataset", time_ns=T0 + i)
            for i, run in enumerate(runs)]
    if batches == "one_batch":
        store.write([*reversed(records), *uses])
    else:
        order = list(reversed(records)) if batches == "later_first" else records
        for record, use in zip(order, uses, strict=True):
            store.write([record, use])
    (entity,) = rows(store, "SELECT * FROM entities")
    assert entity["entity_id"] == eid
    assert (entity["name"], entity["uri"], entity["run_id"], entity["created_ns"]) == \
        ("train-0.csv", "file:///n0/train.csv", runs[0], T0)
    # The earliest record had no attributes: the next earliest fills them; the latest
    # never overwrites them.
    attrs = entity["attributes"]
    assert (attrs if isinstance(attrs, dict) else json.loads(attrs)) == {"seen_by": 1}
    used = rows(store, "SELECT run_id FROM relations WHERE relation = 'used' "
                       "AND object_id = :e ORDER BY time_ns", e=eid)
    assert [u["run_id"] for u in used] == runs


@pytest.mark.parametrize("order", ["generated_first", "used_first", "same_batch"])
def test_informed_is_written_when_the_second_side_arrives(store, order):
    eid, producer, consumer = content_id("digest:sha256:" + "cd" * 32), new_id(), new_id()
    run_a, run_b = new_id(), new_id()
    made = [EntityRecord(eid, "dataset", run_id=run_a, created_ns=T0),
            RelationRecord("generated", producer, eid, run_id=run_a, role="dataset",
                           time_ns=T0)]
    used = [EntityRecord(eid, "file", run_id=run_b, created_ns=T0 + 5),
            RelationRecord("used", consumer, eid, run_id=run_b, role="file", time_ns=T0 + 5)]
    if order == "same_batch":
        store.write(made + used)
    else:
        first, second = (made, used) if order == "generated_first" else (used, made)
        store.write(first)
        assert rows(store, "SELECT * FROM relations WHERE relation = 'informed'") == []
        store.write(second)
    store.write(made + used)  # delivered again: nothing more
    informed = rows(store, "SELECT * FROM relations WHERE relation = 'informed'")
    assert [(r["subject_id"], r["object_id"], r["run_id"], r["role"], r["time_ns"])
            for r in informed] == [(consumer, producer, run_b, "", T0 + 5)]


def test_no_informed_from_a_later_generator_or_from_itself(store):
    eid, task, later = content_id("digest:sha256:" + "ef" * 32), new_id(), new_id()
    run = new_id()
    store.write([
        EntityRecord(eid, "file", run_id=run, created_ns=T0),
        RelationRecord("used", task, eid, run_id=run, time_ns=T0 + 10),
        RelationRecord("generated", task, eid, run_id=run, time_ns=T0 + 5),  # itself
        # A task that wrote the same bytes after the use did not inform it.
        RelationRecord("generated", later, eid, run_id=new_id(), time_ns=T0 + 20),
    ])
    assert rows(store, "SELECT * FROM relations WHERE relation = 'informed'") == []


def test_two_entities_from_one_producer_give_one_informed_row(store):
    producer, consumer, run = new_id(), new_id(), new_id()
    ids = [content_id(f"digest:sha256:{i:064x}") for i in range(2)]
    batch = []
    for i, eid in enumerate(ids):
        batch += [EntityRecord(eid, "file", run_id=run, created_ns=T0),
                  RelationRecord("generated", producer, eid, run_id=run, time_ns=T0 + i),
                  RelationRecord("used", consumer, eid, run_id=run, time_ns=T0 + 10 + i)]
    store.write(batch)
    informed = rows(store, "SELECT * FROM relations WHERE relation = 'informed'")
    assert [(r["subject_id"], r["object_id"], r["time_ns"]) for r in informed] == \
        [(consumer, producer, T0 + 10)]
