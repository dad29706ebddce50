"""Who this process is in its job: the run it writes into and its rank.

One rule decides the run id of a top-level workflow (and of the implicit run); the first
that applies wins:

1. ``workflow(run_id=...)``, given explicitly;
2. ``PROVSCOPE_RUN_ID`` (``provscope run`` sets it for the command it starts);
3. an id derived from the launcher's job identity, when the launcher started more than
   one process (``launcher_key``): torchrun/elastic, a SLURM step, an MPI launch;
4. rank 0's id, shared over ``torch.distributed``'s default store once the process group
   is initialised (``DistShare``; never initialises it, never joins a collective);
5. a new UUIDv7.

A derived id (3) is ``uuid5`` of the launcher key: the same on every rank and node of
one job, different for every job, but **not time ordered** (ids of 1, 2, 4 and 5 are).

One rank detector (``env_rank`` / ``detect_rank``) serves the in-job API, the agent
client and ``watch()``: ``PROVSCOPE_RANK``, then ``RANK``, then the launchers' variables
(``SLURM_PROCID``, ``OMPI_COMM_WORLD_RANK``, ``PMI_RANK``, ``PMIX_RANK``), then
``torch.distributed`` when it is initialised, else 0.

Nothing here imports torch; it is asked only when the job imported it already.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import sys
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from provscope import env
from provscope.forking import reset_in_child
from provscope.ids import new_id

__all__ = [
    "LAUNCHER_VARS",
    "NAMESPACE",
    "DistShare",
    "Identity",
    "child_run_id",
    "derived_run_id",
    "detect_rank",
    "dist_state",
    "env_rank",
    "launcher_key",
    "resolve",
    "world_size",
]

log = logging.getLogger("provscope.client")

#: Namespace of the derived (uuid5) run ids.
NAMESPACE = uuid.UUID("8f7c2a4e-3b1d-5e6f-9a0b-1c2d3e4f5a6b")

# Global rank, most specific first (torchrun's RANK beats the SLURM task a node runs in).
_RANK_VARS = (env.RANK, "RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
              "PMIX_RANK")
# Number of processes the launcher started, in the same order.
_SIZE_VARS = ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_JOB_VARS = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "GROUP_WORLD_SIZE",
             "MASTER_PORT", "PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid",
             "OMPI_MCA_orte_ess_jobid", "PBS_JOBID", "SLURM_JOB_ID", "SLURM_STEP_ID")
#: Every variable the rule reads (tests clear them to stand outside any launcher).
LAUNCHER_VARS = (env.RUN_ID, *_RANK_VARS, *_SIZE_VARS, *_JOB_VARS)


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if not value.lstrip("-").isdigit():
        return None
    return int(value)


def dist_state() -> tuple[int, int] | None:
    """``(rank, world size)`` of ``torch.distributed`` when the job initialised it, else
    None. Never imports torch, never blocks."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
    except Exception:
        pass
    return None


def env_rank(environ: Mapping[str, str] | None = None) -> int | None:
    """The global rank the environment names (``PROVSCOPE_RANK``, ``RANK``, then the
    launchers' variables), else torch.distributed's when initialised, else None."""
    environ = os.environ if environ is None else environ
    for name in _RANK_VARS:
        rank = _int(environ.get(name))
        if rank is not None:
            return rank
    state = dist_state()
    return state[0] if state is not None else None


def detect_rank(environ: Mapping[str, str] | None = None) -> int:
    """``env_rank``, else 0 (a single process is rank 0)."""
    rank = env_rank(environ)
    return rank if rank is not None else 0


def world_size(environ: Mapping[str, str] | None = None) -> int | None:
    """Processes in the job, as the launcher or torch.distributed says; None: unknown."""
    environ = os.environ if environ is None else environ
    for name in _SIZE_VARS:
        size = _int(environ.get(name))
        if size is not None:
            return size
    state = dist_state()
    return state[1] if state is not None else None


