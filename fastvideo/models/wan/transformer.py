"""Wan diffusion transformer, built bottom-up: embeddings -> attention -> block -> model.

Parameter names equal diffusers' ``WanTransformer3DModel`` so its safetensors load
unchanged. The model runs on token shards (see ``fastvideo.layers.sequence``): with one
rank the shard is the whole video; with sequence parallelism each rank runs its slice and
self-attention is the only layer that communicates.

One class covers the family:

* Wan2.1 text-to-video, and Wan2.2 A14B (each expert is one instance; the I2V expert only
  has ``in_channels=36``: the image latents arrive concatenated to the noisy latents).
* Wan2.1 image-to-video / FLF2V (``image_dim`` and ``added_kv_proj_dim`` set): CLIP image
  states are embedded (``condition_embedder.image_embedder``) and cross-attention attends
  to them through extra K/V projections, its output added to the text attention's.
* Wan2.2 TI2V-5B: a timestep per token (``[B, L]``), hence per-token modulation.

Numerics follow the reference: modulation, residual adds and the norms run in fp32; the
time embedder, modulation tables and the cross-attention norm keep fp32 weights when the
rest of the model is bf16 (see ``FP32_PARAM_PATTERNS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvideo.cache.base import StepCacheCall
from fastvideo.distributed.runtime import ParallelRuntime
from fastvideo.kernels_bridge.eager import keep_eager_regions
from fastvideo.kernels_bridge.fused import (
    add_norm_modulate,
    gated_residual,
    linear_gelu,
    norm_modulate,
)
from fastvideo.kernels_bridge.sta import STAConfig
from fastvideo.layers.attention import DistributedAttention
from fastvideo.layers.rotary import RotaryEmbedding3D, norm_and_rotate
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
        if cfg.out_channels is None:  # diffusers: ``out_channels or in_channels``
            cfg.out_channels = cfg.in_channels
        if cfg.qk_norm not in ("rms_norm_across_heads",):
            raise ValueError(f"transformer qk_norm={cfg.qk_norm!r} is not supported")
        cfg.check_image_branch()
        return cfg

    def check_image_branch(self) -> None:
        """The image-conditioning fields must come together and fit the model width."""
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(
                "transformer config sets only one of image_dim / added_kv_proj_dim; the "
                "image-to-video branch needs both (or neither)"
            )
        if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.inner_dim:
            # The added K/V projections read the *embedded* image states, which have the
            # model width (num_attention_heads * attention_head_dim).
            raise ValueError(
                f"added_kv_proj_dim={self.added_kv_proj_dim} must equal the model width "
                f"{self.inner_dim}"
            )
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError("pos_embed_seq_len is set but image_dim is not")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# --- layers ------------------------------------------------------------------------------
class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input and weight dtypes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class GeluProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, approximate: str = "tanh"):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu(x, self.proj, self.approximate)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear, with diffusers' ``net.0.proj`` / ``net.2`` names.

    The blocks use GELU(tanh) and ``dim_out = dim``; the image embedder exact GELU and a
    different output width.
    """

    def __init__(
        self, dim: int, inner_dim: int, dim_out: int | None = None, approximate: str = "tanh"
    ):
        super().__init__()
        self.net = nn.ModuleList(
            [
                GeluProjection(dim, inner_dim, approximate),
                nn.Identity(),
                nn.Linear(inner_dim, dim if dim_out is None else dim_out),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


# --- embeddings --------------------------------------------------------------------------
def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Timesteps [*S] (e.g. [B] or [B, L]) -> [*S, dim] fp32 embedding ordered (cos, sin)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)
    args = t[..., None].float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulation_terms(
    table: torch.Tensor, modulation: torch.Tensor
) -> Callable[[int], torch.Tensor]:
    """Term i of ``table + modulation`` in fp32, shaped to broadcast against [B, L, D].

    table: [1, n, D] learned; modulation: [B, n, D] (one timestep per sample) or
    [B, L, n, D] (one per token, Wan2.2 TI2V) -> a function of i giving [B, 1, D] or
    [B, L, D]. One per sample: all n terms in one fp32 add (small), each a view. Per token,
    each term is taken just before use: all n at once would be an fp32 [B, L, n, D]
    tensor, the largest of the forward (~4 GB for TI2V-5B at 704x1280x121 with CFG). The
    values are the reference's (it adds the whole tables, then chunks).
    """
    if modulation.ndim == 3:
        terms = table.float() + modulation
        return lambda i: terms[:, i : i + 1]
    return lambda i: table[:, i : i + 1] + modulation[:, :, i].float()


class MLPEmbedder(nn.Module):
    """linear_1 -> activation -> linear_2 (names as in diffusers)."""

    def __init__(self, dim_in: int, dim: int, act: nn.Module):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.act = act
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ImageEmbedder(nn.Module):
    """CLIP image states [B, L_img, image_dim] -> [B, L_img, D] (diffusers' names).

    LayerNorm -> Linear -> GELU (exact, not tanh) -> Linear -> LayerNorm, the norms in fp32.
    With ``pos_embed_seq_len`` (Wan2.1 FLF2V) a learned position embedding is added first;
    then L_img must equal it (first frame's tokens followed by the last frame's).
    """

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm1 = FP32LayerNorm(image_dim)  # nn.LayerNorm defaults: eps 1e-5, affine
        self.ff = FeedForward(image_dim, image_dim, dim_out=dim, approximate="none")
        self.norm2 = FP32LayerNorm(dim)
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, pos_embed_seq_len, image_dim))
            if pos_embed_seq_len is not None
            else None
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            if image.shape[1] != self.pos_embed.shape[1]:
                raise ValueError(
                    f"image states have {image.shape[1]} tokens; this FLF2V model expects "
                    f"{self.pos_embed.shape[1]} (first-frame then last-frame CLIP tokens)"
                )
            image = image + self.pos_embed
        return self.norm2(self.ff(self.norm1(image)))


