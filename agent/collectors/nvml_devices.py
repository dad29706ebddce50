"""Which NVML device is CUDA device ``i`` of this process.

CUDA and NVML number GPUs differently: CUDA counts only the devices in
``CUDA_VISIBLE_DEVICES``, in that variable's order, and by default fastest first
(``CUDA_DEVICE_ORDER=FASTEST_FIRST``); NVML counts every GPU of the node in PCI bus order.
Reading NVML at the CUDA index measures another GPU as soon as a scheduler hands a job
``CUDA_VISIBLE_DEVICES=2,3``. The UUID is the same in both, so resolve by UUID:

1. torch's ``get_device_properties(i).uuid`` when torch has CUDA initialised (exact: it is
   the device CUDA uses, whatever the variable or the order);
2. else entry ``i`` of ``CUDA_VISIBLE_DEVICES``: a UUID (``GPU-...``/``MIG-...``, or a
   unique prefix, as CUDA accepts) matched against NVML's UUIDs; an integer taken as an
   NVML index (right when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, as cluster schedulers assume);
3. else NVML index ``i`` (the same caveat).

Never initialises CUDA: torch is consulted only when it is already imported and
initialised.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from typing import Any

from provscope.agent.collectors.nvml_util import nvml_error_code

__all__ = ["cuda_uuid", "resolve_cuda_device"]

_NOT_FOUND = 6


def _torch_uuid(torch: Any, index: int) -> str | None:
    try:
        if torch is None or not torch.cuda.is_initialized():
            return None
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    except Exception:
        return None
    return str(uuid) if uuid else None


def _by_uuid(nv: Any, text: str) -> Any:
    """The handle of a full UUID, with or without its ``GPU-``/``MIG-`` prefix."""
    candidates = [text] if text.startswith(("GPU-", "MIG-")) else [f"GPU-{text}", f"MIG-{text}"]
    for candidate in candidates:
        try:
            return nv.nvmlDeviceGetHandleByUUID(candidate)
        except Exception as exc:
            if nvml_error_code(exc) != _NOT_FOUND:
                raise
    return None


def _by_prefix(nv: Any, prefix: str) -> Any:
    """The one NVML GPU whose UUID starts with ``prefix`` (CUDA accepts unique prefixes)."""
    with contextlib.suppress(Exception):  # not a full UUID: look for it by prefix below
        return nv.nvmlDeviceGetHandleByUUID(prefix)
    found = []
    for i in range(int(nv.nvmlDeviceGetCount())):
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            uuid = str(nv.nvmlDeviceGetUUID(handle))
        except Exception:
            continue  # a GPU this process may not open
        if uuid.startswith(prefix):
            found.append(handle)
    return found[0] if len(found) == 1 else None


def resolve_cuda_device(nv: Any, cuda_index: int, *, torch: Any = None,
                        environ: Mapping[str, str] | None = None,
                        whole_gpu: bool = False) -> Any:
    """The NVML handle of CUDA device ``cuda_index`` (rules in the module docstring).

    Args:
        nv: the initialised pynvml module.
        cuda_index: the CUDA ordinal (``torch.cuda.current_device()``).
        torch: the torch module, or None to use it only if already imported.
        environ: the environment (default ``os.environ``).
        whole_gpu: for a MIG instance return its parent GPU's handle (board-level
            counters such as energy exist only there).

    Returns:
        The handle, or None when it cannot be told (a malformed or ambiguous entry).

    Raises:
        NVML errors other than "not found" (the caller decides what they mean).
    """
    if torch is None:
        torch = sys.modules.get("torch")
    environ = os.environ if environ is None else environ
    handle = None
    uuid = _torch_uuid(torch, cuda_index)
    if uuid is not None:
        handle = _by_uuid(nv, uuid)
    else:
        visible = environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            handle = nv.nvmlDeviceGetHandleByIndex(cuda_index)
        else:
            entries = []
            for entry in (e.strip() for e in visible.split(",")):
                # CUDA stops at the first entry it cannot use.
                if not entry or (entry.lstrip("-").isdigit() and int(entry) < 0):
                    break
                entries.append(entry)
            if cuda_index >= len(entries):
                return None
            entry = entries[cuda_index]
            if entry.isdigit():
                handle = nv.nvmlDeviceGetHandleByIndex(int(entry))
            elif entry.startswith(("GPU-", "MIG-")):
                handle = _by_prefix(nv, entry)
    if handle is not None and whole_gpu and hasattr(nv, "nvmlDeviceIsMigDeviceHandle"):
        is_mig = nv.nvmlDeviceIsMigDeviceHandle(handle)
        if getattr(is_mig, "value", is_mig):
            handle = nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
    return handle


def cuda_uuid(nv: Any, cuda_index: int, **kw: Any) -> str | None:
    """The NVML UUID (``GPU-...``/``MIG-...``) of CUDA device ``cuda_index``; None when it
    cannot be told. Keyword arguments as for ``resolve_cuda_device``; never raises."""
    try:
        handle = resolve_cuda_device(nv, cuda_index, **kw)
        if handle is None:
            return None
        uuid = nv.nvmlDeviceGetUUID(handle)
    except Exception:
        return None
    return uuid.decode("ascii", "replace") if isinstance(uuid, bytes) else str(uuid)
