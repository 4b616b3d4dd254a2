"""HunyuanVideo diffusion transformer, built bottom-up: norms -> joint attention -> dual- and
single-stream blocks -> model.

Parameter names equal diffusers' ``HunyuanVideoTransformer3DModel`` so its safetensors load
with ``strict=True``. The model runs on token shards (see ``fastvideo.layers.sequence``): the
video tokens are split across the SP group, the text tokens (<= 256) are replicated on every
rank, and the joint video+text attention (``DistributedAttention.joint``) is the only layer
that communicates. The video and text streams are kept as separate tensors throughout (the
single-stream blocks apply their shared weights to each), so the sharded video is never
concatenated with the text except inside attention.

Numerics follow the reference: everything runs in the model dtype (diffusers keeps no fp32
parameters for this model); RMS norms compute their statistics in fp32, rotary in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvideo.cache.base import StepCacheCall
from fastvideo.distributed.runtime import ParallelRuntime
from fastvideo.kernels_bridge.eager import keep_eager_regions
from fastvideo.kernels_bridge.sta import STAConfig
from fastvideo.layers.attention import DistributedAttention
from fastvideo.layers.rotary import apply_rotary
from fastvideo.layers.sequence import SequenceShard, TokenGrid, patchify, unpatchify
from fastvideo.models.hunyuan.embeddings import (
    ConditionEmbedding,
    FeedForward,
    Gates,
    HunyuanRotary,
    TokenRefiner,
)

Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass
class HunyuanTransformerConfig:
    """diffusers ``HunyuanVideoTransformer3DModel`` config (same field names and defaults)."""

    in_channels: int = 16
    out_channels: int = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = (16, 56, 56)
    image_condition_type: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> HunyuanTransformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"transformer config has unknown fields: {', '.join(unknown)}")
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.rope_axes_dim = tuple(cfg.rope_axes_dim)
        cfg.out_channels = cfg.out_channels or cfg.in_channels
        if cfg.image_condition_type is not None:
            raise ValueError(
                f"image_condition_type={cfg.image_condition_type!r}: image-to-video HunyuanVideo "
                "checkpoints are not supported yet (text-to-video only)"
            )
        if cfg.qk_norm != "rms_norm":
            raise ValueError(f"transformer qk_norm={cfg.qk_norm!r} is not supported")
        if sum(cfg.rope_axes_dim) != cfg.attention_head_dim or len(cfg.rope_axes_dim) != 3:
            raise ValueError(
                f"rope_axes_dim {cfg.rope_axes_dim} must be 3 sizes summing to "
                f"attention_head_dim={cfg.attention_head_dim}"
            )
        return cfg

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch(self) -> tuple[int, int, int]:
        return (self.patch_size_t, self.patch_size, self.patch_size)


# --- norms -------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMS norm over the last dim as diffusers computes it (statistics in fp32; a half
    weight gets a half input)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(self.weight.dtype)
        return (h * self.weight).to(x.dtype)


class AdaNorm(Gates):
    """``linear(silu(temb))`` split in ``n`` modulation tensors [B, 1, D], and the affine-free
    LayerNorm they modulate (diffusers' ``AdaLayerNormZero`` / ``...ZeroSingle``)."""

    def __init__(self, dim: int, n: int):
        super().__init__(dim, n)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * (1 + scale) + shift


# --- attention ---------------------------------------------------------------------------
class JointAttention(nn.Module):
    """q/k/v of both streams (q/k RMS-normed per head, rotary on the video only) and their
    joint attention. ``dual=True`` (dual-stream blocks): the text has its own projections
    (``add_*``) and both outputs are projected here; ``dual=False`` (single-stream): the text
    shares the video's projections and the outputs are returned unprojected."""

    def __init__(self, dim: int, heads: int, dual: bool, dist_attn: DistributedAttention):
        super().__init__()
        self.heads, self.dual = heads, dual
        head_dim = dim // heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        if dual:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (
                nn.Linear(dim, dim) for _ in range(3)
            )
            self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
            self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])
            self.to_add_out = nn.Linear(dim, dim)
        self.dist_attn = dist_attn

    def _qkv(self, x: torch.Tensor, text: bool) -> tuple[torch.Tensor, ...]:
        """[B, L, D] -> q, k, v [B, L, H, D_head] with the stream's projections and norms."""
        if text and self.dual:
            projs = (self.add_q_proj, self.add_k_proj, self.add_v_proj)
            norm_q, norm_k = self.norm_added_q, self.norm_added_k
        else:
            projs, norm_q, norm_k = (self.to_q, self.to_k, self.to_v), self.norm_q, self.norm_k
        heads = (self.heads, -1)
        q = norm_q(projs[0](x).unflatten(2, heads))
        k = norm_k(projs[1](x).unflatten(2, heads))
        return q, k, projs[2](x).unflatten(2, heads)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        rope: Rope,
        text_lens: list[int] | None,
        shard: SequenceShard | None,
        grid: TokenGrid | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L_shard, D] video, c [B, L_text, D] text -> outputs of the same shapes
        (``grid``: the whole video's token grid, for sliding-tile attention)."""
        q, k, v = self._qkv(x, text=False)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        tq, tk, tv = self._qkv(c, text=True)
        out, t_out = self.dist_attn.joint(q, k, v, tq, tk, tv, text_lens, shard, grid)
        out, t_out = out.flatten(2).type_as(q), t_out.flatten(2).type_as(q)
        if not self.dual:
            return out, t_out
        return self.to_out[0](out), self.to_add_out(t_out)


# --- blocks ------------------------------------------------------------------------------
class DualStreamBlock(nn.Module):
    """Video and text streams with their own weights, mixed only by joint attention."""

    def __init__(self, cfg: HunyuanTransformerConfig, dist_attn: DistributedAttention):
        super().__init__()
        dim, mlp = cfg.inner_dim, int(cfg.inner_dim * cfg.mlp_ratio)
        self.norm1 = AdaNorm(dim, 6)
        self.norm1_context = AdaNorm(dim, 6)
        self.attn = JointAttention(dim, cfg.num_attention_heads, True, dist_attn)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mlp)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim, mlp)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        temb: torch.Tensor,
        rope: Rope,
        text_lens: list[int] | None,
        shard: SequenceShard | None,
        grid: TokenGrid | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L_shard, D], c [B, L_text, D], temb [B, D] -> (x, c)."""
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
        h = self.norm1.modulate(x, shift, scale)
        hc = self.norm1_context.modulate(c, c_shift, c_scale)
        out, c_out = self.attn(h, hc, rope, text_lens, shard, grid)
        x = x + out * gate
        c = c + c_out * c_gate
        del h, hc, out, c_out
        x = x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        c = c + c_gate_mlp * self.ff_context(
            self.norm2_context(c) * (1 + c_scale_mlp) + c_shift_mlp
        )
        return x, c


class SingleStreamBlock(nn.Module):
    """One set of weights for both streams: parallel attention + MLP, one output projection."""

    def __init__(self, cfg: HunyuanTransformerConfig, dist_attn: DistributedAttention):
        super().__init__()
        dim, mlp = cfg.inner_dim, int(cfg.inner_dim * cfg.mlp_ratio)
        self.attn = JointAttention(dim, cfg.num_attention_heads, False, dist_attn)
        self.norm = AdaNorm(dim, 3)
        self.proj_mlp = nn.Linear(dim, mlp)
        self.proj_out = nn.Linear(dim + mlp, dim)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        temb: torch.Tensor,
        rope: Rope,
        text_lens: list[int] | None,
        shard: SequenceShard | None,
        grid: TokenGrid | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L_shard, D], c [B, L_text, D], temb [B, D] -> (x, c)."""
        shift, scale, gate = self.norm(temb)
        h, hc = self.norm.modulate(x, shift, scale), self.norm.modulate(c, shift, scale)
        out, c_out = self.attn(h, hc, rope, text_lens, shard, grid)
        x = x + gate * self.proj_out(torch.cat([out, self._mlp(h)], dim=2))
        c = c + gate * self.proj_out(torch.cat([c_out, self._mlp(hc)], dim=2))
        return x, c

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj_mlp(h), approximate="tanh")


