"""``provscope agent`` (foreground or ``--detach``), ``provscope stop``, ``provscope status``.

The foreground agent runs until SIGTERM or SIGINT, then flushes and exits within
``pipeline.shutdown_timeout_s``. ``--detach`` daemonises (double fork, new session, logs
to ``agent.log`` beside the socket) and returns once the agent listens, printing its
pid. ``stop`` sends SIGTERM to the pid in the agent's pid file and waits for it to exit;
``status`` asks the running agent over its socket.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "agent", help="run the node agent",
        description="Sample CPU, memory, disk, network, GPUs and jobs' process trees; accept "
        "records from local jobs; write to InfluxDB (else the embedded store) and serve "
        "Prometheus /metrics. Foreground unless --detach.")
    p.add_argument("--detach", action="store_true",
                   help="run in the background (logs to agent.log beside the socket)")
    p.add_argument("--interval", type=float, metavar="SECONDS",
                   help="sampling interval (agent.interval_s)")
    p.add_argument("--influx-url", metavar="URL", help="InfluxDB URL (influxdb.url)")
    p.add_argument("--lineage-url", metavar="URL",
                   help="lineage store URL, sqlite:///... or postgresql://... (lineage.url)")
    p.add_argument("--no-prometheus", action="store_true",
                   help="do not serve /metrics (prometheus.enabled=false)")
    p.add_argument("--host", metavar="NAME", help="host name on every series and row (host)")
    p.add_argument("--socket", metavar="PATH", help="local socket path (agent.socket_path)")
    p.set_defaults(handler=run_agent)

    s = sub.add_parser("stop", help="stop the node agent",
                       description="Send SIGTERM to the running agent and wait for it to exit.")
    s.add_argument("--socket", metavar="PATH", help="local socket path (agent.socket_path)")
    s.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the agent to exit (default 30)")
    s.set_defaults(handler=run_stop)

    st = sub.add_parser("status", help="show the node agent's state",
                        description="Ask the running agent for its pid, socket, uptime, "
                        "points/s, drops and per-collector state.")
    st.add_argument("--socket", metavar="PATH", help="local socket path (agent.socket_path)")
    st.add_argument("--json", action="store_true", help="print the raw status as JSON")
    st.set_defaults(handler=run_status)


def _config(args: argparse.Namespace):
    from provscope.commands import load_from_args

    extra: dict[str, object] = {"agent.socket_path": getattr(args, "socket", None)}
    if getattr(args, "interval", None) is not None:
        extra["agent.interval_s"] = args.interval
    extra["influxdb.url"] = getattr(args, "influx_url", None)
    extra["lineage.url"] = getattr(args, "lineage_url", None)
    extra["host"] = getattr(args, "host", None)
    if getattr(args, "no_prometheus", False):
        extra["prometheus.enabled"] = False
    return load_from_args(args, **extra)


def run_agent(args: argparse.Namespace) -> int:
    from provscope.destinations import absolute_paths

    # Relative paths mean the directory the agent was started in, also after --detach
    # (which changes directory to "/").
    config = absolute_paths(_config(args))
    if args.detach:
        return _detach(config)
    return _foreground(config)


def _foreground(config, ready_fd: int | None = None) -> int:
    from provscope.agent.daemon import Agent

    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent = Agent(config)
    try:
        agent.start()
    except Exception as exc:
        if ready_fd is not None:
            os.write(ready_fd, f"err {exc}\n".encode())
            os.close(ready_fd)
        if isinstance(exc, OSError):  # socket or /metrics port: one line, not a traceback
            print(f"provscope: agent cannot start: {exc}", file=sys.stderr)
            return 1
        raise
    if ready_fd is not None:
        os.write(ready_fd, f"ok {os.getpid()}\n".encode())
        os.close(ready_fd)
    else:
        from provscope.destinations import describe

        print(f"provscope agent: pid {os.getpid()}, socket {agent.socket_path}; records go to: "
              f"{describe(agent.where())}", file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    agent.stop()
    return 0


def _detach(config) -> int:
    from provscope.wire import socket_path

    sock = socket_path(config)
    from provscope.safefs import open_private, private_dir

    log_path = sock.with_name("agent.log")
    private_dir(sock.parent)  # refused (one line) when not ours, open to others or a link
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # first child: new session, fork again so the agent is no session leader
        os.close(r)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        code = 1
        try:
            fd = open_private(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir("/")
            root = logging.getLogger()
            for h in root.handlers:
                if isinstance(h, logging.StreamHandler):
                    h.setStream(sys.stderr)
            root.setLevel(min(root.level, logging.INFO) if root.level else logging.INFO)
            code = _foreground(config, ready_fd=w)
        except BaseException as exc:  # the daemon's last words go to its log
            print(f"provscope agent: {exc}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as pipe:
        answer = pipe.readline().strip()
    if answer.startswith("ok "):
        from provscope.destinations import describe, destinations

        print(f"provscope agent started: pid {answer[3:]}, socket {sock}, log {log_path}")
        print(f"records go to: {describe(destinations(config))}")
        return 0
    print(f"provscope: agent did not start: {answer[4:] or 'see ' + str(log_path)}",
          file=sys.stderr)
    return 1


def run_stop(args: argparse.Namespace) -> int:
    from provscope.agent.daemon import read_pid
    from provscope.wire import socket_path

    sock = socket_path(_config(args))
    pid = read_pid(sock)
    if pid is None:
        print(f"provscope: no agent runs here (no pid file beside {sock})", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print(f"provscope: agent pid {pid} is not running (stale pid file)", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not _alive(pid) or read_pid(sock) != pid:
            print(f"provscope agent (pid {pid}) stopped")
            return 0
        time.sleep(0.1)
    print(f"provscope: agent pid {pid} still running after {args.timeout:.0f}s",
          file=sys.stderr)
    return 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def _rejections(exporters: dict) -> str:
    """One line: points and field values each store refused, by reason ("" if none)."""
    out = []
    for name, stats in sorted(exporters.items()):
        points = stats.get("points_rejected_total", 0)
        fields = stats.get("fields_rejected_total", 0)
        if not points and not fields:
            continue
        reasons = ", ".join(
            f"{key[len('rejected_'):-len('_total')]} {value:.0f}"
            for key, value in sorted(stats.items())
            if key.startswith("rejected_") and key.endswith("_total") and value)
        out.append(f"{name}: {points:.0f} points, {fields:.0f} values ({reasons})")
    return "; ".join(out)


def run_status(args: argparse.Namespace) -> int:
    from provscope import wire as framing
    from provscope.wire import request, socket_path

    sock = socket_path(_config(args))
    try:
        status = request(sock, framing.STATUS, None)
    except OSError:
        print(f"provscope: no agent answers on {sock}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(f"agent      pid {status['pid']}, host {status['host']}")
    print(f"socket     {status['socket']}")
    print(f"uptime     {status['uptime_s']:.0f} s")
    print(f"points/s   {status['points_per_s'] or 0:.1f}  (total {status['points_total']:.0f}, "
          f"dropped {status['dropped']:.0f})")
    rejected = _rejections(status.get("exporters") or {})
    if rejected:
        print(f"rejected   {rejected}")
    ing = status.get("ingest", {})
    # The status request is itself a connection; do not count it as a job.
    print(f"jobs       {max(0, ing.get('ingest_connections', 1) - 1)} connected, "
          f"{ing.get('ingest_frames_rejected_total', 0):.0f} frames rejected")
    where = status.get("destinations") or {}
    if where:
        print(f"series     {where.get('time_series', '?')}")
        print(f"lineage    {where.get('lineage', '?')}")
        print(f"spool      {where.get('spool', '?')}")
    if status.get("prometheus"):
        # Fields /metrics leaves out on purpose (docs/agent.md, Prometheus): never silent.
        skipped = (status.get("exporters") or {}).get("prometheus", {}) \
            .get("fields_skipped_total", 0)
        print(f"metrics    {status['prometheus']}  ({skipped:.0f} fields not exposed)")
    print("collectors:")
    for name, c in status.get("collectors", {}).items():
        reason = f"  ({c['reason']})" if c.get("reason") else ""
        lane = ""
        if c.get("overruns"):  # a collector on its own lane (a GPU driver) ran late
            lane = f", {c['overruns']} overruns"
        if c.get("busy_s", 0.0) > c["interval_s"]:
            lane += f", in a collect for {c['busy_s']:.0f}s"
        print(f"  {name:11s} {c['state']:12s} every {c['interval_s']:g}s, "
              f"{c['samples']} samples, {c['errors']} errors{lane}{reason}")
    return 0


