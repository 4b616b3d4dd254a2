"""HunyuanVideo DiT inputs: timestep/guidance/pooled-text conditioning, the text token
refiner, and HunyuanVideo's 3-D rotary tables.

Module and parameter names equal diffusers' (``time_text_embed``, ``context_embedder``
with ``token_refiner.refiner_blocks``), so its checkpoints load with ``strict=True``. The
text side is small (<= 256 tokens) and replicated on every rank: nothing here communicates.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvideo.layers.attention import DistributedAttention
from fastvideo.layers.sequence import SequenceShard, TokenGrid

TIME_FREQ_DIM = 256  # the sinusoidal width of diffusers' ``Timesteps(256, ...)``


# --- conditioning embeddings -------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int = TIME_FREQ_DIM) -> torch.Tensor:
    """[B] timesteps -> [B, dim] fp32 sinusoidal embedding ordered (cos, sin)."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)
    args = t[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' ``TimestepEmbedding`` and, with ``act_1``,
    ``PixArtAlphaTextProjection``: the activation has no parameters, only names differ)."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ConditionEmbedding(nn.Module):
    """temb [B, D] = time(t) [+ guidance(g)] + text(pooled): diffusers'
    ``HunyuanVideoConditionEmbedding`` (with guidance) and, without guidance, the refiner's
    ``CombinedTimestepTextProjEmbeddings``."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIME_FREQ_DIM, dim)
        self.text_embedder = MLPEmbedder(pooled_dim, dim)
        self.guidance_embedder = MLPEmbedder(TIME_FREQ_DIM, dim) if guidance else None

    def forward(
        self, timestep: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """timestep [B], pooled [B, pooled_dim], guidance [B] -> [B, D] in pooled's dtype."""
        temb = self.timestep_embedder(timestep_embedding(timestep).to(pooled.dtype))
        text = self.text_embedder(pooled)
        if self.guidance_embedder is None:
            return temb + text
        if guidance is None:
            raise ValueError("this DiT embeds the guidance scale: pass guidance [B]")
        g = self.guidance_embedder(timestep_embedding(guidance).to(pooled.dtype))
        return temb + g + text


# --- text token refiner ------------------------------------------------------------------
class Projection(nn.Module):
    """``proj`` then an activation (diffusers' ``GELU`` / ``LinearActivation`` modules)."""

    def __init__(self, dim_in: int, dim_out: int, act: str):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return F.silu(x) if self.act == "silu" else F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """Linear -> activation -> Linear with diffusers' ``net.0.proj`` / ``net.2`` names."""

    def __init__(self, dim: int, inner_dim: int, act: str = "gelu_tanh"):
        super().__init__()
        self.net = nn.ModuleList(
            [Projection(dim, inner_dim, act), nn.Identity(), nn.Linear(inner_dim, dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class RefinerAttention(nn.Module):
    """Plain multi-head self-attention over the text (no q/k norm, no rotary)."""

    def __init__(self, dim: int, heads: int, dist_attn: DistributedAttention):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])
        self.dist_attn = dist_attn

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, D]; mask [B, 1, L, L] bool (True = attend) or None -> [B, L, D]."""
        q, k, v = (p(x).unflatten(2, (self.heads, -1)) for p in (self.to_q, self.to_k, self.to_v))
        if mask is None:
            out = self.dist_attn.local(q, k, v)
        else:
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)
        return self.to_out[0](out.flatten(2).type_as(q))


class Gates(nn.Module):
    """temb [B, D] -> ``n`` tensors [B, 1, D] from ``linear(silu(temb))`` (diffusers'
    ``HunyuanVideoAdaNorm``; also the modulation of the adaptive norms)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).unsqueeze(1).chunk(self.n, dim=2)


class RefinerBlock(nn.Module):
    """Pre-norm attention + SiLU MLP, both gated by the refiner's timestep embedding."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dist_attn: DistributedAttention):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefinerAttention(dim, heads, dist_attn)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ff = FeedForward(dim, int(dim * mlp_ratio), act="silu")
        self.norm_out = Gates(dim, 2)

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x [B, L, D], temb [B, D] -> [B, L, D]."""
        attn = self.attn(self.norm1(x), mask)
        gate_msa, gate_mlp = self.norm_out(temb)
        x = x + attn * gate_msa
        return x + self.ff(self.norm2(x)) * gate_mlp


