"""Ids, records and the catalogue."""

from __future__ import annotations

import pickle
import re
import threading
import time
import uuid

import pytest

from provscope.catalogue import lookup, specs
from provscope.ids import id_time_ns, new_id
from provscope.records import (
    EntityRecord,
    Point,
    RelationRecord,
    RunRecord,
    TaskRecord,
    record_from_dict,
)


def test_ids_are_uuid7_time_ordered_and_unique_across_threads():
    ids: list[str] = []
    lock = threading.Lock()

    def make():
        local = [new_id() for _ in range(5000)]
        with lock:
            ids.extend(local)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == len(ids) == 20000
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    sequential = [new_id() for _ in range(1000)]
    assert sequential == sorted(sequential)
    assert abs(id_time_ns(sequential[0]) - time.time_ns()) < 5e9


@pytest.mark.parametrize(
    "record",
    [
        Point("gpu", {"host": "n1", "gpu": "0"}, {"util_percent": 93.5, "ok": True}, 123),
        RunRecord("r1", name="x", config={"lr": 0.1}, start_ns=5),
        TaskRecord("t1", "r1", name="step", task_kind="step", rank=1,
                   resources={"cpu_seconds": 1.5}),
        EntityRecord("e1", "dataset", uri="file:///d", digest="sha256:ab", size_bytes=10),
        RelationRecord("used", "t1", "e1", run_id="r1", role="input"),
    ],
)
def test_records_round_trip_through_dict_and_pickle(record):
    assert record_from_dict(record.to_dict()) == record
    assert pickle.loads(pickle.dumps(record)) == record


def test_partial_records_leave_unknown_fields_out_of_the_dict():
    assert TaskRecord("t1", "r1", status="finished").to_dict() == {
        "type": "task", "task_id": "t1", "run_id": "r1", "status": "finished"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"type": "nope"}, "record type 'nope' is not one of"),
        ({"type": "task", "task_id": "t", "run_id": "r", "colour": 1}, "task record:"),
        ({"type": "point", "tags": {}}, "point record: missing key 'measurement'"),
    ],
)
def test_bad_record_dicts_raise_one_line_value_errors(data, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        record_from_dict(data)


def test_catalogue_names_follow_the_conventions():
    for spec in specs():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", spec.measurement), spec
        assert re.fullmatch(r"[a-z][a-z0-9_]*", spec.field), spec
        if spec.kind == "counter":
            assert spec.field.endswith("_total"), spec
        assert spec.help and spec.help.endswith("."), spec
        assert "step" not in spec.tags and "epoch" not in spec.tags, spec
    assert lookup("provscope", "points_dropped_total").kind == "counter"
    assert lookup("nope", "nothing") is None
