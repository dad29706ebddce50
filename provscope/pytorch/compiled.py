"""Observing a module compiled with ``module.compile()`` from outside its compiled code.

``module.compile()`` compiles the module's whole ``_call_impl``, hooks included: a hook
registered on such a module runs inside the compiled code, where its Python side effects
(timers, events, lists) cause graph breaks, and registering or removing it changes what
the compiler guards on. So provscope registers no hook there: it replaces the module's
``_compiled_call_impl`` once, at ``watch()``, with :class:`CompiledCall`, which calls the
watcher's pre- and post-callables in plain Python around the untouched compiled call. The
callables are cheap when the step is not sampled. PyTorch drops ``_compiled_call_impl``
when a module is pickled, so a saved model carries none of this; ``uninstall`` restores
the compiled call.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["CompiledCall", "install", "uninstall"]


class CompiledCall:
    """The compiled call of one module, with callables run before and after it."""

    __slots__ = ("module", "original", "post", "pre")

    def __init__(self, original: Callable[..., Any], module: nn.Module) -> None:
        self.original = original
        self.module = weakref.ref(module)  # the module holds this call: no cycle
        self.pre: list[Callable[[Any, tuple, dict], None]] = []
        self.post: list[Callable[[Any, tuple, Any], None]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module()
        for pre in self.pre:
            pre(module, args, kwargs)  # provscope's callables never raise
        out = self.original(*args, **kwargs)
        for post in self.post:
            post(module, args, out)
        return out


def install(module: nn.Module, *, pre: Callable[[Any, tuple, dict], None] | None = None,
            post: Callable[[Any, tuple, Any], None] | None = None) -> CompiledCall:
    """Run ``pre(module, args, kwargs)`` before and ``post(module, args, output)`` after each
    call of ``module`` (compiled with ``module.compile()``), outside its compiled code."""
    call = module.__dict__.get("_compiled_call_impl")
    if not isinstance(call, CompiledCall):
        original = module._compiled_call_impl
        if original is None:
            raise ValueError(f"{type(module).__name__} is not compiled with module.compile()")
        call = CompiledCall(original, module)
        module._compiled_call_impl = call
    if pre is not None:
        call.pre.append(pre)
    if post is not None:
        call.post.append(post)
    return call


def uninstall(module: nn.Module) -> None:
    """Put the module's own compiled call back. Idempotent."""
    call = module.__dict__.get("_compiled_call_impl")
    if isinstance(call, CompiledCall):
        module._compiled_call_impl = call.original
