"""Metric specs of the node agent's collectors (measurements ``cpu`` ... ``agent``).

One list per collector, gathered in ``SPECS``; ``BY_COLLECTOR`` maps a collector's name to
the measurements it emits, which the contract test and the docs read. Units are base
units; counters end in ``_total`` and stay raw and cumulative (query the rate).
"""

from __future__ import annotations

from provscope.catalogue import MetricSpec

__all__ = ["BY_COLLECTOR", "SPECS"]

_H = ("host",)


def _g(meas: str, field: str, unit: str, help_: str, tags=_H, dtype="float") -> MetricSpec:
    return MetricSpec(meas, field, "gauge", unit, help_, tags, dtype)


def _c(meas: str, field: str, unit: str, help_: str, tags=_H, dtype="float") -> MetricSpec:
    return MetricSpec(meas, field, "counter", unit, help_, tags, dtype)


# -- cpu: whole-node CPU time split by mode (percent of all CPUs over the last interval).
CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest")
CPU = [
    _g("cpu", "usage_percent", "percent", "Share of all CPUs busy (not idle or iowait) over the last interval."),
    *[_g("cpu", f"{mode}_percent", "percent", f"Share of all CPU time spent in {mode} mode over the last interval.")
      for mode in CPU_MODES],
    _g("cpu", "load1", "1", "Run-queue load average over 1 minute."),
    _g("cpu", "load5", "1", "Run-queue load average over 5 minutes."),
    _g("cpu", "load15", "1", "Run-queue load average over 15 minutes."),
    _g("cpu", "frequency_hertz", "hertz", "Mean current CPU clock frequency."),
    _g("cpu", "logical_cpus", "count", "Logical CPUs.", dtype="int"),
]

MEMORY = [
    _g("memory", "total_bytes", "bytes", "Physical memory installed."),
    _g("memory", "used_bytes", "bytes", "Physical memory in use (total minus available)."),
    _g("memory", "available_bytes", "bytes", "Memory available to new processes without swapping."),
    _g("memory", "used_percent", "percent", "Share of physical memory in use."),
    _g("memory", "swap_total_bytes", "bytes", "Swap space configured."),
    _g("memory", "swap_used_bytes", "bytes", "Swap space in use."),
]

_D = ("host", "device")
DISK = [
    _c("disk", "read_bytes_total", "bytes", "Bytes read from the block device.", _D),
    _c("disk", "written_bytes_total", "bytes", "Bytes written to the block device.", _D),
    _c("disk", "reads_total", "count", "Read operations completed.", _D),
    _c("disk", "writes_total", "count", "Write operations completed.", _D),
    _c("disk", "busy_seconds_total", "seconds", "Time the device had I/O in flight (its rate is utilisation).", _D),
]

_N = ("host", "interface")
NET = [
    _c("net", "receive_bytes_total", "bytes", "Bytes received on the interface.", _N),
    _c("net", "transmit_bytes_total", "bytes", "Bytes sent on the interface.", _N),
    _c("net", "receive_packets_total", "count", "Packets received on the interface.", _N),
    _c("net", "transmit_packets_total", "count", "Packets sent on the interface.", _N),
    _c("net", "receive_errors_total", "count", "Receive errors on the interface.", _N),
    _c("net", "transmit_errors_total", "count", "Transmit errors on the interface.", _N),
    _c("net", "receive_drops_total", "count", "Incoming packets dropped on the interface.", _N),
    _c("net", "transmit_drops_total", "count", "Outgoing packets dropped on the interface.", _N),
]

_F = ("host", "path")
FILESYSTEM = [
    _g("filesystem", "total_bytes", "bytes", "Size of the file system holding the path.", _F),
    _g("filesystem", "used_bytes", "bytes", "Bytes used on the file system holding the path.", _F),
    _g("filesystem", "free_bytes", "bytes", "Bytes available to unprivileged users on the file system.", _F),
    _g("filesystem", "used_percent", "percent", "Share of the file system in use.", _F),
]