class RefinerStack(nn.Module):
    """The refiner blocks and diffusers' self-attention mask of a padded text."""

    def __init__(
        self, dim: int, heads: int, layers: int, mlp_ratio: float, dist_attn: DistributedAttention
    ):
        super().__init__()
        self.refiner_blocks = nn.ModuleList(
            [RefinerBlock(dim, heads, mlp_ratio, dist_attn) for _ in range(layers)]
        )

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """mask [B, L]: a query attends to the valid keys, a padded query to key 0 only (it
        must attend to something); padded outputs are never used downstream."""
        attn_mask = None
        if mask is not None:
            valid = mask.to(x.device).bool()
            attn_mask = (valid[:, None, :, None] & valid[:, None, None, :]).clone()
            attn_mask[:, :, :, 0] = True
        for block in self.refiner_blocks:
            x = block(x, temb, attn_mask)
        return x


class TokenRefiner(nn.Module):
    """Text-encoder states [B, Lt, text_dim] -> refined text tokens [B, Lt, D]
    (diffusers' ``HunyuanVideoTokenRefiner``, the DiT's ``context_embedder``)."""

    def __init__(
        self, text_dim: int, heads: int, head_dim: int, layers: int, dist_attn: DistributedAttention
    ):
        super().__init__()
        dim = heads * head_dim
        self.time_text_embed = ConditionEmbedding(dim, text_dim, guidance=False)
        self.proj_in = nn.Linear(text_dim, dim)
        self.token_refiner = RefinerStack(dim, heads, layers, 4.0, dist_attn)

    def forward(
        self, text: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """text [B, Lt, text_dim], timestep [B], mask [B, Lt] (1 = valid) or None."""
        if mask is None:
            pooled = text.mean(dim=1)
        else:
            m = mask.float().unsqueeze(-1)
            pooled = ((text * m).sum(dim=1) / m.sum(dim=1)).to(text.dtype)
        temb = self.time_text_embed(timestep, pooled)
        return self.token_refiner(self.proj_in(text), temb, mask)


# --- rotary ------------------------------------------------------------------------------
class HunyuanRotary:
    """Cos/sin tables of HunyuanVideo's 3-D rotary embedding for a ``TokenGrid``.

    The head dimension is split into ``axes_dim`` = (t, h, w) parts (16/56/56 for head dim
    128), each rotated by its axis position with base ``theta`` (256). Angles are computed in
    fp32 exactly as diffusers' ``get_1d_rotary_pos_embed`` does, so the tables are bitwise
    equal to the reference's (un-interleaved: [.., D/2] instead of repeated pairs).
    """

    def __init__(self, axes_dim: tuple[int, int, int], theta: float):
        if any(d % 2 for d in axes_dim):
            raise ValueError(f"rope_axes_dim {axes_dim} must be even")
        self.axes_dim = tuple(axes_dim)
        self.theta = theta
        self._last: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _axis(self, dim: int, size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """cos, sin [size, dim/2] of positions 0..size-1."""
        exps = torch.arange(0, dim, 2, dtype=torch.float32, device=device)[: dim // 2] / dim
        inv_freq = 1.0 / (self.theta**exps)
        angles = torch.outer(torch.arange(size, dtype=torch.float32, device=device), inv_freq)
        return angles.cos(), angles.sin()

    def __call__(
        self, grid: TokenGrid, shard: SequenceShard | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, L_shard, 1, D/2] (fp32) for this rank's tokens; padding positions
        (past the real sequence) get position 0, their outputs are discarded."""
        key = (grid, shard, device)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        start, length = (0, grid.num_tokens) if shard is None else (shard.start, shard.length)
        index = torch.arange(start, start + length, device=device)
        index = torch.where(index < grid.num_tokens, index, torch.zeros_like(index))
        positions = (
            index // (grid.height * grid.width),
            (index // grid.width) % grid.height,
            index % grid.width,
        )
        sizes = (grid.frames, grid.height, grid.width)
        cos, sin = [], []
        for dim, size, pos in zip(self.axes_dim, sizes, positions, strict=True):
            c, s = self._axis(dim, size, device)
            cos.append(c[pos])
            sin.append(s[pos])
        result = torch.cat(cos, dim=-1)[None, :, None], torch.cat(sin, dim=-1)[None, :, None]
        self._last = (key, result)
        return result
