"""Sequence-parallel self-attention: Ulysses (all-to-all between sequence and heads)
combined with ring attention (K/V passed around, partial results merged by log-sum-exp).

Each rank holds ``[B, L/sp, H, D]`` of q, k and v. Ulysses trades the sequence split for a
head split inside its group, giving ``[B, L/ring, H/ulysses, D]``; ring attention then
covers the remaining sequence split. Padding tokens (the sequence is padded to a multiple
of the SP degree) are cut out of the keys, never attended to.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastvideo.distributed.runtime import GroupView, ParallelRuntime
from fastvideo.kernels_bridge.attention import attention, attention_with_lse
from fastvideo.layers.sequence import SequenceShard


class DistributedAttention:
    """Self-attention over a sequence sharded across the runtime's active SP group.

    Args:
        runtime: this rank's process groups; ``None`` means a single rank.
    """

    def __init__(self, runtime: ParallelRuntime | None = None):
        self.runtime = runtime

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        shard: SequenceShard | None = None,
    ) -> torch.Tensor:
        """q, k, v: [B, L_shard, H, D] -> [B, L_shard, H, D]."""
        groups = self.runtime.groups if self.runtime is not None else None
        if groups is None or groups.sp.size == 1:
            if shard is not None and shard.valid < q.shape[1]:
                k, v = k[:, : shard.valid], v[:, : shard.valid]
            return attention(q, k, v)
        assert shard is not None, "a sharded sequence needs its SequenceShard"
        q, k, v = _ulysses_scatter_heads(self.runtime, groups.ulysses, q, k, v)
        chunk = q.shape[1]  # tokens per ring rank after the Ulysses gather
        if groups.ring.size == 1:
            k, v = k[:, : shard.total], v[:, : shard.total]
            out = attention(q, k, v)
        else:
            out = _ring_attention(groups.ring, q, k, v, chunk, shard.total)
        return _ulysses_gather_heads(self.runtime, groups.ulysses, out)


def _ulysses_scatter_heads(
    runtime: ParallelRuntime, view: GroupView, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, Ls, H, D] x3 -> [B, U*Ls, H/U, D] x3 with one all-to-all for q, k and v."""
    u = view.size
    if u == 1:
        return q, k, v
    b, ls, h, d = q.shape
    qkv = torch.stack((q, k, v))  # 3, B, Ls, H, D
    qkv = qkv.reshape(3, b, ls, u, h // u, d).permute(3, 0, 1, 2, 4, 5)  # U, 3, B, Ls, H/U, D
    qkv = runtime.all_to_all(view, qkv)  # now dim 0 indexes the source rank's sequence chunk
    qkv = qkv.permute(1, 2, 0, 3, 4, 5).reshape(3, b, u * ls, h // u, d)
    return qkv[0], qkv[1], qkv[2]


def _ulysses_gather_heads(
    runtime: ParallelRuntime, view: GroupView, out: torch.Tensor
) -> torch.Tensor:
    """[B, U*Ls, H/U, D] -> [B, Ls, H, D] (inverse all-to-all)."""
    u = view.size
    if u == 1:
        return out
    b, lu, hu, d = out.shape
    x = out.reshape(b, u, lu // u, hu, d).permute(1, 0, 2, 3, 4)  # U, B, Ls, H/U, D
    x = runtime.all_to_all(view, x)  # dim 0 now indexes the head chunk
    return x.permute(1, 2, 0, 3, 4).reshape(b, lu // u, u * hu, d)


def _ring_attention(
    view: GroupView,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk: int,
    total: int,
) -> torch.Tensor:
    """Attention of local q against every ring member's K/V chunk.

    Chunk r covers global tokens [r*chunk, (r+1)*chunk); its keys past ``total`` are
    padding and are cut off. The next chunk's transfer overlaps the current computation.
    """
    size, me = view.size, view.rank
    nxt, prv = view.ranks[(me + 1) % size], view.ranks[(me - 1) % size]
    kv = torch.stack((k, v)).contiguous()
    out = lse = None
    for step in range(size):
        pending = None
        if step < size - 1:
            recv = torch.empty_like(kv)
            ops = [
                dist.P2POp(dist.isend, kv, nxt, group=view.group),
                dist.P2POp(dist.irecv, recv, prv, group=view.group),
            ]
            pending = dist.batch_isend_irecv(ops)
        owner = (me - step) % size
        valid = max(0, min(chunk, total - owner * chunk))
        if valid > 0:
            part, part_lse = attention_with_lse(q, kv[0, :, :valid], kv[1, :, :valid])
            out, lse = _merge(out, lse, part, part_lse)
        if pending is not None:
            for req in pending:
                req.wait()
            kv = recv
    assert out is not None
    return out.to(q.dtype)


def _merge(
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    part: torch.Tensor,
    part_lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax-attention partials by their log-sum-exp (in fp32).

    out/part: [B, L, H, D]; lse/part_lse: [B, H, L].
    """
    if out is None or lse is None:
        return part.float(), part_lse
    new_lse = torch.logaddexp(lse, part_lse)
    w_old = torch.exp(lse - new_lse).transpose(1, 2).unsqueeze(-1)  # B, L, H, 1
    w_new = torch.exp(part_lse - new_lse).transpose(1, 2).unsqueeze(-1)
    return out * w_old + part.float() * w_new, new_lse