def _parent_start() -> str:
    """The parent process's pid and start time: the torchrun agent of a local job."""
    ppid = os.getppid()
    try:
        import psutil

        return f"{ppid}@{psutil.Process(ppid).create_time():.3f}"
    except Exception:
        return str(ppid)


def launcher_key(environ: Mapping[str, str] | None = None) -> tuple[str, str, int] | None:
    """The launcher's identity of this job: ``(launcher, key, attempt)``, or None.

    Only a launcher that started more than one process names a shared job (a job of one
    process mints its own id, so sequential commands in one allocation stay apart):

    - torchrun/elastic: ``TORCHELASTIC_RUN_ID`` (``--rdzv-id``, or the random id of a
      single-node launch). Its placeholder ``none`` (static rendezvous) is no job
      identity: on one node (``GROUP_WORLD_SIZE`` 1) the torchrun process (the workers'
      parent, pid and start time) names the launch; across nodes there is none and the
      id is shared over torch.distributed instead. ``attempt`` is
      ``TORCHELASTIC_RESTART_COUNT``: each elastic restart is its own run.
    - MPI: ``PMIX_NAMESPACE`` or Open MPI's job id (``OMPI_MCA_ess_base_jobid``,
      ``OMPI_MCA_orte_ess_jobid``), qualified by ``PBS_JOBID`` when present.
    - SLURM: ``SLURM_JOB_ID`` + ``SLURM_STEP_ID`` (a step started by ``srun``; the batch
      script itself is not a step and names no job).
    """
    environ = os.environ if environ is None else environ
    size = world_size(environ)
    if size is None or size <= 1:
        return None
    elastic = environ.get("TORCHELASTIC_RUN_ID")
    if elastic:
        attempt = _int(environ.get("TORCHELASTIC_RESTART_COUNT")) or 0
        if elastic != "none":
            return "torchelastic", f"torchelastic:{elastic}", attempt
        if (_int(environ.get("GROUP_WORLD_SIZE")) or 1) == 1:
            return ("torchelastic", f"torchelastic-local:{socket.gethostname()}:"
                    f"{_parent_start()}:{environ.get('MASTER_PORT', '')}", attempt)
        return None  # multi-node static rendezvous: shared over torch.distributed
    mpi = (environ.get("PMIX_NAMESPACE") or environ.get("OMPI_MCA_ess_base_jobid")
           or environ.get("OMPI_MCA_orte_ess_jobid"))
    if mpi and not environ.get("SLURM_STEP_ID"):
        pbs = environ.get("PBS_JOBID", "")
        return "mpi", f"mpi:{pbs}:{mpi}", 0
    job, step = environ.get("SLURM_JOB_ID"), environ.get("SLURM_STEP_ID")
    if job and step:
        return "slurm", f"slurm:{job}.{step}", 0
    return None


def derived_run_id(key: str, attempt: int = 0) -> str:
    """The run id of a launcher key: a uuid5 string (the same everywhere; not time ordered)."""
    return str(uuid.uuid5(NAMESPACE, key if attempt == 0 else f"{key}#attempt={attempt}"))


def child_run_id(parent_run_id: str, name: str, n: int) -> str:
    """The id of the ``n``-th workflow named ``name`` opened inside ``parent_run_id``:
    derived, so every rank names the same child run."""
    return str(uuid.uuid5(NAMESPACE, f"child:{parent_run_id}:{name}:{n}"))


@dataclass(frozen=True, slots=True)
class Identity:
    """The resolved run identity of one top-level run.

    ``source``: explicit, env, torchelastic, mpi, slurm, dist (shared by rank 0 over
    torch.distributed), or new. ``parent_run_id``: for an elastic restart, the run of the
    first attempt. ``pending``: the id must still come from rank 0 (``DistShare``); the
    ``run_id`` is provisional until then.
    """

    run_id: str
    source: str
    parent_run_id: str | None = None
    pending: bool = False

    @property
    def shared(self) -> bool:
        """True when other processes use the same id (children are derived from it)."""
        return self.source != "new"


