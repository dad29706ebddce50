"""provscope: live telemetry and full provenance for PyTorch training runs.

The public API, in the training script::

    import provscope

    with provscope.workflow("finetune", config=cfg) as run:
        for epoch in run.epochs(3):
            for step, batch in run.steps(loader):
                run.log(loss=train_step(batch))
    provscope.query.runs()          # afterwards: pandas DataFrames

Names are imported on first use, so ``import provscope`` stays light and never imports
torch (``provscope.watch`` loads the PyTorch hooks when called).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from provscope._version import __version__

__all__ = [
    "Config",
    "Point",
    "Run",
    "Task",
    "__version__",
    "current_run",
    "flush",
    "load_config",
    "log",
    "new_id",
    "produce",
    "query",
    "task",
    "unwatch",
    "use",
    "watch",
    "workflow",
    "wrap",
]

# public name -> (module, attribute); attribute None means the module itself.
_LAZY: dict[str, tuple[str, str | None]] = {
    "workflow": ("provscope.job.api", "workflow"),
    "task": ("provscope.job.api", "task"),
    "log": ("provscope.job.api", "log"),
    "use": ("provscope.job.api", "use"),
    "produce": ("provscope.job.api", "produce"),
    "flush": ("provscope.job.api", "flush"),
    "current_run": ("provscope.job.api", "current_run"),
    "wrap": ("provscope.job.context", "wrap"),
    "Run": ("provscope.job.run", "Run"),
    "Task": ("provscope.job.run", "Task"),
    "watch": ("provscope.pytorch.watch", "watch"),
    "unwatch": ("provscope.pytorch.watch", "unwatch"),
    "query": ("provscope.query", None),
    "Point": ("provscope.records", "Point"),
    "new_id": ("provscope.ids", "new_id"),
    "load_config": ("provscope.config", "load_config"),
    "Config": ("provscope.config", "Config"),
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from provscope import query
    from provscope.config import Config, load_config
    from provscope.ids import new_id
    from provscope.job.api import (
        current_run,
        flush,
        log,
        produce,
        task,
        use,
        workflow,
    )
    from provscope.job.context import wrap
    from provscope.job.run import Run, Task
    from provscope.pytorch.watch import unwatch, watch
    from provscope.records import Point


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'provscope' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
