"""Wan2.1 diffusion transformer, built bottom-up: embeddings -> attention -> block -> model.

Parameter names equal diffusers' ``WanTransformer3DModel`` so its safetensors load
unchanged. The model runs on token shards (see ``fastvideo.layers.sequence``): with one
rank the shard is the whole video; with sequence parallelism each rank runs its slice and
self-attention is the only layer that communicates.

Numerics follow the reference: modulation, residual adds and the norms run in fp32; the
time embedder, modulation tables and the cross-attention norm keep fp32 weights when the
rest of the model is bf16 (see ``FP32_PARAM_PATTERNS``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvideo.cache.base import StepCacheCall
from fastvideo.distributed.runtime import ParallelRuntime
from fastvideo.kernels_bridge.sta import STAConfig
from fastvideo.layers.attention import DistributedAttention
from fastvideo.layers.rotary import RotaryEmbedding3D, apply_rotary
from fastvideo.layers.sequence import SequenceShard, TokenGrid, patchify, unpatchify

# Parameters kept in fp32 when the model runs in half precision (as diffusers does).
FP32_PARAM_PATTERNS = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")


@dataclass
class WanTransformerConfig:
    """diffusers ``WanTransformer3DModel`` config (same field names and defaults)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> WanTransformerConfig:
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"transformer config has unknown fields: {', '.join(unknown)}")
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.patch_size = tuple(cfg.patch_size)  # type: ignore[assignment]
        if cfg.image_dim is not None or cfg.added_kv_proj_dim is not None:
            raise ValueError(
                "transformer config has image_dim/added_kv_proj_dim: image-to-video Wan "
                "checkpoints are not supported yet (text-to-video only)"
            )
        if cfg.qk_norm not in ("rms_norm_across_heads",):
            raise ValueError(f"transformer qk_norm={cfg.qk_norm!r} is not supported")
        return cfg

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# --- embeddings --------------------------------------------------------------------------
def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] timesteps -> [B, dim] fp32 embedding ordered (cos, sin)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)
    args = t[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """linear_1 -> activation -> linear_2 (names as in diffusers)."""

    def __init__(self, dim_in: int, dim: int, act: nn.Module):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.act = act
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Timestep -> (temb [B, D], modulation [B, 6, D]); text [B, Lt, Dt] -> [B, Lt, D]."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = MLPEmbedder(freq_dim, dim, nn.SiLU())
        self.time_proj = nn.Linear(dim, dim * 6)
        self.text_embedder = MLPEmbedder(text_dim, dim, nn.GELU(approximate="tanh"))

    def embed_time(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        t_freq = sinusoidal_embedding(timestep, self.freq_dim)
        t_freq = t_freq.to(self.time_embedder.linear_1.weight.dtype)
        # The reference casts the time embedding to the text dtype before projecting.
        temb = self.time_embedder(t_freq).to(dtype)
        modulation = self.time_proj(F.silu(temb)).unflatten(1, (6, -1))
        return temb, modulation


# --- attention ---------------------------------------------------------------------------
class WanAttention(nn.Module):
    """Multi-head attention with q/k RMS norm across all heads.

    ``self_attention=True`` rotates q/k and goes through ``DistributedAttention``; cross
    attention (queries local, keys/values from the text) needs no communication.
    """

    def __init__(self, dim: int, heads: int, eps: float, dist_attn: DistributedAttention):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.dist_attn = dist_attn

    def _project(self, x: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """q, k, v as [B, L, H, D_head] (k, v from ``context`` for cross-attention)."""
        kv_src = x if context is None else context
        heads = (self.heads, -1)
        # Each raw projection is dropped as soon as it is normalised (peak memory).
        q = self.norm_q(self.to_q(x)).unflatten(2, heads)
        k = self.norm_k(self.to_k(kv_src)).unflatten(2, heads)
        return q, k, self.to_v(kv_src).unflatten(2, heads)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        shard: SequenceShard | None = None,
        grid: TokenGrid | None = None,
    ) -> torch.Tensor:
        """x: [B, L, D]; context: [B, Lt, D] for cross-attention -> [B, L, D]."""
        q, k, v = self._project(x, context)
        if context is None:
            assert rope is not None
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            out = self.dist_attn(q, k, v, shard, grid)
        else:
            out = self.dist_attn.local(q, k, v)
        return self.to_out[0](out.flatten(2).type_as(q))


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input and weight dtypes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class GeluProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear, with diffusers' ``net.0.proj`` / ``net.2`` names."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.net = nn.ModuleList(
            [GeluProjection(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


# --- block -------------------------------------------------------------------------------
class WanBlock(nn.Module):
    """Self-attention, cross-attention and FFN, each modulated by the timestep (fp32)."""

    def __init__(self, cfg: WanTransformerConfig, dist_attn: DistributedAttention):
        super().__init__()
        dim, heads = cfg.inner_dim, cfg.num_attention_heads
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, heads, cfg.eps, dist_attn)
        self.attn2 = WanAttention(dim, heads, cfg.eps, dist_attn)
        self.norm2 = (
            FP32LayerNorm(dim, cfg.eps, elementwise_affine=True)
            if cfg.cross_attn_norm
            else nn.Identity()
        )
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.empty(1, 6, dim))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        modulation: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        shard: SequenceShard | None,
        grid: TokenGrid | None = None,
    ) -> torch.Tensor:
        """x: [B, L, D]; context: [B, Lt, D]; modulation: [B, 6, D] -> [B, L, D]."""
        mod = (self.scale_shift_table + modulation.float()).chunk(6, dim=1)
        shift, scale, gate, c_shift, c_scale, c_gate = mod  # each [B, 1, D] fp32
        # The reference's arithmetic ((norm * (1 + scale) + shift), (x + out * gate), all in
        # fp32), done in place on fresh tensors: fewer passes and no fp32 copy of x.
        h = self.norm1(x.float()).mul_(1 + scale).add_(shift).type_as(x)
        out = self.attn1(h, rope=rope, shard=shard, grid=grid)
        x = (out * gate).add_(x).type_as(x)
        del out
        h = self.norm2(x.float()).type_as(x)
        x = x + self.attn2(h, context=context)
        h = self.norm3(x.float()).mul_(1 + c_scale).add_(c_shift).type_as(x)
        out = self.ffn(h)
        del h
        return (out * c_gate).add_(x).type_as(x)


# --- model -------------------------------------------------------------------------------
class WanTransformer3D(nn.Module):
    """The Wan2.1 DiT.

    Args:
        config: architecture (diffusers config fields).
        runtime: process groups for sequence parallelism; ``None`` for one rank.
    """

    def __init__(self, config: WanTransformerConfig, runtime: ParallelRuntime | None = None):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.runtime = runtime
        self.patch_embedding = nn.Conv3d(
            config.in_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.condition_embedder = ConditionEmbedder(dim, config.freq_dim, config.text_dim)
        self.dist_attn = dist_attn = DistributedAttention(runtime)
        self.blocks = nn.ModuleList([WanBlock(config, dist_attn) for _ in range(config.num_layers)])
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, config.out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.empty(1, 2, dim))
        self.rope = RotaryEmbedding3D(config.attention_head_dim, config.rope_max_seq_len)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def embed_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, pt*ph*pw*C] -> [B, L, D]: the patch conv as a matmul on token features."""
        w = self.patch_embedding.weight  # [D, C, pt, ph, pw]
        w = w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1)  # features ordered (pt, ph, pw, C)
        return F.linear(tokens.to(w.dtype), w, self.patch_embedding.bias)

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        grid: TokenGrid,
        shard: SequenceShard | None = None,
        cache: StepCacheCall | None = None,
    ) -> torch.Tensor:
        """Denoiser output for a (shard of a) token sequence.

        Args:
            tokens: [B, L_shard, pt*ph*pw*C_in] noisy latents in token layout.
            timestep: [B] diffusion timesteps.
            text: [B, L_text, text_dim] text-encoder states.
            grid: the whole video's token grid; shard: this rank's slice (None = all).
            cache: the request's step cache and which rows are which CFG branch; None runs
                every block.
        Returns:
            [B, L_shard, pt*ph*pw*C_out] in the model dtype.
        """
        rope = self.rope(grid, shard, tokens.device)
        temb, modulation = self.condition_embedder.embed_time(timestep, text.dtype)
        context = self.condition_embedder.text_embedder(text)
        # The embedded input is handed straight to the block loop (no local name keeps it
        # alive through the blocks); a step cache keeps it for the residual itself.
        if cache is None:
            x = self.run_blocks(self.embed_patches(tokens), context, modulation, rope, shard, grid)
        else:

            def blocks(h: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
                ctx, mod = (
                    (context, modulation) if rows is None else (context[rows], modulation[rows])
                )
                return self.run_blocks(h, ctx, mod, rope, shard, grid)

            # The modulated timestep input (Wan's e0) is the signal the caches compare.
            x = cache.cache.run(self.embed_patches(tokens), modulation, cache.branches, blocks)
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        return self.proj_out(x)

    def run_blocks(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        modulation: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        shard: SequenceShard | None,
        grid: TokenGrid,
    ) -> torch.Tensor:
        """The block loop: x [B, L_shard, D] -> [B, L_shard, D] (the only one, cached or
        not)."""
        for block in self.blocks:
            x = block(x, context, modulation, rope, shard, grid)
        return x

    def set_attention(self, backend: str | None, sta: STAConfig | None = None) -> None:
        """The attention backend (resolved name) and STA settings of this model only."""
        self.dist_attn.backend, self.dist_attn.sta = backend, sta

    def compile_blocks(self, backend: str = "inductor", mode: str | None = None) -> None:
        """Regional torch.compile: each block is compiled (one graph shared by all blocks,
        attention and its collectives left eager), so compile time stays small and it
        works under sequence parallelism."""
        for block in self.blocks:
            block.compile(backend=backend, mode=mode)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
    ) -> torch.Tensor:
        """Single-rank, diffusers-compatible call: [B, C, F, H, W] -> [B, C_out, F, H, W]."""
        patch = self.config.patch_size
        _, _, f, h, w = hidden_states.shape
        grid = TokenGrid(f // patch[0], h // patch[1], w // patch[2])
        tokens = patchify(hidden_states, patch)
        out = self.forward_tokens(tokens, timestep, encoder_hidden_states, grid)
        return unpatchify(out, grid, patch)