_P = ("host", "run_id", "rank")
PROCESS = [
    _c("process", "cpu_seconds_total", "seconds", "CPU time (user + system) of the job's process tree, exited children included.", _P),
    _g("process", "rss_bytes", "bytes", "Resident memory of the job's process tree (sum over its live processes).", _P),
    _c("process", "read_bytes_total", "bytes", "Bytes the job's process tree read from storage, exited children included.", _P),
    _c("process", "written_bytes_total", "bytes", "Bytes the job's process tree wrote to storage, exited children included.", _P),
    _g("process", "threads", "count", "Threads in the job's process tree.", _P, "int"),
    _g("process", "open_files", "count", "Open file descriptors in the job's process tree.", _P, "int"),
    _g("process", "processes", "count", "Live processes in the job's tree (DataLoader workers included).", _P, "int"),
]

_G = ("host", "gpu", "gpu_uuid")
GPU = [
    _g("gpu", "up", "1", "1 when the GPU answered this sample, 0 when it is lost or unreachable (NVML_ERROR_GPU_IS_LOST, a failed handle lookup, every getter failing); only the Xid fields are kept then.", _G, "int"),
    _g("gpu", "utilization_percent", "percent", "Time a kernel was running on the GPU over the driver's sample window.", _G),
    _g("gpu", "memory_utilization_percent", "percent", "Time device memory was being read or written over the driver's sample window.", _G),
    _g("gpu", "memory_used_bytes", "bytes", "Device memory in use.", _G),
    _g("gpu", "memory_total_bytes", "bytes", "Device memory installed.", _G),
    _g("gpu", "memory_free_bytes", "bytes", "Device memory free (total minus used minus what the driver reserves).", _G),
    _g("gpu", "power_watts", "watts", "Board power draw.", _G),
    _g("gpu", "power_limit_watts", "watts", "Power limit the driver enforces now (the lowest of all active limits).", _G),
    _c("gpu", "energy_joules_total", "joules", "Energy the board consumed since the driver loaded.", _G),
    _g("gpu", "temperature_celsius", "celsius", "GPU core temperature (AMD: edge sensor, or hotspot/junction where the part has no edge sensor).", _G),
    _g("gpu", "memory_temperature_celsius", "celsius", "Device memory (HBM/VRAM) temperature.", _G),
    _g("gpu", "sm_clock_hertz", "hertz", "Streaming-multiprocessor (graphics) clock.", _G),
    _g("gpu", "memory_clock_hertz", "hertz", "Device memory clock.", _G),
    _g("gpu", "encoder_utilization_percent", "percent", "Video encoder (NVENC) busy time over the driver's sample window.", _G),
    _g("gpu", "decoder_utilization_percent", "percent", "Video decoder (NVDEC) busy time over the driver's sample window.", _G),
    _g("gpu", "throttled", "1", "1 when a reason that slows a busy GPU is active (software power cap, hardware slowdown, software or hardware thermal slowdown, power brake); idle, applications-clocks, display and sync-boost reasons do not count. Alert on this, not on throttle_reasons.", _G, "int"),
    _g("gpu", "throttle_reasons", "1", "Raw NVML clocks event (throttle) reasons bitmask; non-zero on an idle GPU (GpuIdle = 0x1), so do not alert on it: use throttled or the clocks_event_* fields.", _G, "int"),
    _g("gpu", "clocks_event_gpu_idle", "1", "1 while clocks are low because nothing runs (GpuIdle); not throttling.", _G, "int"),
    _g("gpu", "clocks_event_applications_clocks", "1", "1 while clocks are held by an applications-clocks setting; not throttling.", _G, "int"),
    _g("gpu", "clocks_event_sw_power_cap", "1", "1 while the software power cap lowers the clocks (throttling).", _G, "int"),
    _g("gpu", "clocks_event_hw_slowdown", "1", "1 while hardware slowdown (thermal or power brake, factor 2 or more) lowers the clocks (throttling).", _G, "int"),
    _g("gpu", "clocks_event_sync_boost", "1", "1 while clocks are held to the slowest GPU of a sync-boost group; not counted as throttling (that GPU shows its own reason).", _G, "int"),
    _g("gpu", "clocks_event_sw_thermal", "1", "1 while software thermal slowdown lowers the clocks (throttling).", _G, "int"),
    _g("gpu", "clocks_event_hw_thermal", "1", "1 while hardware thermal slowdown lowers the clocks (throttling).", _G, "int"),
    _g("gpu", "clocks_event_hw_power_brake", "1", "1 while the external power brake lowers the clocks (throttling).", _G, "int"),
    _g("gpu", "clocks_event_display_clocks", "1", "1 while clocks are held by a display clock setting; not throttling.", _G, "int"),
    _c("gpu", "power_violation_seconds_total", "seconds", "Time the clocks were held below their target by the power limit (NVML violation time).", _G),
    _c("gpu", "thermal_violation_seconds_total", "seconds", "Time the clocks were held below their target by the thermal limit (NVML violation time).", _G),
    _c("gpu", "pcie_transmit_bytes_total", "bytes", "Bytes the GPU sent over PCIe.", _G),
    _c("gpu", "pcie_receive_bytes_total", "bytes", "Bytes the GPU received over PCIe.", _G),
    _c("gpu", "pcie_replay_errors_total", "count", "PCIe link replays (retransmissions after link errors).", _G),
    _c("gpu", "nvlink_transmit_bytes_total", "bytes", "Data bytes the GPU sent over all NVLinks.", _G),
    _c("gpu", "nvlink_receive_bytes_total", "bytes", "Data bytes the GPU received over all NVLinks.", _G),
    _c("gpu", "nvlink_crc_flit_errors_total", "count", "NVLink flow-control CRC errors, all links.", _G),
    _c("gpu", "nvlink_crc_data_errors_total", "count", "NVLink data CRC errors, all links.", _G),
    _c("gpu", "nvlink_replay_errors_total", "count", "NVLink replay errors, all links.", _G),
    _c("gpu", "nvlink_recovery_errors_total", "count", "NVLink recovery errors, all links.", _G),
    _c("gpu", "ecc_corrected_errors_total", "count", "Corrected device memory ECC errors (aggregate).", _G),
    _c("gpu", "ecc_uncorrected_errors_total", "count", "Uncorrected device memory ECC errors (aggregate).", _G),
    _g("gpu", "remapped_rows_correctable", "count", "Memory rows remapped after correctable errors.", _G),
    _g("gpu", "remapped_rows_uncorrectable", "count", "Memory rows remapped after uncorrectable errors.", _G),
    _g("gpu", "remapped_rows_pending", "1", "1 when a row remapping waits for a GPU reset.", _G, "int"),
    _g("gpu", "remapped_rows_failed", "1", "1 when a row remapping failed (the GPU needs service).", _G, "int"),
    _c("gpu", "xid_errors_total", "count", "Xid (driver-reported GPU fault) events seen since the agent started.", _G),
    _g("gpu", "last_xid", "1", "Code of the last Xid event since the agent started (0: none).", _G, "int"),
    _g("gpu", "gr_engine_active_percent", "percent", "Time any graphics/compute engine was active over the last interval (NVML GPM, Hopper and later).", _G),
    _g("gpu", "sm_active_percent", "percent", "Share of SMs busy over the last interval (NVML GPM, Hopper and later).", _G),
    _g("gpu", "sm_occupancy_percent", "percent", "Resident warps as a share of the SMs' maximum over the last interval (NVML GPM, Hopper and later).", _G),
    _g("gpu", "tensor_active_percent", "percent", "Time the SMs ran tensor-core instructions over the last interval (NVML GPM, Hopper and later).", _G),
    _g("gpu", "dram_active_percent", "percent", "Device memory bandwidth used as a share of its maximum over the last interval (NVML GPM, Hopper and later).", _G),
]

