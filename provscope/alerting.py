"""Alert definitions: the ``alerts`` section of the configuration and the rules that ship.

Users declare thresholds in the provscope config; ``provscope alerts build`` turns the
effective rules into Grafana-provisioned alert rules (InfluxQL) and Prometheus alerting
rules (``provscope.dashboards.alert_grafana`` / ``alert_prometheus``). Each rule is one of
two kinds:

- ``threshold``: a catalogued field (``metric: gpu.temperature_celsius``), or a ratio of
  two fields of one measurement in percent (``per: gpu.memory_total_bytes``), compared
  with ``threshold`` by ``op`` (``>`` or ``<``). The value is the mean over each minute
  (a counter: its per-second rate over each minute); the rule fires when every
  one-minute value in the last ``for`` (at least the last minute) is beyond the
  threshold. ``while_run_active`` restricts a node or GPU rule to while a job's
  processes run there (GPU rules: a job holds a context on that GPU).
- ``no_steps``: a run whose processes are alive wrote no ``train`` point for ``for``.

Configuration merges by rule name: naming a shipped rule changes only the keys given
(``gpu_temperature_high: {threshold: 80}``, ``filesystem_full: {enabled: false}``); a new
name declares a new rule and needs ``metric``, ``op`` and ``threshold``. Every problem
is one line naming the rule, the key and what is allowed (``provscope.config``).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from provscope.catalogue import lookup, specs

__all__ = [
    "DEFAULT_RULES",
    "RULE_NAME",
    "AlertRule",
    "AlertsConfig",
    "duration_seconds",
]

#: A rule name: lower case, digits and underscores (it becomes the Grafana uid
#: ``provscope-<name>`` and the Prometheus alert name).
RULE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,29}$")
_DURATION = re.compile(r"^(\d+)([smh])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600}


def duration_seconds(text: str) -> int:
    """Seconds of a duration written ``30s``, ``5m`` or ``1h`` (already validated)."""
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"not a duration: {text!r}")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def _metric_problem(text: str) -> str | None:
    """Why ``text`` is not a catalogued numeric field ``measurement.field``, or None."""
    measurement, sep, field = text.partition(".")
    if not sep:
        return "allowed: a catalogued field written measurement.field, e.g. gpu.temperature_celsius"
    spec = lookup(measurement, field)
    if spec is None:
        names = [f"{s.measurement}.{s.field}" for s in specs()]
        close = difflib.get_close_matches(text, names, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ("not in the catalogue; allowed: a catalogued field written measurement.field, "
                f"see docs/alerts.md{hint}")
    if spec.dtype == "str":
        return "is text; allowed: a numeric field"
    return None


class AlertRule(BaseModel):
    """One alert rule (a shipped default merged with what the user gave, or a new one)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              serialize_by_alias=True)

    enabled: bool = Field(True, description="Build this rule.")
    kind: Literal["threshold", "no_steps"] = Field(
        "threshold", description="threshold: compare a field; no_steps: a live run wrote no training step for `for`.")
    metric: str | None = Field(None, description="The field compared, measurement.field from the catalogue (threshold rules).")
    per: str | None = Field(None, description="Denominator field of the same measurement: the value is 100 * metric / per, in percent.")
    op: Literal[">", "<"] | None = Field(None, description="Fire when the value is above (>) or below (<) the threshold.")
    threshold: float | None = Field(None, description="The threshold, in the field's unit (percent for per rules; per second for counters).")
    for_: str = Field("0s", alias="for",
                      description="How long the condition must hold (every one-minute value in it), e.g. 5m; no_steps: how long without a step.")
    while_run_active: bool = Field(False, description="Only while a job's processes run on the node (GPU fields: on that GPU).")
    severity: Literal["info", "warning", "critical"] = Field("warning", description="Label severity on the alert.")
    summary: str = Field("", description="One line shown with the alert.")

    @field_validator("metric", "per")
    @classmethod
    def _catalogued(cls, value: str | None) -> str | None:
        if value is not None:
            problem = _metric_problem(value)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("for_")
    @classmethod
    def _duration(cls, value: str) -> str:
        if not _DURATION.match(value):
            raise ValueError("allowed: a duration such as 0s, 30s, 5m or 1h")
        return value

    @field_validator("threshold")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("allowed: a finite number")
        return value

    @model_validator(mode="after")
    def _complete(self) -> AlertRule:
        if self.kind == "no_steps":
            given = [k for k in ("metric", "per", "op", "threshold") if getattr(self, k) is not None]
            if given:
                verb = "does" if len(given) == 1 else "do"
                raise ValueError(f"{', '.join(given)} {verb} not apply to a no_steps rule; "
                                 "allowed: enabled, for, severity, summary")
            if duration_seconds(self.for_) < 60:
                raise ValueError("a no_steps rule needs for of at least 1m")
            return self
        missing = [k for k in ("metric", "op", "threshold") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a threshold rule needs metric, op and threshold; missing: "
                             f"{', '.join(missing)}")
        assert self.metric is not None  # checked above
        measurement = self.metric.partition(".")[0]
        spec = lookup(*self.metric.split(".", 1))
        if self.per is not None:
            if self.per.partition(".")[0] != measurement:
                raise ValueError(f"per must be a field of {measurement!r} like metric")
            if spec is not None and spec.kind == "counter":
                raise ValueError("per applies to gauges only; a counter is compared as a rate")
        if self.while_run_active and spec is not None and "run_id" in spec.tags:
            raise ValueError("while_run_active applies to node and GPU fields; "
                             f"{self.metric} belongs to a run already")
        return self

    @property
    def for_seconds(self) -> int:
        """``for`` in seconds."""
        return duration_seconds(self.for_)


