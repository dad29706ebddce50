"""Nodes & GPUs: per host and GPU utilisation, memory, power, energy, temperature,
clocks, throttling, PCIe/NVLink and errors; the host's CPU, memory, disk and network
rates and file systems; the job's process tree (CPU, RSS, I/O) per run and rank.

Sources: the agent's (or the in-job telemetry's) measurements ``gpu``, ``gpu_mig``,
``gpu_process``, ``cpu``, ``memory``, ``disk``, ``net``, ``filesystem``, ``process``.
Counters are drawn as rates through ``non_negative_derivative``. Every GPU panel draws
one series per host and GPU, so it reads the same with one GPU or eight.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import statetimeline as st
from grafana_foundation_sdk.builders import table as table_b
from grafana_foundation_sdk.builders.dashboard import Dashboard, Row
from grafana_foundation_sdk.builders.timeseries import Panel
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import GridPos
from provscope.dashboards import panels
from provscope.dashboards.base import dashboard
from provscope.dashboards.links import NODES
from provscope.dashboards.queries import INFLUXDB, InfluxQL, InfluxTarget, ident, matches
from provscope.dashboards.templating import (
    host_from_influx,
    rank_from_influx,
    run_variable,
    tag_variable,
    task_annotation,
)

__all__ = ["build"]

HOST = (matches("host", "host"),)
GPU = (*HOST, matches("gpu", "gpu"))
JOB = (matches("run_id", "run"), *HOST, matches("rank", "rank"))
GPU_BY = ("host", "gpu")
GPU_ALIAS = "$tag_host gpu $tag_gpu"
JOB_BY = ("run_id", "host", "rank")
JOB_ALIAS = "$tag_host rank $tag_rank ($tag_run_id)"


def _gpu(field: str, **kw) -> Panel:
    return panels.metric("gpu", field, where=GPU, by=GPU_BY, alias=GPU_ALIAS, **kw)


def _gpu_fields(title: str, names: tuple[str, ...], **kw) -> Panel:
    return panels.fields(title, "gpu", names, where=GPU, by=GPU_BY,
                         alias=f"{GPU_ALIAS} $col", **kw)


def _memory_share() -> Panel:
    used = panels.spec("gpu", "memory_used_bytes")
    q = InfluxQL("gpu", ('mean("memory_used_bytes") / mean("memory_total_bytes") * 100 '
                         'AS "Memory used"',), GPU, GPU_BY)
    return panels.timeseries(
        "GPU memory used %", f"{used.help} As a share of the memory installed.", "percent",
        [InfluxTarget(q, alias=GPU_ALIAS)], min_=0, max_=100)


def _energy() -> stat_b.Panel:
    s = panels.spec("gpu", "energy_joules_total")
    q = InfluxQL("gpu", (f'spread({ident(s.field)}) AS "Energy"',), GPU, GPU_BY,
                 interval=False)
    return panels.stat("GPU energy in range", f"{s.help} Consumed over the time range.",
                       panels.unit(s), [InfluxTarget(q, alias=GPU_ALIAS)], w=12, h=8,
                       calc="lastNotNull")


def _throttled() -> st.Panel:
    s = panels.spec("gpu", "throttled")
    q = InfluxQL("gpu", (f"max({ident(s.field)})",), GPU, GPU_BY)
    return (st.Panel().title("GPU throttled").description(s.help).datasource(INFLUXDB)
            .thresholds(panels.thresholds((1, "red"))).merge_values(True)
            .show_value(common.VisibilityMode.NEVER)
            .with_target(InfluxTarget(q, alias=GPU_ALIAS))
            .grid_pos(GridPos(h=8, w=12, x=0, y=0)))


def _errors() -> table_b.Panel:
    names = ("xid_errors_total", "ecc_uncorrected_errors_total", "pcie_replay_errors_total",
             "remapped_rows_pending", "remapped_rows_failed")
    specs = [panels.spec("gpu", n) for n in names]
    q = InfluxQL("gpu", tuple(f"last({ident(s.field)}) AS {ident(panels.title(s))}"
                              for s in specs), GPU, GPU_BY, interval=False)
    return panels.table(
        "GPU errors", " ".join(f"{panels.title(s)}: {s.help}" for s in specs),
        [InfluxTarget(q, result_format="table")], datasource=INFLUXDB, w=12, h=8)


def _process_cpu() -> Panel:
    s = panels.spec("process", "cpu_seconds_total")
    q = InfluxQL("process", (panels.select(s, rate=True, name="CPU"),), JOB, JOB_BY)
    return panels.timeseries(
        "Job CPU (cores)", f"{s.help} Shown as CPU seconds per second: cores kept busy.",
        "short", [InfluxTarget(q, alias=JOB_ALIAS)], min_=0)


def build() -> Dashboard:
    """The Nodes & GPUs dashboard (uid ``provscope-nodes``)."""
    return (
        dashboard(NODES, "provscope / Nodes & GPUs",
                  "GPU and host telemetry per node, and the job's process tree.")
        .with_variable(run_variable())
        .with_variable(host_from_influx("cpu", by_run=False))
        .with_variable(rank_from_influx("process"))
        .with_variable(tag_variable("gpu", "GPU", "gpu", "gpu", where=HOST, numeric=True))
        .annotation(task_annotation())
        .with_row(Row("GPUs"))
        .with_panel(_gpu("utilization_percent", title_="GPU utilisation", min_=0, max_=100))
        .with_panel(_memory_share())
        .with_panel(_gpu_fields("GPU memory", ("memory_used_bytes", "memory_total_bytes"),
                                min_=0))
        .with_panel(panels.metric("gpu_process", "memory_used_bytes",
                                  where=(*JOB, matches("gpu", "gpu")),
                                  by=(*JOB_BY, "gpu"), alias=f"{JOB_ALIAS} gpu $tag_gpu",
                                  title_="GPU memory of the job", min_=0))
        .with_panel(_gpu_fields("GPU power", ("power_watts", "power_limit_watts"), min_=0))
        .with_panel(_energy())
        .with_panel(_gpu_fields("GPU temperature",
                                ("temperature_celsius", "memory_temperature_celsius")))
        .with_panel(_gpu_fields("GPU clocks", ("sm_clock_hertz", "memory_clock_hertz"),
                                min_=0))
        .with_panel(_throttled())
        .with_panel(_gpu_fields("Clocks held back (share of time)",
                                ("power_violation_seconds_total",
                                 "thermal_violation_seconds_total"), max_=1))
        .with_panel(_gpu_fields("PCIe", ("pcie_transmit_bytes_total",
                                         "pcie_receive_bytes_total")))
        .with_panel(_gpu_fields("NVLink", ("nvlink_transmit_bytes_total",
                                           "nvlink_receive_bytes_total")))
        .with_panel(_gpu_fields("SM and tensor activity (GPM)",
                                ("sm_active_percent", "tensor_active_percent",
                                 "dram_active_percent"), min_=0, max_=100))
        .with_panel(_errors())
        .with_panel(panels.metric("gpu_mig", "memory_used_bytes", where=GPU,
                                  by=(*GPU_BY, "mig_uuid"),
                                  alias=f"{GPU_ALIAS} $tag_mig_uuid",
                                  title_="MIG instance memory used", min_=0, w=24, h=6))
        .with_row(Row("Host"))
        .with_panel(panels.metric("cpu", "usage_percent", where=HOST, by=("host",),
                                  alias="$tag_host", title_="CPU busy", min_=0, max_=100))
        .with_panel(panels.fields("CPU time by mode", "cpu",
                                  ("user_percent", "system_percent", "iowait_percent",
                                   "steal_percent"), where=HOST, by=("host",),
                                  alias="$tag_host $col", min_=0, stack=True))
        .with_panel(panels.fields("Load", "cpu", ("load1", "load5", "load15"), where=HOST,
                                  by=("host",), alias="$tag_host $col", min_=0))
        .with_panel(panels.metric("memory", "used_percent", where=HOST, by=("host",),
                                  alias="$tag_host", title_="Memory used", min_=0, max_=100))
        .with_panel(panels.fields("Disk throughput", "disk",
                                  ("read_bytes_total", "written_bytes_total"), where=HOST,
                                  by=("host", "device"), alias="$tag_host $tag_device $col"))
        .with_panel(panels.metric("disk", "busy_seconds_total", where=HOST,
                                  by=("host", "device"), alias="$tag_host $tag_device",
                                  title_="Disk busy", max_=1))
        .with_panel(panels.fields("Network", "net",
                                  ("receive_bytes_total", "transmit_bytes_total"),
                                  where=HOST, by=("host", "interface"),
                                  alias="$tag_host $tag_interface $col"))
        .with_panel(panels.metric("filesystem", "used_percent", where=HOST,
                                  by=("host", "path"), alias="$tag_host $tag_path",
                                  agg="last", title_="File system used", min_=0, max_=100))
        .with_row(Row("Job processes"))
        .with_panel(_process_cpu())
        .with_panel(panels.metric("process", "rss_bytes", where=JOB, by=JOB_BY,
                                  alias=JOB_ALIAS, title_="Job resident memory", min_=0))
        .with_panel(panels.fields("Job storage I/O", "process",
                                  ("read_bytes_total", "written_bytes_total"), where=JOB,
                                  by=JOB_BY, alias=f"{JOB_ALIAS} $col"))
        .with_panel(panels.fields("Job processes and threads", "process",
                                  ("processes", "threads", "open_files"), where=JOB,
                                  by=JOB_BY, alias=f"{JOB_ALIAS} $col", agg="last", min_=0))
    )
