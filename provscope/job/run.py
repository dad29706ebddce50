"""The in-job API: workflows (runs), tasks, scalars, entities, loop helpers.

Typical use::

    import provscope

    with provscope.workflow("finetune", config=cfg) as run:
        run.use("data/train.jsonl", kind="dataset")
        for epoch in run.epochs(3):
            for step, batch in run.steps(loader):
                loss = train_step(batch)
                run.log(loss=loss, lr=sched.get_last_lr()[0])
            with run.task("eval", kind="eval"):
                run.log(eval_loss=evaluate())
        run.produce("out/model.pt", kind="checkpoint")

Guarantees: nothing here blocks the job (records go to a bounded buffer drained by a
background thread) and nothing raises into it; the only exceptions that leave a
``@provscope.task`` function or a ``with run.task(...)`` block are the user's own,
unchanged, after being recorded. Every swallowed error is counted (``Run.errors``).
Outside any workflow the API works through an *implicit run*, created on first use and
closed at exit. ``PROVSCOPE_ENABLED=0`` turns all of it into no-ops.
"""

from __future__ import annotations

import getpass
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from provscope import env, jsonsafe
from provscope.config import Config, load_config
from provscope.ids import content_id, entity_key, new_id
from provscope.job import capture, context, identity, liveness
from provscope.job.context import run_var, task_var
from provscope.job.sink import Sink, get_sink, on_exit
from provscope.job.stepbuffer import StepBuffer, complete_all
from provscope.records import (
    ENTITY_KINDS,
    RUN_STATUSES,
    TASK_KINDS,
    EntityRecord,
    Point,
    RelationRecord,
    RunRecord,
    TaskRecord,
)
from provscope.redact import mask_mapping

__all__ = ["Run", "Task", "detect_rank", "enabled"]

log_ = logging.getLogger("provscope.client")

F = TypeVar("F", bound=Callable[..., Any])

MAX_ERROR_CHARS = 4000
TRAIN = "train"
_INT_FIELDS = frozenset({"step", "epoch"})
# How often a run whose id must come from rank 0 checks whether torch.distributed is up.
_IDENTITY_POLL_S = 0.1
# Records counted per kind (tasks are counted once each, when they start).
_COUNT_KEYS = {"point": "points", "entity": "entities", "relation": "relations", "run": "runs"}


# A step still open at exit (the last one, a forked child's) is written before the sinks
# shut down.
on_exit(complete_all)


def enabled() -> bool:
    """False when ``PROVSCOPE_ENABLED`` is 0/false/no/off: the whole API is a no-op."""
    return os.environ.get(env.ENABLED, "1").strip().lower() not in ("0", "false", "no", "off")


def detect_rank() -> int:
    """The process's global rank (``provscope.job.identity.detect_rank``)."""
    return identity.detect_rank()


def _stopped_by(exc: BaseException | None) -> str:
    """The status an exception ends a run or task with (Ctrl-C: ``interrupted``)."""
    if exc is None:
        return "finished"
    return "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"


_reported_settings: set[str] = set()


def _report_setting(line: str) -> None:
    """One log line per bad setting and process (every workflow reads the same sources)."""
    if line not in _reported_settings:
        _reported_settings.add(line)
        log_.error("provscope: %s; this setting is ignored, the others apply", line)


def _resolve_settings(settings: Any) -> Config:
    """The job's config: a bad setting is reported (naming its source) and ignored, the
    valid ones are kept; nothing here raises into the job."""
    if isinstance(settings, Config):
        return settings
    try:
        if settings is None:
            return load_config(report=_report_setting)
        if isinstance(settings, Mapping):
            return load_config(overrides=settings, overrides_source="workflow(settings=...)",
                               report=_report_setting)
        return load_config(settings, report=_report_setting)
    except Exception as exc:  # a bug here must not fail the job
        log_.error("provscope: cannot read the settings (%s); recording with the defaults",
                   exc)
        return Config()


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__qualname__}: {exc}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


DEVICE_BATCH = 10
"""Steps whose device-tensor scalars wait before one copy to the host."""


def on_device(value: Any) -> bool:
    """A one-element tensor on an accelerator: reading it would synchronise the device."""
    device = getattr(value, "device", None)
    return getattr(device, "type", "cpu") not in ("cpu", "meta") and \
        callable(getattr(value, "detach", None)) and value.numel() == 1


