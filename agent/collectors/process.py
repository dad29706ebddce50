"""Process collector: the job's whole process tree (DataLoader workers included).

Emits measurement ``process`` (tags ``host``, ``run_id`` and, when known, ``rank``):
``cpu_seconds_total``, ``read_bytes_total``, ``written_bytes_total`` (cumulative; exited
children keep counting, so the counters never step back when a worker exits),
``rss_bytes``, ``threads``, ``open_files``, ``processes`` (sums over live processes).

Which processes to watch is a ``WatchList`` shared with the local ingest (a job's hello
frame registers its pid, run id and rank) and ``provscope run`` (registers the command).
A registered process's tree is every descendant except those registered themselves, so
a ``torchrun`` launcher and its ranks are each counted once. A root that exits is
forgotten after its last sample.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from provscope.agent.collectors.base import OnceLogger, specs_for

from provscope.catalogue import MetricSpec
from provscope.records import Point

__all__ = ["ProcessCollector", "ProcessTree", "WatchList", "Watched", "children_map",
           "tree_children_map"]

log = logging.getLogger("provscope.collectors.process")

# Bounded cardinality: a node runs a handful of jobs and ranks at a time.
MAX_WATCHED = 256


@dataclass(frozen=True, slots=True)
class Watched:
    """One registered process: the root of a job's tree."""

    pid: int
    run_id: str
    rank: int | None = None


class WatchList:
    """Thread-safe set of registered process roots, keyed by pid."""

    def __init__(self) -> None:
        self._items: dict[int, Watched] = {}
        self._lock = threading.Lock()

    def add(self, pid: int, run_id: str, rank: int | None = None) -> bool:
        """Register a root (a later registration of the same pid replaces it).

        Returns False when the list is full (the registration is refused and logged).
        """
        with self._lock:
            if pid not in self._items and len(self._items) >= MAX_WATCHED:
                log.warning("process: %d processes watched already; pid %d refused",
                            MAX_WATCHED, pid)
                return False
            self._items[pid] = Watched(int(pid), str(run_id), rank)
            return True

    def remove(self, pid: int) -> None:
        with self._lock:
            self._items.pop(pid, None)

    def get(self, pid: int) -> Watched | None:
        return self._items.get(pid)

    def snapshot(self) -> list[Watched]:
        with self._lock:
            return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class _PidState:
    proc: Any
    cpu: float = 0.0
    read: float = 0.0
    written: float = 0.0


