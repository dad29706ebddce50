"""``provscope alerts build``: the config's thresholds reach both rule formats; invalid
definitions get one line each and nothing is written."""

from __future__ import annotations

import yaml

from provscope.cli import main


def test_user_thresholds_and_new_rules_reach_both_formats(tmp_path, capsys):
    cfg = tmp_path / "provscope.yaml"
    cfg.write_text(yaml.safe_dump({"alerts": {"rules": {
        "gpu_temperature_high": {"threshold": 80, "for": "10m"},
        "filesystem_full": {"enabled": False},
        "gpu_power_high": {"metric": "gpu.power_watts", "op": ">", "threshold": 400,
                           "for": "5m", "severity": "critical", "summary": "power"},
    }}}))
    out = tmp_path / "prov"
    assert main(["-c", str(cfg), "alerts", "build", "--out", str(out)]) == 0
    grafana = yaml.safe_load((out / "alerting" / "provscope-rules.yaml").read_text())
    rules = {r["uid"]: r for r in grafana["groups"][0]["rules"]}
    assert "provscope-filesystem-full" not in rules
    temp = rules["provscope-gpu-temperature-high"]
    assert temp["data"][0]["relativeTimeRange"]["from"] == 600
    evaluator = temp["data"][2]["model"]["conditions"][0]["evaluator"]
    assert evaluator == {"type": "gt", "params": [80.0]}
    power = rules["provscope-gpu-power-high"]
    assert '"power_watts"' in power["data"][0]["model"]["query"]
    assert power["labels"]["severity"] == "critical"
    prom = yaml.safe_load((out / "prometheus" / "provscope-rules.yml").read_text())
    alerts = {r["alert"]: r for r in prom["groups"][0]["rules"]}
    assert alerts["ProvscopeGpuTemperatureHigh"]["expr"].endswith("> 80")
    assert alerts["ProvscopeGpuTemperatureHigh"]["for"] == "10m"
    power_expr = alerts["ProvscopeGpuPowerHigh"]["expr"]
    assert power_expr == "avg_over_time(provscope_gpu_power_watts[1m]) > 400"
    assert "ProvscopeFilesystemFull" not in alerts
    assert "9 alert rules" in capsys.readouterr().out


def test_each_invalid_definition_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"alerts": {"rules": {
        "gpu_temperature_high": {"threshold": "hot"},
        "gpu_idle": {"thrshold": 5},
        "training_stalled": {"threshold": 3},
        "new_rule": {"summary": "no metric"},
        "Bad-Name": {"metric": "gpu.power_watts", "op": ">", "threshold": 1},
        "typo": {"metric": "gpu.temprature_celsius", "op": ">=", "threshold": 1},
    }}}))
    out = tmp_path / "prov"
    assert main(["-c", str(cfg), "alerts", "build", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    src = f"provscope: {cfg}: "
    assert sorted(lines) == sorted([
        src + "alerts.rules.gpu_temperature_high.threshold = 'hot' is not allowed; allowed: "
        "a valid number, unable to parse string as a number",
        src + "unknown key 'alerts.rules.gpu_idle.thrshold'; allowed keys here: enabled, kind, "
        "metric, per, op, threshold, for, while_run_active, severity, summary",
        src + "alerts.rules.training_stalled: threshold does not apply to a no_steps rule; "
        "allowed: enabled, for, severity, summary",
        src + "alerts.rules.new_rule: a threshold rule needs metric, op and threshold; "
        "missing: metric, op, threshold",
        src + "alerts.rules.Bad-Name: rule name 'Bad-Name' is not allowed; allowed: lower case "
        "letters, digits and _, starting with a letter, at most 30 characters",
        src + "alerts.rules.typo.metric = 'gpu.temprature_celsius' is not allowed; not in the "
        "catalogue; allowed: a catalogued field written measurement.field, see "
        "docs/alerts.md (did you mean 'gpu.temperature_celsius'?)",
        src + "alerts.rules.typo.op = '>=' is not allowed; allowed: '>' or '<'",
    ])
    assert not out.exists()


def test_set_flag_changes_one_key_of_a_shipped_rule(tmp_path):
    out = tmp_path / "prov"
    assert main(["--set", "alerts.rules.host_memory_high.threshold=75", "alerts", "build",
                 "--out", str(out)]) == 0
    prom = yaml.safe_load((out / "prometheus" / "provscope-rules.yml").read_text())
    alerts = {r["alert"]: r for r in prom["groups"][0]["rules"]}
    assert alerts["ProvscopeHostMemoryHigh"]["expr"].endswith("> 75")
    assert alerts["ProvscopeHostMemoryHigh"]["for"] == "2m"  # the shipped rest stays
