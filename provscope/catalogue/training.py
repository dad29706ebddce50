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
    MetricSpec("train", "loss_nonfinite", "gauge", "1", "1 when the step's loss was NaN or infinite, else 0 (written with every loss; line protocol cannot carry NaN or Inf, so the loss itself is left out of InfluxDB then).", _JOB),
    MetricSpec("train", "lr", "gauge", "1", "Learning rate.", _JOB),
    MetricSpec("train", "samples_per_second", "gauge", "count", "Training throughput in samples per second.", _JOB),
    MetricSpec("train", "tokens_per_second", "gauge", "count", "Training throughput in tokens per second.", _JOB),
    MetricSpec("train", "step_time_seconds", "gauge", "seconds", "Time of one training step: wall time on the CPU; on a GPU the device time between the step ends (CUDA events), from the step's first forward after a sampled step.", _JOB),
    MetricSpec("train", "optimizer_step_skipped", "gauge", "1", "1 when the step's optimizer step was skipped (a GradScaler found Inf/NaN gradients), else 0; written when watch() is given scaler=.", _JOB),
    MetricSpec("train", "grad_norm", "gauge", "1", "Global gradient norm before clipping.", _JOB),
    MetricSpec("train", "eval_loss", "gauge", "1", "Loss on the evaluation set.", _JOB),
]

# Layer statistics written by ``provscope.watch`` every N steps (measurement ``layer``, one
# point per watched module; ``layer_param``: one per parameter tensor when per_param=True).
_LAYER = ("run_id", "host", "rank", "layer", "module_type")
_PARAM = (*_LAYER, "param")
SPECS += [
    MetricSpec("layer", "step", "gauge", "count", "Training step the layer statistics were taken at.", _LAYER, "int"),
    MetricSpec("layer", "activation_mean", "gauge", "1", "Mean of the layer's forward output (first tensor).", _LAYER),
    MetricSpec("layer", "activation_std", "gauge", "1", "Population standard deviation of the layer's forward output.", _LAYER),
    MetricSpec("layer", "activation_abs_max", "gauge", "1", "Largest absolute value in the layer's forward output.", _LAYER),
    MetricSpec("layer", "activation_zero_fraction", "gauge", "ratio", "Fraction of exact zeros in the layer's forward output (dead units).", _LAYER),
    MetricSpec("layer", "activation_nan_elements", "gauge", "count", "NaN values in the layer's forward output.", _LAYER, "int"),
    MetricSpec("layer", "activation_inf_elements", "gauge", "count", "Infinite values in the layer's forward output.", _LAYER, "int"),
    MetricSpec("layer", "forward_seconds", "gauge", "seconds", "Forward time of the layer in the sampled step (all calls summed).", _LAYER),
    MetricSpec("layer", "backward_seconds", "gauge", "seconds", "Backward time of the layer: output gradient ready to input gradient ready.", _LAYER),
    MetricSpec("layer", "grad_norm", "gauge", "1", "L2 norm of the gradients of the layer's own parameters.", _LAYER),
    MetricSpec("layer", "weight_norm", "gauge", "1", "L2 norm of the layer's own trainable floating-point parameters after the step (under FSDP or tensor parallelism: of this rank's shard).", _LAYER),
    MetricSpec("layer", "update_ratio", "gauge", "ratio", "||W_after - W_before|| / ||W_after|| around the optimizer step (the relative size of the update).", _LAYER),
    MetricSpec("layer", "memory_allocated_delta_bytes", "gauge", "bytes", "CUDA memory allocated during the layer's forward (can be negative).", _LAYER, "int"),
    MetricSpec("layer_param", "step", "gauge", "count", "Training step of the parameter statistics.", _PARAM, "int"),
    MetricSpec("layer_param", "grad_norm", "gauge", "1", "L2 norm of one parameter tensor's gradient.", _PARAM),
    MetricSpec("layer_param", "weight_norm", "gauge", "1", "L2 norm of one parameter tensor.", _PARAM),
    MetricSpec("layer_param", "update_ratio", "gauge", "ratio", "||W_after - W_before|| / ||W_after|| of one parameter tensor.", _PARAM),
]
