"""The generated Grafana alert rules, evaluated against the real InfluxDB of the suite:
each default rule fires on the series written for it (its reduced value is beyond the
threshold) and stays quiet on the others (tests/alerts/scenarios.py)."""

from __future__ import annotations

import math
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from provscope.dashboards.alert_grafana import INFLUXDB_UID, rule_uid

from provscope.alerting import DEFAULT_RULES, AlertsConfig

from .grafana_eval import evaluate, firing
from .scenarios import SCENARIOS, Scenario, minutes

ROOT = Path(__file__).resolve().parents[2]
PROVISIONING = ROOT / "provisioning"
RULES = PROVISIONING / "alerting" / "provscope-rules.yaml"
DASHBOARD_UIDS = {"provscope-overview", "provscope-training", "provscope-layers",
                  "provscope-nodes", "provscope-lineage"}


def _rules() -> dict[str, dict]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["uid"]: r for r in doc["groups"][0]["rules"]}


def test_rule_file_shape():
    """Grafana 11.6 file provisioning: apiVersion 1, one group, each rule's data are
    InfluxQL queries on provscope-influxdb and expressions on __expr__."""
    doc = yaml.safe_load(RULES.read_text())
    assert doc["apiVersion"] == 1
    (group,) = doc["groups"]
    assert group["orgId"] == 1 and group["folder"] == "provscope" and group["interval"] == "1m"
    rules = group["rules"]
    assert {r["uid"] for r in rules} == {rule_uid(n) for n in DEFAULT_RULES}
    assert len({r["title"] for r in rules}) == len(rules)
    for rule in rules:
        assert len(rule["uid"]) <= 40
        refs = [d["refId"] for d in rule["data"]]
        assert rule["condition"] in refs and len(set(refs)) == len(refs)
        for d in rule["data"]:
            assert set(d) == {"refId", "relativeTimeRange", "datasourceUid", "model"}
            assert d["model"]["refId"] == d["refId"]
            if d["datasourceUid"] == "__expr__":
                assert d["model"]["type"] in ("reduce", "threshold", "math")
                if d["model"]["type"] != "math":
                    assert d["model"]["expression"] in refs
            else:
                assert d["datasourceUid"] == INFLUXDB_UID
                assert d["model"]["rawQuery"] is True and "$timeFilter" in d["model"]["query"]
                assert d["relativeTimeRange"]["from"] >= 60
        # Grafana expands $VAR in labels (not in annotations or query models).
        assert all("$" not in v for v in rule["labels"].values())
        uid = rule["annotations"]["dashboard"].split("/d/")[1].split("?")[0]
        assert uid in DASHBOARD_UIDS


def _write(influx_server, db: str, scenario: Scenario, now_ms: int) -> int:
    lines = []
    for s in scenario.series:
        tags = ",".join(f"{k}={v}" for k, v in sorted(s.tags.items()))
        for m in minutes():
            v = s.value(m)
            if v is not None:
                lines.append(f"{s.measurement},{tags} {s.field}={float(v)!r} "
                             f"{now_ms - round(m * 60_000)}")
    req = urllib.request.Request(f"{influx_server.url}/write?db={db}&precision=ms",
                                 data="\n".join(lines).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 204
    return len(lines)


@pytest.mark.integration
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.id)
def test_grafana_rule_fires_or_stays_quiet(scenario: Scenario, influx_server, influx_db):
    rule_config = AlertsConfig().rules[scenario.rule]
    rule = _rules()[rule_uid(scenario.rule)]
    now_ms = time.time_ns() // 1_000_000
    assert _write(influx_server, influx_db, scenario, now_ms) > 0
    cond, results = evaluate(rule, now_ms, lambda q: influx_server.query(q, influx_db))
    fired = firing(cond)
    if rule_config.kind == "no_steps":
        expected_labels = {k: scenario.subject[k] for k in ("run_id", "host")} \
            if scenario.fires else None
    else:
        expected_labels = scenario.subject if scenario.fires else None
    assert fired == ([expected_labels] if scenario.fires else []), results
    if rule_config.kind == "threshold":
        reduced = results["B"]
        assert reduced, "the query returned no series"
        t, op = rule_config.threshold, rule_config.op
        beyond = [v for v in reduced.values() if not math.isnan(v)
                  and (v > t if op == ">" else v < t)]  # type: ignore[operator]
        if scenario.fires:
            assert beyond, reduced
        elif not rule_config.while_run_active:
            assert not beyond, reduced  # the value itself is within the threshold


def test_generated_files_are_committed(tmp_path):
    """Regenerating from the shipped definitions gives the committed bytes."""
    from provscope.dashboards.alert_build import FILES, build

    build(AlertsConfig(), tmp_path)
    for rel in FILES:
        assert (tmp_path / rel).read_text() == (PROVISIONING / rel).read_text(), (
            f"{rel} differs from `provscope alerts build`; rebuild and commit it")


def test_secrets_only_from_the_environment():
    """Provisioning files hold no password or webhook URL, only environment references."""
    cp = yaml.safe_load((PROVISIONING / "alerting" / "contact-points.yaml").read_text())
    (receiver,) = cp["contactPoints"][0]["receivers"]
    assert receiver["settings"]["url"] == "$PROVSCOPE_ALERT_WEBHOOK_URL"
    ds = yaml.safe_load((PROVISIONING / "datasources" / "provscope.yaml").read_text())
    by_uid = {d["uid"]: d for d in ds["datasources"]}
    assert {u: d["type"] for u, d in by_uid.items()} == {
        "provscope-influxdb": "influxdb",
        "provscope-lineage": "grafana-postgresql-datasource",
        "provscope-prometheus": "prometheus"}
    for d in ds["datasources"]:
        for value in (d.get("secureJsonData") or {}).values():
            assert value.startswith("$__env{") or value.startswith("${"), value
        assert "$" in str(d.get("user", "$"))
    policies = yaml.safe_load((PROVISIONING / "alerting" / "policies.yaml").read_text())
    assert policies["policies"][0]["receiver"] == cp["contactPoints"][0]["name"]