_GM = ("host", "gpu", "gpu_uuid", "mig_uuid", "gpu_instance", "compute_instance")
GPU_MIG = [
    _g("gpu_mig", "memory_used_bytes", "bytes", "Device memory in use in this MIG instance.", _GM),
    _g("gpu_mig", "memory_total_bytes", "bytes", "Device memory of this MIG instance.", _GM),
    _g("gpu_mig", "gr_engine_active_percent", "percent", "Time any graphics/compute engine of this GPU instance was active over the last interval (NVML GPM).", _GM),
    _g("gpu_mig", "sm_active_percent", "percent", "Share of this GPU instance's SMs busy over the last interval (NVML GPM).", _GM),
    _g("gpu_mig", "sm_occupancy_percent", "percent", "Resident warps as a share of this GPU instance's maximum over the last interval (NVML GPM).", _GM),
    _g("gpu_mig", "tensor_active_percent", "percent", "Time this GPU instance's SMs ran tensor-core instructions over the last interval (NVML GPM).", _GM),
    _g("gpu_mig", "dram_active_percent", "percent", "This GPU instance's memory bandwidth used as a share of its maximum over the last interval (NVML GPM).", _GM),
]

_GP = ("host", "gpu", "gpu_uuid", "run_id", "rank")
GPU_PROCESS = [
    _g("gpu_process", "memory_used_bytes", "bytes", "Device memory used by the job's processes on this GPU, per rank.", _GP),
    _g("gpu_process", "processes", "count", "The job's processes holding a context on this GPU, per rank.", _GP, "int"),
]

