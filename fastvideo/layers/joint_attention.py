"""Joint attention over ``[video tokens; text tokens]`` (MM-DiT style, e.g. HunyuanVideo)
with the video sharded across the SP group and the text replicated on every rank.

Every query (video and text) attends to every real video key and to the valid text keys of
its own batch item. Text keys are valid as a prefix: item ``b`` has ``text_lens[b]`` of them
(``None``: all). Invalid text keys are never passed to a kernel: with equal lengths the text
K/V are cut once; with unequal lengths each batch item runs on its own (batch items only
differ in their text length), so no attention mask is ever built and fast kernels run.

Sequence parallelism (the entry point is ``DistributedAttention.joint``):

- Ulysses: the video q/k/v go through the all-to-all (sequence split -> head split); each rank
  takes its own head slice of the replicated text q/k/v, attends over [gathered video; text],
  sends the video output back through the all-to-all and all-gathers the text output's heads.
- Ring: the text K/V are local on every rank, so each rank merges them exactly once (before
  the ring loop) while the video K/V travel around the ring; padding video keys are cut per
  chunk. Text queries are replicated over the ring, so their partial results are merged in a
  fixed (chunk) order: every ring rank ends with bitwise the same text output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from fastvideo.distributed.runtime import GroupView, ParallelRuntime
from fastvideo.kernels_bridge.attention import (
    attention,
    attention_with_lse,
    needs_whole_sequence,
    sta_with_lse,
)
from fastvideo.kernels_bridge.sta import STAConfig
from fastvideo.layers.attention import _head_groups, _merge, _ulysses
from fastvideo.layers.sequence import TokenGrid

Tensor = torch.Tensor
TextQKV = tuple[Tensor, Tensor, Tensor]
# (video q, k, v, text q, k, v) -> (video out, text out)
JointFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def equal_lengths(text_lens: Sequence[int] | None, text_len: int) -> int | None:
    """The common number of valid text keys when every item has the same, else None."""
    if text_lens is None:
        return text_len
    return text_lens[0] if len(set(text_lens)) == 1 else None


def _dense(
    qv: Tensor, kv: Tensor, vv: Tensor, qt: Tensor, kt: Tensor, vt: Tensor,
    backend: str | None, sta: STAConfig | None, grid: TokenGrid | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One attention call over the concatenated sequence; all keys given are attended.
    Sliding-tile attention (``backend`` sta, with the video's ``grid``) instead keeps, for
    video queries, the video keys of their window and every text key; text queries still
    see every key."""
    if grid is not None and needs_whole_sequence(backend):
        return _sliding_tile(qv, kv, vv, qt, kt, vt, grid, sta)
    lv = qv.shape[1]
    q = torch.cat([qv, qt], dim=1)
    k = torch.cat([kv, kt], dim=1)
    v = torch.cat([vv, vt], dim=1)
    out = attention(q, k, v, None, backend, sta)
    return out[:, :lv], out[:, lv:]


