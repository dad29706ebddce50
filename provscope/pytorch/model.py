"""Which layers of a model to watch, and the model's lineage description.

Pure functions over an ``nn.Module``: they unwrap DDP / ``torch.compile`` wrappers, select
layers by name pattern and depth, and describe the model (class, parameter counts, dtype,
device, a compact architecture summary) for its ``model`` entity.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from provscope.errors import ConfigError
from provscope.ids import content_id

log = logging.getLogger("provscope.torch")

__all__ = [
    "Layer",
    "architecture_digest",
    "architecture_summary",
    "describe_model",
    "model_entity_id",
    "select_layers",
    "unwrap",
]

_ARCH_CHARS = 2000

# Parameter-free modules that only rescale or pass their input on: their statistics repeat
# the previous layer's (dropout adds exactly its rate of zeros), at the full cost of a pass
# over the activation. Left out by default; a ``layers=`` pattern selects them.
_PASS_THROUGH: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.Identity,
)


@dataclass(frozen=True, slots=True)
class Layer:
    """One watched module: its dotted name, class name, and the parameters it owns directly.

    ``params`` are ``(name, tensor)`` pairs; a parameter shared by several modules (tied
    weights) belongs to the first module that owns it, so norms are never counted twice.
    ``hooks`` says how its forward is observed: ``"module"`` (forward hooks on ``module``),
    ``"call"`` (``module`` was compiled with ``module.compile()``: its hooks would run
    inside the compiled code, so its compiled call is wrapped instead) or ``"none"`` (it
    runs inside compiled code: parameter statistics only).
    """

    name: str
    module: nn.Module
    module_type: str
    params: tuple[tuple[str, nn.Parameter], ...]
    hooks: str = "module"

    @property
    def hookable(self) -> bool:
        """Forward hooks go on ``module`` on sampled steps."""
        return self.hooks == "module"


def is_optimized_module(module: Any) -> bool:
    """A ``torch.compile(module)`` wrapper (``OptimizedModule``)."""
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


def compiled_by_method(module: Any) -> bool:
    """Compiled in place with ``module.compile()``."""
    return getattr(module, "_compiled_call_impl", None) is not None


def compiled_inside(model: nn.Module) -> set[int]:
    """Ids of the modules whose forward runs inside compiled code: everything under a
    ``torch.compile`` wrapper, and a ``module.compile()``-compiled module with its subtree
    (hooks of those would be traced into the graph: graph breaks or recompiles)."""
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if is_optimized_module(module):
            inside.update(id(m) for m in cast(nn.Module, module._orig_mod).modules())
        elif compiled_by_method(module):
            inside.update(id(m) for m in module.modules())
    return inside


def unwrap(model: nn.Module) -> tuple[nn.Module, str | None]:
    """Strip ``DistributedDataParallel`` / ``DataParallel`` (``.module``) and
    ``torch.compile`` (``._orig_mod``) wrappers.

    Returns ``(inner, compiled_reason)``; ``compiled_reason`` is a sentence when a compiled
    wrapper was found (per-layer hooks would run inside the compiled graph), else None.
    """
    compiled = None
    inner = model
    for _ in range(8):  # wrappers nest at most a few levels deep
        if hasattr(inner, "_orig_mod") and type(inner).__name__ == "OptimizedModule":
            compiled = (
                "model is compiled with torch.compile: per-layer forward/backward hooks would "
                "force recompilation and graph breaks, so activation statistics and layer "
                "timings are skipped; parameter statistics are computed outside the graph"
            )
            inner = cast(nn.Module, inner._orig_mod)  # Module.__getattr__ says Tensor | Module
        elif isinstance(getattr(inner, "module", None), nn.Module) and type(inner).__name__ in (
            "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel",
        ):
            inner = cast(nn.Module, inner.module)  # checked to be a Module above
        else:
            break
    return inner, compiled


def _glob(pattern: str) -> Callable[[str], bool]:
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def _matcher(patterns: Sequence[str] | str | None) -> Callable[[str], bool] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled: list[Callable[[str], object]] = []  # truthy on a match
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"watch(layers=...): {pattern!r} is not a non-empty string; "
                              "give glob patterns ('encoder.*') or 're:<regex>'")
        if pattern.startswith("re:"):
            try:
                compiled.append(re.compile(pattern[3:]).fullmatch)
            except re.error as exc:
                raise ConfigError(f"watch(layers=...): bad regex {pattern[3:]!r}: {exc}") from None
        else:
            compiled.append(_glob(pattern))
    return lambda name: any(m(name) for m in compiled)


def select_layers(
    model: nn.Module,
    layers: Sequence[str] | str | None = None,
    depth: int | None = None,
    max_layers: int = 512,
) -> list[Layer]:
    """Pick the modules to watch.

    Default: every leaf module plus every module that owns parameters directly (e.g.
    ``MultiheadAttention``, whose projection weights are its own), except pass-through
    modules (``Dropout`` variants, ``Identity``). ``depth`` cuts the tree:
    modules exactly ``depth`` levels down are taken whole, shallower leaves too.
    ``layers`` keeps only the candidates (leaves and parameter owners, or the depth cut)
    whose names match one of the patterns (glob, or ``re:<regex>`` matched against the whole
    dotted name); a pattern also selects pass-through modules.
    TorchScript modules are skipped (hooks do not run inside them).

    More than ``max_layers`` candidates: the first ``max_layers`` are watched and one error
    line names the count, the cap and the setting.

    Raises:
        ConfigError: bad pattern or depth.
    """
    if depth is not None and (not isinstance(depth, int) or depth < 1):
        raise ConfigError(f"watch(depth=...): {depth!r} is not an integer >= 1")
    match = _matcher(layers)
    inside = compiled_inside(model)
    chosen: list[tuple[str, nn.Module]] = []
    boundaries: dict[str, nn.Module] = {}  # clean name -> module observed from outside
    for raw_name, module in model.named_modules():
        if not raw_name or isinstance(module, _script_types()):
            continue
        name = _clean(raw_name)
        if is_optimized_module(module) or (compiled_by_method(module) and
                                           not _inside_parent(model, raw_name, inside)):
            boundaries[name] = module
        if raw_name.endswith("_orig_mod") and name in boundaries and \
                next(module.children(), None) is not None:
            continue  # the compiled module itself: its wrapper stands for it
        level = name.count(".") + 1
        if depth is not None and level > depth:
            continue
        is_leaf = next(module.children(), None) is None
        owns = next(module.parameters(recurse=False), None) is not None
        ok = (level == depth or is_leaf) if depth is not None else (is_leaf or owns)
        if match is not None:
            ok = ok and match(name)
        elif depth is None:
            ok = ok and not isinstance(module, _PASS_THROUGH)
        if ok and not is_optimized_module(module):
            chosen.append((name, module))
    # Compiled blocks are watched from outside their compiled code, as one layer each.
    taken = {name for name, _ in chosen}
    for name, module in boundaries.items():
        if (match is None or match(name)) and (depth is None or name.count(".") < depth) \
                and name not in taken:
            chosen.append((name, module))
    if not chosen and next(model.parameters(), None) is not None and match is None:
        chosen = [("", model)]  # a model with no submodules is its own single layer
    if len(chosen) > max_layers:
        # The layer count depends on the model, not on a mistake in the script: a job must
        # not fail because its model grew. Watch the first layers and say so, once.
        log.error(
            "watch(): %d layers selected, more than the cap of %d (setting torch.max_layers "
            "/ PROVSCOPE_TORCH_MAX_LAYERS, or max_layers=); watching the first %d; narrow "
            "the choice with layers= patterns or depth=", len(chosen), max_layers, max_layers)
        chosen = chosen[:max_layers]
    seen: set[int] = set()
    out = []
    for name, module in chosen:
        target = module
        if name in boundaries:
            target = boundaries[name]
        elif is_optimized_module(module):
            target = module
        params = []
        owner = cast(nn.Module, target._orig_mod) if is_optimized_module(target) else target
        recurse = depth is not None or (is_optimized_module(target)
                                         and next(owner.children(), None) is None)
        for pname, param in owner.named_parameters(recurse=recurse):
            if id(param) in seen:
                continue
            seen.add(id(param))
            params.append((pname, param))
        if is_optimized_module(target):
            hooks = "module"  # the wrapper's own hooks run outside the compiled code
        elif compiled_by_method(target):
            hooks = "call"
        elif id(target) in inside:
            hooks = "none"
        else:
            hooks = "module"
        inner = owner if is_optimized_module(target) else target
        out.append(Layer(name or type(inner).__name__, target, type(inner).__name__,
                         tuple(params), hooks))
    return out


def _clean(name: str) -> str:
    """A module name without the ``_orig_mod`` steps of ``torch.compile`` wrappers, so a
    layer keeps its name whether or not its block is compiled."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _inside_parent(model: nn.Module, name: str, inside: set[int]) -> bool:
    """The parent of module ``name`` already runs compiled."""
    parent = name.rpartition(".")[0]
    if not parent:
        return id(model) in inside
    return id(model.get_submodule(parent)) in inside


