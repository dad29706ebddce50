"""``provscope run [--name N] -- CMD ...``: run a command as a recorded task of a new run.

If no agent listens on this node, one is started inside this process for the
command's lifetime (its threads; it stops when the command ends). The run id follows the
one rule of ``provscope.job.identity`` (``PROVSCOPE_RUN_ID`` already set, else the
launcher's job, e.g. a SLURM step started on N nodes, else a new UUIDv7), so one
``provscope run`` per node under one launcher job makes one run, each node's command its
own task. The run gets a run record whose name (the program name, or ``--name``) is a
placeholder the job's own ``workflow(name, config=...)`` replaces (``origin``
``launcher``), and a task record of kind ``command`` (command line, working directory,
start). CMD runs with ``PROVSCOPE_RUN_ID``, ``PROVSCOPE_PARENT_TASK_ID`` and
the agent's socket path (``PROVSCOPE_AGENT_SOCKET_PATH``) in its environment, so the
job's own records join the run through the same agent; the agent watches CMD's process
tree and the working directory's file system. At exit the task gets the exit code,
duration and a resource summary (CPU seconds, peak RSS, bytes read and written), and
``provscope run`` exits with CMD's code (128 + N when a signal N killed it). SIGINT and
SIGTERM are forwarded to CMD. The run and task end ``finished`` (exit code 0),
``interrupted`` (Ctrl-C: SIGINT, or exit code 130), ``killed`` (SIGTERM/SIGKILL, or exit
code 143/137) or ``failed``.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import resource

    from provscope.agent.daemon import Agent
    from provscope.exporters.pipeline import Pipeline
    from provscope.job.agent_client import AgentClient

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a command as a recorded task (starts an agent if none runs)",
        description="Run CMD inside a new provscope run: its process tree is sampled, its "
        "records join the run, and its exit code, duration and resource use are recorded.",
        usage="provscope run [--name NAME] [options] -- CMD [ARG ...]")
    p.add_argument("--name", help="run name when the job does not name it with "
                   "provscope.workflow() (default: the command's program name)")
    p.add_argument("--influx-url", metavar="URL", help="InfluxDB URL for a started agent")
    p.add_argument("--lineage-url", metavar="URL", help="lineage store URL for a started agent")
    p.add_argument("--host", metavar="NAME", help="host name (host)")
    p.add_argument("--socket", metavar="PATH", help="agent socket (agent.socket_path)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from provscope import env
    from provscope import wire as framing
    from provscope.agent.collectors.process import ProcessTree
    from provscope.agent.daemon import Agent, AgentAlreadyRunning
    from provscope.commands import load_lenient
    from provscope.errors import ProvscopeError
    from provscope.ids import new_id
    from provscope.job import identity
    from provscope.job.agent_client import AgentClient
    from provscope.records import RunRecord, TaskRecord
    from provscope.redact import mask_argv
    from provscope.wire import request, socket_path

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("provscope: run needs a command after --, e.g. provscope run -- python train.py",
              file=sys.stderr)
        return 2
    # The command always runs: a bad setting is one warning line and keeps its default
    # (as in a job), and no usable store means the run's records are counted and dropped.
    config = load_lenient(args, _warn, **{
        "agent.socket_path": args.socket, "influxdb.url": args.influx_url,
        "lineage.url": args.lineage_url, "host": args.host})
    sock = socket_path(config)
    agent = None
    client: AgentClient | Pipeline | _Nowhere | None = AgentClient.try_connect(config)
    if client is None:
        try:
            agent = Agent(config).start()  # lives as long as the command
        except AgentAlreadyRunning:
            pass  # another one started just now: use it
        except (OSError, ProvscopeError) as exc:
            # Monitoring never stops the command: without an agent, the run's own records
            # go straight to the stores; node and process telemetry are missing.
            _warn(f"no agent ({exc}); running without node telemetry")
            client = _own_pipeline(config)
        if client is None:
            client = AgentClient.try_connect(config)
        if client is None:  # an agent listened a moment ago and is gone: run anyway
            if agent is not None:
                agent.stop()
                agent = None
            _warn(f"cannot connect to the agent at {sock}; the command runs unrecorded")
            client = _Nowhere()
    host = config.host_name
    run_id = identity.resolve().run_id
    task_id = new_id()
    name = args.name or os.path.basename(cmd[0])
    cwd = os.getcwd()
    # Values of secret-looking options and KEY=VALUE words are recorded as *** (redact.names).
    recorded = mask_argv(cmd, config.redact.names)
    command = shlex.join(recorded)
    start_ns = time.time_ns()
    client.submit(RunRecord(run_id, name=name, host=host, start_ns=start_ns, status="running",
                            command=command, user=_user(), origin="launcher"))
    child_env = dict(os.environ)
    child_env[env.RUN_ID] = run_id
    child_env[env.PARENT_TASK_ID] = task_id
    # The job must find the same agent and name the same host, however they were chosen.
    child_env["PROVSCOPE_AGENT_SOCKET_PATH"] = str(sock)
    if config.host:
        child_env["PROVSCOPE_HOST"] = config.host
    try:
        proc = subprocess.Popen(cmd, env=child_env)
    except OSError as exc:
        client.submit(TaskRecord(task_id, run_id, name=name, task_kind="command", host=host,
                                 pid=os.getpid(), start_ns=start_ns, end_ns=time.time_ns(),
                                 status="failed", error=str(exc),
                                 params={"argv": recorded, "cwd": cwd}))
        client.submit(RunRecord(run_id, end_ns=time.time_ns(), status="failed",
                                origin="launcher"))
        _finish(client, agent)
        print(f"provscope: cannot run {cmd[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        return 127
    client.submit(TaskRecord(task_id, run_id, name=name, task_kind="command", host=host,
                             pid=proc.pid, start_ns=start_ns, status="running",
                             params={"argv": recorded, "cwd": cwd}))
    # If the agent went away, the command runs on regardless.
    with contextlib.suppress(OSError):
        request(sock, framing.WATCH, {"pid": proc.pid, "run_id": run_id, "rank": None,
                                      "paths": [cwd]})

    interrupted: list[int] = []

    def forward(signum, frame) -> None:
        if signum == signal.SIGINT:
            interrupted.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    tree = ProcessTree(proc.pid)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            with contextlib.suppress(Exception):
                tree.sample()

    tree.sample()
    sampler = threading.Thread(target=sample, name="provscope-run-sample", daemon=True)
    sampler.start()
    rc, usage = _wait(proc)
    done.set()
    sampler.join(2.0)
    for s, h in old.items():
        signal.signal(s, h)
    end_ns = time.time_ns()
    resources = tree.summary()
    if usage is not None:
        resources["cpu_seconds"] = max(resources["cpu_seconds"],
                                       usage.ru_utime + usage.ru_stime)
        resources["peak_rss_bytes"] = max(resources["peak_rss_bytes"],
                                          float(usage.ru_maxrss) * 1024.0)
    code = rc if rc >= 0 else 128 - rc
    status = _status(rc, bool(interrupted))
    client.submit(TaskRecord(task_id, run_id, end_ns=end_ns, status=status,
                             result={"exit_code": code, "duration_s": (end_ns - start_ns) / 1e9},
                             resources=resources))
    client.submit(RunRecord(run_id, end_ns=end_ns, status=status, origin="launcher"))
    _finish(client, agent)
    return code


def _status(rc: int, sigint: bool) -> str:
    """The run status of a command's return code (negative: killed by that signal)."""
    if rc == 0:
        return "finished"
    if sigint or rc in (-signal.SIGINT, 128 + signal.SIGINT):
        return "interrupted"
    if rc in (-signal.SIGTERM, -signal.SIGKILL, 128 + signal.SIGTERM, 128 + signal.SIGKILL):
        return "killed"
    return "failed"


