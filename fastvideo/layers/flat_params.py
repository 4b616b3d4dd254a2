"""A module's parameters packed into one flat buffer per dtype, each parameter a view of it.

Moving or gathering a block's weights then costs one copy (or one collective) per dtype
instead of one per tensor, and pointing the parameters at another set of buffers (a device
copy, an all-gathered full buffer) is a cheap re-bind: the ``Parameter`` objects stay the
same, so anything holding them (a LoRA manager, an optimiser-free inference loop) keeps
working. Used by :mod:`fastvideo.layers.offload` and :mod:`fastvideo.layers.sharded`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class _Slot:
    param: nn.Parameter
    offset: int
    numel: int
    shape: torch.Size


class FlatParams:
    """The distinct parameters of ``module`` (tied ones once), grouped by dtype.

    ``buffers`` (dtype -> 1-D tensor) is where the parameters point right after packing:
    a fresh copy on ``device`` (pinned host memory when ``pin``), padded to a multiple of
    ``align`` elements so it splits evenly into shards.
    """

    def __init__(
        self, module: nn.Module, device: torch.device, pin: bool = False, align: int = 1
    ) -> None:
        self.slots: dict[torch.dtype, list[_Slot]] = {}
        sizes: dict[torch.dtype, int] = {}
        for param in module.parameters():  # distinct Parameters, tied ones once
            offset = sizes.get(param.dtype, 0)
            slot = _Slot(param, offset, param.numel(), param.shape)
            self.slots.setdefault(param.dtype, []).append(slot)
            sizes[param.dtype] = offset + param.numel()
        self.numel = {dt: -(-n // align) * align for dt, n in sizes.items()}
        self.buffers: dict[torch.dtype, torch.Tensor] = {}
        for dtype, slots in self.slots.items():
            flat = torch.empty(self.numel[dtype], dtype=dtype, device=device, pin_memory=pin)
            for s in slots:
                flat[s.offset : s.offset + s.numel].copy_(s.param.data.reshape(-1))
            flat[sizes[dtype] :].zero_()  # padding: defined values for collectives
            self.buffers[dtype] = flat
        self.bind(self.buffers)

    @property
    def params(self) -> list[nn.Parameter]:
        return [s.param for slots in self.slots.values() for s in slots]

    @property
    def nbytes(self) -> int:
        return sum(n * dt.itemsize for dt, n in self.numel.items())

    def bind(self, flats: dict[torch.dtype, torch.Tensor]) -> None:
        """Point every parameter at its place in ``flats`` (dtype -> 1-D buffer of at least
        ``numel[dtype]`` elements)."""
        for dtype, slots in self.slots.items():
            flat = flats[dtype]
            for s in slots:
                s.param.data = flat[s.offset : s.offset + s.numel].view(s.shape)

    def empty_like(self, device: torch.device) -> dict[torch.dtype, torch.Tensor]:
        """Uninitialised buffers of the packed sizes on ``device``."""
        return {dt: torch.empty(n, dtype=dt, device=device) for dt, n in self.numel.items()}


def move_buffers(module: nn.Module, device: torch.device) -> None:
    """Move every registered buffer of ``module`` (and its children) to ``device``."""
    for child in module.modules():
        for name, buf in child._buffers.items():
            if buf is not None and buf.device != device:
                child._buffers[name] = buf.to(device)


def distinct_storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (what they hold in memory)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
