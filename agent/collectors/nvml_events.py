"""Xid errors through an NVML event set, read on a thread of its own.

An Xid is the driver's report of a GPU fault (79: fallen off the bus, 48: double-bit ECC,
63/64: row remapping, 13/31/43: application faults ...). NVML delivers them as events of
type ``nvmlEventTypeXidCriticalError`` on an event set; ``nvmlEventSetWait`` blocks until
one arrives or the timeout passes (then it raises ``NVML_ERROR_TIMEOUT``). That wait runs
on the ``provscope-nvml-xid`` thread with a short timeout, so the sampling lane never
waits on it and ``stop`` returns within one timeout.

Per device (by UUID, which the event's device handle resolves to) it counts the Xids seen
since the agent started and keeps the last Xid code; ``read`` returns both.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from provscope.agent.collectors.nvml_util import nvml_const, nvml_error_code

__all__ = ["XidWatcher"]

log = logging.getLogger("provscope.collectors.nvml")

_XID_EVENT = 0x0000000000000008  # nvmlEventTypeXidCriticalError
_TIMEOUT = 10  # NVML_ERROR_TIMEOUT


class XidWatcher:
    """Counts Xid events per device on its own thread.

    Args:
        nv: the pynvml module.
        handles: {gpu UUID: device handle} of the devices to register.
        wait_ms: longest single ``nvmlEventSetWait``, milliseconds (bounds ``stop``).
    """

    def __init__(self, nv: Any, handles: Mapping[str, Any], wait_ms: int = 500) -> None:
        self._nv = nv
        self._handles = dict(handles)
        self._wait_ms = wait_ms
        self._set: Any = None
        self._registered: set[str] = set()
        self._counts: dict[str, int] = {}
        self._last: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wait_errors = 0

    @property
    def registered(self) -> frozenset[str]:
        """UUIDs whose Xid events are watched."""
        return frozenset(self._registered)

    def start(self) -> None:
        """Create the event set, register every device that supports Xid events, start
        the thread. A device that cannot register (not supported, no permission) is left
        out with one log line; never raises."""
        nv = self._nv
        xid = nvml_const(nv, "nvmlEventTypeXidCriticalError", _XID_EVENT) or _XID_EVENT
        try:
            self._set = nv.nvmlEventSetCreate()
        except Exception as exc:
            log.info("nvml: Xid events unavailable (%s); left out", exc)
            return
        for uuid, handle in self._handles.items():
            try:
                if not int(nv.nvmlDeviceGetSupportedEventTypes(handle)) & xid:
                    log.info("nvml: gpu %s has no Xid events; left out", uuid)
                    continue
                nv.nvmlDeviceRegisterEvents(handle, xid, self._set)
            except Exception as exc:
                log.info("nvml: Xid events of gpu %s cannot be registered (%s); left out",
                         uuid, exc)
                continue
            self._registered.add(uuid)
            self._counts[uuid] = 0
            self._last[uuid] = 0
        if not self._registered:
            self._free()
            return
        self._thread = threading.Thread(target=self._run, name="provscope-nvml-xid",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        nv = self._nv
        xid = nvml_const(nv, "nvmlEventTypeXidCriticalError", _XID_EVENT) or _XID_EVENT
        while not self._stop.is_set():
            try:
                data = nv.nvmlEventSetWait(self._set, self._wait_ms)
            except Exception as exc:
                if nvml_error_code(exc) != _TIMEOUT:
                    # A failing wait must not spin: count it and pause one timeout.
                    self.wait_errors += 1
                    if self.wait_errors == 1:
                        log.warning("nvml: waiting for Xid events failed (%s); retrying", exc)
                    self._stop.wait(self._wait_ms / 1000.0)
                continue
            if not int(data.eventType) & xid:
                continue
            try:
                uuid = nv.nvmlDeviceGetUUID(data.device)
                uuid = uuid.decode("ascii", "replace") if isinstance(uuid, bytes) else str(uuid)
            except Exception:
                continue  # the device went away between the event and the lookup
            with self._lock:
                if uuid in self._counts:
                    self._counts[uuid] += 1
                    self._last[uuid] = int(data.eventData)
            log.warning("nvml: gpu %s reported Xid %d", uuid, int(data.eventData))

    def read(self, uuid: str) -> tuple[int, int] | None:
        """(Xids seen since start, last Xid code or 0) of one device; None when its
        events are not watched."""
        with self._lock:
            if uuid not in self._counts:
                return None
            return self._counts[uuid], self._last[uuid]

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread (within one wait) and free the event set."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                # The wait is stuck in the driver: freeing the set under it would crash.
                log.warning("nvml: the Xid thread did not stop; event set left to exit")
                return
        self._free()

    def _free(self) -> None:
        if self._set is not None:
            try:
                self._nv.nvmlEventSetFree(self._set)
            except Exception:
                log.debug("nvmlEventSetFree failed", exc_info=True)
            self._set = None