def _to_floats(tensors: list[Any]) -> list[float]:
    """One-element tensors to floats in one copy to the host: gathered into one tensor on
    the first one's device with device-side copies, then copied once."""
    flat = [t.float().reshape(()) for t in tensors]
    gathered = flat[0].new_zeros(len(flat))
    for k, t in enumerate(flat):
        gathered[k] = t  # a device-side copy; one from another device copies across
    return gathered.cpu().tolist()


def _scalar(value: Any) -> float | int | bool | str | None:
    if value is None:
        return None
    if isinstance(value, bool | int | float | str):
        return value
    item = getattr(value, "item", None)  # 0-d tensors, numpy scalars
    if callable(item):
        value = item()
        if isinstance(value, bool | int | float):
            return value
    return float(value)


# ----------------------------------------------------------------------------- tasks


class Task:
    """One open task (a PROV activity). Yielded by ``run.task(...)``.

    Attributes: ``task_id``, ``name``, ``kind``, ``parent_task_id``, ``run``; ``result``
    holds what ``set_result`` added (written with the end record).
    """

    __slots__ = ("_meter", "kind", "name", "params", "parent_task_id", "result", "run",
                 "start_ns", "task_id")

    def __init__(self, run: Run, name: str, kind: str, parent_task_id: str | None,
                 params: Mapping[str, Any] | None) -> None:
        self.run = run
        self.task_id = new_id()
        self.name = name
        self.kind = kind
        self.parent_task_id = parent_task_id
        self.params = params
        self.result: dict[str, Any] = {}
        self.start_ns = time.time_ns()
        self._meter: capture.ResourceMeter | None = None

    def set_result(self, **values: Any) -> None:
        """Add summarised values to the task's result (written at task end)."""
        for key, value in values.items():
            self.result[key] = jsonsafe.summarise(value)

    def use(self, path_or_uri: str | os.PathLike[str], kind: str = "dataset",
            **attrs: Any) -> str:
        """``run.use`` with this task as the user. Returns the entity id."""
        return self.run.use(path_or_uri, kind, task_id=self.task_id, **attrs)

    def produce(self, path_or_uri: str | os.PathLike[str], kind: str = "checkpoint",
                step: int | None = None, **attrs: Any) -> str:
        """``run.produce`` with this task as the generator. Returns the entity id."""
        return self.run.produce(path_or_uri, kind, step, task_id=self.task_id, **attrs)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, kind={self.kind!r}, task_id={self.task_id!r})"


class _TaskScope:
    """``with`` / ``async with`` around one task: start record, context, end record."""

    __slots__ = ("_run", "_tokens", "args", "kind", "name", "params", "task")

    def __init__(self, run: Run, name: str, kind: str, params: Mapping[str, Any] | None,
                 args: Mapping[str, Any] | None = None) -> None:
        self._run = run
        self.name = name
        self.kind = kind
        self.params = params
        self.args = args  # raw call arguments of a decorated function (paths -> entities)
        self.task: Task | None = None
        self._tokens: tuple[Any, Any] | None = None

    def __enter__(self) -> Task:
        run = self._run
        try:
            task = self.task = run._start_task(self.name, self.kind, self.params, self.args)
            self._tokens = (run_var.set(run), task_var.set(task.task_id))
            return task
        except Exception:
            run.errors += 1
            return self.task or Task(run, self.name, self.kind, None, None)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        # Returns None: the user's exception, if any, goes on unchanged.
        try:
            _reset_context(self._tokens)
            self._tokens = None
            if self.task is not None:
                self._run._end_task(self.task, exc)
        except Exception:
            self._run.errors += 1

    async def __aenter__(self) -> Task:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)


def _reset_context(tokens: tuple[Any, Any] | None) -> None:
    """Restore the run and task context variables set on entry (tokens from ``.set``)."""
    if tokens is None:
        return
    run_token, task_token = tokens
    try:
        task_var.reset(task_token)
        run_var.reset(run_token)
    except ValueError:  # closed from another context (a collected generator)
        pass


# ----------------------------------------------------------------------------- runs