class PatchEmbed(nn.Module):
    """The patch conv (``x_embedder.proj``), applied to tokens as a matmul."""

    def __init__(self, patch: tuple[int, int, int], in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, pt*ph*pw*C] (features ordered (pt, ph, pw, C)) -> [B, L, D]."""
        w = self.proj.weight  # [D, C, pt, ph, pw]
        w = w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1)
        return F.linear(tokens.to(w.dtype), w, self.proj.bias)


# --- model -------------------------------------------------------------------------------
class HunyuanTransformer3D(nn.Module):
    """The HunyuanVideo DiT (text-to-video, embedded guidance).

    Args:
        config: architecture (diffusers config fields).
        runtime: process groups for sequence parallelism; ``None`` for one rank.
    """

    def __init__(self, config: HunyuanTransformerConfig, runtime: ParallelRuntime | None = None):
        super().__init__()
        self.config = cfg = config
        dim, heads = cfg.inner_dim, cfg.num_attention_heads
        self.runtime = runtime
        self.dist_attn = dist_attn = DistributedAttention(runtime)
        self.x_embedder = PatchEmbed(cfg.patch, cfg.in_channels, dim)
        self.context_embedder = TokenRefiner(
            cfg.text_embed_dim, heads, cfg.attention_head_dim, cfg.num_refiner_layers, dist_attn
        )
        self.time_text_embed = ConditionEmbedding(
            dim, cfg.pooled_projection_dim, cfg.guidance_embeds
        )
        self.transformer_blocks = nn.ModuleList(
            [DualStreamBlock(cfg, dist_attn) for _ in range(cfg.num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [SingleStreamBlock(cfg, dist_attn) for _ in range(cfg.num_single_layers)]
        )
        self.norm_out = AdaNorm(dim, 2)  # diffusers' AdaLayerNormContinuous: (scale, shift)
        self.proj_out = nn.Linear(dim, cfg.out_channels * cfg.patch[0] * cfg.patch[1] ** 2)
        self.rope = HunyuanRotary(cfg.rope_axes_dim, cfg.rope_theta)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def embed_text(
        self, text: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[int] | None]:
        """Refined text tokens [B, Lt', D] and the valid count per item (None: all Lt').

        As in diffusers, text key j of item b is attended iff j < mask[b].sum() (the mask's
        count, i.e. right padding). Tokens past the longest count are dropped (they are
        never attended); when the mask is a prefix they are dropped before the refiner, and
        with equal counts no mask is needed at all (so batch 1 never builds one).
        """
        if mask is None:
            return self.context_embedder(text, timestep, None), None
        lens = [int(n) for n in mask.sum(dim=1).tolist()]
        longest = max(lens)
        if longest == 0:
            raise ValueError("text_mask marks no valid text token")
        positions = torch.arange(mask.shape[1], device=mask.device)
        prefix = torch.tensor(lens, device=mask.device)[:, None] > positions
        if torch.equal(mask.bool(), prefix):
            text, mask = text[:, :longest], mask[:, :longest]
            if min(lens) == longest:
                mask = None
        refined = self.context_embedder(text, timestep, mask)[:, :longest]
        return refined, None if min(lens) == longest else lens

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        timestep: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None,
        pooled: torch.Tensor,
        guidance: torch.Tensor | None,
        grid: TokenGrid,
        shard: SequenceShard | None = None,
        cache: StepCacheCall | None = None,
    ) -> torch.Tensor:
        """Denoiser output for a (shard of a) video token sequence.

        Args:
            tokens: [B, L_shard, pt*ph*pw*C_in] noisy latents in token layout (features
                ordered (pt, ph, pw, C), see ``fastvideo.layers.sequence.patchify``).
            timestep: [B] diffusion timesteps (0..1000).
            text_states: [B, L_text, text_embed_dim] Llama hidden states (the same on every
                rank).
            text_mask: [B, L_text] 1 for valid text tokens (right padding), or None = all.
            pooled: [B, pooled_projection_dim] CLIP pooled text embedding.
            guidance: [B] embedded guidance scale times 1000 (as diffusers' pipeline passes
                it); required when ``config.guidance_embeds``.
            grid: the whole video's token grid; shard: this rank's slice (None = all).
            cache: the request's step cache and which rows are which CFG branch; None runs
                every block.
        Returns:
            [B, L_shard, pt*ph*pw*C_out] in the model dtype, features ordered (pt, ph, pw, C).
        """
        dtype = self.dtype
        rope = self.rope(grid, shard, tokens.device)
        temb = self.time_text_embed(timestep, pooled.to(dtype), guidance)
        c, text_lens = self.embed_text(text_states.to(dtype), timestep, text_mask)
        # The embedded input goes straight into the block loop (no local name keeps it
        # alive through the blocks); a step cache keeps it for the residual itself.
        if cache is None:
            x = self.run_blocks(self.x_embedder(tokens), c, temb, rope, text_lens, shard, grid)
        else:

            def blocks(h: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
                if rows is None:
                    return self.run_blocks(h, c, temb, rope, text_lens, shard, grid)
                lens = None if text_lens is None else [text_lens[i] for i in rows.tolist()]
                return self.run_blocks(h, c[rows], temb[rows], rope, lens, shard, grid)

            x = self.x_embedder(tokens)
            x = cache.cache.run(x, self.cache_signal(x, temb, shard), cache.branches, blocks)
        scale, shift = self.norm_out(temb)
        x = self.proj_out(self.norm_out.modulate(x, shift, scale))
        # proj_out's features are ordered (C, pt, ph, pw); tokens use (pt, ph, pw, C).
        return x.unflatten(2, (self.config.out_channels, -1)).transpose(2, 3).flatten(2)

    def run_blocks(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        temb: torch.Tensor,
        rope: Rope,
        text_lens: list[int] | None,
        shard: SequenceShard | None,
        grid: TokenGrid | None = None,
    ) -> torch.Tensor:
        """The block loop (the only one, cached or not): video x [B, L_shard, D] and text
        c [B, L_text, D] -> the video [B, L_shard, D] (the text stream ends here)."""
        for block in self.transformer_blocks:
            x, c = block(x, c, temb, rope, text_lens, shard, grid)
        for block in self.single_transformer_blocks:
            x, c = block(x, c, temb, rope, text_lens, shard, grid)
        return x

    def cache_signal(
        self, x: torch.Tensor, temb: torch.Tensor, shard: SequenceShard | None
    ) -> torch.Tensor:
        """What a step cache compares between steps: the first dual-stream block's
        modulated input ``norm1(x) * (1 + scale) + shift`` [B, L_valid, D], as in
        TeaCache4HunyuanVideo, over this rank's real tokens (sequence-parallel padding left
        out). Under sequence parallelism each rank compares its own shard and the ranks
        agree on the largest proposal (``cache.base``), so a decision may differ from the
        one a single rank would take over the whole video."""
        if not self.transformer_blocks:  # no dual-stream block: the conditioning alone
            return temb
        norm1 = self.transformer_blocks[0].norm1
        shift, scale = norm1(temb)[:2]
        valid = x.shape[1] if shard is None or shard.valid == 0 else shard.valid
        return norm1.modulate(x[:, :valid], shift, scale)

    def set_attention(self, backend: str | None, sta: STAConfig | None = None) -> None:
        """The attention backend (resolved name) and STA settings of this model only."""
        self.dist_attn.backend, self.dist_attn.sta = backend, sta

    def compile_blocks(self, backend: str = "inductor", mode: str | None = None) -> None:
        """Regional torch.compile of every block (attention and collectives stay eager)."""
        keep_eager_regions()
        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            block.compile(backend=backend, mode=mode)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Single-rank, diffusers-compatible call: [B, C, F, H, W] -> [B, C_out, F, H, W]."""
        patch = self.config.patch
        _, _, f, h, w = hidden_states.shape
        grid = TokenGrid(f // patch[0], h // patch[1], w // patch[2])
        tokens = patchify(hidden_states, patch)
        out = self.forward_tokens(
            tokens, timestep, encoder_hidden_states, encoder_attention_mask,
            pooled_projections, guidance, grid,
        )  # fmt: skip
        return unpatchify(out, grid, patch)
