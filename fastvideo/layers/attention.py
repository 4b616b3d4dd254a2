"""Sequence-parallel self-attention: Ulysses (all-to-all between sequence and heads)
combined with ring attention (K/V passed around, partial results merged by log-sum-exp).

Each rank holds ``[B, L/sp, H, D]`` of q, k and v. Ulysses trades the sequence split for a
head split inside its group, giving ``[B, L/ring, H/ulysses, D]``; ring attention then
covers the remaining sequence split. Padding tokens (the sequence is padded to a multiple
of the SP degree) are cut out of the keys, never attended to.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from fastvideo.distributed.runtime import GroupView, ParallelRuntime, PlanGroups
from fastvideo.kernels_bridge.attention import (
    active_backend,
    attention,
    attention_with_lse,
    needs_whole_sequence,
)
from fastvideo.kernels_bridge.eager import eager_under_compile
from fastvideo.kernels_bridge.sta import STAConfig
from fastvideo.layers.sequence import SequenceShard, TokenGrid

# Heads are exchanged in up to this many groups so that the all-to-all of one group
# overlaps the attention of the previous one.
MAX_HEAD_GROUPS = 3


class DistributedAttention:
    """Self-attention over a sequence sharded across the runtime's active SP group.

    Args:
        runtime: this rank's process groups; ``None`` means a single rank.
    """

    def __init__(self, runtime: ParallelRuntime | None = None):
        self.runtime = runtime
        # The model's attention backend and STA settings (None: the process default).
        self.backend: str | None = None
        self.sta: STAConfig | None = None

    def _refuse_ring(self, ring_size: int) -> None:
        if ring_size > 1 and needs_whole_sequence(self.backend):
            raise ValueError(
                f"attention_backend={active_backend(self.backend)!r} needs the whole "
                f"sequence on one rank: it works with Ulysses and CFG parallelism, not ring "
                f"attention (ring degree {ring_size})"
            )

    def local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention without sequence parallelism (e.g. cross-attention to the text)."""
        return attention(q, k, v, None, self.backend, self.sta)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        shard: SequenceShard | None = None,
        grid: TokenGrid | None = None,
    ) -> torch.Tensor:
        """q, k, v: [B, L_shard, H, D] -> [B, L_shard, H, D].

        ``grid`` (the whole video's token grid) lets sparse video backends (STA) lay out
        their tiles; they need the whole sequence on one rank, so not ring attention.
        On one rank this stays inside a compiled graph (``attention`` is one op there);
        the sequence-parallel path is an eager region.
        """
        groups = self.runtime.groups if self.runtime is not None else None
        if groups is None or groups.sp.size == 1:
            if shard is not None and shard.valid < q.shape[1]:
                k, v = k[:, : shard.valid], v[:, : shard.valid]
            return attention(q, k, v, grid, self.backend, self.sta)
        return self._sharded(groups, q, k, v, shard, grid)

    @eager_under_compile  # collectives and kernel dispatch stay eager under compile
    def _sharded(
        self,
        groups: PlanGroups,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        shard: SequenceShard | None,
        grid: TokenGrid | None,
    ) -> torch.Tensor:
        """``__call__`` over a sequence split across the SP group (Ulysses and/or ring)."""
        assert shard is not None, "a sharded sequence needs its SequenceShard"
        total = shard.total
        self._refuse_ring(groups.ring.size)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """Attention over the Ulysses-gathered chunk [B, L/ring, h, D]."""
            if groups.ring.size == 1:
                return attention(q, k[:, :total], v[:, :total], grid, self.backend, self.sta)
            return _ring_attention(groups.ring, q, k, v, q.shape[1], total, self.backend)

        if groups.ulysses.size == 1:
            return attend(q, k, v)
        return _ulysses(groups.ulysses, q, k, v, attend)

    @eager_under_compile  # collectives and kernel dispatch stay eager under compile
    def joint(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        text_q: torch.Tensor,
        text_k: torch.Tensor,
        text_v: torch.Tensor,
        text_lens: list[int] | None = None,
        shard: SequenceShard | None = None,
        grid: TokenGrid | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint attention over [video; text] (see ``fastvideo.layers.joint_attention``).

        Args:
            q, k, v: [B, L_shard, H, D] this rank's video tokens (rotated).
            text_q, text_k, text_v: [B, L_text, H, D] text tokens, the same on every rank.
            text_lens: valid text keys (a prefix) per batch item; None = all L_text.
            shard: this rank's video slice (padding keys are never attended).
            grid: the whole video's token grid (sliding-tile attention lays out its tiles
                on it; it needs every video key on one rank, so not ring attention).
        Returns:
            video out [B, L_shard, H, D] and text out [B, L_text, H, D] (all heads, on
            every rank).
        """
        from fastvideo.layers import joint_attention as ja

        text = (text_q, text_k, text_v)
        groups = self.runtime.groups if self.runtime is not None else None
        if groups is None or groups.sp.size == 1:
            if shard is not None and shard.valid < q.shape[1]:
                k, v = k[:, : shard.valid], v[:, : shard.valid]
            return ja.joint_local(q, k, v, text, text_lens, self.backend, self.sta, grid)
        assert shard is not None, "a sharded sequence needs its SequenceShard"
        total = shard.total
        if grid is not None:  # without the grid STA runs dense, which the ring can
            self._refuse_ring(groups.ring.size)

        def attend(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *text: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            """Joint attention of the Ulysses-gathered video chunk [B, L/ring, h, D]."""
            qkv_text = (text[0], text[1], text[2])
            if groups.ring.size == 1:
                kv, vv = k[:, :total], v[:, :total]
                return ja.joint_local(q, kv, vv, qkv_text, text_lens, self.backend, self.sta, grid)
            return ja.joint_ring(groups.ring, q, k, v, qkv_text, text_lens, total)

        if groups.ulysses.size == 1:
            return attend(q, k, v, *text)
        assert self.runtime is not None
        return ja.joint_ulysses(self.runtime, groups.ulysses, q, k, v, text, attend)


def _head_groups(heads_per_rank: int) -> int:
    return max(g for g in range(1, MAX_HEAD_GROUPS + 1) if heads_per_rank % g == 0)


def _ulysses(
    view: GroupView,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Ulysses attention: [B, Ls, H, D] x3 -> [B, Ls, H, D].

    Rank u of the group attends heads [u*H/U, (u+1)*H/U) over the whole gathered sequence.
    Heads move in G groups, pipelined: every group's q/k/v all-to-all is issued up front,
    and group g's attention runs while later groups are still in flight; each group's
    output all-to-all then overlaps the next group's attention.
    """
    u = view.size
    b, ls, h, d = q.shape
    groups = _head_groups(h // u)
    hg = h // (u * groups)
    inflight = []
    for g in range(groups):
        # [U, 3, B, Ls, hg, D]: chunk i holds, for destination rank i, its heads of group g.
        parts = [t.view(b, ls, u, groups, hg, d)[:, :, :, g] for t in (q, k, v)]
        send = torch.stack([p.permute(2, 0, 1, 3, 4) for p in parts], dim=1)
        recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=view.group, async_op=True)
        inflight.append((recv, work))
    out = torch.empty_like(q)
    out_groups = out.view(b, ls, u, groups, hg, d)
    returns = []
    for recv, work in inflight:
        work.wait()
        # dim 0 now indexes the source rank, i.e. the position of its sequence shard.
        qkv = recv.permute(1, 2, 0, 3, 4, 5).reshape(3, b, u * ls, hg, d)
        res = attend(qkv[0], qkv[1], qkv[2])  # [B, U*Ls, hg, D]
        send = res.view(b, u, ls, hg, d).transpose(0, 1).contiguous()  # [U, B, Ls, hg, D]
        back = torch.empty_like(send)
        work = dist.all_to_all_single(back, send, group=view.group, async_op=True)
        returns.append((back, work))
    for g, (back, work) in enumerate(returns):
        work.wait()
        # dim 0 now indexes the rank that owned these heads.
        out_groups[:, :, :, g].copy_(back.permute(1, 2, 0, 3, 4))
    return out


def _ring_attention(
    view: GroupView,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk: int,
    total: int,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of local q against every ring member's K/V chunk.

    Chunk r covers global tokens [r*chunk, (r+1)*chunk); its keys past ``total`` are
    padding and are cut off. The next chunk's transfer overlaps the current computation.
    Each partial comes from ``backend``'s own kernel when it returns the log-sum-exp
    (FA4), else from SDPA's.
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
            part, part_lse = attention_with_lse(q, kv[0, :, :valid], kv[1, :, :valid], backend)
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
