"""Shared settings of the fault suite's hypothesis fuzzing: case counts scale with
``--long`` (x20); no example database (CI runs are reproducible from the seed printed
on failure), no per-example deadline (a loaded 2-core CI machine)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

LONG_FACTOR = 20


def fuzz_settings(cases: int, long_run: bool) -> settings:
    return settings(max_examples=cases * (LONG_FACTOR if long_run else 1), deadline=None,
                    database=None, derandomize=not long_run,
                    suppress_health_check=list(HealthCheck))
