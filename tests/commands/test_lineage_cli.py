"""`provscope runs` and `provscope show RUN_ID` on a real lineage file (and PostgreSQL)."""

from __future__ import annotations

import json

import pytest
from provscope.exporters.lineage.store import SqlLineageStore

from provscope.cli import main
from provscope.commands.lineage import format_bytes, format_duration
from provscope.ids import new_id
from provscope.records import EntityRecord, RelationRecord, RunRecord, TaskRecord

T0 = 1_700_000_000_000_000_000
SEC = 1_000_000_000


def _record_run(url: str, *, steps: int = 3, name: str = "finetune") -> str:
    store = SqlLineageStore(url)
    run_id, train, evaluate, data, ckpt, cfg = (new_id() for _ in range(6))
    records = [
        RunRecord(run_id, name=name, status="finished", host="node7", user="ada",
                  start_ns=T0, end_ns=T0 + 125 * SEC, command="python train.py --lr 0.1",
                  code={"commit": "abc1234", "dirty": True}, config={"lr": 0.1}),
        TaskRecord(train, run_id, name="train", task_kind="task", start_ns=T0,
                   end_ns=T0 + 100 * SEC, status="finished", rank=0,
                   resources={"cpu_seconds": 90.5, "peak_rss_bytes": 3 << 30,
                              "gpu_seconds": 99.0, "gpu_energy_joules": 25000.0}),
        TaskRecord(evaluate, run_id, name="eval", task_kind="eval", start_ns=T0 + 100 * SEC,
                   end_ns=T0 + 110 * SEC, status="failed", error="Traceback...\nValueError: nan",
                   resources={"cpu_seconds": 5.0}),
        EntityRecord(data, "dataset", uri="file:///data/shakespeare.txt",
                     digest="sha256:" + "a" * 64, size_bytes=1_100_000),
        EntityRecord(ckpt, "checkpoint", uri="file:///ckpt/final.pt", run_id=run_id,
                     size_bytes=2048),
        RelationRecord("used", train, data, run_id=run_id, role="train_data"),
        RelationRecord("generated", train, ckpt, run_id=run_id),
        EntityRecord(cfg, "config", uri="file:///cfg.yaml"),
        RelationRecord("used", run_id, cfg, run_id=run_id, role="config"),  # by the run
    ]
    for i in range(steps):
        records.append(TaskRecord(new_id(), run_id, parent_task_id=train, name=f"step {i}",
                                  task_kind="step", start_ns=T0 + i * SEC,
                                  end_ns=T0 + i * SEC + SEC // 20, status="finished"))
    store.write(records)
    store.close()
    return run_id


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "provscope.db"
    return path, ["--set", f"embedded.path={path}"]


def test_runs_lists_recent_runs_with_duration_and_task_count(db, capsys):
    path, flags = db
    run_id = _record_run(f"sqlite:///{path}")
    assert main([*flags, "runs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["RUN", "ID", "NAME", "STATUS", "START", "(UTC)", "DURATION",
                              "HOST", "TASKS"]
    row = out[1].split()
    assert row[:3] == [run_id, "finetune", "finished"]
    assert row[-2:] == ["node7", "5"]
    assert "2023-11-14 22:13:20" in out[1] and "2m 05s" in out[1]


def test_runs_limit_and_json(db, capsys):
    path, flags = db
    older = _record_run(f"sqlite:///{path}", name="older")
    newer = _record_run(f"sqlite:///{path}", name="newer")
    store = SqlLineageStore(f"sqlite:///{path}")
    store.write([RunRecord(newer, start_ns=T0 + SEC)])  # make "newer" the most recent
    store.close()
    assert main([*flags, "runs", "--json", "--limit", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in data] == [newer]
    assert data[0]["task_count"] == 5 and data[0]["config"] == {"lr": 0.1}
    assert main([*flags, "runs", "--json"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == [newer, older]


def test_runs_on_an_empty_store_says_so(db, capsys):
    _, flags = db
    assert main([*flags, "runs"]) == 0
    assert "no runs recorded" in capsys.readouterr().out


def test_show_prints_task_tree_entities_and_resources(db, capsys):
    path, flags = db
    run_id = _record_run(f"sqlite:///{path}")
    assert main([*flags, "show", run_id[:30]]) == 0
    out = capsys.readouterr().out
    assert f"run       {run_id}  finetune" in out
    assert "code      abc1234 (dirty)" in out and "command   python train.py" in out
    lines = out.splitlines()
    train = next(line for line in lines if line.startswith("train "))
    assert "finished" in train and "1m 40s" in train and "3.0 GiB" in train
    step = next(line for line in lines if line.startswith("  step 0"))  # indented child
    assert "50 ms" in step
    assert any(line.startswith("eval ") and "failed*" in line for line in lines)
    assert "* eval: ValueError: nan" in out
    assert "used (2)" in out and "file:///data/shakespeare.txt" in out and "1.0 MiB" in out
    cfg = next(line for line in lines if "file:///cfg.yaml" in line)
    assert cfg.split()[-2:] == ["(run)", "config"]
    assert "generated (1)" in out and "file:///ckpt/final.pt" in out
    assert "train_data" in out
    # Top-level tasks only: the steps are inside "train" and are not counted twice.
    assert "resources (top-level tasks): cpu 95.5 s, peak RSS 3.0 GiB, GPU 99.0 s, " \
           "energy 25000 J" in out


def test_show_summarises_many_children_unless_all(db, capsys):
    path, flags = db
    run_id = _record_run(f"sqlite:///{path}", steps=30)
    assert main([*flags, "show", run_id, "--max-children", "5"]) == 0
    out = capsys.readouterr().out
    assert "  ... 25 more: 25 step (25 finished; mean 50 ms)" in out
    assert "step 5" not in out
    assert main([*flags, "show", run_id, "--all"]) == 0
    assert "step 29" in capsys.readouterr().out


def test_show_json_has_run_tasks_entities_relations(db, capsys):
    path, flags = db
    run_id = _record_run(f"sqlite:///{path}")
    assert main([*flags, "show", run_id, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["run"]["run_id"] == run_id
    assert len(data["tasks"]) == 5 and len(data["entities"]) == 3
    assert {r["relation"] for r in data["relations"]} == {"used", "generated"}


def test_show_unknown_or_ambiguous_id_is_one_line_and_exit_1(db, capsys):
    path, flags = db
    _record_run(f"sqlite:///{path}")
    _record_run(f"sqlite:///{path}")
    assert main([*flags, "show", "nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("provscope: no run id starts with 'nope'") and "\n" not in err
    assert main([*flags, "show", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert "ambiguous" in err and "\n" not in err


def test_show_reads_postgresql_through_lineage_url(postgres_url, capsys):
    run_id = _record_run(postgres_url)
    assert main(["show", run_id[:25], "--lineage-url", postgres_url]) == 0
    assert f"run       {run_id}" in capsys.readouterr().out
    assert main(["runs", "--lineage-url", postgres_url]) == 0
    assert run_id in capsys.readouterr().out


def test_duration_and_size_formats():
    assert [format_duration(x) for x in (None, 0.045, 12.34, 125, 3725)] == [
        "-", "45 ms", "12.3 s", "2m 05s", "1h 02m"]
    assert [format_bytes(x) for x in (None, 512, 1536, 3 << 30)] == [
        "-", "512 B", "1.5 KiB", "3.0 GiB"]