AGENT = [
    _g("agent", "uptime_seconds", "seconds", "Time since the agent started."),
    _c("agent", "points_collected_total", "points", "Points the agent's collectors produced."),
    _c("agent", "ingest_points_total", "points", "Points received from jobs over the local socket."),
    _c("agent", "ingest_records_total", "count", "Lineage records received from jobs over the local socket."),
    _c("agent", "ingest_frames_total", "count", "Frames received from jobs over the local socket."),
    _c("agent", "ingest_frames_rejected_total", "count", "Frames rejected as malformed, truncated, oversized or not UTF-8."),
    _c("agent", "ingest_points_rejected_total", "points", "Point rows of accepted frames left out because they could not be read (wrong shape, unknown series); the frame's other points are kept."),
    _g("agent", "ingest_connections", "count", "Jobs connected to the local socket now.", dtype="int"),
    _g("agent", "points_per_second", "points", "Points per second handed to the pipeline over the last interval."),
    _c("agent", "collector_errors_total", "count", "Exceptions raised by collectors."),
    _c("agent", "ticks_skipped_total", "count", "Scheduler ticks skipped because sampling ran late."),
    _c("agent", "collect_overruns_total", "count", "Collects of a collector on its own lane (NVML, amdsmi) that ran past their deadline; their points are dropped."),
    _g("agent", "collectors_active", "count", "Collectors sampling now (not disabled or unavailable).", dtype="int"),
]

BY_COLLECTOR: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu",),
    "memory": ("memory",),
    "disk": ("disk",),
    "net": ("net",),
    "filesystem": ("filesystem",),
    "process": ("process",),
    "nvml": ("gpu", "gpu_mig", "gpu_process"),
    "amdsmi": ("gpu", "gpu_process"),
    "health": ("agent", "provscope"),
}

SPECS: list[MetricSpec] = [
    *CPU, *MEMORY, *DISK, *NET, *FILESYSTEM, *PROCESS, *GPU, *GPU_MIG, *GPU_PROCESS, *AGENT,
]
