"""`provscope export`: a run as W3C PROV (PROV-JSON, PROV-N, PROV-O), read back with the
same ``prov`` library for each format, relations checked one by one."""

from __future__ import annotations

import io

import pytest
from prov.model import (
    PROV_TYPE,
    ProvActivity,
    ProvAgent,
    ProvAssociation,
    ProvCommunication,
    ProvDelegation,
    ProvDerivation,
    ProvDocument,
    ProvEntity,
    ProvGeneration,
    ProvStart,
    ProvUsage,
)

import provscope
from provscope import provexport
from provscope.cli import main


def _pipeline_run(settings, tmp_path):
    """prep reads raw data and writes clean data; fit reads the clean data (the store
    links fit -> prep with `informed`) and writes two checkpoints, the second derived
    from the first and from the clean data."""
    raw = tmp_path / "raw.txt"
    raw.write_text("raw text\n" * 50)
    clean = tmp_path / "clean.txt"
    with provscope.workflow("pipeline", config={"lr": 0.01}, settings=settings) as run:
        with run.task("prep", kind="data") as prep:
            prep.use(raw, kind="dataset", role="raw")
            clean.write_text("clean text\n" * 40)
            clean_id = prep.produce(clean, kind="dataset")
        with run.task("fit", kind="task") as fit:
            fit.use(clean, kind="dataset", role="train")
            with run.task("epoch 0", kind="epoch"):
                pass
            one = tmp_path / "ckpt-1.pt"
            one.write_bytes(b"one")
            first = fit.produce(one, kind="checkpoint", step=1)
            two = tmp_path / "ckpt-2.pt"
            two.write_bytes(b"two")
            second = fit.produce(two, kind="checkpoint", step=2,
                                 derived_from=[first, clean_id])
    assert run.flush(20)
    return run, {"raw": raw, "clean": clean_id, "first": first, "second": second}


def _records(doc, cls):
    return [r for r in doc.get_records() if isinstance(r, cls)]


def _ids(records):
    return {str(r.identifier) for r in records}


def _rel(record) -> tuple[str, ...]:
    return tuple(str(v) for _, v in record.formal_attributes if v is not None
                 and not hasattr(v, "isoformat"))


@pytest.mark.parametrize("fmt", ["prov-json", "prov-n", "prov-o"])
def test_export_reads_back_with_every_relation(store, tmp_path, fmt, capsys):
    settings, _ = store
    run, ids = _pipeline_run(settings, tmp_path)
    out = tmp_path / f"run.{fmt}"
    flags = ["--set", f"embedded.path={settings.embedded.path}"]
    assert main([*flags, "export", run.run_id[:12], "--format", fmt, "-o", str(out)]) == 0
    assert f"wrote {fmt} of run {run.run_id}" in capsys.readouterr().err
    name, kwargs = provexport.FORMATS[fmt]
    doc = ProvDocument.deserialize(source=io.StringIO(out.read_text()), format=name,
                                   **kwargs)
    from provscope import query

    frame = query.tasks(run.run_id, config=settings)
    tasks = dict(zip(frame["name"], frame["task_id"], strict=True))
    run_q = f"run:{run.run_id}"
    task_q = {n: f"task:{tid}" for n, tid in tasks.items()}
    ent = {k: f"entity:{v}" for k, v in ids.items() if k != "raw"}

    activities = _ids(_records(doc, ProvActivity))
    assert activities == {run_q, *task_q.values()}
    entities = _ids(_records(doc, ProvEntity))
    assert {ent["clean"], ent["first"], ent["second"]} <= entities and len(entities) == 4
    kinds = {str(r.identifier): {str(v) for v in r.get_attribute(PROV_TYPE)}
             for r in _records(doc, ProvEntity)}
    assert kinds[ent["second"]] == {"provscope:checkpoint"}
    agents = _records(doc, ProvAgent)
    agent_types = {str(v) for a in agents for v in a.get_attribute(PROV_TYPE)}
    assert {"prov:SoftwareAgent", "provscope:Host"} <= agent_types
    assert any(str(a.identifier).startswith("software:provscope-") for a in agents)

    used = {_rel(r)[:2] for r in _records(doc, ProvUsage)}
    assert (task_q["fit"], ent["clean"]) in used
    assert any(a == task_q["prep"] for a, _ in used)  # prep used raw.txt
    generated = {_rel(r)[:2] for r in _records(doc, ProvGeneration)}
    assert {(ent["clean"], task_q["prep"]), (ent["first"], task_q["fit"]),
            (ent["second"], task_q["fit"])} <= generated
    derived = {_rel(r)[:2] for r in _records(doc, ProvDerivation)}
    assert {(ent["second"], ent["first"]), (ent["second"], ent["clean"])} <= derived
    informed = {_rel(r)[:2] for r in _records(doc, ProvCommunication)}
    assert (task_q["fit"], task_q["prep"]) in informed
    started = {_rel(r)[:3] for r in _records(doc, ProvStart)}
    assert (task_q["epoch 0"], task_q["fit"]) in {(s[0], s[-1]) for s in started}
    assert (task_q["prep"], run_q) in {(s[0], s[-1]) for s in started}
    associated = {_rel(r)[:2] for r in _records(doc, ProvAssociation)}
    assert any(a == run_q and b.startswith("host:") for a, b in associated)
    assert any(a == run_q and b.startswith("software:provscope-") for a, b in associated)
    assert any(a == task_q["fit"] and b.startswith("host:") for a, b in associated)
    if doc.get_records(ProvDelegation):  # only when the user name is known
        assert any(b.startswith("user:") for _, b in
                   (_rel(r)[:2] for r in _records(doc, ProvDelegation)))


def test_export_to_stdout_and_bad_input(store, tmp_path, capsys):
    settings, _ = store
    run, _ = _pipeline_run(settings, tmp_path)
    flags = ["--set", f"embedded.path={settings.embedded.path}"]
    assert main([*flags, "export", "latest"]) == 0
    text = capsys.readouterr().out
    doc = ProvDocument.deserialize(content=text, format="json")
    assert f"run:{run.run_id}" in _ids(_records(doc, ProvActivity))
    assert main([*flags, "export", "ffff0000"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run id starts with 'ffff0000'" in err[0]
    with pytest.raises(SystemExit) as exc:
        main([*flags, "export", run.run_id, "--format", "dot"])
    assert exc.value.code == 2
    assert "invalid choice: 'dot'" in capsys.readouterr().err
    with pytest.raises(provscope.errors.ProvscopeError, match="format 'xml' is not allowed"):
        provexport.export(run.run_id, "xml", config=settings)