class Run:
    """A workflow run: the unit that tasks, scalars and entities belong to.

    Create it with ``provscope.workflow(...)``. Attributes: ``run_id``, ``name``, ``host``,
    ``rank``, ``config`` (provscope settings), ``hparams`` (the user's config, JSON-safe),
    ``id_source`` (how the run id was found: ``provscope.job.identity``; ``child`` for a
    workflow inside another), ``origin`` (the claim of this process's run record:
    ``provscope.records.RUN_ORIGINS``), ``owner`` (False when joining a run started by
    ``provscope run``), ``errors`` (exceptions swallowed), ``counts`` (tasks started;
    points, entities, relations and run records emitted; ``late``: records refused
    because the run had ended).

    Every process of a job writes its partial run record at start (rank 0's values win in
    the stores) and rank 0 the end record; another rank writes an end record only when it
    failed or was interrupted.
    """

    def __init__(
        self,
        name: str,
        hparams: Any = None,
        *,
        settings: Any = None,
        campaign: str | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        implicit: bool = False,
        disabled: bool = False,
    ) -> None:
        self.enabled = enabled() and not disabled
        self.name = name
        self.implicit = implicit
        self.config: Config = _resolve_settings(settings) if self.enabled else Config()
        self.host = self.config.host_name
        self.rank = detect_rank()
        self.campaign = campaign
        self.parent_run_id = parent_run_id
        outer = context.context_run()
        self.top_level = outer is None or outer.implicit
        self.root_parent: str | None = None
        self._pending = False
        self._settle_lock = threading.RLock()
        self._children: dict[str, int] = {}
        if run_id or self.top_level:
            try:
                found = identity.resolve(
                    run_id, share=identity.SHARE if self.enabled else None,
                    wait_s=self.config.client.identity_wait_s)
            except Exception:  # monitoring never raises into the job: record on its own
                log_.debug("run id rule failed; a new id is used", exc_info=True)
                found = identity.Identity(new_id(), "new")
            if outer is not None and not outer.implicit and self.parent_run_id is None:
                self.parent_run_id = outer.run_id  # an explicit run_id inside a workflow
            self._run_id, self.id_source, self._pending = found.run_id, found.source, \
                found.pending
            if self.parent_run_id is None:
                self.parent_run_id = found.parent_run_id
            if found.source == "env":  # started by `provscope run`: under its command task
                self.root_parent = os.environ.get(env.PARENT_TASK_ID) or None
            self._shared = found.shared
        else:
            # A workflow inside another: a child run. Every rank derives the same id when
            # the enclosing run is shared, so their child runs are one run too.
            assert outer is not None
            n = outer._children.get(name, 0)
            outer._children[name] = n + 1
            self._shared = outer._shared
            self._run_id = identity.child_run_id(outer.run_id, name, n) if self._shared \
                else new_id()
            self.id_source = "child"
            if self.parent_run_id is None:
                self.parent_run_id = outer.run_id
        self.owner = self.id_source != "env"
        self.origin = "implicit" if implicit else ("job" if self.rank == 0 else "worker")
        self.hparams = jsonsafe.jsonable(hparams, jsonsafe.CONFIG) if hparams is not None else None
        self.status = "created"
        self.errors = 0
        self.counts = {"points": 0, "tasks": 0, "entities": 0, "relations": 0, "runs": 0,
                       "late": 0}
        self.step: int | None = None
        self.epoch: int | None = None
        self._tags_ = {"run_id": self._run_id, "host": self.host, "rank": str(self.rank)}
        self._sink: Sink | None = get_sink(self.config) if self.enabled else None
        #: The open training step: ``log``, ``steps`` and ``watch()`` merge their fields
        #: into one ``train`` point per step (provscope/job/stepbuffer.py).
        self.step_buffer = StepBuffer(self._write_train)
        # 0-d device tensors run.log was given (step, field, tensor): copied to the host
        # together every DEVICE_BATCH steps, so logging a CUDA loss never syncs each step.
        self._device_values: list[tuple[int, str, Any]] = []
        self._device_steps = 0
        self._device_resolver = self._resolve_device_values
        self._owner_thread = threading.get_ident()
        self._main_stack: list[str] = []
        # Tasks started and not ended (any thread): ended as killed on SIGTERM (abort).
        self._open_tasks: dict[str, Task] = {}
        self._tokens: tuple[Any, Any] | None = None
        self._start_ns: int | None = None
        self._start_due = False
        self._warned: set[str] = set()
        #: Entity ids of the models ``watch()`` recorded in this run (checkpoints derive
        #: from them).
        self.model_entity_ids: list[str] = []
        # Last checkpoint per set of models it derives from (the next one derives from it).
        self._last_checkpoint: dict[tuple[str, ...], str] = {}

    # ------------------------------------------------------------------ identity

    @property
    def run_id(self) -> str:
        """The run's id. Under a launcher without a job id, a rank other than 0 learns
        rank 0's id when torch.distributed is up (reading it then may wait, once, up to
        ``client.identity_wait_s``)."""
        if self._pending:
            self._settle()
        return self._run_id

    @property
    def _tags(self) -> dict[str, str]:
        if self._pending:
            self._settle()
        return self._tags_

    def _settle(self) -> None:
        """Take rank 0's run id over torch.distributed once it is initialised (rank 0
        publishes its own). Before that, this does nothing. Other threads asking for the
        run id meanwhile wait for the answer (bounded by ``client.identity_wait_s``)."""
        state = identity.dist_state()
        if state is None:
            return
        with self._settle_lock:
            if not self._pending:
                return
            shared = None
            try:
                if state[0] == 0:
                    identity.SHARE.publish(self._run_id)
                else:
                    shared = identity.SHARE.fetch(self.config.client.identity_wait_s)
            except Exception:
                self.errors += 1
            if shared is not None and shared != self._run_id:
                self._tags_ = {**self._tags_, "run_id": shared}
                self._run_id = shared
            self._pending = False
        try:
            if self._start_due:
                self._start_due = False
                self.emit(self._run_record(start=True))
            self._announce()
        except Exception:
            self.errors += 1

    def _announce(self) -> None:
        """Tell the node agent which run and rank this process belongs to, so that its
        process series carry them (the agent connection said hello before the run was
        known)."""
        if not self.top_level or self._sink is None:
            return
        try:
            backend = getattr(self._sink, "backend", None)
            announce = getattr(backend, "set_identity", None)
            if announce is not None:
                announce(self._run_id, self.rank)
        except Exception:
            self.errors += 1

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Run:
        """Open the run: write its start record (rank 0, owner) and make it current."""
        if self.status != "created":
            return self
        self.status = "running"
        self._start_ns = time.time_ns()
        try:
            if not self.implicit:
                self._tokens = (run_var.set(self), task_var.set(self.root_parent))
                context.push_run(self)
            if self.enabled:
                if self._pending and self.rank != 0:
                    self._start_due = True  # written under rank 0's id once it is known
                else:
                    self.emit(self._run_record(start=True))
                self._announce()
                if self._pending:
                    self._watch_identity()
                liveness.register(self)
        except Exception:
            self.errors += 1
        return self

    def _watch_identity(self) -> None:
        """Settle the run id as soon as the job initialises torch.distributed, on a
        daemon thread (``provscope-identity``): rank 0 publishes at once, so a short job
        does not tear down the process group's store before the others have read it."""

        def poll() -> None:
            while self._pending and self.status in ("created", "running"):
                if identity.dist_state() is not None:
                    self._settle()
                    return
                time.sleep(_IDENTITY_POLL_S)

        threading.Thread(target=poll, name="provscope-identity", daemon=True).start()

    def finish(self, status: str = "finished", error: BaseException | None = None) -> None:
        """Close the run: end record with ``status`` (one of ``RUN_STATUSES``). Idempotent.

        Rank 0 always writes the end record; another rank only when its status is not
        ``finished`` (its failure is the run's; its success says nothing of the others).
        Records emitted after this are refused and counted in ``counts["late"]``.
        """
        if self.status not in ("running", "created"):
            return
        # running and lost are not ends a job gives itself (lost: the heartbeat stopped).
        ends = [s for s in RUN_STATUSES if s not in ("running", "lost")]
        if status not in ends:
            self._warn_once(f"status:{status}", f"run status {status!r} is not one of "
                            f"{', '.join(ends)}; recorded as 'failed'")
            status = "failed"
        try:
            self.step_buffer.complete()  # the last step's point, before the run ends
        except Exception:
            self.errors += 1
        try:
            if self.enabled:
                if self._start_due:  # rank 0's id never came: keep this rank's own
                    self._pending = self._start_due = False
                    self.emit(self._run_record(start=True))
                if self.rank == 0 or status != "finished":
                    self.emit(RunRecord(run_id=self._run_id, end_ns=time.time_ns(),
                                        status=status, origin=self.origin))
        except Exception:
            self.errors += 1
        self.status = status
        liveness.unregister(self)
        if error is not None:
            log_.debug("run %s ended %s: %s", self._run_id, status, _error_text(error))
        _reset_context(self._tokens)
        self._tokens = None
        context.pop_run(self)

    def __enter__(self) -> Run:
        return self.start()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.finish(_stopped_by(exc), exc)  # the exception, if any, goes on unchanged

    def _masked(self, obj: Any) -> Any:
        """Task params / run config with secret-looking keys' values as ``***`` (the
        ``redact.names`` rule, docs/security.md)."""
        return mask_mapping(obj, self.config.redact.names) if obj else obj

    def _run_record(self, start: bool) -> RunRecord:
        try:
            user = getpass.getuser()
        except Exception:
            user = None
        return RunRecord(
            run_id=self.run_id, name=self.name, parent_run_id=self.parent_run_id,
            campaign=self.campaign, user=user, host=self.host, start_ns=self._start_ns,
            status="running", config=self._masked(self.hparams) if isinstance(self.hparams, dict)
            else ({"value": self.hparams} if self.hparams is not None else None),
            code=capture.code_version(capture.script_dir()) or None,
            environment=capture.environment(),
            command=capture.command_line(self.config.redact.names),
            origin=self.origin,
            heartbeat_ns=self._start_ns if self.config.client.heartbeat_s > 0 else None,
        )

    def heartbeat(self) -> None:
        """Record a sign of life of this process in the run row (``heartbeat_ns``); see
        ``provscope.job.liveness``. Called by the heartbeat thread. Never raises."""
        sink = self._sink
        if sink is None or self._pending or self.status != "running":
            return
        try:
            sink.submit(RunRecord(run_id=self._run_id, heartbeat_ns=time.time_ns(),
                                  origin=self.origin))
        except Exception:
            self.errors += 1

    def abort(self, status: str = "killed") -> None:
        """End the open tasks (newest first) and then the run with ``status``: what the
        SIGTERM handler does before the process dies. Never raises."""
        for task in reversed(list(self._open_tasks.values())):
            try:
                self._end_task(task, None, status=status)
            except Exception:
                self.errors += 1
        self.finish(status)

    # ------------------------------------------------------------------ emitting

    def emit(self, record: Any) -> None:
        """Hand any Point or lineage record to the sink. Never blocks, never raises.

        After the run ended, records are not written into it: they are counted in
        ``counts["late"]`` and reported once in the log.
        """
        sink = self._sink
        if sink is None:
            return
        if self._pending:
            self._settle()
        if self.status not in ("running", "created"):
            self._late()
            return
        try:
            sink.submit(record)
            key = _COUNT_KEYS.get(record.kind)
            if key is not None:
                self.counts[key] += 1
        except Exception:
            self.errors += 1

    def _late(self) -> None:
        self.counts["late"] += 1
        if self.counts["late"] == 1:
            log_.warning("provscope: run %r (%s) has ended; records emitted after its end "
                         "are not written into it (counted in run.counts['late'])",
                         self.name, self._run_id)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Write the open step's ``train`` point, then wait up to ``timeout_s`` until this
        run's records are written. Blocks."""
        if self._sink is None:
            return True
        try:
            self.step_buffer.complete()
        except Exception:
            self.errors += 1
        return self._sink.flush(timeout_s)

    def written(self) -> dict[str, int]:
        """Records the destinations accepted so far (embedded mode), after a ``flush``."""
        return self._sink.written() if self._sink is not None else {"points": 0, "lineage": 0}

    @property
    def sink_mode(self) -> str:
        """``agent``, ``embedded``, ``drop``, ``failed``, ``pending`` or ``disabled``."""
        return self._sink.mode if self._sink is not None else "disabled"

    # ------------------------------------------------------------------ scalars

    def log(self, step: int | None = None, **scalars: Any) -> None:
        """Record scalars in the step's ``train`` point, tagged run_id/host/rank.

        ``step`` is a field: the current step (``run.steps()``, or a watcher counting
        optimizer steps) when omitted. Every scalar of one step, from ``log``,
        ``steps`` and ``watch()``, goes into ONE point, written when the step is complete
        (the next step begins or another step number is logged, or ``flush``/the end of
        the run); a later value of the same field replaces the earlier one. With no step
        at all the scalars are one point of their own, at once. Values may be numbers,
        bools, short strings, 0-d tensors or numpy scalars; others are skipped and counted
        in ``errors``. Never raises; blocks only once, on a rank other than 0 whose run id
        still waits for rank 0's after ``init_process_group`` (at most
        ``client.identity_wait_s``).
        """
        if self._sink is None:
            return
        if self._pending:
            # Settle the id while rank 0 is surely alive (it waits in this step's
            # collective), not at the step's end, when a short job's rank 0 may already
            # have torn down the store that carries its id.
            self._settle()
        try:
            if step is None:
                step = self.step
            skipped: list[str] | None = None
            for key, value in scalars.items():  # **scalars is a dict of our own: in place
                if step is not None and on_device(value):
                    self._defer(int(step), key, value)
                    skipped = [*(skipped or ()), key]
                    continue
                try:
                    v = _scalar(value)
                except Exception:
                    self.errors += 1
                    v = None
                if v is None:
                    skipped = [*(skipped or ()), key]
                    continue
                if key in _INT_FIELDS and isinstance(v, float) and v.is_integer():
                    v = int(v)
                elif isinstance(v, int) and not isinstance(v, bool) and key not in _INT_FIELDS:
                    v = float(v)
                if v is not value:
                    scalars[key] = v
            for key in skipped or ():
                del scalars[key]
            loss = scalars.get("loss")
            if isinstance(loss, float):
                # Line protocol has no NaN/Inf, so InfluxDB never sees such a loss; this
                # flag is what the loss_nonfinite alert and the dashboards read.
                scalars["loss_nonfinite"] = 0.0 if loss - loss == 0.0 else 1.0
            if step is not None:
                if scalars:
                    self.step_buffer.add(int(step), scalars)
                return
            if self.epoch is not None and "epoch" not in scalars:
                scalars["epoch"] = self.epoch
            if scalars:
                self.emit(Point(TRAIN, self._tags, scalars, time.time_ns()))
        except Exception:
            self.errors += 1

    def _defer(self, step: int, key: str, value: Any) -> None:
        """Keep a device tensor of step ``step`` until the batch copy (no sync now)."""
        values = self._device_values
        if not values or values[-1][0] != step:
            self._device_steps += 1
        values.append((step, key, value.detach()))
        self.step_buffer.hold(self._device_resolver, step)
        if self._device_steps > DEVICE_BATCH:
            self._resolve_device_values()

    def _resolve_device_values(self) -> None:
        """Copy the deferred device tensors to the host in one copy per device and add
        them to their steps; release the steps held for them. Never raises."""
        pending, self._device_values = self._device_values, []
        self._device_steps = 0
        try:
            if pending:
                values = _to_floats([value for _, _, value in pending])
                for (step, key, _), value in zip(pending, values, strict=True):
                    fields: dict[str, Any] = {key: value}
                    if key == "loss":
                        fields["loss_nonfinite"] = 0.0 if value - value == 0.0 else 1.0
                    self.step_buffer.add(step, fields)
        except Exception:
            self.errors += 1
        self.step_buffer.release(self._device_resolver)

    def _write_train(self, fields: dict[str, Any], time_ns: int) -> None:
        """The step buffer's writer: one ``train`` point per finished step."""
        self.emit(Point(TRAIN, self._tags, fields, time_ns))

    # ------------------------------------------------------------------ tasks

    def task(self, name: str, kind: str = "task", **params: Any) -> _TaskScope:
        """A context manager (sync or async) around one task; yields a ``Task``.

        ``params`` are summarised into the task's params. The block's exception, if any,
        is recorded (status failed, error text) and goes on unchanged.
        """
        try:
            summary = {k: jsonsafe.summarise(v) for k, v in params.items()} or None
        except Exception:
            summary = None
        return _TaskScope(self, name, kind, summary)

    def current_task_id(self) -> str | None:
        """The innermost open task of this context (None at the run's top level)."""
        try:
            return context.context_task(self)
        except Exception:
            return None

    def fallback_task_id(self) -> str | None:
        """For threads with no context: the innermost task open in the run's main thread."""
        stack = self._main_stack
        return stack[-1] if stack else self.root_parent

    def _start_task(self, name: str, kind: str, params: Mapping[str, Any] | None,
                    args: Mapping[str, Any] | None = None) -> Task:
        if kind not in TASK_KINDS:
            self._warn_once(f"kind:{kind}", f"task kind {kind!r} is not one of "
                            f"{', '.join(TASK_KINDS)}; recorded as 'other'")
            kind = "other"
        task = Task(self, name, kind, self.current_task_id(), params)
        if self._sink is None:
            return task
        if threading.get_ident() == self._owner_thread:
            self._main_stack.append(task.task_id)
        self._open_tasks[task.task_id] = task
        task._meter = capture.ResourceMeter()
        self.counts["tasks"] += 1
        self.emit(TaskRecord(
            task_id=task.task_id, run_id=self.run_id, parent_task_id=task.parent_task_id,
            name=name, task_kind=kind, host=self.host, rank=self.rank, pid=os.getpid(),
            start_ns=task.start_ns, status="running", params=self._masked(params),
        ))
        if args:
            for role, value in args.items():
                self.use(value, "file", role=role, task_id=task.task_id)
        return task

    def _end_task(self, task: Task, exc: BaseException | None,
                  status: str | None = None) -> None:
        if self._sink is None:
            return
        if self._open_tasks.pop(task.task_id, None) is None and status is not None:
            return  # ended already (abort racing the task's own end)
        stack = self._main_stack
        if task.task_id in stack:
            stack.remove(task.task_id)
        resources = task._meter.stop() if task._meter is not None else None
        failed = exc is not None and not isinstance(exc, GeneratorExit | StopIteration)
        self.emit(TaskRecord(
            task_id=task.task_id, run_id=self.run_id, parent_task_id=task.parent_task_id,
            name=task.name, task_kind=task.kind, host=self.host, rank=self.rank,
            pid=os.getpid(), start_ns=task.start_ns, end_ns=time.time_ns(),
            status=status or (_stopped_by(exc) if failed else "finished"),
            error=_error_text(exc) if failed and exc is not None else None,
            result=task.result or None, resources=resources,
        ))

    # ------------------------------------------------------------------ entities

    def use(self, path_or_uri: str | os.PathLike[str], kind: str = "dataset", *,
            role: str | None = None, name: str | None = None, task_id: str | None = None,
            **attrs: Any) -> str:
        """Record that the current task (or the run) used a file, directory or URI.

        Local files up to ``client.hash_max_bytes`` are hashed (sha256, streaming; this
        blocks while it reads); bigger ones get size and mtime only. Returns the entity
        id. Never raises.
        """
        return self._entity("used", path_or_uri, kind, role, name, task_id, None, attrs)

    def produce(self, path_or_uri: str | os.PathLike[str], kind: str = "checkpoint",
                step: int | None = None, *, role: str | None = None, name: str | None = None,
                task_id: str | None = None, derived_from: str | Iterable[str] | None = None,
                **attrs: Any) -> str:
        """Record that the current task (or the run) generated a file or URI.

        ``step`` (default: the current ``steps()`` step) goes into the attributes.
        ``derived_from``: entity ids the output was derived from (``derived`` relations,
        prov:wasDerivedFrom). A ``checkpoint`` is derived by default from the models
        ``watch()`` recorded in this run (``model_entity_ids``), and always from the
        run's previous checkpoint of the same models. Hashing as for ``use``. Returns
        the entity id. Never raises.
        """
        return self._entity("generated", path_or_uri, kind, role, name, task_id,
                            step if step is not None else self.step, attrs, derived_from)

    def _entity(self, relation: str, path_or_uri: Any, kind: str, role: str | None,
                name: str | None, task_id: str | None, step: int | None,
                attrs: Mapping[str, Any], derived_from: Any = None) -> str:
        # The id comes from the content (ids.entity_key): the same bytes are one entity in
        # every run. A value that is not a path has no key and gets a new id.
        entity_id = ""
        if self._sink is None:
            return new_id()
        try:
            attributes = {k: jsonsafe.summarise(v) for k, v in attrs.items()}
            if kind not in ENTITY_KINDS:
                attributes["declared_kind"] = str(kind)
                self._warn_once(f"entity:{kind}", f"entity kind {kind!r} is not one of "
                                f"{', '.join(ENTITY_KINDS)}; recorded as 'artifact'")
                kind = "artifact"
            if isinstance(path_or_uri, str | os.PathLike):
                found = capture.describe_path(path_or_uri, self.config.client.hash_max_bytes)
            else:
                found = {"uri": None, "name": type(path_or_uri).__name__, "digest": None,
                         "size_bytes": None, "attributes": {
                             "value": jsonsafe.summarise(path_or_uri)}}
            attributes.update(found["attributes"])
            if step is not None:
                attributes["step"] = int(step)
            mtime = found["attributes"].get("mtime_ns")
            key = entity_key(digest=found["digest"], uri=found["uri"],
                             size_bytes=found["size_bytes"],
                             mtime_ns=mtime if isinstance(mtime, int) else None)
            entity_id = content_id(key) if key else new_id()
            now = time.time_ns()
            self.emit(EntityRecord(
                entity_id=entity_id, entity_kind=kind, uri=found["uri"], run_id=self.run_id,
                name=name or found["name"], digest=found["digest"],
                size_bytes=found["size_bytes"], attributes=attributes or None, created_ns=now,
            ))
            subject = task_id or self.current_task_id() or self.run_id
            self.emit(RelationRecord(relation, subject, entity_id, run_id=self.run_id,
                                     role=role or kind, time_ns=now))
            if relation == "generated":
                self._derive(entity_id, kind, derived_from, now)
        except Exception:
            self.errors += 1
        return entity_id or new_id()

    def _derive(self, entity_id: str, kind: str, derived_from: Any, now: int) -> None:
        """``derived`` relations of a generated entity: its explicit sources; for a
        checkpoint, the watched models by default and the previous checkpoint of the
        same models in this run."""
        if derived_from is None:
            sources = list(self.model_entity_ids) if kind == "checkpoint" else []
        elif isinstance(derived_from, str):
            sources = [derived_from]
        else:
            sources = [str(source) for source in derived_from]
        models = tuple(sorted(m for m in sources if m in self.model_entity_ids))
        roles = {source: "model" if source in models else "source" for source in sources}
        if kind == "checkpoint":
            previous = self._last_checkpoint.get(models)
            if previous is not None:
                roles.setdefault(previous, "previous_checkpoint")
            self._last_checkpoint[models] = entity_id
        for source, role in roles.items():
            if source and source != entity_id:  # unchanged bytes saved again: no self-loop
                self.emit(RelationRecord("derived", entity_id, source, run_id=self.run_id,
                                         role=role, time_ns=now))

    # ------------------------------------------------------------------ loops

    def epochs(self, n: int, *, start: int = 0) -> Iterator[int]:
        """Yield ``start .. n-1``, each inside an ``epoch`` task (the loop body's parent).

        Leaving the loop early (``break``) closes the open epoch as finished.
        """
        for epoch in range(start, n):
            self.epoch = self.step_buffer.epoch = epoch
            scope = _TaskScope(self, f"epoch {epoch}", "epoch", {"epoch": epoch})
            scope.__enter__()
            try:
                yield epoch
            finally:
                scope.__exit__(None, None, None)

    def steps(self, iterable: Iterable[Any], *, log_every: int = 1,
              task_every: int | None = None) -> Iterator[tuple[int, Any]]:
        """Yield ``(step, item)`` with a global step counter that continues across epochs.

        Each step's wall time (fetching the item plus the loop body) is logged as
        ``step_time_seconds`` every ``log_every`` steps (0: never): the run's one
        definition of step time. While the loop runs it owns the run's step counter
        (``run.step``; a watcher follows it), and the step's ``train`` point is written
        when the next item is fetched. Step *tasks* are
        sampled: one ``step`` task row every ``task_every`` steps (default
        ``client.step_task_every``; 0: none), so a million steps do not make a million rows.
        """
        every = self.config.client.step_task_every if task_every is None else task_every
        iterator = iter(iterable)
        step = self.step + 1 if self.step is not None else 0
        buffer = self.step_buffer
        buffer.loops += 1
        try:
            yield from self._step_loop(iterator, step, log_every, every)
        finally:
            buffer.loops = max(0, buffer.loops - 1)

    def _step_loop(self, iterator: Iterator[Any], step: int, log_every: int,
                   every: int) -> Iterator[tuple[int, Any]]:
        buffer = self.step_buffer
        while True:
            t0 = time.perf_counter()
            start_ns = time.time_ns()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.step = step
            if self._sink is not None:
                buffer.advance(step)  # the previous step is complete: its point goes out
            yield step, item
            if self._sink is not None:
                try:
                    elapsed = time.perf_counter() - t0
                    if log_every and step % log_every == 0:
                        self.log(step=step, step_time_seconds=elapsed)
                    if every and step % every == 0:
                        self.counts["tasks"] += 1
                        self.emit(TaskRecord(
                            task_id=new_id(), run_id=self.run_id,
                            parent_task_id=self.current_task_id(), name=f"step {step}",
                            task_kind="step", host=self.host, rank=self.rank, pid=os.getpid(),
                            start_ns=start_ns, end_ns=time.time_ns(), status="finished",
                            params={"step": step},
                            resources={"wall_seconds": round(elapsed, 6)},
                        ))
                except Exception:
                    self.errors += 1
            step += 1

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log_.warning("provscope: %s", message)

    def __repr__(self) -> str:
        return f"Run({self.name!r}, run_id={self.run_id!r}, rank={self.rank})"
