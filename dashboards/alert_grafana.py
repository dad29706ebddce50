"""Grafana alert rules (file provisioning, Grafana 11.6) from the configured alert rules.

Each rule queries ``provscope-influxdb`` with InfluxQL and decides with server-side
expressions on the ``__expr__`` datasource:

- threshold rules: ``A`` the field's one-minute means (a counter: its per-second rate per
  minute; a ``per`` rule: ``100 * mean(metric) / mean(per)``) over the last ``for`` (at
  least one minute); ``B`` reduces them to the least favourable value (``min`` for
  ``>``, ``max`` for ``<``: the condition held in *every* minute); ``C`` compares it
  with the threshold. So the duration lives in the query window, which the test suite
  can check against a real InfluxDB, and ``for`` of the Grafana rule stays 0s.
- ``while_run_active``: ``D`` counts the job's process samples (GPU fields: the job's
  samples on that GPU, measurement ``gpu_process``) over the last one to two minutes,
  ``E`` reduces them, and the math ``F = $C > 0 && $E > 0`` is the condition.
- ``no_steps``: ``A`` counts ``train`` points of each run over the last ``for`` (plus
  the minute under way), ``C`` is ``B < 1``, and ``D``/``E``/``F`` as above with the
  run's own process samples.

The ``D`` queries keep a series (value 0) for a run or GPU that was active within the
last 30 minutes and no longer is, so Grafana's label join of ``$C`` and ``$E`` always
finds its partner instead of joining two unrelated single series.
"""

from __future__ import annotations

from typing import Any

from provscope.alerting import AlertRule, AlertsConfig
from provscope.catalogue import MetricSpec, lookup

__all__ = [
    "EXPR_UID",
    "INFLUXDB_UID",
    "LINEAGE_UID",
    "PROMETHEUS_UID",
    "contact_points",
    "dashboard_for",
    "grafana_rules",
    "notification_policies",
    "rule_uid",
]

#: Datasource uids fixed by provisioning/datasources/provscope.yaml.
INFLUXDB_UID = "provscope-influxdb"
LINEAGE_UID = "provscope-lineage"
PROMETHEUS_UID = "provscope-prometheus"
EXPR_UID = "__expr__"
CONTACT_POINT = "provscope"
WEBHOOK_ENV = "PROVSCOPE_ALERT_WEBHOOK_URL"

_ACTIVE_WINDOW_S = 1800  # how long an inactive run or GPU keeps a (zero) "active" series
_DASHBOARDS = {  # measurement -> dashboard uid the alert links to
    "train": "provscope-training",
    "layer": "provscope-layers",
    "layer_param": "provscope-layers",
    "provscope": "provscope-overview",
    "agent": "provscope-overview",
}


def rule_uid(name: str) -> str:
    """Grafana uid of a rule: ``provscope-`` + the name with ``-`` for ``_`` (<= 40)."""
    return "provscope-" + name.replace("_", "-")


def dashboard_for(rule: AlertRule) -> str:
    """The uid of the dashboard an alert of ``rule`` links to."""
    if rule.kind == "no_steps":
        return "provscope-training"
    measurement = (rule.metric or "").partition(".")[0]
    return _DASHBOARDS.get(measurement, "provscope-nodes")


def _spec(metric: str) -> MetricSpec:
    spec = lookup(*metric.split(".", 1))
    if spec is None:  # the config validated it against the same catalogue
        raise ValueError(f"not a catalogued field: {metric}")
    return spec


def _group_by(tags: tuple[str, ...]) -> str:
    return "".join(f', "{t}"' for t in tags)


def value_query(rule: AlertRule) -> str:
    """InfluxQL of query ``A`` of a threshold rule: one value per minute per series."""
    assert rule.metric is not None
    spec = _spec(rule.metric)
    field = spec.field
    if spec.kind == "counter":
        select = f'non_negative_derivative(last("{field}"), 1s)'
    elif rule.per is not None:
        select = f'100 * mean("{field}") / mean("{_spec(rule.per).field}")'
    else:
        select = f'mean("{field}")'
    return (f'SELECT {select} FROM "{spec.measurement}" WHERE $timeFilter '
            f"GROUP BY time(1m){_group_by(spec.tags)} fill(null)")