def _rule(**kwargs: Any) -> dict[str, Any]:
    return kwargs


#: The rules that ship (``alerts.defaults: true``), by name. Thresholds follow common
#: practice: NVIDIA data-centre GPUs slow down near 85-90 C; a filesystem or host memory
#: above 90 % is close to failing a checkpoint write or an OOM kill.
DEFAULT_RULES: dict[str, dict[str, Any]] = {
    "gpu_temperature_high": _rule(
        metric="gpu.temperature_celsius", op=">", threshold=85.0, **{"for": "5m"},
        severity="warning",
        summary="GPU core temperature above the threshold for the whole period (thermal slowdown is near)."),
    "gpu_memory_high": _rule(
        metric="gpu.memory_used_bytes", per="gpu.memory_total_bytes", op=">", threshold=95.0,
        **{"for": "5m"}, severity="warning",
        summary="GPU memory in use above the threshold (percent of the device); the next allocation may fail."),
    "gpu_idle": _rule(
        metric="gpu.utilization_percent", op="<", threshold=10.0, **{"for": "10m"},
        while_run_active=True, severity="warning",
        summary="A job holds this GPU but it stayed nearly idle (input pipeline, communication or a hang)."),
    "host_memory_high": _rule(
        metric="memory.used_percent", op=">", threshold=90.0, **{"for": "2m"},
        severity="warning",
        summary="Host memory in use above the threshold; the kernel may kill the job."),
    "filesystem_full": _rule(
        metric="filesystem.used_percent", op=">", threshold=90.0, **{"for": "5m"},
        severity="warning",
        summary="File system above the threshold; checkpoints and logs may fail to write."),
    "loss_nonfinite": _rule(
        metric="train.loss_nonfinite", op=">", threshold=0.0, severity="critical",
        summary="The training loss was NaN or infinite in the last minute."),
    "training_stalled": _rule(
        kind="no_steps", **{"for": "5m"}, severity="critical",
        summary="The run's processes are alive but it wrote no training step for the whole period."),
    "points_dropped": _rule(
        metric="provscope.points_dropped_total", op=">", threshold=0.0, severity="warning",
        summary="provscope dropped records (queue full, rejected by the server or spool full)."),
    "spooling": _rule(
        metric="provscope.spool_bytes", op=">", threshold=0.0, **{"for": "2m"},
        severity="warning",
        summary="provscope keeps records in its on-disk spool: the destination is unreachable."),
}


def _check_name(name: str) -> str:
    if not RULE_NAME.match(name):
        raise ValueError(f"rule name {name!r} is not allowed; allowed: lower case letters, "
                         "digits and _, starting with a letter, at most 30 characters")
    return name


class AlertsConfig(BaseModel):
    """The ``alerts`` section: which rules ``provscope alerts build`` generates."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    defaults: bool = Field(True, description="Include the rules that ship (docs/alerts.md); false: only the rules declared here.")
    interval: str = Field("1m", description="How often Grafana evaluates the rules (and the Prometheus rule group).")
    folder: str = Field("provscope", min_length=1, description="Grafana folder of the provisioned rules.")
    rules: dict[Annotated[str, AfterValidator(_check_name)], AlertRule] = Field(
        default_factory=dict,
        description="Rules by name: a shipped name changes only the keys given (e.g. gpu_temperature_high: {threshold: 80}); a new name declares a rule (metric, op, threshold, for, severity, summary).")

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: Any) -> Any:
        """Merge the user's rules into the shipped ones, key by key."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        given = data.get("rules")
        if given is not None and not isinstance(given, Mapping):
            return data  # validation names what it must be
        given = dict(given or {})
        use_defaults = data.get("defaults", True)
        merged: dict[str, Any] = {}
        if use_defaults is not False:
            merged = {name: dict(rule) for name, rule in DEFAULT_RULES.items()}
        for name, entry in given.items():
            base = DEFAULT_RULES.get(name)
            if base is not None and isinstance(entry, Mapping):
                merged[name] = {**base, **entry}
            elif isinstance(entry, AlertRule):
                merged[name] = entry
            else:
                merged[name] = entry
        data["rules"] = merged
        return data

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: str) -> str:
        m = _DURATION.match(value)
        if m is None or not 10 <= duration_seconds(value) <= 3600:
            raise ValueError("allowed: a duration from 10s to 1h, such as 30s or 1m")
        return value

    def enabled_rules(self) -> dict[str, AlertRule]:
        """The rules to build, by name, sorted by name (deterministic output)."""
        return {name: self.rules[name] for name in sorted(self.rules) if self.rules[name].enabled}
