"""Fuzzing the alert threshold definitions (the ``alerts:`` section): every input gives
an ``AlertsConfig`` whose rules are complete, or one ``ConfigError`` line naming what
was wrong."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from provscope.alerting import DEFAULT_RULES, AlertRule
from provscope.catalogue import specs
from provscope.config import Config, load_config
from provscope.errors import ConfigError
from tests.faults.fuzzing import fuzz_settings

pytestmark = [pytest.mark.faults]

METRICS = sorted(f"{s.measurement}.{s.field}" for s in specs())
text = st.text(max_size=30)
rule = st.fixed_dictionaries({}, optional={
    "enabled": st.one_of(st.booleans(), text),
    "kind": st.one_of(st.sampled_from(["threshold", "no_steps"]), text),
    "metric": st.one_of(st.sampled_from(METRICS), text, st.integers()),
    "per": st.one_of(st.sampled_from(METRICS), text),
    "op": st.one_of(st.sampled_from([">", "<", ">=", "=="]), text),
    "threshold": st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                           st.integers(-(2**70), 2**70), text),
    "for": st.one_of(st.sampled_from(["0s", "30s", "5m", "1h", "90m"]), text,
                     st.integers()),
    "while_run_active": st.one_of(st.booleans(), text),
    "severity": st.one_of(st.sampled_from(["info", "warning", "critical"]), text),
    "summary": text,
    text.filter(lambda k: k not in ("for",)): text,
})
names = st.one_of(st.sampled_from(sorted(DEFAULT_RULES)), st.from_regex(
    r"[a-z][a-z0-9_]{0,29}", fullmatch=True), text)


def test_alert_threshold_definitions(long_run):
    @fuzz_settings(1500, long_run)
    @given(st.fixed_dictionaries({}, optional={
        "defaults": st.one_of(st.booleans(), text),
        "interval": st.one_of(st.sampled_from(["10s", "1m", "1h", "5s", "2h"]), text),
        "folder": text,
        "rules": st.one_of(st.dictionaries(names, st.one_of(rule, text, st.none()),
                                           max_size=3), text),
    }))
    def run(section: dict) -> None:
        try:
            config = load_config(overrides={"alerts": section}, environ={})
        except ConfigError as exc:
            assert str(exc) and "\n" not in str(exc), str(exc)
            return
        assert isinstance(config, Config)
        for name, r in config.alerts.enabled_rules().items():
            assert isinstance(r, AlertRule)
            if r.kind == "threshold":
                assert r.metric in METRICS and r.op in (">", "<"), (name, r)
                assert r.threshold is not None and math.isfinite(r.threshold)
            assert r.for_seconds >= 0

    run()
