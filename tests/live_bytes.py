"""The peak bytes of tensors alive at once while a function runs, traced under
FakeTensorMode: no arithmetic and no real memory, so full-size models run in seconds on a
CPU. Counts each storage an op creates until its last tensor dies; inputs made before the
trace (weights, latents) are not counted, and neither are kernels' workspaces."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """``peak``: the most bytes of op-made storages alive at once; ``live``: those alive now."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}  # storage -> tensors of it still alive
        self._tracked: set[int] = set()  # ids of the tensors counted

    def _release(self, key: int, nbytes: int, tensor_id: int) -> None:
        self._tracked.discard(tensor_id)
        self._refs[key] -= 1
        if not self._refs[key]:
            del self._refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or id(t) in self._tracked:
                continue  # an in-place op's output is its input, counted already
            storage = t.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
            if key not in self._refs:  # a new storage, not a view of a counted one
                self._refs[key] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self._refs[key] += 1
            self._tracked.add(id(t))
            weakref.finalize(t, self._release, key, nbytes, id(t))
        return out


def traced_peak(fn: Callable[[], Any]) -> int:
    """Peak live bytes of ``fn()`` (call it inside a FakeTensorMode, with fake inputs)."""
    tracker = LiveBytes()
    with tracker, torch.no_grad():
        fn()
    return tracker.peak
