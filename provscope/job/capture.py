"""What the in-job API captures: file digests, code, environment, resources.

Everything here is defensive: a command that hangs is cut off by a short timeout, and no
function raises. Argument and result summaries are ``provscope.jsonsafe.summarise``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from provscope.redact import DEFAULT_NAMES, mask_argv

__all__ = [
    "ResourceMeter",
    "code_version",
    "command_line",
    "describe_path",
    "environment",
    "looks_like_path",
    "reset_after_fork",
    "script_dir",
]

# Packages whose versions go into the run's environment when they are installed.
KEY_PACKAGES = (
    "provscope", "torch", "numpy", "transformers", "accelerate", "deepspeed", "lightning",
    "pytorch-lightning", "datasets", "tokenizers", "triton", "nvidia-ml-py",
)


def looks_like_path(value: Any) -> bool:
    """True for ``os.PathLike`` values and for strings naming an existing file or directory."""
    if isinstance(value, os.PathLike):
        return True
    if not isinstance(value, str) or not value or len(value) > 4096 or "\n" in value:
        return False
    if "://" in value:
        return False
    try:
        return ("/" in value or "." in value) and os.path.exists(value)
    except (OSError, ValueError):
        return False


def _sha256(path: str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return "sha256:" + h.hexdigest()


def describe_path(path_or_uri: str | os.PathLike[str], max_bytes: int) -> dict[str, Any]:
    """URI, digest, size and attributes of a file, directory or URI. Never raises.

    Local files up to ``max_bytes`` get a streaming sha256 (``digest``, "sha256:<hex>");
    a bigger file gets size and mtime only, and ``attributes["digest_skipped"]`` says why.
    A directory gets its file count and total size (first 10,000 files), no digest.
    A URI with a scheme (``s3://...``) is recorded as given. Blocks while hashing.
    """
    text = os.fspath(path_or_uri)
    if "://" in text and not text.startswith("file://"):
        return {"uri": text, "name": text.rstrip("/").rsplit("/", 1)[-1] or text,
                "digest": None, "size_bytes": None, "attributes": {}}
    local = text.removeprefix("file://")
    absolute = os.path.abspath(os.path.expanduser(local))
    out: dict[str, Any] = {"uri": Path(absolute).as_uri(), "name": os.path.basename(absolute),
                           "digest": None, "size_bytes": None, "attributes": {}}
    attrs: dict[str, Any] = out["attributes"]
    try:
        st = os.stat(absolute)
    except OSError as exc:
        attrs["exists"] = False
        attrs["error"] = exc.strerror or str(exc)
        return out
    attrs["mtime_ns"] = st.st_mtime_ns
    if os.path.isdir(absolute):
        files = total = 0
        for root, _dirs, names in os.walk(absolute):
            for name in names:
                try:
                    total += os.stat(os.path.join(root, name)).st_size
                except OSError:
                    continue
                files += 1
                if files >= 10_000:
                    break
            if files >= 10_000:
                attrs["truncated"] = True
                break
        attrs["files"] = files
        attrs["directory"] = True
        out["size_bytes"] = total
        return out
    out["size_bytes"] = st.st_size
    if st.st_size > max_bytes:
        attrs["digest_skipped"] = (
            f"size {st.st_size} bytes is over client.hash_max_bytes={max_bytes}"
        )
        return out
    try:
        start = time.perf_counter()
        out["digest"] = _sha256(absolute, st.st_size)
        attrs["hash_seconds"] = round(time.perf_counter() - start, 6)
    except OSError as exc:
        attrs["digest_skipped"] = f"cannot read: {exc.strerror or exc}"
    return out


@lru_cache(maxsize=8)
def code_version(script_dir: str) -> dict[str, Any]:
    """Git commit and dirty flag of the repository holding ``script_dir`` (cached).

    Runs ``git`` with a 2 s timeout; returns ``{}`` outside a repository or without git.
    """
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "-C", script_dir, *args], capture_output=True, text=True, timeout=2,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    out: dict[str, Any] = {"commit": commit}
    status = git("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        out["dirty"] = bool(status)
    top = git("rev-parse", "--show-toplevel")
    if top:
        out["repo"] = top
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        out["branch"] = branch
    return out


def script_dir() -> str:
    """Directory of the running script (the current directory for ``python -c``/REPL)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv and sys.argv[0] else "")
    if path and os.path.exists(path):
        return os.path.dirname(os.path.abspath(path))
    return os.getcwd()


