"""One run row from the partial records of every rank and launcher of a job, whatever the
order they arrive in (SQLite and a real PostgreSQL), and the v2 -> v3 upgrade."""

from __future__ import annotations

import itertools

import pytest
import sqlalchemy as sa
from provscope.exporters.lineage.engine import create_lineage_engine
from provscope.exporters.lineage.schema import migrate
from provscope.exporters.lineage.store import SqlLineageStore

from provscope.ids import new_id
from provscope.records import RunRecord

T0 = 1_700_000_000_000_000_000


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lineage.db'}"
    return request.getfixturevalue("postgres_url")


def _job(run_id: str) -> list[RunRecord]:
    """What `provscope run -- torchrun` on two nodes, and its two ranks, report."""
    return [
        RunRecord(run_id, name="torchrun", host="node-a", start_ns=T0, status="running",
                  command="torchrun train.py", user="u", origin="launcher"),
        RunRecord(run_id, name="torchrun", host="node-b", start_ns=T0 + 5, status="running",
                  command="torchrun train.py", user="u", origin="launcher"),
        RunRecord(run_id, name="finetune", host="node-a", start_ns=T0 + 100, status="running",
                  config={"lr": 0.1}, code={"commit": "abc", "dirty": False},
                  environment={"python": "3.11"}, command="train.py", origin="job"),
        RunRecord(run_id, name="finetune", host="node-b", start_ns=T0 + 90, status="running",
                  config={"lr": 0.1, "rank": 1}, environment={"python": "3.11"},
                  command="train.py --rank 1", origin="worker"),
        RunRecord(run_id, end_ns=T0 + 1000, status="finished", origin="job"),
        RunRecord(run_id, end_ns=T0 + 1200, status="finished", origin="launcher"),
        RunRecord(run_id, end_ns=T0 + 1100, status="failed", origin="launcher"),
    ]


EXPECTED = {
    "name": "finetune", "host": "node-a", "config": {"lr": 0.1}, "command": "train.py",
    "code_commit": "abc", "user_name": "u", "start_ns": T0, "end_ns": T0 + 1200,
    "status": "failed", "origin": "job",
}


def _row(store: SqlLineageStore, run_id: str) -> dict:
    with store.engine.connect() as conn:
        [row] = conn.execute(sa.text("SELECT * FROM runs WHERE run_id = :r"),
                             {"r": run_id}).mappings().all()
    out = {k: row[k] for k in EXPECTED}
    if isinstance(out["config"], str):  # SQLite returns JSON text through sa.text
        import json

        out["config"] = json.loads(out["config"])
    return out


def test_the_jobs_values_win_whatever_the_arrival_order_one_record_per_batch(url):
    store = SqlLineageStore(url)
    orders = list(itertools.permutations(range(7)))[::97]  # a spread of the 5040 orders
    for order in orders:
        run_id = new_id()
        records = _job(run_id)
        for i in order:
            store.write([records[i]])
        assert _row(store, run_id) == EXPECTED, order
    store.close()


def test_the_in_memory_merge_of_one_batch_gives_the_same_row(url):
    store = SqlLineageStore(url)
    for order in list(itertools.permutations(range(7)))[::311]:
        run_id = new_id()
        records = _job(run_id)
        store.write([records[i] for i in order])
        assert _row(store, run_id) == EXPECTED, order
    store.close()


def test_running_never_replaces_an_end_and_equal_claims_take_the_newer(url):
    store = SqlLineageStore(url)
    run_id = new_id()
    store.write([RunRecord(run_id, end_ns=T0 + 9, status="interrupted")])
    store.write([RunRecord(run_id, name="a", start_ns=T0, status="running")])
    store.write([RunRecord(run_id, name="b")])  # no origin on either: the newer wins
    store.write([RunRecord(run_id, status="finished")])  # less severe than interrupted
    with store.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT name, status, start_ns, end_ns FROM runs")).one()
    assert tuple(row) == ("b", "interrupted", T0, T0 + 9)
    store.close()


def test_a_version2_database_gets_runs_origin_and_keeps_its_rows(url):
    engine = create_lineage_engine(url)
    assert migrate(engine, target=2) == 2
    run_id = new_id()
    with engine.begin() as conn:
        assert "origin" not in {c["name"] for c in sa.inspect(conn).get_columns("runs")}
        conn.execute(sa.text("INSERT INTO runs (run_id, name, status) "
                             "VALUES (:r, 'python', 'running')"), {"r": run_id})
    engine.dispose()
    store = SqlLineageStore(url)
    store.write([RunRecord(run_id, name="finetune", config={"lr": 1}, origin="job")])
    with store.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT name, status, origin FROM runs")).one()
    assert tuple(row) == ("finetune", "running", "job")
    store.close()