def steps_query(rule: AlertRule) -> str:
    """InfluxQL of query ``A`` of a no_steps rule: ``train`` points per run and host in
    the last ``for`` minutes plus the minute under way."""
    n = -(-rule.for_seconds // 60) + 1
    return (f'SELECT moving_average(count("step"), {n}) * {n} FROM "train" WHERE $timeFilter '
            'GROUP BY time(1m), "run_id", "host" fill(0)')


def active_query(rule: AlertRule) -> str:
    """InfluxQL of query ``D``: samples of a job's processes per minute, averaged over the
    last minute and the minute under way; 0 for what was active in the last 30 minutes
    and is not now."""
    tags: tuple[str, ...]
    if rule.kind == "no_steps":
        measurement, field, tags = "process", "rss_bytes", ("run_id", "host")
    elif "gpu" in _spec(rule.metric or "").tags:
        measurement, field, tags = "gpu_process", "memory_used_bytes", ("host", "gpu")
    else:
        measurement, field, tags = "process", "rss_bytes", ("host",)
    return (f'SELECT moving_average(count("{field}"), 2) FROM "{measurement}" WHERE '
            f"$timeFilter GROUP BY time(1m){_group_by(tags)} fill(0)")


def _influx(ref: str, query: str, window_s: int) -> dict[str, Any]:
    return {
        "refId": ref,
        "relativeTimeRange": {"from": window_s, "to": 0},
        "datasourceUid": INFLUXDB_UID,
        "model": {
            "refId": ref,
            "datasource": {"type": "influxdb", "uid": INFLUXDB_UID},
            "query": query,
            "rawQuery": True,
            "resultFormat": "time_series",
            "intervalMs": 60_000,
            "maxDataPoints": 43_200,
        },
    }


def _expr(ref: str, model: dict[str, Any]) -> dict[str, Any]:
    return {
        "refId": ref,
        "relativeTimeRange": {"from": 0, "to": 0},
        "datasourceUid": EXPR_UID,
        "model": {"refId": ref, "datasource": {"type": EXPR_UID, "uid": EXPR_UID}, **model},
    }


def _reduce(ref: str, of: str, reducer: str) -> dict[str, Any]:
    return _expr(ref, {"type": "reduce", "expression": of, "reducer": reducer,
                       "settings": {"mode": "dropNN"}})


def _threshold(ref: str, of: str, op: str, value: float) -> dict[str, Any]:
    kind = "gt" if op == ">" else "lt"
    return _expr(ref, {"type": "threshold", "expression": of,
                       "conditions": [{"evaluator": {"type": kind, "params": [value]}}]})


def rule_data(rule: AlertRule) -> tuple[list[dict[str, Any]], str]:
    """The rule's ``data`` (queries and expressions) and its condition refId."""
    if rule.kind == "no_steps":
        window = max(_ACTIVE_WINDOW_S, 3 * rule.for_seconds)
        data = [_influx("A", steps_query(rule), window), _reduce("B", "A", "last"),
                _threshold("C", "B", "<", 1.0)]
    else:
        assert rule.metric is not None and rule.op is not None and rule.threshold is not None
        window = max(rule.for_seconds, 60)
        if _spec(rule.metric).kind == "counter":
            window += 60  # the first minute of the window only anchors the first rate
        data = [_influx("A", value_query(rule), window),
                _reduce("B", "A", "min" if rule.op == ">" else "max"),
                _threshold("C", "B", rule.op, rule.threshold)]
        if not rule.while_run_active:
            return data, "C"
    data += [_influx("D", active_query(rule), _ACTIVE_WINDOW_S), _reduce("E", "D", "last"),
             _expr("F", {"type": "math", "expression": "$C > 0 && $E > 0"})]
    return data, "F"


def _annotations(name: str, rule: AlertRule) -> dict[str, str]:
    where = "{{ $labels.host }}"
    if rule.kind == "no_steps":
        detail = (f"run {{{{ $labels.run_id }}}} on {where}: no training step for "
                  f"{rule.for_}")
    else:
        detail = (f"{rule.metric}{' / ' + rule.per if rule.per else ''} on {where} "
                  f"{{{{ $labels }}}}: {{{{ $values.B }}}} {rule.op} {rule.threshold:g}"
                  + (f" for {rule.for_}" if rule.for_seconds else ""))
    link = f"/d/{dashboard_for(rule)}?var-host={where}"
    if rule.kind == "no_steps" or "run_id" in _spec(rule.metric or "train.step").tags:
        link += "&var-run={{ $labels.run_id }}"
    return {"summary": rule.summary or name, "description": detail, "dashboard": link,
            "rule": name}


def grafana_rules(alerts: AlertsConfig) -> dict[str, Any]:
    """The alert rule provisioning file (``apiVersion: 1``, one group) as a dict."""
    rules = []
    for name, rule in alerts.enabled_rules().items():
        data, condition = rule_data(rule)
        rules.append({
            "uid": rule_uid(name),
            "title": "provscope: " + name.replace("_", " "),
            "condition": condition,
            "data": data,
            "noDataState": "OK",  # no GPU, no run: nothing to alert on
            "execErrState": "Error",
            "for": "0s",  # the duration is the query window (module docstring)
            "labels": {"severity": rule.severity, "source": "provscope"},
            "annotations": _annotations(name, rule),
            "isPaused": False,
        })
    return {"apiVersion": 1, "groups": [{
        "orgId": 1, "name": "provscope", "folder": alerts.folder,
        "interval": alerts.interval, "rules": rules}]}


def contact_points() -> dict[str, Any]:
    """One webhook contact point; its URL comes from the environment of Grafana
    (``$PROVSCOPE_ALERT_WEBHOOK_URL``: the compose stack's ``.env``), never a file."""
    return {"apiVersion": 1, "contactPoints": [{
        "orgId": 1, "name": CONTACT_POINT,
        "receivers": [{"uid": "provscope-webhook", "type": "webhook",
                       "settings": {"url": f"${WEBHOOK_ENV}", "httpMethod": "POST"},
                       "disableResolveMessage": False}]}]}


def notification_policies() -> dict[str, Any]:
    """The notification policy tree: everything to the provscope contact point, grouped
    by rule, critical alerts repeated more often. Provisioning replaces the whole tree."""
    return {"apiVersion": 1, "policies": [{
        "orgId": 1, "receiver": CONTACT_POINT,
        "group_by": ["grafana_folder", "alertname"],
        "group_wait": "30s", "group_interval": "5m", "repeat_interval": "4h",
        "routes": [{"receiver": CONTACT_POINT,
                    "object_matchers": [["severity", "=", "critical"]],
                    "repeat_interval": "1h"}]}]}
