"""Regions that stay eager under torch.compile, without importing the compiler at start-up.

``torch.compiler.disable`` imports ``torch._dynamo`` when it is applied (1-3 s of every
worker's start-up, most of its import time), so decorating at import time would make every
process pay for compile whether it compiles or not. ``eager_under_compile`` marks a function
instead; :func:`keep_eager_regions` (called before anything of ours is compiled) wraps every
marked function in ``torch.compiler.disable`` then. Calls go through a trampoline that reads
the current implementation, so references taken before (``from ... import attention``,
methods) see the change.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

_marked: list[Callable[[], None]] = []
_lock = threading.Lock()
_active = False


def eager_under_compile(fn: F) -> F:
    """``fn`` runs eagerly (a graph break) inside compiled code, once
    :func:`keep_eager_regions` has run; until then it is ``fn`` itself behind one call."""
    impl = [fn]

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return impl[0](*args, **kwargs)

    def disable() -> None:
        import torch

        impl[0] = torch.compiler.disable(fn)

    with _lock:
        _marked.append(disable)
        if _active:
            disable()
    return call  # type: ignore[return-value]


def keep_eager_regions() -> None:
    """Apply ``torch.compiler.disable`` to every marked function (idempotent)."""
    global _active
    with _lock:
        if _active:
            return
        for disable in _marked:
            disable()
        _active = True