def _wait(proc: subprocess.Popen) -> tuple[int, resource.struct_rusage | None]:
    """Wait for the child, returning (returncode, rusage of it and its reaped children)."""
    while True:
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
        except ChildProcessError:
            return proc.wait(), None
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    return rc, usage


def _warn(line: str) -> None:
    print(f"provscope: {line}", file=sys.stderr)


class _Nowhere:
    """The run's records when no store can take them: counted, then one line at exit."""

    def __init__(self) -> None:
        self.dropped = 0

    def submit(self, record: object) -> bool:
        self.dropped += 1
        return False

    def shutdown(self, timeout_s: float | None = None) -> None:
        if self.dropped:
            _warn(f"{self.dropped} records of this run were dropped: no store could be used")


def _own_pipeline(config):  # -> Pipeline | _Nowhere
    """The run's own pipeline to its stores; a store that cannot be used (a bad URL, a
    missing driver) is one warning line and the records are counted as dropped."""
    from provscope.errors import ProvscopeError
    from provscope.exporters.pipeline import Pipeline

    try:
        return Pipeline.from_config(config)
    except (OSError, ProvscopeError) as exc:
        _warn(f"cannot write this run's records ({exc}); the command runs unrecorded")
        return _Nowhere()


def _finish(client: AgentClient | Pipeline | _Nowhere, agent: Agent | None) -> None:
    client.shutdown(10.0)
    if agent is not None:
        agent.stop()


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:
        return None
