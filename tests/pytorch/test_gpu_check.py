"""benchmarks/gpu_check.py on a machine without a GPU: one clear line and exit 0; its pure
helpers compute what the GPU run reports; a dry run of one check on the CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

import provscope
from provscope import query
from provscope.config import load_config
from provscope.records import Point

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while building
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check_under_test", None)
        sys.path.remove(str(SCRIPT.parent))


def _env(**more):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVSCOPE_")}
    env.update(more)
    return env


def _run(*args, cwd, env, timeout=120):
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _untouched(tmp_path):
    """Nothing written where the script was started, nor in HOME (the conftest's)."""
    assert list((tmp_path / "work").iterdir()) == []
    assert list((tmp_path / "home").rglob("*")) == []


def test_without_a_cuda_device_it_prints_one_line_and_exits_0(tmp_path):
    pytest.importorskip("torch")
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too.
    out = _run(cwd=tmp_path / "work", env=_env(CUDA_VISIBLE_DEVICES=""))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines == [{"check": "gpu", "ok": False, "reason": "no CUDA device"}]
    _untouched(tmp_path)


def test_an_unknown_check_name_is_one_line_naming_the_allowed_ones(tmp_path):
    out = _run("--only", "memory,bogus", cwd=tmp_path / "work", env=_env())
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "gpu_check: --only: unknown check(s) bogus; allowed: nvml_collector, memory, "
        "overhead, gradscaler, gpu_process, compile, energy_by_uuid"]


def test_parse_only_keeps_the_run_order(gc):
    assert gc.parse_only(None) == list(gc.CHECKS)
    assert gc.parse_only("compile, memory") == ["memory", "compile"]


def test_memory_limit_is_5_percent_of_parameter_bytes_plus_64_mib(gc):
    params = 334_000_000
    limit = int(0.05 * params) + 64 * 2**20
    met = gc.memory_verdict(1_000_000_000, 1_000_000_000 + limit, params)
    assert met == {"added_bytes": limit, "limit_bytes": limit, "ok": True}
    missed = gc.memory_verdict(1_000_000_000, 1_000_000_001 + limit, params)
    assert missed["ok"] is False and missed["added_bytes"] == limit + 1


def test_overhead_is_the_ratio_of_total_times_not_of_medians(gc):
    bare = [1.0, 1.0, 1.0, 1.0]
    inst = [1.0, 1.0, 1.0, 2.0]  # one slow block: the median says 1.0, the total 1.25
    s = gc.overhead_summary(bare, inst)
    assert s["ratio"] == pytest.approx(1.25)
    assert s["median_block_ratio"] == pytest.approx(1.0)
    assert s["bare_total_s"] == 4.0 and s["inst_total_s"] == 5.0
    lo, hi = s["block_ratio_p10_p90"]
    assert lo == pytest.approx(1.0) and hi > 1.5
    with pytest.raises(ValueError):
        gc.overhead_summary([1.0], [1.0, 2.0])


def test_dynamo_counts_read_without_adding_keys(gc):
    counters = defaultdict(Counter)
    counters["frames"].update({"total": 3, "ok": 2})
    counters["stats"]["unique_graphs"] = 2
    counters["graph_break"].update({"reason a": 2, "reason b": 1})
    assert gc.dynamo_counts(counters) == {"frames_total": 3, "frames_ok": 2,
                                          "unique_graphs": 2, "graph_breaks": 3,
                                          "recompiles": 0}
    assert set(counters) == {"frames", "stats", "graph_break"}


def test_field_types_and_catalogue_problems(gc):
    from provscope.agent.collectors.base import specs_for

    points = [Point("gpu", {"host": "h", "gpu": "0"}, {"up": 1, "power_watts": 80.5,
                                                       "throttled": 0}, 1),
              Point("gpu", {"host": "h", "gpu": "0"}, {"up": 1.0, "made_up_field": 2.0}, 2)]
    types = gc.field_types(points)
    assert types == {"gpu": {"made_up_field": "float", "power_watts": "float",
                             "throttled": "int", "up": "float|int"}}
    problems = gc.type_problems(types, specs_for("nvml"))
    assert problems["uncatalogued"] == ["gpu.made_up_field"]
    assert problems["wrong_type"] == ["gpu.up: float|int, catalogue int"]


