"""provscope.compare and `provscope diff / reproduce / cost` on runs recorded through the
real in-job API into a real embedded store, and on a real PostgreSQL lineage store."""

from __future__ import annotations

import json
import subprocess

import pytest
from provscope.exporters.lineage.store import SqlLineageStore

from provscope import compare
from provscope.cli import main
from provscope.config import load_config
from provscope.errors import ProvscopeError
from provscope.ids import new_id
from provscope.records import RunRecord, TaskRecord

from .conftest import record_run

T0 = 1_700_000_000_000_000_000
SEC = 1_000_000_000


def _cell(df, section, key):
    row = df[(df.section == section) & (df.key == key)]
    assert len(row) == 1, (section, key, df)
    return row.iloc[0]


def test_diff_names_config_data_and_metric_differences(store, tmp_path):
    settings, data = store
    a = record_run(settings, data, tmp_path / "a", lr=0.1)
    data.write_text("other bytes\n")
    b = record_run(settings, data, tmp_path / "b", lr=0.2)
    df = compare.diff(a[:13], b, config=settings)
    assert df.attrs["run_a"] == a and df.attrs["run_b"] == b and df.attrs["partial"] is False
    lr = _cell(df, "config", "lr")
    assert (lr.a, lr.b, lr.same) == (0.1, 0.2, False)
    assert _cell(df, "config", "model.layers").same  # nested keys flattened
    digest = _cell(df, "data", data.resolve().as_uri())
    assert digest.a.startswith("sha256:") and digest.b.startswith("sha256:")
    assert digest.a != digest.b and not digest.same
    loss = _cell(df, "metrics", "loss")
    assert loss.a == pytest.approx(2.0 / (1 + 19 * 0.1))
    assert loss.b == pytest.approx(2.0 / (1 + 19 * 0.2))
    assert _cell(df, "metrics", "eval_loss").b == pytest.approx(2.0 / 5)
    py = _cell(df, "environment", "python")
    assert py.same and py.a.count(".") == 2
    assert _cell(df, "environment", "hosts").same

    only = compare.diff(a, b, only_differences=True, config=settings)
    assert not only["same"].any()
    assert {"config", "data", "metrics"} <= set(only["section"])