@dataclass
class ProcessTree:
    """Cumulative resource use of one root process and its descendants.

    ``sample(exclude)`` reads every live member once; counters of members that exited
    since the last sample are kept in ``gone_*`` so the totals stay monotonic.
    """

    root_pid: int
    psutil_module: Any = None
    members: dict[int, _PidState] = field(default_factory=dict)
    gone_cpu: float = 0.0
    gone_read: float = 0.0
    gone_written: float = 0.0
    peak_rss: float = 0.0
    alive: bool = True
    _cpu: float = 0.0
    _read: float = 0.0
    _written: float = 0.0

    def __post_init__(self) -> None:
        if self.psutil_module is None:
            import psutil

            self.psutil_module = psutil

    def _pids(self, exclude: frozenset[int],
              children: dict[int, list[int]] | None) -> list[Any]:
        """The live Process objects of the tree: the root, then its descendants, minus
        registered sub-roots and everything below them."""
        ps = self.psutil_module
        root = self.members.get(self.root_pid)
        try:
            proc = root.proc if root else ps.Process(self.root_pid)
            if not proc.is_running():
                raise ps.NoSuchProcess(self.root_pid)
            if children is None:
                children = _children_map(proc.children(recursive=True))
        except (ps.NoSuchProcess, ps.ZombieProcess):
            self.alive = False
            return []
        except ps.AccessDenied:
            children = {}
        out = [proc]
        stack = [self.root_pid]
        while stack:
            for pid in children.get(stack.pop(), ()):
                if pid in exclude:
                    continue
                stack.append(pid)
                state = self.members.get(pid)
                if state is not None:
                    out.append(state.proc)
                    continue
                try:
                    out.append(ps.Process(pid))
                except ps.Error:
                    continue
        return out

    def sample(self, exclude: frozenset[int] = frozenset(),
               children: dict[int, list[int]] | None = None) -> dict[str, float] | None:
        """Read the tree now. Returns the fields, or None when the root has exited.

        Args:
            exclude: pids whose subtrees belong to another registration.
            children: parent pid -> child pids of the whole machine, read once per sample
                for every tree (``children_map``); None: ask psutil for this tree.
        """
        ps = self.psutil_module
        procs = self._pids(exclude - {self.root_pid}, children)
        if not procs:
            self._retire(set(self.members))
            return None
        rss = threads = fds = 0.0
        seen: set[int] = set()
        for proc in procs:
            state = self.members.get(proc.pid)
            if state is None:
                state = self.members[proc.pid] = _PidState(proc)
            try:
                with state.proc.oneshot():
                    if state.proc.status() == ps.STATUS_ZOMBIE:
                        continue  # exited, not yet reaped: its last counters are kept
                    t = state.proc.cpu_times()
                    state.cpu = t.user + t.system
                    rss += state.proc.memory_info().rss
                    threads += state.proc.num_threads()
                    try:
                        io = state.proc.io_counters()
                        state.read, state.written = io.read_bytes, io.write_bytes
                    except (ps.AccessDenied, AttributeError, NotImplementedError):
                        pass
                    with contextlib.suppress(ps.AccessDenied, AttributeError):
                        fds += state.proc.num_fds()
            except (ps.NoSuchProcess, ps.ZombieProcess):
                continue
            except ps.AccessDenied:
                pass
            seen.add(proc.pid)
        self._retire(set(self.members) - seen)
        self.peak_rss = max(self.peak_rss, rss)
        live = self.members.values()
        # Counters never step back (float sums differ in the last bit when members move
        # from live to gone).
        self._cpu = max(self._cpu, self.gone_cpu + sum(s.cpu for s in live))
        self._read = max(self._read, self.gone_read + sum(s.read for s in live))
        self._written = max(self._written, self.gone_written + sum(s.written for s in live))
        return {
            "cpu_seconds_total": self._cpu,
            "read_bytes_total": self._read,
            "written_bytes_total": self._written,
            "rss_bytes": rss,
            "threads": int(threads),
            "open_files": int(fds),
            "processes": len(seen),
        }

    def _retire(self, pids: set[int]) -> None:
        for pid in pids:
            state = self.members.pop(pid)
            self.gone_cpu += state.cpu
            self.gone_read += state.read
            self.gone_written += state.written

    def summary(self) -> dict[str, float]:
        """Totals so far in the lineage ``resources`` keys (base units)."""
        live = self.members.values()
        return {
            "cpu_seconds": self.gone_cpu + sum(s.cpu for s in live),
            "peak_rss_bytes": self.peak_rss,
            "read_bytes": self.gone_read + sum(s.read for s in live),
            "write_bytes": self.gone_written + sum(s.written for s in live),
        }


def _children_map(procs: Any) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for p in procs:
        try:
            out.setdefault(p.ppid(), []).append(p.pid)
        except Exception:
            continue
    return out


def children_map(procfs: str | os.PathLike[str] = "/proc") -> dict[int, list[int]] | None:
    """parent pid -> child pids of every process, from ``<procfs>/<pid>/stat``.

    One pass over procfs per sample, shared by every watched tree (psutil's
    ``children(recursive=True)`` makes that pass once per tree). None when procfs cannot
    be read (not Linux): callers then ask psutil per tree.
    """
    try:
        entries = os.listdir(procfs)
    except OSError:
        return None
    out: dict[int, list[int]] = {}
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(procfs, name, "stat"), "rb") as f:
                data = f.read()
        except OSError:
            continue  # exited since the listing
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        rest = data[data.rfind(b")") + 2:].split(b" ", 2)
        try:
            out.setdefault(int(rest[1]), []).append(int(name))
        except (IndexError, ValueError):
            continue
    return out


