"""Metric specs: training."""

from __future__ import annotations

from provscope.catalogue import MetricSpec

SPECS: list[MetricSpec] = []

# Job scalars written by ``run.log()`` (measurement ``train``). The step is a field, never
# a tag; any other scalar a user logs is written too but is not catalogued.
_JOB = ("run_id", "host", "rank")
SPECS += [
    MetricSpec("train", "step", "gauge", "count", "Training step (global) of this sample.", _JOB, "int"),
    MetricSpec("train", "epoch", "gauge", "count", "Epoch of this sample.", _JOB, "int"),
    MetricSpec("train", "loss", "gauge", "1", "Training loss.", _JOB),
    MetricSpec("train", "lr", "gauge", "1", "Learning rate.", _JOB),
    MetricSpec("train", "samples_per_second", "gauge", "count", "Training throughput in samples per second.", _JOB),
    MetricSpec("train", "tokens_per_second", "gauge", "count", "Training throughput in tokens per second.", _JOB),
    MetricSpec("train", "step_time_seconds", "gauge", "seconds", "Wall time of one training step.", _JOB),
    MetricSpec("train", "grad_norm", "gauge", "1", "Global gradient norm before clipping.", _JOB),
    MetricSpec("train", "eval_loss", "gauge", "1", "Loss on the evaluation set.", _JOB),
]