def test_diff_cli_text_and_json(store, tmp_path, capsys):
    settings, data = store
    flags = ["--set", f"embedded.path={settings.embedded.path}"]
    a = record_run(settings, data, tmp_path / "a", lr=0.1)
    b = record_run(settings, data, tmp_path / "b", lr=0.3)
    assert main([*flags, "diff", a, b]) == 0
    out = capsys.readouterr().out
    assert f"A  {a}" in out and "\nconfig\n" in out and "0.3" in out
    assert "\ndata\n" not in out  # the same bytes: one entity, no difference
    assert main([*flags, "diff", a, b, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["attrs"]["run_a"] == a
    assert {"section": "config", "key": "lr", "a": 0.1, "b": 0.3, "same": False} in doc["rows"]


def test_bad_run_ids_are_one_line_each(store, tmp_path, capsys):
    settings, data = store
    flags = ["--set", f"embedded.path={settings.embedded.path}"]
    a = record_run(settings, data, tmp_path / "a")
    record_run(settings, data, tmp_path / "b")
    assert main([*flags, "diff", a, "ffffffff"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"provscope: no run id starts with 'ffffffff' in "
                   f"sqlite:///{settings.embedded.path}; `provscope runs` lists them")
    assert main([*flags, "reproduce", a[:2]]) == 1  # both ids share their first digits
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is ambiguous" in err[0] and "give more characters" in err[0]
    assert main([*flags, "cost", "nope"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_running_run_is_refused_unless_partial(store, tmp_path, capsys):
    settings, data = store
    done = record_run(settings, data, tmp_path / "a")
    live = new_id()
    store_ = SqlLineageStore(settings.lineage_url)
    import time

    now = time.time_ns()
    store_.write([RunRecord(live, name="live", status="running", start_ns=now - 10 * SEC,
                            heartbeat_ns=now, config={"lr": 0.5})])
    store_.close()
    flags = ["--set", f"embedded.path={settings.embedded.path}"]
    assert main([*flags, "diff", done, live]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"run {live} is still running" in err[0] and "--partial" in err[0]
    with pytest.raises(ProvscopeError, match="still running"):
        compare.reproduce(live, config=settings)
    df = compare.diff(done, live, partial=True, config=settings)
    assert df.attrs["partial"] is True and df.attrs["running"] == [live]
    assert main([*flags, "diff", done, live, "--partial"]) == 0
    assert f"partial: still running: {live}" in capsys.readouterr().err


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_reproduce_reports_command_commit_and_what_is_missing(store, tmp_path, capsys):
    settings, data = store
    run_id = record_run(settings, data, tmp_path / "a")
    rep = compare.reproduce(run_id, config=settings)
    assert "pytest" in rep.command  # the command line of the process that recorded it
    assert rep.config == {"lr": 0.1, "model": {"layers": 2}}
    assert [c.status for c in rep.data] == ["same"]
    assert rep.data[0].current_digest == rep.data[0].digest
    assert rep.environment["python"]

    data.write_text("changed\n")
    rep = compare.reproduce(run_id, config=settings)
    assert [c.status for c in rep.data] == ["changed"]
    assert any(line.startswith(f"{data.resolve().as_uri()} changed since the run")
               for line in rep.missing)
    assert not rep.ready
    data.unlink()
    rep = compare.reproduce(run_id, config=settings)
    assert [c.status for c in rep.data] == ["missing"]
    assert any("is gone" in line for line in rep.missing)
    unchecked = compare.reproduce(run_id, check_files=False, config=settings)
    assert [c.status for c in unchecked.data] == ["unchecked"]

    flags = ["--set", f"embedded.path={settings.embedded.path}"]
    assert main([*flags, "reproduce", run_id]) == 3
    out = capsys.readouterr().out
    assert "missing to rerun it exactly:" in out and "is gone" in out
    assert main([*flags, "reproduce", run_id, "--json"]) == 3
    doc = json.loads(capsys.readouterr().out)
    assert doc["ready"] is False and doc["data"][0]["status"] == "missing"


def test_reproduce_from_a_git_checkout_dirty_and_clean(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.org")
    _git(repo, "config", "user.name", "t")
    (repo / "train.py").write_text("print(1)\n")
    _git(repo, "add", "train.py")
    _git(repo, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    settings = load_config(overrides={"embedded.path": str(tmp_path / "p.db")}, environ={})
    store_ = SqlLineageStore(settings.lineage_url)
    clean, dirty = new_id(), new_id()
    store_.write([
        RunRecord(clean, name="t", status="finished", start_ns=T0, end_ns=T0 + SEC,
                  command="python train.py", code={"commit": head, "dirty": False,
                                                   "repo": str(repo)}),
        RunRecord(dirty, name="t", status="finished", start_ns=T0, end_ns=T0 + SEC,
                  command="python train.py", code={"commit": "0" * 40, "dirty": True,
                                                   "repo": str(repo)}),
    ])
    store_.close()
    rep = compare.reproduce(clean, config=settings)
    assert rep.ready and rep.missing == [] and rep.code["commit"] == head
    rep = compare.reproduce(dirty, config=settings)
    assert rep.missing == [
        "the working tree had uncommitted changes at commit 000000000000; they were not "
        "recorded",
        f"commit 000000000000 is not in {repo} any more",
    ]


def _cost_run(store_, name, *, loss, gpu_s, energy, read, wall_s):
    from provscope.records import Point

    run_id, task = new_id(), new_id()
    store_.write([
        RunRecord(run_id, name=name, status="finished", start_ns=T0,
                  end_ns=T0 + int(wall_s * SEC)),
        TaskRecord(task, run_id, name="fit", task_kind="task", start_ns=T0,
                   end_ns=T0 + int(wall_s * SEC), status="finished",
                   resources={"gpu_seconds": gpu_s, "gpu_energy_joules": energy,
                              "read_bytes": read, "cpu_seconds": 1.0}),
        # a nested task's figures are inside its parent's: never counted twice
        TaskRecord(new_id(), run_id, parent_task_id=task, name="inner", task_kind="step",
                   start_ns=T0, end_ns=T0 + SEC, status="finished",
                   resources={"gpu_seconds": gpu_s, "gpu_energy_joules": energy}),
    ])
    return run_id, [Point("train", {"run_id": run_id, "host": "n", "rank": "0"},
                          {"loss": v, "step": i}, T0 + i * SEC)
                    for i, v in enumerate(loss)]


def _cost_store(settings):
    from provscope.exporters.embedded import EmbeddedPointsExporter
    from provscope.exporters.pipeline import Pipeline

    store_ = SqlLineageStore(settings.lineage_url)
    runs, points = {}, []
    for name, loss, gpu_s, energy, read, wall in [
        ("cheap", [3.0, 2.0, 1.5], 3600.0, 360_000.0, 100, 60.0),
        ("better", [3.0, 1.0, 0.8], 7200.0, 720_000.0, 200, 120.0),
        ("dominated", [3.0, 1.2, 1.6], 7200.0, 900_000.0, 300, 130.0),
        ("best", [2.0, 0.4, 0.5], 36000.0, 3_600_000.0, 50, 600.0),
    ]:
        runs[name], pts = _cost_run(store_, name, loss=loss, gpu_s=gpu_s, energy=energy,
                                    read=read, wall_s=wall)
        points += pts
    store_.close()
    with Pipeline([EmbeddedPointsExporter.from_config(settings)]) as pipeline:
        pipeline.submit_many(points)
        assert pipeline.flush(10)
    return runs


def test_quality_cost_marks_the_pareto_front(tmp_path):
    settings = load_config(overrides={"embedded.path": str(tmp_path / "p.db")}, environ={})
    runs = _cost_store(settings)
    df = compare.quality_cost(config=settings)
    by = df.set_index("name")
    assert list(df["name"]) == ["best", "better", "cheap", "dominated"]  # best loss first
    assert by.loc["cheap", "value"] == 1.5 and by.loc["best", "value"] == 0.5
    assert by.loc["better", "gpu_hours"] == 2.0  # the nested task is not added again
    assert by.loc["best", "energy_kwh"] == pytest.approx(1.0)
    assert by.loc["best", "energy_j"] == 3_600_000.0
    assert by.loc["cheap", "wall_s"] == 60.0 and by.loc["cheap", "read_bytes"] == 100
    assert by["pareto"].to_dict() == {"best": True, "better": True, "cheap": True,
                                      "dominated": False}
    best = compare.quality_cost(list(runs.values()), which="best", config=settings)
    by = best.set_index("name")
    assert by.loc["best", "value"] == 0.4 and by.loc["best", "step"] == 1.0
    assert by.loc["dominated", "value"] == 1.2
    # the front on GPU-hours alone: "dominated" costs as much as "better" for a worse loss
    front = compare.quality_cost(list(runs.values()), pareto_on=["gpu_hours"],
                                 config=settings).set_index("name")["pareto"].to_dict()
    assert front == {"best": True, "better": True, "cheap": True, "dominated": False}
    higher = compare.quality_cost(list(runs.values()), mode="max", config=settings)
    assert higher["name"].iloc[0] == "dominated"


def test_pareto_front_rules():
    import pandas as pd

    df = pd.DataFrame({"value": [1.0, 1.0, 2.0, None, 0.5],
                       "gpu_hours": [1.0, 2.0, 0.5, 0.1, None]})
    assert compare.pareto_front(df, "value", ["gpu_hours"]).tolist() == \
        [True, False, True, False, True]  # equal loss, more cost: dominated; NA: unknown


def test_cost_cli(tmp_path, capsys):
    settings = load_config(overrides={"embedded.path": str(tmp_path / "p.db")}, environ={})
    runs = _cost_store(settings)
    flags = ["--set", f"embedded.path={settings.embedded.path}"]
    assert main([*flags, "cost"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["RUN", "ID", "NAME", "FINAL"]
    marked = {line.split()[1] for line in lines[1:5] if line.startswith("*")}
    assert marked == {runs["best"], runs["better"], runs["cheap"]}
    assert main([*flags, "cost", "--best", "--json", runs["best"], runs["cheap"]]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["value"] for r in doc["rows"]] == [0.4, 1.5]
    assert doc["attrs"]["which"] == "best"


def test_diff_reads_postgresql_lineage(postgres_url, tmp_path):
    settings = load_config(overrides={"lineage.url": postgres_url,
                                      "embedded.path": str(tmp_path / "p.db")}, environ={})
    store_ = SqlLineageStore(postgres_url)
    a, b = new_id(), new_id()
    store_.write([RunRecord(a, name="x", status="finished", start_ns=T0, end_ns=T0 + SEC,
                            config={"lr": 0.1}, environment={"python": "3.11.7"}),
                  RunRecord(b, name="x", status="finished", start_ns=T0, end_ns=T0 + SEC,
                            config={"lr": 0.2}, environment={"python": "3.12.1"})])
    store_.close()
    df = compare.diff(a, b, only_differences=True, config=settings)
    assert sorted(zip(df.section, df.key, strict=True)) == [("config", "lr"),
                                                            ("environment", "python")]