def resolve(explicit: str | None = None, environ: Mapping[str, str] | None = None, *,
            share: DistShare | None = None, wait_s: float = 10.0) -> Identity:
    """Apply the rule (module docstring) for a top-level run. Blocks only in step 4, on
    a rank other than 0, while waiting up to ``wait_s`` for rank 0's id."""
    environ = os.environ if environ is None else environ
    if explicit:
        return Identity(str(explicit), "explicit")
    joined = (environ.get(env.RUN_ID) or "").strip()
    if joined:
        return Identity(joined, "env")
    found = launcher_key(environ)
    if found is not None:
        launcher, key, attempt = found
        parent = derived_run_id(key) if attempt else None
        return Identity(derived_run_id(key, attempt), launcher, parent)
    if share is None:
        return Identity(new_id(), "new")
    state = dist_state()
    if state is not None and state[1] > 1:
        run_id = share.exchange(new_id() if state[0] == 0 else None, state[0], wait_s)
        if run_id is not None:
            return Identity(run_id, "dist")
        return Identity(new_id(), "new")
    size = world_size(environ)
    if state is None and size is not None and size > 1:
        # A multi-process job without a launcher id whose process group is not up yet:
        # rank 0's own id is final (it publishes it once the group is up); the others
        # take rank 0's then.
        return Identity(new_id(), "dist", pending=True)
    return Identity(new_id(), "new")


class DistShare:
    """Rank 0's run ids, shared through torch.distributed's default key-value store.

    The n-th shared run of a process uses key ``provscope/run_id/<n>``: rank 0 sets it,
    the other ranks wait for it (bounded), so ranks that open their workflows in the same
    order pair up. The store is not a collective: a rank that never opens a workflow
    blocks nobody; a rank whose rank 0 never publishes waits ``wait_s`` once, then keeps
    its own id and logs one line.
    """

    PREFIX = "provscope/run_id/"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0
        reset_in_child(self, DistShare.reset_after_fork)

    def _seq(self) -> int:
        with self._lock:
            n = self._next
            self._next += 1
            return n

    @staticmethod
    def _store() -> object | None:
        torch = sys.modules.get("torch")
        try:
            return torch.distributed.distributed_c10d._get_default_store()  # type: ignore[union-attr]
        except Exception:
            return None

    def publish(self, run_id: str, seq: int | None = None) -> int | None:
        """Rank 0: make ``run_id`` the id of the next shared run. Returns its slot."""
        store = self._store()
        if store is None:
            return None
        seq = self._seq() if seq is None else seq
        try:
            store.set(f"{self.PREFIX}{seq}", run_id)  # type: ignore[attr-defined]
        except Exception:
            log.debug("provscope: cannot publish the run id", exc_info=True)
            return None
        return seq

    def fetch(self, wait_s: float, seq: int | None = None) -> str | None:
        """A rank other than 0: rank 0's id of the next shared run, waiting up to
        ``wait_s``; None when it does not come (one line is logged)."""
        store = self._store()
        if store is None:
            return None
        seq = self._seq() if seq is None else seq
        key = f"{self.PREFIX}{seq}"
        try:
            store.wait([key], dt.timedelta(seconds=wait_s))  # type: ignore[attr-defined]
            return bytes(store.get(key)).decode()  # type: ignore[attr-defined]
        except Exception:
            log.warning("provscope: rank 0 did not share its run id within %.0f s "
                        "(client.identity_wait_s); this rank records under its own run id",
                        wait_s)
            return None

    def exchange(self, own: str | None, rank: int, wait_s: float) -> str | None:
        """Rank 0 publishes ``own`` and returns it; the others fetch rank 0's."""
        if rank == 0 and own is not None:
            self.publish(own)
            return own
        return self.fetch(wait_s)

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()


#: The process's share (slots are counted per process).
SHARE = DistShare()
