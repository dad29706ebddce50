"""Series written for each default alert rule: one scenario that must fire and at least
one that must stay quiet, used for both rule formats (Prometheus through promtool, the
Grafana rules through InfluxDB).

Time runs over the last ``SPAN_MIN`` minutes, one sample every 15 s, as ``minutes ago``
(``m``): a series' function returns the value at ``m`` minutes before the evaluation, or
None where nothing was written. Measurement, field and tag names are the catalogue's,
exactly what the agent and the jobs write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

SPAN_MIN = 40
STEP_S = 15

GPU = {"host": "n1", "gpu": "0", "gpu_uuid": "GPU-0a1b"}
RUN = {"run_id": "r-0001", "host": "n1", "rank": "0"}
GPU_RUN = {**GPU, "run_id": "r-0001", "rank": "0"}


@dataclass(frozen=True)
class Series:
    """One field of one series; ``value(m)`` at ``m`` minutes ago (None: no sample)."""

    measurement: str
    tags: dict[str, str]
    field: str
    value: Callable[[float], float | None]


@dataclass(frozen=True)
class Scenario:
    rule: str
    name: str
    fires: bool
    series: list[Series]
    #: Tags of the series the alert is about (firing scenarios).
    subject: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.rule}-{self.name}"


def minutes() -> list[float]:
    """Sample times, oldest first, in minutes ago (SPAN_MIN ... 0)."""
    n = SPAN_MIN * 60 // STEP_S
    return [SPAN_MIN - i * STEP_S / 60 for i in range(n + 1)]


def _const(v: float | None) -> Callable[[float], float | None]:
    return lambda m: v


def _recent(m_max: float, hi: float, lo: float | None) -> Callable[[float], float | None]:
    """``hi`` over the last ``m_max`` minutes, ``lo`` before."""
    return lambda m: hi if m <= m_max else lo


def _steps_until(m_stop: float) -> Callable[[float], float | None]:
    """A step number growing every sample while ``m > m_stop`` (then nothing)."""
    return lambda m: (SPAN_MIN - m) * 4 if m > m_stop else None


def _alive_until(m_stop: float) -> Callable[[float], float | None]:
    return lambda m: 2e9 if m >= m_stop else None


def _counter(from_m: float) -> Callable[[float], float | None]:
    """A counter at 5, growing by 10 per sample over the last ``from_m`` minutes."""
    return lambda m: 5.0 + (10.0 * round((from_m - m) * 60 / STEP_S) if m < from_m else 0.0)


def _gpu(field_: str, fn: Callable[[float], float | None]) -> Series:
    return Series("gpu", GPU, field_, fn)


def _job_on_gpu(fn: Callable[[float], float | None]) -> list[Series]:
    return [Series("gpu_process", GPU_RUN, "memory_used_bytes", fn),
            Series("gpu_process", GPU_RUN, "processes", lambda m: 1.0 if fn(m) else None)]


AGENT = {"host": "n1", "component": "influxdb"}

SCENARIOS: list[Scenario] = [
    # GPU temperature > 85 C for 5m: 90 C for 8 minutes fires; for 3 minutes does not.
    Scenario("gpu_temperature_high", "hot_8m", True,
             [_gpu("temperature_celsius", _recent(8, 90.0, 70.0))], GPU),
    Scenario("gpu_temperature_high", "hot_3m", False,
             [_gpu("temperature_celsius", _recent(3, 90.0, 70.0))]),
    # GPU memory > 95 % of the device for 5m.
    Scenario("gpu_memory_high", "97pct_8m", True,
             [_gpu("memory_used_bytes", _recent(8, 77.6e9, 40e9)),
              _gpu("memory_total_bytes", _const(80e9))], GPU),
    Scenario("gpu_memory_high", "80pct", False,
             [_gpu("memory_used_bytes", _const(64e9)), _gpu("memory_total_bytes", _const(80e9))]),
    # GPU idle < 10 % for 10m while a job holds it.
    Scenario("gpu_idle", "idle_with_job", True,
             [_gpu("utilization_percent", _const(2.0)), *_job_on_gpu(_alive_until(0))], GPU),
    Scenario("gpu_idle", "idle_no_job", False, [_gpu("utilization_percent", _const(2.0))]),
    Scenario("gpu_idle", "idle_job_ended", False,
             [_gpu("utilization_percent", _const(2.0)), *_job_on_gpu(_alive_until(10))]),
    Scenario("gpu_idle", "busy_with_job", False,
             [_gpu("utilization_percent", _const(85.0)), *_job_on_gpu(_alive_until(0))]),
    # Host memory > 90 % for 2m.
    Scenario("host_memory_high", "95pct_6m", True,
             [Series("memory", {"host": "n1"}, "used_percent", _recent(6, 95.0, 60.0))],
             {"host": "n1"}),
    Scenario("host_memory_high", "95pct_1m", False,
             [Series("memory", {"host": "n1"}, "used_percent", _recent(1, 95.0, 60.0))]),
    # Filesystem > 90 % for 5m.
    Scenario("filesystem_full", "95pct", True,
             [Series("filesystem", {"host": "n1", "path": "/data"}, "used_percent",
                     _recent(10, 95.0, 80.0))], {"host": "n1", "path": "/data"}),
    Scenario("filesystem_full", "50pct", False,
             [Series("filesystem", {"host": "n1", "path": "/data"}, "used_percent",
                     _const(50.0))]),
    # Loss NaN/Inf in the last minute (the job writes loss_nonfinite with every loss).
    Scenario("loss_nonfinite", "nan_now", True,
             [Series("train", RUN, "step", _steps_until(-1)),
              Series("train", RUN, "loss_nonfinite", _recent(2, 1.0, 0.0))], RUN),
    Scenario("loss_nonfinite", "finite", False,
             [Series("train", RUN, "step", _steps_until(-1)),
              Series("train", RUN, "loss_nonfinite", _const(0.0))]),
    # No training step for 5m while the run's processes are alive.
    Scenario("training_stalled", "stalled_12m", True,
             [Series("train", RUN, "step", _steps_until(12)),
              Series("process", RUN, "rss_bytes", _alive_until(0))], RUN),
    Scenario("training_stalled", "stepping", False,
             [Series("train", RUN, "step", _steps_until(-1)),
              Series("process", RUN, "rss_bytes", _alive_until(0))]),
    Scenario("training_stalled", "finished", False,
             [Series("train", RUN, "step", _steps_until(12)),
              Series("process", RUN, "rss_bytes", _alive_until(12))]),
    Scenario("training_stalled", "never_stepped", False,
             [Series("process", RUN, "rss_bytes", _alive_until(0))]),
    # An agent dropping points: the counter grew in the last minutes.
    Scenario("points_dropped", "dropping", True,
             [Series("provscope", AGENT, "points_dropped_total", _counter(3))], AGENT),
    Scenario("points_dropped", "flat", False,
             [Series("provscope", {"host": "n1", "component": "influxdb"},
                     "points_dropped_total", _const(5.0))]),
    # An agent spooling for 2m.
    Scenario("spooling", "spooling_5m", True,
             [Series("provscope", AGENT, "spool_bytes", _recent(5, 1e6, 0.0))], AGENT),
    Scenario("spooling", "empty", False,
             [Series("provscope", {"host": "n1", "component": "influxdb"}, "spool_bytes",
                     _const(0.0))]),
]
