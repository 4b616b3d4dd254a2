"""Sharded DiT block weights under sequence parallelism (FSDP-style, inference only).

The ranks of a sequence-parallel group run the same blocks in the same order on different
tokens, so they can hold one copy of the block weights between them: each block's
parameters are packed into one flat buffer per dtype (:class:`FlatParams`, padded to a
multiple of N), rank r keeps the r-th of N equal pieces, and a forward pre-hook all-gathers
the block into a full buffer just before it runs while starting the gather of the next
block (asynchronous, on its own process group, so it overlaps the compute and the
attention's all-to-alls). A forward hook frees the full buffer again: its storage is
resized to zero, so the parameters keep their shapes and identity but hold no memory.

Everything outside the blocks (embeddings, norms, head) stays replicated. Every rank of
the group must run the blocks identically (the step caches decide collectively), or the
gathers would not match up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastvideo.distributed.runtime import GroupView
from fastvideo.layers.flat_params import FlatParams, distinct_storage_bytes, move_buffers
from fastvideo.layers.offload import HOST, block_lists

Work = Any  # a torch.distributed work handle


class ShardedBlocks:
    """Shards ``blocks``' weights across ``group`` and gathers them on demand."""

    def __init__(
        self, model: nn.Module, device: torch.device, group: GroupView, blocks: list[nn.Module]
    ) -> None:
        self.group = group
        self.device = device
        n, me = group.size, group.rank
        inside = {id(p) for b in blocks for p in b.parameters()}
        for p in model.parameters():
            if id(p) not in inside:
                p.data = p.data.to(device)
        move_buffers(model, device)
        self.flats: list[FlatParams] = []
        self.shards: list[dict[torch.dtype, torch.Tensor]] = []
        self.full: list[dict[torch.dtype, torch.Tensor]] = []
        for block in blocks:
            flat = FlatParams(block, HOST, align=n)  # frees the block's loaded tensors
            self.shards.append(
                {dt: buf.view(n, -1)[me].to(device).clone() for dt, buf in flat.buffers.items()}
            )
            full = flat.empty_like(device)
            flat.bind(full)
            flat.buffers = {}  # the host copy goes; the parameters point at ``full``
            for buf in full.values():
                buf.untyped_storage().resize_(0)
            self.flats.append(flat)
            self.full.append(full)
        self.nccl = group.group is not None and dist.get_backend(group.group) == "nccl"
        self.pending: dict[int, list[Work]] = {}
        self.gathers = 0  # blocks gathered (counted for tests and logs)
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._before(i)))
            self.handles.append(block.register_forward_hook(self._after(i)))

    @classmethod
    def apply(cls, model: nn.Module, device: torch.device, group: GroupView) -> nn.Module:
        """Shard ``model``'s blocks (:func:`block_lists`) across ``group``; returns it."""
        blocks = [b for blocks in block_lists(model) for b in blocks]
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no block list to shard")
        model._fastvideo_sharded = cls(model, device, group, blocks)  # type: ignore[assignment]
        return model

    @property
    def shard_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.shards for t in s.values())

    def _gather(self, i: int) -> None:
        """Start gathering block i into its full buffers (asynchronously)."""
        works = []
        n = self.group.size
        for dt, full in self.full[i].items():
            full.untyped_storage().resize_(full.numel() * full.element_size())
            shard = self.shards[i][dt]
            if n == 1:
                full.copy_(shard)
            elif self.nccl:
                works.append(
                    dist.all_gather_into_tensor(full, shard, group=self.group.group, async_op=True)
                )
            else:
                parts = list(full.chunk(n))
                works.append(dist.all_gather(parts, shard, group=self.group.group, async_op=True))
        self.gathers += 1
        self.pending[i] = works

    def _before(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if i not in self.pending:
                self._gather(i)
            for work in self.pending.pop(i):
                work.wait()
            # Not past the last block: a gather left pending between calls would hold a
            # whole block (and, across requests, could meet another plan's collectives).
            if i + 1 < len(self.full) and i + 1 not in self.pending:
                self._gather(i + 1)

        return hook

    def _after(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            for full in self.full[i].values():
                full.untyped_storage().resize_(0)

        return hook


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of weights ``model`` holds on this rank: the storages its parameters point at
    (a sharded block's full buffers hold none between calls) plus its shards."""
    sharded: ShardedBlocks | None = getattr(model, "_fastvideo_sharded", None)
    held = distinct_storage_bytes(list(model.parameters()))
    return held + (sharded.shard_bytes if sharded is not None else 0)
