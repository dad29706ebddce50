"""Line protocol encoding speed: provscope's encoder against influxdb-client's serializer.

Both encode the same points (tags, mixed float/int/bool/str fields) with native int
encoding (``ints_as_float=False``, the only mode influxdb-client has), and the bytes are
checked to be identical before any figure is printed. The contenders alternate round by
round and each one's best round is kept: on a shared machine the minimum is the least
noisy estimate. ``points_per_s_vs_build_and_serialize`` also counts building
influxdb-client's own Point objects, the work its write path does per point.

Usage: python benchmarks/encode.py [--quick]
"""

from __future__ import annotations

import random
import struct
import sys
import time

import _common
from influxdb_client import Point as ClientPoint
from provscope.exporters.influxdb.lineprotocol import encode_batch

from provscope.records import Point

__all__ = ["make_narrow_points", "make_points"]


def _f32(x: float) -> float:
    # Training scalars come from float32 tensors (.item()): long repr digits.
    return struct.unpack("f", struct.pack("f", x))[0]


def make_points(n: int, seed: int = 1) -> list[Point]:
    """``n`` points shaped like what provscope emits, values as their sources give them.

    One quarter each of ``gpu`` (16 fields), ``cpu`` (15), ``train`` (8) and ``layer`` (13),
    the field sets of ``provscope.catalogue``. NVML reports integer percent, celsius and
    byte counters and milliwatts; psutil one-decimal percents; training and layer
    statistics are float32 tensor values (long repr digits); 1-4 tags per point.
    """
    rnd = random.Random(seed)
    hosts = [f"node-{i:03d}" for i in range(8)]
    runs = [f"0192f7a0-{i:04x}-7000-8000-00000000000{i}" for i in range(4)]
    t0 = 1_795_544_890_000_000_000
    out = []
    pct = lambda: rnd.randrange(1001) / 10  # noqa: E731 - psutil-style 0.1 % steps
    for i in range(n):
        kind = i % 4
        host = hosts[i % len(hosts)]
        t = t0 + i
        if kind == 0:
            fields = {
                "utilization_percent": float(rnd.randrange(101)),
                "memory_utilization_percent": float(rnd.randrange(101)),
                "memory_used_bytes": float(rnd.randrange(1 << 36)),
                "memory_total_bytes": 85899345920.0,
                "power_watts": rnd.randrange(50_000, 700_000) / 1000,
                "energy_joules_total": i * 301.125,
                "temperature_celsius": float(rnd.randrange(30, 90)),
                "sm_clock_hertz": float(rnd.randrange(1000, 1980)) * 1e6,
                "memory_clock_hertz": 2619e6,
                "throttle_reasons": 0,
                "pcie_transmit_bytes_total": float(i * 4096),
                "pcie_receive_bytes_total": float(i * 8192),
                "nvlink_transmit_bytes_total": float(i * 65536),
                "nvlink_receive_bytes_total": float(i * 65536),
                "ecc_corrected_errors_total": 0.0,
                "ecc_uncorrected_errors_total": 0.0,
            }
            out.append(Point("gpu", {"host": host, "gpu": str(i % 8), "gpu_uuid": f"GPU-{i % 8}"},
                             fields, t))
        elif kind == 1:
            fields = {name: pct() for name in (
                "usage_percent", "user_percent", "nice_percent", "system_percent",
                "idle_percent", "iowait_percent", "irq_percent", "softirq_percent",
                "steal_percent", "guest_percent")}
            fields.update(load1=rnd.randrange(800) / 100, load5=rnd.randrange(800) / 100,
                          load15=rnd.randrange(800) / 100, frequency_hertz=2.45e9,
                          logical_cpus=64)
            out.append(Point("cpu", {"host": host}, fields, t))
        elif kind == 2:
            out.append(Point("train", {"host": host, "run_id": runs[i % 4], "rank": str(i % 8)},
                             {"step": i, "epoch": i // 10_000, "loss": _f32(rnd.random() * 3),
                              "lr": _f32(1e-4 * rnd.random()),
                              "samples_per_second": _f32(rnd.random() * 1e3),
                              "tokens_per_second": _f32(rnd.random() * 1e5),
                              "step_time_seconds": _f32(rnd.random()),
                              "grad_norm": _f32(rnd.random() * 5)}, t))
        else:
            out.append(Point("layer", {"host": host, "run_id": runs[i % 4], "rank": "0",
                                       "layer": f"model.layers.{i % 32}.mlp"},
                             {"step": i, "activation_mean": _f32(rnd.gauss(0, 1)),
                              "activation_std": _f32(rnd.random()),
                              "activation_abs_max": _f32(rnd.random() * 10),
                              "activation_zero_fraction": _f32(rnd.random()),
                              "activation_nan_elements": 0, "activation_inf_elements": 0,
                              "forward_seconds": _f32(rnd.random() / 100),
                              "backward_seconds": _f32(rnd.random() / 100),
                              "grad_norm": _f32(rnd.random()),
                              "weight_norm": _f32(rnd.random() * 10),
                              "update_ratio": _f32(rnd.random() / 1000),
                              "memory_allocated_delta_bytes": rnd.randrange(1 << 20)}, t))
    return out


