"""GPU performance metrics (GPM, Hopper and later) through NVML: SM activity, occupancy,
tensor-core and DRAM activity, the figures dcgm-exporter reads as ``DCGM_FI_PROF_*``.

GPM works on two samples: ``nvmlGpmSampleGet`` copies the device's counters into a
sample buffer, ``nvmlGpmMetricsGet`` computes each metric over the time between two
buffers. A ``GpmSampler`` keeps two buffers per device (or per MIG GPU instance, through
``nvmlGpmMigSampleGet``) and swaps them, so each ``read`` returns the metrics over the
last collect interval; the first read only primes. Buffers are allocated once and freed
in ``close``.
"""

from __future__ import annotations

import contextlib
from typing import Any

from provscope.agent.collectors.nvml_util import nvml_const

__all__ = ["GPM_METRICS", "GpmSampler", "gpm_supported"]

# (our field, NVML_GPM_METRIC_* name); values are percent (0.0 - 100.0).
GPM_METRICS = (
    ("gr_engine_active_percent", "NVML_GPM_METRIC_GRAPHICS_UTIL"),
    ("sm_active_percent", "NVML_GPM_METRIC_SM_UTIL"),
    ("sm_occupancy_percent", "NVML_GPM_METRIC_SM_OCCUPANCY"),
    ("tensor_active_percent", "NVML_GPM_METRIC_ANY_TENSOR_UTIL"),
    ("dram_active_percent", "NVML_GPM_METRIC_DRAM_BW_UTIL"),
)


def gpm_supported(nv: Any, handle: Any) -> bool:
    """Whether this pynvml has the GPM calls and the device supports them.

    Raises:
        whatever ``nvmlGpmQueryDeviceSupport`` raises (the caller classifies it).
    """
    if not all(hasattr(nv, n) for n in ("nvmlGpmQueryDeviceSupport", "nvmlGpmSampleAlloc",
                                        "nvmlGpmSampleGet", "nvmlGpmMetricsGet",
                                        "c_nvmlGpmMetricsGet_t")):
        return False
    return bool(nv.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice)


class GpmSampler:
    """Two GPM sample buffers of one device or one MIG GPU instance.

    Args:
        nv: the pynvml module.
        handle: the (parent) device handle.
        metrics: (field, NVML_GPM_METRIC_* name) pairs; names this pynvml lacks are skipped.
        gpu_instance_id: sample this MIG GPU instance (``nvmlGpmMigSampleGet``); None:
            the whole device.
    """

    def __init__(self, nv: Any, handle: Any, metrics: tuple[tuple[str, str], ...] = GPM_METRICS,
                 gpu_instance_id: int | None = None) -> None:
        self._nv = nv
        self._handle = handle
        self._gi = gpu_instance_id
        self._metrics = [(ours, mid) for ours, name in metrics
                         if (mid := nvml_const(nv, name)) is not None]
        self._bufs: list[Any] = []
        self._primed = False

    def read(self) -> dict[str, float]:
        """Take a sample; the metrics since the previous one ({} on the first call).

        Raises:
            NVML errors of the sample or metrics calls (the caller classifies them).
        """
        nv = self._nv
        if not self._bufs:
            self._bufs = [nv.nvmlGpmSampleAlloc(), nv.nvmlGpmSampleAlloc()]
        older, newer = self._bufs
        if self._gi is None:
            nv.nvmlGpmSampleGet(self._handle, newer)
        else:
            nv.nvmlGpmMigSampleGet(self._handle, self._gi, newer)
        if not self._primed:
            self._primed = True
            self._bufs = [newer, older]
            return {}
        req = nv.c_nvmlGpmMetricsGet_t()
        req.version = nvml_const(nv, "NVML_GPM_METRICS_GET_VERSION", 1)
        req.numMetrics = len(self._metrics)
        req.sample1 = older
        req.sample2 = newer
        for i, (_, metric_id) in enumerate(self._metrics):
            req.metrics[i].metricId = metric_id
        nv.nvmlGpmMetricsGet(req)
        self._bufs = [newer, older]  # the newer sample is the baseline of the next read
        out: dict[str, float] = {}
        for i, (ours, _) in enumerate(self._metrics):
            m = req.metrics[i]
            if int(m.nvmlReturn) == 0:
                out[ours] = float(m.value)
        return out

    def close(self) -> None:
        """Free the sample buffers (errors ignored: the library may be shutting down)."""
        for buf in self._bufs:
            with contextlib.suppress(Exception):  # nothing left to do with it
                self._nv.nvmlGpmSampleFree(buf)
        self._bufs = []
        self._primed = False