def tree_children_map(roots: Iterable[int],
                      procfs: str | os.PathLike[str] = "/proc") -> dict[int, list[int]] | None:
    """parent pid -> child pids below ``roots`` only, from
    ``<procfs>/<pid>/task/<tid>/children``.

    A job watching its own tree reads a few files instead of every process's ``stat``
    (a shared node runs thousands). None when the kernel does not provide ``children``
    files (built without ``CONFIG_PROC_CHILDREN``, or not Linux).
    """
    out: dict[int, list[int]] = {}
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in out:
            continue
        task_dir = os.path.join(procfs, str(pid), "task")
        try:
            tids = os.listdir(task_dir)
        except OSError:
            out[pid] = []  # exited: the tree sampler finds out on its own
            continue
        kids: list[int] = []
        for tid in tids:
            try:
                with open(os.path.join(task_dir, tid, "children"), "rb") as f:
                    kids.extend(int(k) for k in f.read().split())
            except FileNotFoundError:
                if os.path.isdir(os.path.join(task_dir, tid)):
                    return None  # the thread exists, its children file does not
            except (OSError, ValueError):
                continue
        out[pid] = kids
        stack.extend(kids)
    return out


class ProcessCollector:
    """Resource use of every registered job's process tree.

    Args:
        host: value of the ``host`` tag.
        watch: the shared ``WatchList`` (ingest and ``provscope run`` register roots).
        psutil_module: the psutil module (tests pass a fake).
        procfs: the procfs root read for the process hierarchy (tests pass a fixture tree).
        scan: ``"node"`` reads every process's parent once per sample (the agent: many
            trees); ``"tree"`` walks down from the registered roots only (a job sampling
            its own tree), falling back to ``"node"`` where the kernel cannot.
    """

    name: ClassVar[str] = "process"

    def __init__(self, host: str, watch: WatchList | None = None,
                 psutil_module: Any = None, procfs: str | os.PathLike[str] = "/proc",
                 scan: Literal["node", "tree"] = "node") -> None:
        self._procfs = procfs
        self._scan = scan
        if psutil_module is None:
            import psutil as psutil_module
        self._ps = psutil_module
        self._host = host
        self.watch = watch if watch is not None else WatchList()
        self._trees: dict[int, ProcessTree] = {}
        self._once = OnceLogger(log)

    def open(self) -> None:
        pass

    def collect(self, now_ns: int) -> list[Point]:
        watched = self.watch.snapshot()
        roots = frozenset(w.pid for w in watched)
        for pid in set(self._trees) - roots:
            del self._trees[pid]
        out = []
        children = None
        if watched and self._scan == "tree":
            children = tree_children_map(roots, self._procfs)
        if watched and children is None:
            children = children_map(self._procfs)
        for w in watched:
            tree = self._trees.get(w.pid)
            if tree is None:
                tree = self._trees[w.pid] = ProcessTree(w.pid, self._ps)
            try:
                fields = tree.sample(roots, children)
            except Exception as exc:  # one odd process must not stop the others
                self._once(("err", w.pid), "process: pid %d not sampled (%s)", w.pid, exc)
                continue
            if fields is None:
                self.watch.remove(w.pid)
                self._trees.pop(w.pid, None)
                continue
            tags = {"host": self._host, "run_id": w.run_id}
            if w.rank is not None:
                tags["rank"] = str(w.rank)
            out.append(Point("process", tags, fields, now_ns))
        return out

    def pids_of(self) -> dict[int, Watched]:
        """Every live pid in a watched tree -> its registration (for per-rank GPU memory)."""
        out: dict[int, Watched] = {}
        for root, tree in list(self._trees.items()):
            w = self.watch.get(root)
            if w is None:
                continue
            for pid in list(tree.members):
                out.setdefault(pid, w)
            out[root] = w
        return out

    def close(self) -> None:
        self._trees.clear()

    def specs(self) -> Sequence[MetricSpec]:
        return specs_for(self.name)