def test_rows_by_step_reads_train_points_back_from_the_store(gc, tmp_path):
    db = tmp_path / "p.db"
    settings = {"embedded.path": str(db), "agent.socket_path": str(tmp_path / "none.sock")}
    with provscope.workflow("rows", settings=settings) as run:
        for step, _ in run.steps(range(3)):
            run.log(loss=float(step) / 2, optimizer_step_skipped=int(step == 1))
    assert run.flush(30.0)
    frame = query.points("train", run_id=run.run_id,
                         config=load_config(overrides={"embedded.path": str(db)}, environ={}))
    rows = gc.rows_by_step(frame)
    assert sorted(rows) == [0, 1, 2]
    assert [rows[s]["loss"] for s in range(3)] == [0.0, 0.5, 1.0]
    flags = {s: f.get("optimizer_step_skipped") for s, f in rows.items()}
    assert gc.skip_verdict(flags, [1], forced=1)["ok"] is True


def test_skip_verdict_wants_exactly_the_skipped_steps_flagged(gc):
    assert gc.skip_verdict({0: 0, 1: 1, 2: 0}, [1], forced=1)["ok"] is True
    extra = gc.skip_verdict({0: 1, 1: 1, 2: 0}, [1], forced=1)
    assert extra["ok"] is False and extra["flagged_steps"] == [0, 1]
    absent = gc.skip_verdict({0: None, 2: None}, [1], forced=1)
    assert absent["ok"] is False and absent["steps_without_point"] == [1]
    not_forced = gc.skip_verdict({0: 0, 1: 0}, [], forced=1)  # the overflow never happened
    assert not_forced["ok"] is False


def test_relative_error_and_json_lines(gc):
    assert gc.relative_error(105.0, 100.0) == pytest.approx(0.05)
    assert gc.relative_error(None, 100.0) is None and gc.relative_error(1.0, 0.0) is None
    line = gc.jsonable({"a": math.nan, "b": (1, math.inf), "c": {"d": {2, 1}}})
    assert json.loads(json.dumps(line, allow_nan=False)) == {"a": None, "b": [1, None],
                                                             "c": {"d": [1, 2]}}
    fig = gc.figure_line("memory", True, "watch_peak_added_bytes", 10.0, "bytes", "lower",
                         baseline="limit", baseline_value=20.0)
    assert fig["check"] == "memory" and fig["ok"] is True and fig["bench"] == "gpu_check"
    assert fig["ratio"] == 0.5 and fig["better"] == "lower"


def test_isolate_moves_every_state_directory_into_the_temporary_one(gc, tmp_path,
                                                                     monkeypatch):
    for var in ("XDG_STATE_HOME", "XDG_RUNTIME_DIR", "XDG_CACHE_HOME",
                "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "PYTHONPATH"):
        monkeypatch.setenv(var, "/user/choice")  # restored after the test
    monkeypatch.setenv("PROVSCOPE_CONFIG", "/user/provscope.yaml")
    gc.isolate(tmp_path)
    assert "PROVSCOPE_CONFIG" not in os.environ
    for var in ("XDG_STATE_HOME", "XDG_RUNTIME_DIR", "XDG_CACHE_HOME",
                "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert Path(os.environ[var]).parent == tmp_path
    assert os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(SCRIPT.parents[1])
    settings = gc.settings_for(tmp_path, "x")
    assert all(str(tmp_path) in str(v) for v in settings.values())


@pytest.mark.torch
def test_a_cpu_dry_run_of_the_gradscaler_check_reads_its_train_points(tmp_path):
    pytest.importorskip("torch")
    out = _run("--cpu-dry-run", "--only", "gradscaler", cwd=tmp_path / "work",
               env=_env(CUDA_VISIBLE_DEVICES=""), timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["check"] for line in lines] == ["gpu", "gradscaler"]
    result = lines[1]
    assert "error" not in result, result
    # The forced overflow happened (the scaler's scale went down at that step) and the
    # step still has its train point; whether it is flagged depends on watch(scaler=).
    assert result["skipped_steps"] == [4] and result["steps_without_point"] == []
    if result["available"]:
        assert result["ok"] is True and result["flagged_steps"] == [4]
    else:
        assert result["ok"] is False
    _untouched(tmp_path)