class ConditionEmbedder(nn.Module):
    """Timestep -> (temb, modulation); text [B, Lt, Dt] -> [B, Lt, D]; image (optional)."""

    def __init__(self, cfg: WanTransformerConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = MLPEmbedder(cfg.freq_dim, dim, nn.SiLU())
        self.time_proj = nn.Linear(dim, dim * 6)
        self.text_embedder = MLPEmbedder(cfg.text_dim, dim, nn.GELU(approximate="tanh"))
        self.image_embedder = (
            ImageEmbedder(cfg.image_dim, dim, cfg.pos_embed_seq_len)
            if cfg.image_dim is not None
            else None
        )

    def embed_time(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """timestep [B] or [B, L] -> temb [B, (L,) D] and modulation [B, (L,) 6, D]."""
        t_freq = sinusoidal_embedding(timestep, self.freq_dim)
        t_freq = t_freq.to(self.time_embedder.linear_1.weight.dtype)
        # The reference casts the time embedding to the text dtype before projecting.
        temb = self.time_embedder(t_freq).to(dtype)
        modulation = self.time_proj(F.silu(temb)).unflatten(-1, (6, -1))
        return temb, modulation


# --- attention ---------------------------------------------------------------------------
class WanAttention(nn.Module):
    """Multi-head attention with q/k RMS norm across all heads.

    Self-attention (no ``context``) rotates q/k and goes through ``DistributedAttention``;
    cross-attention (queries local, keys/values from the text) needs no communication.
    With ``added_kv_dim`` (image-to-video cross-attention) the queries also attend to the
    embedded image states through their own K/V projections, and that output is added to
    the text attention's.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        eps: float,
        dist_attn: DistributedAttention,
        added_kv_dim: int | None = None,
    ):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.dist_attn = dist_attn
        self.add_k_proj = self.add_v_proj = self.norm_added_k = None
        if added_kv_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_dim, dim)
            # No norm_added_q: the reference's checkpoints may carry one, which it ignores.
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def _project(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """q, k, v as [B, L, H, D_head] (k, v from ``context`` for cross-attention); with
        ``rope`` (self-attention) q and k are normalised and rotated in one pass."""
        kv_src = x if context is None else context
        heads = (self.heads, -1)
        # Each raw projection is dropped as soon as it is normalised (peak memory).
        if rope is not None:
            q = norm_and_rotate(self.to_q(x), self.norm_q, *rope).unflatten(2, heads)
            k = norm_and_rotate(self.to_k(kv_src), self.norm_k, *rope).unflatten(2, heads)
        else:
            q = self.norm_q(self.to_q(x)).unflatten(2, heads)
            k = self.norm_k(self.to_k(kv_src)).unflatten(2, heads)
        return q, k, self.to_v(kv_src).unflatten(2, heads)

    def _attend_image(self, q: torch.Tensor, image_context: torch.Tensor) -> torch.Tensor:
        """Attention of q [B, L, H, D_head] over image states [B, L_img, D] -> [B, L, D]."""
        assert self.add_k_proj is not None and self.add_v_proj is not None
        assert self.norm_added_k is not None
        heads = (self.heads, -1)
        k = self.norm_added_k(self.add_k_proj(image_context)).unflatten(2, heads)
        v = self.add_v_proj(image_context).unflatten(2, heads)
        return self.dist_attn.local(q, k, v).flatten(2).type_as(q)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        shard: SequenceShard | None = None,
        grid: TokenGrid | None = None,
        image_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, L, D]; context: [B, Lt, D] for cross-attention; image_context:
        [B, L_img, D] embedded image states (image-to-video cross-attention) -> [B, L, D]."""
        if context is None:
            assert rope is not None
            q, k, v = self._project(x, None, rope)
            out = self.dist_attn(q, k, v, shard, grid).flatten(2).type_as(q)
        else:
            q, k, v = self._project(x, context)
            out = self.dist_attn.local(q, k, v).flatten(2).type_as(q)
            if image_context is not None:
                # Each attention output is cast to the query dtype before the sum, as in
                # the reference processor.
                out = out + self._attend_image(q, image_context)
        return self.to_out[0](out)


# --- block -------------------------------------------------------------------------------
class WanBlock(nn.Module):
    """Self-attention, cross-attention and FFN, each modulated by the timestep (fp32)."""

    def __init__(self, cfg: WanTransformerConfig, dist_attn: DistributedAttention):
        super().__init__()
        dim, heads = cfg.inner_dim, cfg.num_attention_heads
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, heads, cfg.eps, dist_attn)
        self.attn2 = WanAttention(dim, heads, cfg.eps, dist_attn, cfg.added_kv_proj_dim)
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
        image_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, L, D]; context: [B, Lt, D]; modulation: [B, 6, D] or per token
        [B, L, 6, D]; image_context: [B, L_img, D] or None -> [B, L, D]."""

        # 0..5: shift, scale, gate, then the FFN's three.
        mod = modulation_terms(self.scale_shift_table, modulation)

        # The reference's arithmetic ((norm * (1 + scale) + shift), (x + out * gate), all in
        # fp32), one pass each on a GPU (kernels_bridge.fused), torch ops elsewhere.
        h = norm_modulate(x, self.norm1, mod(1), mod(0))
        out = self.attn1(h, rope=rope, shard=shard, grid=grid)
        x = gated_residual(x, out, mod(2))
        del out
        h = x if isinstance(self.norm2, nn.Identity) else norm_modulate(x, self.norm2)
        out = self.attn2(h, context=context, image_context=image_context)
        x, h = add_norm_modulate(x, out, self.norm3, mod(4), mod(3))  # x + out, then norm3
        del out
        out = self.ffn(h)
        del h
        return gated_residual(x, out, mod(5))


# --- model -------------------------------------------------------------------------------
class WanTransformer3D(nn.Module):
    """The Wan DiT (Wan2.1 T2V/I2V/FLF2V, Wan2.2 A14B experts and TI2V-5B).

    Args:
        config: architecture (diffusers config fields).
        runtime: process groups for sequence parallelism; ``None`` for one rank.
    """

    def __init__(self, config: WanTransformerConfig, runtime: ParallelRuntime | None = None):
        super().__init__()
        config.check_image_branch()
        self.config = config
        dim = config.inner_dim
        self.runtime = runtime
        self.patch_embedding = nn.Conv3d(
            config.in_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.condition_embedder = ConditionEmbedder(config)
        self.dist_attn = dist_attn = DistributedAttention(runtime)
        self.blocks = nn.ModuleList([WanBlock(config, dist_attn) for _ in range(config.num_layers)])
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, config.out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.empty(1, 2, dim))
        self.rope = RotaryEmbedding3D(config.attention_head_dim, config.rope_max_seq_len)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def takes_image(self) -> bool:
        """Whether forward_tokens needs CLIP image states (Wan2.1 I2V / FLF2V)."""
        return self.condition_embedder.image_embedder is not None

    def embed_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, pt*ph*pw*C] -> [B, L, D]: the patch conv as a matmul on token features."""
        w = self.patch_embedding.weight  # [D, C, pt, ph, pw]
        w = w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1)  # features ordered (pt, ph, pw, C)
        return F.linear(tokens.to(w.dtype), w, self.patch_embedding.bias)

    def _check_conditions(
        self,
        tokens: torch.Tensor,
        timestep: torch.Tensor,
        image: torch.Tensor | None,
    ) -> None:
        b, length = tokens.shape[:2]
        if timestep.shape not in ((b,), (b, length)):
            raise ValueError(
                f"timestep has shape {tuple(timestep.shape)}; expected [{b}] (one per sample) "
                f"or [{b}, {length}] (one per token of this shard)"
            )
        if self.takes_image and image is None:
            raise ValueError("this image-to-video DiT needs `image` (CLIP image states)")
        if not self.takes_image and image is not None:
            raise ValueError("`image` given, but this DiT has no image branch (image_dim)")

    def _embed_conditions(
        self, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> temb [B, (L,) D], modulation [B, (L,) 6, D], text context [B, L_text, D] and
        image context [B, L_img, D] (None without an image branch)."""
        embedder = self.condition_embedder
        temb, modulation = embedder.embed_time(timestep, text.dtype)
        context = embedder.text_embedder(text)
        if embedder.image_embedder is None:
            return temb, modulation, context, None
        assert image is not None  # see _check_conditions
        # The reference pipeline hands the image states over in the DiT's dtype.
        return temb, modulation, context, embedder.image_embedder(image.to(self.dtype))

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        grid: TokenGrid,
        shard: SequenceShard | None = None,
        cache: StepCacheCall | None = None,
        *,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoiser output for a (shard of a) token sequence.

        Args:
            tokens: [B, L_shard, pt*ph*pw*C_in] noisy latents in token layout (for I2V
                models the image-condition latents are part of C_in).
            timestep: [B] diffusion timesteps, or [B, L_shard] one per token of this shard
                (Wan2.2 TI2V; padding tokens may hold any value).
            text: [B, L_text, text_dim] text-encoder states.
            grid: the whole video's token grid; shard: this rank's slice (None = all).
            cache: the request's step cache and which rows are which CFG branch; None runs
                every block.
            image: [B, L_img, image_dim] CLIP vision penultimate hidden states, required
                exactly when the model has an image branch (for FLF2V, L_img =
                ``pos_embed_seq_len``: the first frame's tokens, then the last frame's).
        Returns:
            [B, L_shard, pt*ph*pw*C_out] in the model dtype.
        """
        self._check_conditions(tokens, timestep, image)
        rope = self.rope(grid, shard, tokens.device)
        temb, modulation, context, image_ctx = self._embed_conditions(timestep, text, image)
        # The embedded input is handed straight to the block loop (no local name keeps it
        # alive through the blocks); a step cache keeps it for the residual itself.
        if cache is None:
            x = self.run_blocks(
                self.embed_patches(tokens), context, modulation, rope, shard, grid, image_ctx
            )
        else:

            def blocks(h: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
                ctx, mod, img = context, modulation, image_ctx
                if rows is not None:
                    ctx, mod = context[rows], modulation[rows]
                    img = None if image_ctx is None else image_ctx[rows]
                return self.run_blocks(h, ctx, mod, rope, shard, grid, img)

            # The modulated timestep input (Wan's e0) is the signal the caches compare.
            x = cache.cache.run(self.embed_patches(tokens), modulation, cache.branches, blocks)
        # The output norm is modulated by temb itself ([B, D] or per token [B, L, D]).
        t = temb.unsqueeze(1) if temb.ndim == 2 else temb
        shift, scale = self.scale_shift_table[:, :1] + t, self.scale_shift_table[:, 1:] + t
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
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block loop: x [B, L_shard, D] -> [B, L_shard, D] (the only one, cached or
        not); image: [B, L_img, D] embedded image context or None."""
        for block in self.blocks:
            x = block(x, context, modulation, rope, shard, grid, image)
        return x

    def lora_aliases(self, name: str) -> list[str]:
        """Wan's original name for one of ours (what community LoRA files use)."""
        from fastvideo.models.wan.lora_names import wan_name

        original = wan_name(name)
        return [] if original is None else [original]

    def set_attention(self, backend: str | None, sta: STAConfig | None = None) -> None:
        """The attention backend (resolved name) and STA settings of this model only."""
        self.dist_attn.backend, self.dist_attn.sta = backend, sta

    def compile_blocks(self, backend: str = "inductor", mode: str | None = None) -> None:
        """Regional torch.compile: each block is compiled (one graph shared by all blocks;
        on one rank dense attention is an op of that graph, under sequence parallelism its
        collectives stay eager), so compile time stays small. ``backend``: a
        torch.compile backend name (or callable)."""
        keep_eager_regions()
        for block in self.blocks:
            block.compile(backend=backend, mode=mode)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Single-rank, diffusers-compatible call: [B, C, F, H, W] -> [B, C_out, F, H, W].

        timestep: [B] or [B, F'*H'*W'] (per token); encoder_hidden_states_image: CLIP
        states as diffusers takes them ([2B, L, image_dim] for FLF2V: the two images of a
        sample are consecutive rows, and are joined into one [B, 2L] sequence here).
        """
        patch = self.config.patch_size
        b, _, f, h, w = hidden_states.shape
        grid = TokenGrid(f // patch[0], h // patch[1], w // patch[2])
        tokens = patchify(hidden_states, patch)
        image = encoder_hidden_states_image
        if image is not None:
            image = image.reshape(b, -1, image.shape[-1])
        out = self.forward_tokens(tokens, timestep, encoder_hidden_states, grid, image=image)
        return unpatchify(out, grid, patch)