def command_line(names: Iterable[str] = DEFAULT_NAMES) -> str:
    """The command line that started this process, shell-quoted, with the values of
    secret-looking options and ``KEY=VALUE`` words as ``***`` (``provscope.redact``'s
    rule over ``names``)."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return shlex.join(mask_argv([str(a) for a in argv], names))


@lru_cache(maxsize=1)
def _static_environment() -> dict[str, Any]:
    from importlib import metadata

    packages: dict[str, str] = {}
    for name in KEY_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except Exception:
            continue
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "packages": packages,
    }


def environment() -> dict[str, Any]:
    """Python, platform, key package versions, and torch/CUDA/driver when already loaded.

    Never imports torch: CUDA details are read only when the job has imported it.
    """
    out = dict(_static_environment())
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            out["torch"] = str(torch.__version__)
            out["cuda"] = torch.version.cuda
            if torch.cuda.is_available():
                out["cuda_devices"] = torch.cuda.device_count()
                out["gpu"] = torch.cuda.get_device_name(0)
        except Exception:
            pass
    driver = _nvidia_driver()
    if driver:
        out["driver"] = driver
    return out


@lru_cache(maxsize=1)
def _nvidia_driver() -> str | None:
    if not os.path.exists("/proc/driver/nvidia/version"):
        return None  # no NVIDIA kernel driver: skip loading NVML at all
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


class _Gpu:
    """NVML energy counter of the GPU this process uses; absent GPUs cost nothing.

    The NVML device is found by UUID, not at the CUDA index: the two numberings differ
    under ``CUDA_VISIBLE_DEVICES`` (``provscope.agent.collectors.nvml_devices``). A MIG
    instance reads its whole GPU's counter (NVML has no per-instance energy).
    """

    def __init__(self, nvml_module: Any = None) -> None:
        self.nv = nvml_module
        # CUDA index -> NVML handle (None: no answer for that device)
        self.handles: dict[int, Any] | None = None

    def energy_mj(self) -> float | None:
        torch = sys.modules.get("torch")
        if torch is None:
            return None
        try:
            if not torch.cuda.is_initialized():
                return None
            index = int(torch.cuda.current_device())
        except Exception:
            return None
        if self.handles is None:
            self.handles = {}
            try:
                if self.nv is None:
                    import pynvml

                    self.nv = pynvml
                self.nv.nvmlInit()
            except Exception:
                self.nv = None
        if self.nv is None:
            return None
        if index not in self.handles:
            try:
                from provscope.agent.collectors.nvml_devices import resolve_cuda_device

                self.handles[index] = resolve_cuda_device(self.nv, index, torch=torch,
                                                          whole_gpu=True)
            except Exception:
                self.handles[index] = None
        handle = self.handles[index]
        if handle is None:
            return None
        try:
            return float(self.nv.nvmlDeviceGetTotalEnergyConsumption(handle))
        except Exception:
            return None


_GPU = _Gpu()
_PROC: dict[int, Any] = {}


def _io_bytes() -> tuple[int, int] | None:
    pid = os.getpid()
    try:
        proc = _PROC.get(pid)
        if proc is None:
            import psutil

            proc = _PROC[pid] = psutil.Process(pid)
        io_ = proc.io_counters()
        return int(io_.read_bytes), int(io_.write_bytes)
    except Exception:
        return None


class ResourceMeter:
    """Resource use of this process between ``__init__`` and ``stop()`` (a task's span).

    ``stop()`` returns the ``TaskRecord.resources`` dict in base units: ``cpu_seconds``
    (process CPU time, all threads), ``peak_rss_bytes`` (process peak so far),
    ``read_bytes`` / ``write_bytes`` (storage I/O, Linux), ``gpu_seconds`` and
    ``gpu_energy_joules`` when CUDA is in use and NVML answers. Costs a few microseconds.
    """

    __slots__ = ("_cpu", "_energy", "_io", "_wall")

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        self._io = _io_bytes()
        self._energy = _GPU.energy_mj()

    def stop(self) -> dict[str, float]:
        out: dict[str, float] = {
            "cpu_seconds": round(time.process_time() - self._cpu, 6),
        }
        try:
            # ru_maxrss is in KiB on Linux, bytes on macOS.
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out["peak_rss_bytes"] = float(rss if sys.platform == "darwin" else rss * 1024)
        except Exception:
            pass
        if self._io is not None:
            now = _io_bytes()
            if now is not None:
                out["read_bytes"] = float(max(0, now[0] - self._io[0]))
                out["write_bytes"] = float(max(0, now[1] - self._io[1]))
        if self._energy is not None:
            energy = _GPU.energy_mj()
            if energy is not None:
                out["gpu_energy_joules"] = max(0.0, energy - self._energy) / 1000.0
                out["gpu_seconds"] = round(time.perf_counter() - self._wall, 6)
        return out


def reset_after_fork() -> None:
    """Forget per-process handles (psutil process object, NVML handles) in a forked child."""
    _PROC.clear()
    _GPU.handles = None
