"""File-system usage collector for configured paths.

Emits measurement ``filesystem`` (tags ``host``, ``path``): ``total_bytes``,
``used_bytes``, ``free_bytes`` (available to unprivileged users), ``used_percent``.
Paths come from ``agent.collectors.filesystem.paths``; ``provscope run`` adds the job's
working directory with ``add_path``. A path that does not exist (yet) is skipped and
logged once; it is tried again each sample, so a checkpoint directory created later
appears by itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from provscope.agent.collectors.base import OnceLogger, specs_for

from provscope.catalogue import MetricSpec
from provscope.records import Point

__all__ = ["FilesystemCollector"]

log = logging.getLogger("provscope.collectors.filesystem")

# Each path is a series; bound the cardinality however many jobs register paths.
MAX_PATHS = 64


class FilesystemCollector:
    """Usage of the file systems holding the given paths.

    Args:
        host: value of the ``host`` tag.
        paths: directories or mount points to watch.
        psutil_module: the psutil module (tests pass a fake).
    """

    name: ClassVar[str] = "filesystem"

    def __init__(self, host: str, paths: Iterable[str] = ("/",),
                 psutil_module: Any = None) -> None:
        if psutil_module is None:
            import psutil as psutil_module
        self._ps = psutil_module
        self._host = host
        self._paths: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._once = OnceLogger(log)
        for p in paths:
            self.add_path(p)

    def add_path(self, path: str) -> bool:
        """Watch one more path (thread-safe). False when the path limit is reached."""
        with self._lock:
            if path in self._paths:
                return True
            if len(self._paths) >= MAX_PATHS:
                self._once("limit", "filesystem: more than %d paths; %s not watched",
                           MAX_PATHS, path, level=logging.WARNING)
                return False
            self._paths[path] = {"host": self._host, "path": path}
            return True

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def open(self) -> None:
        pass

    def collect(self, now_ns: int) -> list[Point]:
        out = []
        with self._lock:
            items = list(self._paths.items())
        for path, tags in items:
            try:
                u = self._ps.disk_usage(path)
            except OSError as exc:
                self._once(path, "filesystem: %s skipped (%s)", path, exc.strerror or exc)
                continue
            out.append(Point("filesystem", tags, {
                "total_bytes": float(u.total),
                "used_bytes": float(u.used),
                "free_bytes": float(u.free),
                "used_percent": float(u.percent),
            }, now_ns))
        return out

    def close(self) -> None:
        pass

    def specs(self) -> Sequence[MetricSpec]:
        return specs_for(self.name)