def _script_types() -> tuple[type, ...]:
    import torch.jit

    return (torch.jit.ScriptModule,)


def architecture_summary(model: nn.Module, max_depth: int = 3) -> str:
    """A compact one-string summary: the module tree to ``max_depth`` levels, with runs of
    identical siblings collapsed (``layers: 12x GPT2Block(...)``); at most 2000 characters."""

    def describe(module: nn.Module, level: int) -> str:
        children = list(module.named_children())
        name = type(module).__name__
        if not children:
            extra = module.extra_repr()
            return f"{name}({extra})" if extra and len(extra) < 60 else name
        if level >= max_depth:
            return f"{name}(...)"
        parts: list[str] = []
        i = 0
        while i < len(children):
            cname, child = children[i]
            text = describe(child, level + 1)
            j = i + 1
            while j < len(children) and describe(children[j][1], level + 1) == text:
                j += 1
            if j - i > 1:
                parts.append(f"{cname}..{children[j - 1][0]}: {j - i}x {text}")
            else:
                parts.append(f"{cname}: {text}")
            i = j
        return f"{name}({', '.join(parts)})"

    text = describe(model, 0)
    return text if len(text) <= _ARCH_CHARS else text[: _ARCH_CHARS - 3] + "..."


def describe_model(model: nn.Module, layers: Sequence[Layer]) -> dict[str, Any]:
    """Attributes of the model's lineage entity: class, parameter counts (total, trainable,
    per watched layer), dominant dtype and device, and the architecture summary."""
    params = list(model.parameters())
    dtypes = Counter(str(p.dtype).removeprefix("torch.") for p in params)
    devices = Counter(str(p.device) for p in params)
    cls = type(model)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "parameters_total": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "parameters_per_layer": {
            layer.name: sum(p.numel() for _, p in layer.params) for layer in layers
        },
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "dtypes": dict(dtypes),
        "device": devices.most_common(1)[0][0] if devices else None,
        "architecture": architecture_summary(model),
    }


def architecture_digest(model: nn.Module) -> str:
    """``"sha256:<hex>"`` over the model's class and the name and shape of every parameter
    and buffer: the same for every instance of one architecture (whatever its weights,
    dtype or device), different when a layer is added, removed or resized.

    Reads shapes only (no tensor data, no device synchronisation).
    """
    cls = type(model)
    h = hashlib.sha256(f"{cls.__module__}.{cls.__qualname__}\n".encode())
    for kind, named in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, tensor in named:
            h.update(f"{kind} {name} {tuple(tensor.shape)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def model_entity_id(digest: str) -> str:
    """The entity id of a model with this ``architecture_digest``: one ``model`` entity
    per architecture across runs (checkpoints, keyed by their bytes, carry the weights)."""
    return content_id(f"model:{digest}")