def _sliding_tile(
    qv: Tensor, kv: Tensor, vv: Tensor, qt: Tensor, kt: Tensor, vt: Tensor,
    grid: TokenGrid, sta: STAConfig | None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Joint STA: the video part of the video queries' softmax from the tile kernel, the
    text part from a dense kernel, merged by their log-sum-exp (the same as one masked
    softmax over [window video keys; text keys]); the few text queries run densely."""
    out, lse = _merge(None, None, *sta_with_lse(qv, kv, vv, grid, sta))
    if kt.shape[1] > 0:
        out, lse = _merge(out, lse, *attention_with_lse(qv, kt, vt))
    t_out = attention(qt, torch.cat([kv, kt], dim=1), torch.cat([vv, vt], dim=1))
    return out.to(qv.dtype), t_out


def joint_local(
    qv: Tensor,
    kv: Tensor,
    vv: Tensor,
    text: TextQKV,
    text_lens: Sequence[int] | None,
    backend: str | None = None,
    sta: STAConfig | None = None,
    grid: TokenGrid | None = None,
) -> tuple[Tensor, Tensor]:
    """Joint attention with every (real) video key present on this rank (``grid``: the
    video's token grid, which sliding-tile attention needs).

    Args:
        qv: [B, Lq, H, D] video queries; kv, vv: [B, Lk, H, D] video keys/values (padding
            already cut).
        text: text (q, k, v), each [B, Lt, H, D].
        text_lens: valid text keys per batch item (a prefix), None = all Lt.
    Returns:
        video out [B, Lq, H, D] and text out [B, Lt, H, D] (q's dtype).
    """
    qt, kt, vt = text
    n = equal_lengths(text_lens, kt.shape[1])
    if n is not None:
        return _dense(qv, kv, vv, qt, kt[:, :n], vt[:, :n], backend, sta, grid)
    assert text_lens is not None
    outs = [
        _dense(qv[b : b + 1], kv[b : b + 1], vv[b : b + 1], qt[b : b + 1],
               kt[b : b + 1, :n], vt[b : b + 1, :n], backend, sta, grid)
        for b, n in enumerate(text_lens)
    ]  # fmt: skip
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _partial(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(out [B, L, H, D], lse [B, H, L]) of q against k/v; zero keys give (0, -inf)."""
    if k.shape[1] == 0:
        b, lq, h, d = q.shape
        lse = torch.full((b, h, lq), float("-inf"), dtype=torch.float32, device=q.device)
        return q.new_zeros(b, lq, h, v.shape[-1]), lse
    return attention_with_lse(q, k, v)


def _text_partial(
    q: Tensor, kt: Tensor, vt: Tensor, text_lens: Sequence[int] | None
) -> tuple[Tensor, Tensor]:
    """Partial attention of q [B, L, H, D] against each item's valid text keys."""
    n = equal_lengths(text_lens, kt.shape[1])
    if n is not None:
        return _partial(q, kt[:, :n], vt[:, :n])
    assert text_lens is not None
    parts = [
        _partial(q[b : b + 1], kt[b : b + 1, :n], vt[b : b + 1, :n])
        for b, n in enumerate(text_lens)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def joint_ring(
    view: GroupView,
    qv: Tensor,
    kv: Tensor,
    vv: Tensor,
    text: TextQKV,
    text_lens: Sequence[int] | None,
    total: int,
) -> tuple[Tensor, Tensor]:
    """Ring attention of [local video chunk; text] queries over all video chunks + text.

    Ring rank r holds video tokens [r*C, (r+1)*C) (C = qv.shape[1]); keys past ``total`` are
    padding and are cut. The text K/V (replicated) are merged once, locally, first; then the
    video K/V chunks travel around the ring, the next transfer overlapping the current one.

    Returns:
        video out [B, C, H, D] and text out [B, Lt, H, D] (q's dtype).
    """
    qt, kt, vt = text
    size, me, chunk = view.size, view.rank, qv.shape[1]
    nxt, prv = view.ranks[(me + 1) % size], view.ranks[(me - 1) % size]
    out, lse = _merge(None, None, *_text_partial(qv, kt, vt, text_lens))
    text_parts: list[tuple[Tensor, Tensor] | None] = [None] * size
    kvs = torch.stack((kv, vv)).contiguous()
    for step in range(size):
        pending = None
        if step < size - 1:
            recv = torch.empty_like(kvs)
            ops = [
                dist.P2POp(dist.isend, kvs, nxt, group=view.group),
                dist.P2POp(dist.irecv, recv, prv, group=view.group),
            ]
            pending = dist.batch_isend_irecv(ops)
        owner = (me - step) % size
        valid = max(0, min(chunk, total - owner * chunk))
        if valid > 0:
            kc, vc = kvs[0, :, :valid], kvs[1, :, :valid]
            out, lse = _merge(out, lse, *attention_with_lse(qv, kc, vc))
            text_parts[owner] = attention_with_lse(qt, kc, vc)
        if pending is not None:
            for req in pending:
                req.wait()
            kvs = recv
    # Text queries are the same on every ring rank: merge their chunks in chunk order.
    t_out, t_lse = _merge(None, None, *_text_partial(qt, kt, vt, text_lens))
    for part in text_parts:
        if part is not None:
            t_out, t_lse = _merge(t_out, t_lse, *part)
    return out.to(qv.dtype), t_out.to(qt.dtype)


def joint_ulysses(
    runtime: ParallelRuntime,
    view: GroupView,
    qv: Tensor,
    kv: Tensor,
    vv: Tensor,
    text: TextQKV,
    attend: JointFn,
) -> tuple[Tensor, Tensor]:
    """Ulysses around a joint ``attend``: [B, Ls, H, D] video shards -> same-shaped output,
    plus the text output [B, Lt, H, D] (all heads, on every rank).

    ``_ulysses`` hands ``attend`` the gathered video of its head groups in order
    g = 0, 1, ...: rank u's group g holds heads ``u*H/U + g*hg + [0, hg)``, so the text
    q/k/v are sliced to the same heads here.
    """
    u, me = view.size, view.rank
    hu = qv.shape[2] // u
    hg = hu // _head_groups(hu)
    mine = [t[:, :, me * hu : (me + 1) * hu] for t in text]
    text_out: list[Tensor] = []

    def attend_group(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        g = len(text_out)
        qt, kt, vt = (t[:, :, g * hg : (g + 1) * hg] for t in mine)
        out, t_out = attend(q, k, v, qt, kt, vt)
        text_out.append(t_out)
        return out

    out = _ulysses(view, qv, kv, vv, attend_group)
    t_out = runtime.all_gather(view, torch.cat(text_out, dim=2), dim=2)
    return out, t_out
