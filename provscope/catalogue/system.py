"""Metric specs: system."""

from __future__ import annotations

from provscope.catalogue import MetricSpec

SPECS: list[MetricSpec] = []