def make_narrow_points(n: int, seed: int = 1) -> list[Point]:
    """``n`` narrow points (2-4 fields, 1-4 tags), like the line protocol reference example
    ``gpu,node=n1,gpu=0 util=93.5,mem_used=1.2e10``: one field set per series type."""
    rnd = random.Random(seed)
    t0 = 1_795_544_890_000_000_000
    out = []
    for i in range(n):
        host = f"node-{i % 8:03d}"
        kind = i % 4
        if kind == 0:
            out.append(Point("gpu", {"host": host, "gpu": str(i % 8)},
                             {"utilization_percent": float(rnd.randrange(101)),
                              "memory_used_bytes": float(rnd.randrange(1 << 36)),
                              "power_watts": rnd.randrange(50_000, 700_000) / 1000}, t0 + i))
        elif kind == 1:
            out.append(Point("cpu", {"host": host}, {"usage_percent": rnd.randrange(1001) / 10,
                                                     "load1": rnd.randrange(800) / 100}, t0 + i))
        elif kind == 2:
            out.append(Point("train", {"host": host, "run_id": "r1", "rank": str(i % 8)},
                             {"loss": rnd.random() * 3, "step": i}, t0 + i))
        else:
            out.append(Point("layer", {"host": host, "run_id": "r1", "rank": "0",
                                       "layer": f"model.layers.{i % 32}.mlp"},
                             {"grad_norm": rnd.random(), "weight_norm": rnd.random() * 10,
                              "step": i}, t0 + i))
    return out


def _client_point(p: Point) -> ClientPoint:
    cp = ClientPoint(p.measurement)
    for k, v in p.tags.items():
        cp.tag(k, v)
    for k, v in p.fields.items():
        cp.field(k, v)
    return cp.time(p.time_ns)


def _client_encode(points: list[Point]) -> bytes:
    # The same work influxdb-client's write path does per point: build its Point, serialize.
    lines = []
    for p in points:
        line = _client_point(p).to_line_protocol()
        if line:
            lines.append(line)
    return "\n".join(lines).encode()


def _client_serialize_only(points: list[ClientPoint]) -> bytes:
    return "\n".join(filter(None, (p.to_line_protocol() for p in points))).encode()


def _timed(fn, arg) -> tuple[float, bytes]:
    t = time.perf_counter()
    out = fn(arg)
    return time.perf_counter() - t, out


def main() -> int:
    args = _common.parser(__doc__.splitlines()[0]).parse_args()
    n = 20_000 if args.quick else 100_000
    rounds = 4 if args.quick else 7
    points = make_points(n)
    client_points = [_client_point(p) for p in points]

    narrow = make_narrow_points(n)
    narrow_client = [_client_point(p) for p in narrow]
    # Rounds alternate between the contenders so that both see the same load on a shared
    # machine; the best round of each is kept.
    ours_s = ser_s = full_s = pol_s = narrow_s = narrow_ref_s = float("inf")
    nb = nref = b""
    ours = ref = ref_full = b""
    for r in range(rounds):
        t, ours = _timed(lambda pts: encode_batch(pts, ints_as_float=False), points)
        ours_s = min(ours_s, t)
        t, ref = _timed(_client_serialize_only, client_points)
        ser_s = min(ser_s, t)
        t, _ = _timed(encode_batch, points)
        pol_s = min(pol_s, t)
        t, nb = _timed(lambda pts: encode_batch(pts, ints_as_float=False), narrow)
        narrow_s = min(narrow_s, t)
        t, nref = _timed(_client_serialize_only, narrow_client)
        narrow_ref_s = min(narrow_ref_s, t)
        if r < 2:
            t, ref_full = _timed(_client_encode, points)
            full_s = min(full_s, t)
    identical = ours == ref == ref_full and nb == nref
    print(f"# {n} points, {len(ours)} bytes, identical bytes: {identical}", file=sys.stderr)
    if not identical:
        print("bytes differ from influxdb-client's; no figures", file=sys.stderr)
        return 1
    _common.emit([
        _common.figure("encode", "points_per_s", n / ours_s, "points/s", "higher",
                       baseline="influxdb-client Point.to_line_protocol",
                       baseline_value=n / ser_s, identical_bytes=identical, points=n),
        _common.figure("encode", "points_per_s_vs_build_and_serialize", n / ours_s, "points/s",
                       "higher", baseline="influxdb-client Point build + to_line_protocol",
                       baseline_value=n / full_s, points=n),
        _common.figure("encode", "points_per_s_narrow", n / narrow_s, "points/s", "higher",
                       baseline="influxdb-client Point.to_line_protocol",
                       baseline_value=n / narrow_ref_s, points=n, fields_per_point="2-3"),
        _common.figure("encode", "points_per_s_ints_as_float", n / pol_s, "points/s", "higher",
                       points=n),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
