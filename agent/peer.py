"""Who is on the other end of the socket: the peer's PID as the agent sees it.

A job in a container has its own PID namespace: the PID it puts in its HELLO frame
(``os.getpid()``, often 1 or 7) means nothing to an agent on the host, whose process
collector and NVML (which reports host PIDs) see another number. The kernel knows both:
``SO_PEERCRED`` on a Unix socket gives the peer's PID translated into the *receiver's*
namespace, and ``/proc/<pid>/status`` lists a process's PID in every namespace from the
reader's down to its own (``NSpid:``). So:

- HELLO (the sender speaks of itself): the peer's PID when it lives in another namespace,
  the claimed one otherwise (unchanged behaviour on a plain host);
- WATCH (``provscope run`` registers the command it started): in another namespace, the
  descendant of the peer whose innermost PID is the claimed one; None when there is none
  (never a stranger's process that happens to have that number on the host).
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Literal

from provscope.agent.collectors.process import children_map

__all__ = ["agent_pid", "ns_pids", "peer_pid"]

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def peer_pid(conn: socket.socket) -> int | None:
    """The connected peer's PID in this process's namespace (``SO_PEERCRED``); None where
    the platform has no such option (not Linux) or the peer is gone."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    try:
        pid, _, _ = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, opt, _UCRED.size))
    except (OSError, struct.error):
        return None
    return pid or None


def ns_pids(pid: int, procfs: str | os.PathLike[str] = "/proc") -> list[int] | None:
    """``NSpid`` of ``pid``: its PID from the procfs's namespace down to its own (one
    entry: same namespace as the agent). None when unreadable (gone, or a kernel before
    4.1 without the line)."""
    try:
        with open(os.path.join(procfs, str(pid), "status"), encoding="ascii",
                  errors="replace") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except (OSError, ValueError):
        return None
    return None


def agent_pid(peer: int | None, claimed: int, kind: Literal["hello", "watch"],
              procfs: str | os.PathLike[str] = "/proc") -> int | None:
    """The PID to watch for a frame's ``claimed`` PID sent by ``peer`` (rules above).

    Returns the claimed PID when the peer is unknown or in the agent's namespace; None
    for a WATCH whose process cannot be found in the peer's namespace.
    """
    if peer is None or peer == claimed:
        return claimed
    mine = ns_pids(peer, procfs)
    if mine is None or len(mine) <= 1:
        return claimed  # same namespace (or cannot tell): the numbers agree
    if kind == "hello":
        return peer
    depth = len(mine)
    children = children_map(procfs) or {}
    stack = list(children.get(peer, ()))
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        theirs = ns_pids(pid, procfs)
        if theirs is not None and len(theirs) == depth and theirs[-1] == claimed:
            return pid
        stack.extend(children.get(pid, ()))
    return None
