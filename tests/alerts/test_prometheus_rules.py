"""The generated Prometheus rules: ``promtool check rules``, and ``promtool test rules``
proving that every default rule fires on the series written for it and stays quiet on
the others (tests/alerts/scenarios.py)."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import yaml
from provscope.dashboards.alert_prometheus import alert_name, labels, metric_name
from provscope.exporters.prometheus import labels_of
from provscope.exporters.prometheus import metric_name as exporter_metric_name

from provscope.alerting import DEFAULT_RULES, AlertsConfig
from provscope.catalogue import lookup, specs
from provscope.testing.required import require_binary

from .scenarios import SCENARIOS, SPAN_MIN, STEP_S, Scenario, minutes

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "provisioning" / "prometheus" / "provscope-rules.yml"


def _rules() -> dict:
    return {r["alert"]: r for r in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]}


def test_names_and_labels_are_the_exporters():
    """The rules name series exactly as the agent's /metrics does."""
    for spec in specs():
        assert metric_name(spec) == exporter_metric_name(spec)
        if labels_of(spec) is not None:
            assert labels(spec) == labels_of(spec), spec


def test_promtool_check_rules():
    promtool = require_binary("promtool", "prometheus")
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(DEFAULT_RULES)} rules found" in out.stdout


def test_every_default_rule_has_a_firing_and_a_quiet_scenario():
    fires = {s.rule for s in SCENARIOS if s.fires}
    quiet = {s.rule for s in SCENARIOS if not s.fires}
    assert fires == set(DEFAULT_RULES) == quiet
    assert set(_rules()) == {alert_name(n) for n in DEFAULT_RULES}


def _prom_labels(measurement: str, tags: dict[str, str]) -> dict[str, str]:
    out = {k: v for k, v in tags.items() if k != "run_id"}
    if "run_id" in tags:
        out["run_slot"] = "0"  # the first run on the node holds slot 0
    return out


def _input_series(scenario: Scenario) -> list[dict[str, str]]:
    out = []
    for s in scenario.series:
        spec = lookup(s.measurement, s.field)
        assert spec is not None, (s.measurement, s.field)
        lab = ",".join(f'{k}="{v}"' for k, v in sorted(_prom_labels(s.measurement,
                                                                      s.tags).items()))
        values = []
        for m in minutes():
            v = s.value(m)
            values.append("_" if v is None else repr(float(v)))
        out.append({"series": f"{metric_name(spec)}{{{lab}}}", "values": " ".join(values)})
    return out


def _humanize(v: float) -> str:
    """Prometheus' ``humanize`` template function (Go's %.4g with SI prefixes)."""
    if v == 0 or math.isnan(v) or math.isinf(v):
        return f"{v:.4g}"
    prefix = ""
    if abs(v) >= 1:
        for p in ("k", "M", "G", "T", "P", "E", "Z", "Y"):
            if abs(v) < 1000:
                break
            prefix, v = p, v / 1000
    else:
        for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
            if abs(v) >= 1:
                break
            prefix, v = p, v * 1000
    return f"{v:.4g}{prefix}"


#: The value each firing scenario's expression has at the evaluation time.
FIRING_VALUES = {
    "gpu_temperature_high": 90.0, "gpu_memory_high": 97.0, "gpu_idle": 2.0,
    "host_memory_high": 95.0, "filesystem_full": 95.0, "loss_nonfinite": 1.0,
    "points_dropped": 10.0 / STEP_S, "spooling": 1e6,
}


def _expected(scenario: Scenario) -> list[dict]:
    if not scenario.fires:
        return []
    rule = AlertsConfig().rules[scenario.rule]
    if rule.kind == "no_steps":
        lab = {"host": scenario.subject["host"], "run_slot": "0"}
    else:
        assert rule.metric is not None
        lab = _prom_labels(rule.metric.partition(".")[0], scenario.subject)
    alert = _rules()[alert_name(scenario.rule)]
    desc = alert["annotations"]["description"]
    for k, v in lab.items():
        desc = desc.replace(f"{{{{ $labels.{k} }}}}", v)
    if scenario.rule in FIRING_VALUES:
        desc = desc.replace("{{ $value | humanize }}", _humanize(FIRING_VALUES[scenario.rule]))
    return [{"exp_labels": {**lab, **alert["labels"]},
             "exp_annotations": {**alert["annotations"], "description": desc}}]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.id)
def test_promtool_rule_fires_or_stays_quiet(scenario: Scenario, tmp_path):
    """promtool evaluates the committed rule file on the scenario's series, minute by
    minute, and compares the alerts firing at the end with what the scenario says."""
    promtool = require_binary("promtool", "prometheus")
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": f"{STEP_S}s",
            "input_series": _input_series(scenario),
            "alert_rule_test": [{"eval_time": f"{SPAN_MIN}m",
                                 "alertname": alert_name(scenario.rule),
                                 "exp_alerts": _expected(scenario)}],
        }],
    }
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_firing_expectation_would_catch_a_quiet_rule(tmp_path):
    """The harness can fail: expecting an alert from a quiet scenario makes promtool fail."""
    promtool = require_binary("promtool", "prometheus")
    quiet = next(s for s in SCENARIOS if s.rule == "gpu_temperature_high" and not s.fires)
    test = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": f"{STEP_S}s", "input_series": _input_series(quiet),
        "alert_rule_test": [{"eval_time": f"{SPAN_MIN}m",
                             "alertname": alert_name(quiet.rule),
                             "exp_alerts": [{"exp_labels": {"severity": "warning"}}]}]}]}
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0
