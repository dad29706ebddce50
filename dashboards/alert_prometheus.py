"""Prometheus alerting rules over the agent's ``/metrics``, from the configured alert rules.

For sites that scrape the node agents with Prometheus and route alerts with
Alertmanager. The same definitions as the Grafana rules, in PromQL:

- threshold rules: ``avg_over_time(m[1m]) OP T`` (a counter: ``rate(m[1m]) OP T``; a
  ``per`` rule: ``100 * avg_over_time(m[1m]) / avg_over_time(p[1m]) OP T``) held for
  ``for``; ``while_run_active`` adds ``and on (host, gpu)`` the job's series on that GPU
  (``provscope_gpu_process_processes``), or ``and on (host)`` a job's process tree.
- ``no_steps``: a run slot whose process tree is on ``/metrics``, that wrote training
  steps in the last 30 minutes, and whose step did not change over ``for``.

Names follow the exporter (``provscope.exporters.prometheus.metric_name``, checked by a
test): ``provscope_<measurement>_<field>``, ``provscope_<field>`` for provscope's own
health; runs appear as ``run_slot`` (never ``run_id``).
"""

from __future__ import annotations

from typing import Any

from provscope.alerting import AlertRule, AlertsConfig
from provscope.catalogue import MetricSpec, lookup

__all__ = ["alert_name", "expression", "labels", "metric_name", "prometheus_rules"]

_RESERVED_SUFFIXES = ("_count", "_sum", "_bucket")
_ACTIVE_WINDOW = "30m"


def metric_name(spec: MetricSpec) -> str:
    """The name the agent's ``/metrics`` gives a catalogued field."""
    if spec.measurement == "provscope":
        name = f"provscope_{spec.field}"
    else:
        name = f"provscope_{spec.measurement}_{spec.field}"
    if spec.kind == "gauge" and name.endswith(_RESERVED_SUFFIXES):
        name += "_value"
    return name


def alert_name(name: str) -> str:
    """``gpu_temperature_high`` -> ``ProvscopeGpuTemperatureHigh``."""
    return "Provscope" + "".join(part.capitalize() for part in name.split("_"))


def _spec(metric: str) -> MetricSpec:
    spec = lookup(*metric.split(".", 1))
    if spec is None:  # the config validated it against the same catalogue
        raise ValueError(f"not a catalogued field: {metric}")
    return spec


def _minutes(seconds: int) -> str:
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


def expression(rule: AlertRule) -> str:
    """The PromQL of one rule."""
    if rule.kind == "no_steps":
        step = "provscope_train_step"
        window = _minutes(max(1800, 3 * rule.for_seconds))
        return (f"(count by (host, run_slot) (provscope_process_rss_bytes)"
                f" and on (host, run_slot) count by (host, run_slot) "
                f"(count_over_time({step}[{window}])))"
                f" unless on (host, run_slot) count by (host, run_slot) "
                f"(changes({step}[{rule.for_}]) > 0)")
    assert rule.metric is not None and rule.op is not None and rule.threshold is not None
    spec = _spec(rule.metric)
    name = metric_name(spec)
    if spec.kind == "counter":
        value = f"rate({name}[1m])"
    elif rule.per is not None:
        value = (f"100 * avg_over_time({name}[1m]) / "
                 f"avg_over_time({metric_name(_spec(rule.per))}[1m])")
    else:
        value = f"avg_over_time({name}[1m])"
    expr = f"{value} {rule.op} {rule.threshold:g}"
    if rule.while_run_active:
        if "gpu" in spec.tags:
            expr += (" and on (host, gpu) count by (host, gpu) "
                     "(provscope_gpu_process_processes)")
        else:
            expr += " and on (host) count by (host) (provscope_process_rss_bytes)"
    return expr


def labels(spec: MetricSpec) -> tuple[str, ...]:
    """The labels of a catalogued field on ``/metrics`` (``run_id`` becomes ``rank`` and
    ``run_slot``), as ``provscope.exporters.prometheus.labels_of`` gives them."""
    out = [t for t in spec.tags if t != "run_id"]
    if "run_id" in spec.tags:
        if "rank" not in out:
            out.append("rank")
        out.append("run_slot")
    return tuple(out)


def _where(names: tuple[str, ...]) -> str:
    return " ".join(f"{n}={{{{ $labels.{n} }}}}" for n in names)


def _annotations(name: str, rule: AlertRule) -> dict[str, str]:
    if rule.kind == "no_steps":
        detail = (f"{_where(('host', 'run_slot'))} (provscope_run_info names the run): "
                  f"no training step for {rule.for_}")
    else:
        assert rule.metric is not None and rule.threshold is not None
        detail = (f"{rule.metric}{' / ' + rule.per if rule.per else ''} "
                  f"{_where(labels(_spec(rule.metric)))}: {{{{ $value | humanize }}}} "
                  f"{rule.op} {rule.threshold:g}"
                  + (f" for {rule.for_}" if rule.for_seconds else ""))
    return {"summary": rule.summary or name, "description": detail}


def prometheus_rules(alerts: AlertsConfig) -> dict[str, Any]:
    """The Prometheus rule file (one group) as a dict."""
    rules = []
    for name, rule in alerts.enabled_rules().items():
        entry: dict[str, Any] = {"alert": alert_name(name), "expr": expression(rule)}
        if rule.kind != "no_steps" and rule.for_seconds:
            entry["for"] = rule.for_
        entry["labels"] = {"severity": rule.severity, "source": "provscope"}
        entry["annotations"] = _annotations(name, rule)
        rules.append(entry)
    return {"groups": [{"name": "provscope", "interval": alerts.interval, "rules": rules}]}
