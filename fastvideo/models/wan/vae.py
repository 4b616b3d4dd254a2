"""Wan video VAEs (2.1, and 2.2 of TI2V-5B): causal 3-D convolutional autoencoders.

Wan 2.1 compresses 4x in time and 8x in space into 16 channels. Wan 2.2 (``is_residual=True``,
``patch_size=2``) first folds 2x2 pixel patches into channels, adds parameter-free shortcuts
to every down/up level (:mod:`fastvideo.models.wan.vae22`) and compresses 4x in time and 16x
in space into 48 channels.

Parameter names and shapes are those of diffusers' ``AutoencoderKLWan``, so its
``diffusion_pytorch_model.safetensors`` loads unchanged with ``strict=True``, and the outputs
of :meth:`WanVAE.encode` / :meth:`WanVAE.decode` match its ``_encode`` / ``_decode``.

Time is processed in chunks, never as a whole clip: the encoder sees the first frame alone and
then chunks of 4 frames; the decoder sees one latent frame at a time. Every temporal conv keeps
the tail of its previous input in a :class:`FeatureCache`, so a chunk sees the frames just
before it instead of zero padding. The first chunk is special (its temporal down/upsampling is
skipped), which is what makes ``T = 1 + 4k`` frames map to ``1 + k`` latent frames and back, and
lets an image be a 1-frame video. This chunked pass *is* the model; there is no other path.

Shapes use B batch, C channels, T frames, H height, W width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastvideo.distributed.runtime import GroupView
from fastvideo.layers.frames import to_levels
from fastvideo.layers.vae_tiling import (
    TileGrid,
    TileSizes,
    decode_grid,
    encode_grid,
    gather_tiles,
    run_tiles,
)
from fastvideo.models.wan.vae22 import (
    patchify_space,
    residual_down_blocks,
    residual_up_blocks,
    unpatchify_space,
)
from fastvideo.models.wan.vae_layers import (
    AttentionBlock,
    CausalConv3d,
    Downsample,
    FeatureCache,
    MidBlock,
    ResidualBlock,
    RMSNorm,
    Upsample,
)

__all__ = ["FeatureCache", "WanVAE", "WanVAEConfig"]

# decode_memory_bytes counts this many full-resolution activations of the decoder's last
# level (tensors alive at its peak, and the convolutions' workspaces). Calibrated on the
# measured decode peaks of benchmarks/results/2026-11-27_h200_latency_exact_v3.json (480x832,
# 81 frames: 9.33 GiB fp32, 4.67 GiB bf16; this estimate gives 9.8 and 4.9).
_LIVE_DECODER_TENSORS = 11
# Encoder chunk length after the lone first frame (hard-coded in the reference as well).
ENCODE_CHUNK_FRAMES = 4

_WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
_WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

_TUPLE_FIELDS = ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std")
# config.json keys that diffusers' AutoencoderKLWan does not take (its ConfigMixin drops them)
# and that therefore change nothing: Wan2.2-TI2V-5B's config has clip_output=false, yet
# diffusers always clamps the decoded video, and so do we.
_IGNORED_KEYS = frozenset({"clip_output"})


@dataclass
class WanVAEConfig:
    """Hyper-parameters, named (and spelled: ``temperal``) as in diffusers' VAE config.json.

    ``in_channels`` / ``out_channels`` count the channels the encoder and decoder convs see,
    i.e. after patchify: 3 * patch_size**2 (12 for Wan 2.2).
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None  # None: same as base_dim
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()  # Wan 2.1 encoder only (unused by residual blocks)
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = _WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = _WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8

    def __post_init__(self) -> None:
        # config.json gives lists; tuples keep a config from being mutated through an alias.
        for name in _TUPLE_FIELDS:
            setattr(self, name, tuple(getattr(self, name)))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample has {len(self.temperal_downsample)} entries, expected "
                f"len(dim_mult) - 1 = {len(self.dim_mult) - 1}"
            )
        p = self.patch
        if p < 1 or self.in_channels % (p * p) or self.out_channels % (p * p):
            raise ValueError(
                f"patch_size={self.patch_size!r} does not fit in_channels={self.in_channels} / "
                f"out_channels={self.out_channels} (channels after patchify: C * patch_size**2)"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WanVAEConfig:
        """Build from a parsed diffusers config.json; keys starting with '_' are metadata."""
        kwargs = {k: v for k, v in d.items() if not k.startswith("_") and k not in _IGNORED_KEYS}
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown WanVAEConfig keys: {', '.join(unknown)}")
        return cls(**kwargs)

    @property
    def decoder_dim(self) -> int:
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

    @property
    def patch(self) -> int:
        """Spatial patch side folded into channels (1: none; diffusers treats 1 as None)."""
        return 1 if self.patch_size is None else self.patch_size

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W: 2 per downsampling level, times the patch."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch


class UpBlock(nn.Module):
    """``num_res_blocks + 1`` residual blocks, then an optional :class:`Upsample`."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_res_blocks: int,
        dropout: float,
        upsample: bool,
        temporal: bool,
    ) -> None:
        super().__init__()
        in_dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(d, out_dim, dropout) for d in in_dims])
        # A one-element list only to keep the checkpoint's "upsamplers.0." key prefix.
        self.upsamplers = nn.ModuleList([Upsample(out_dim, temporal)]) if upsample else None

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        return x


def _wan21_down_blocks(cfg: WanVAEConfig, dims: list[int]) -> list[nn.Module]:
    """One flat list, as in the checkpoint: per level res blocks (+ attention), then a
    downsample (not on the last level)."""
    blocks: list[nn.Module] = []
    scale = 1.0  # current resolution relative to the input, matched against attn_scales
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        for _ in range(cfg.num_res_blocks):
            blocks.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
            if scale in cfg.attn_scales:
                blocks.append(AttentionBlock(out_dim))
            in_dim = out_dim
        if level < len(cfg.dim_mult) - 1:
            blocks.append(Downsample(out_dim, temporal=cfg.temperal_downsample[level]))
            scale /= 2.0
    return blocks


def _wan21_up_blocks(cfg: WanVAEConfig, dims: list[int]) -> list[nn.Module]:
    """The decoder's levels: dims[i] -> dims[i + 1], upsampling on all but the last."""
    mult, temporal_up = cfg.dim_mult, cfg.temperal_downsample[::-1]
    blocks: list[nn.Module] = []
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        # Each Upsample's conv halves the channels, so every block after the first
        # receives half of the previous block's width.
        if level > 0:
            in_dim //= 2
        upsample = level < len(mult) - 1
        temporal = upsample and temporal_up[level]
        blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, cfg.dropout, upsample, temporal))
    return blocks


class Encoder(nn.Module):
    """Chunk [B, in_channels, t, H, W] (patchified) -> [B, 2 * z_dim, t', H/8, W/8]
    (before quant_conv). Wan 2.1 or Wan 2.2 levels according to ``is_residual``."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        build = residual_down_blocks if cfg.is_residual else _wan21_down_blocks
        self.down_blocks = nn.ModuleList(build(cfg, dims))
        self.mid_block = MidBlock(dims[-1], cfg.dropout)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = cache.causal_conv(self.conv_in, x)
        for block in self.down_blocks:
            x = block(x) if isinstance(block, AttentionBlock) else block(x, cache)
        x = self.mid_block(x, cache)
        return cache.causal_conv(self.conv_out, F.silu(self.norm_out(x), inplace=True))


class Decoder(nn.Module):
    """Latent chunk [B, z_dim, t, h, w] -> [B, out_channels, t', 8h, 8w] (still patchified,
    not clamped). Wan 2.1 or Wan 2.2 levels according to ``is_residual``."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.decoder_dim * m for m in (mult[-1], *mult[::-1])]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], cfg.dropout)
        build = residual_up_blocks if cfg.is_residual else _wan21_up_blocks
        self.up_blocks = nn.ModuleList(build(cfg, dims))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = self.middle(x, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.head(x, cache)

    def middle(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """conv_in and the mid block (whose attention spans the whole frame)."""
        return self.mid_block(cache.causal_conv(self.conv_in, x), cache)

    def head(self, x: Tensor, cache: FeatureCache) -> Tensor:
        return cache.causal_conv(self.conv_out, F.silu(self.norm_out(x), inplace=True))

    def tile_halos(self) -> list[tuple[int, int]]:
        """(halo, scale) of each up block's input, then of the head's: the rows (and
        columns) of context on each side that block's input needs, in its own pixels, for
        the decoder's output to be exact over a region; ``scale`` is the block's spatial
        upsampling. After the mid block every layer is local: per-pixel norms and
        activations, 3x3 convolutions (one row of context each), nearest 2x upsampling and
        the parameter-free DupUp3D shortcut."""
        halo = _spatial_pad(self.conv_out)
        out = [(halo, 1)]
        for block in reversed(self.up_blocks):
            convs = sum(_spatial_pad(c) for r in block.resnets for c in (r.conv1, r.conv2))
            up = _upsampler(block)
            if up is None:
                halo, scale = convs + halo, 1
            else:  # nearest 2x, then a 3x3 conv at the doubled size: one more output row
                halo, scale = convs + -(-(halo + _spatial_pad(up.resample[1])) // 2), 2
            out.append((halo, scale))
        return out[::-1]

    def tile_work(
        self,
        latent_hw: tuple[int, int],
        rows: int,
        cols: int,
        halos: list[tuple[int, int]] | None = None,
    ) -> float:
        """Convolution work of the up blocks and head over a ``rows x cols`` grid of exact
        tiles of a latent frame, relative to one whole-frame pass (1.0 for one tile): at
        each level, the tiles' areas with their halos (clipped at the frame) weighted by
        that level's multiply-adds per pixel (its convolutions' channels, and the frames a
        latent frame has become there). ``halos``: :meth:`tile_halos`, when at hand."""
        levels = [*self.up_blocks, None]
        halos = self.tile_halos() if halos is None else halos
        scale, frames, total, whole = 1, 1, 0.0, 0.0
        for block, (halo, up) in zip(levels, halos, strict=True):
            convs = [self.conv_out] if block is None else [
                c for r in block.resnets for c in (r.conv1, r.conv2)]  # fmt: skip
            per_pixel = frames * sum(c.in_channels * c.out_channels for c in convs)
            area = 1.0
            for extent, parts in zip(latent_hw, (rows, cols), strict=True):
                n = extent * scale
                spans = _spans(extent, parts)
                area *= sum(min(n, e * scale + halo) - max(0, a * scale - halo)
                            for a, e in spans) / n  # fmt: skip
            total += per_pixel * scale**2 * area
            whole += per_pixel * scale**2
            if block is not None and (up_ := _upsampler(block)) is not None:
                frames *= 2 if up_.time_conv is not None else 1
            scale *= up
        return total / whole


def _spatial_pad(conv: nn.Module) -> int:
    pad = conv.space_pad[2] if isinstance(conv, CausalConv3d) else conv.padding[0]
    return int(pad)


def _upsampler(block: nn.Module) -> Upsample | None:
    if isinstance(block, UpBlock):
        return None if block.upsamplers is None else block.upsamplers[0]
    return block.upsampler


class WanVAE(nn.Module):
    """Wan 2.1 / 2.2 video VAE. Holds parameters only (no buffers), so it can be built on the meta
    device and filled with ``load_state_dict(state, strict=True, assign=True)``.

    ``encode`` and ``decode`` cast their input to the parameters' dtype (the VAE may run in
    bf16) and return tensors of that dtype. They do not disable autograd: wrap calls in
    ``torch.inference_mode()`` when not training.
    """

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.z_dim = config.z_dim
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)
        self.tiling: TileSizes | None = None  # set by enable_tiling()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # --- spatial tiling (diffusers' enable_tiling): see fastvideo.layers.vae_tiling -----
    def enable_tiling(self, sizes: TileSizes | None = None) -> None:
        """Encode and decode large inputs tile by tile (diffusers' default sizes unless
        given); inputs that fit one tile are not tiled."""
        sizes = sizes or TileSizes()
        sizes.check(self.config.spatial_factor)
        self.tiling = sizes

    def disable_tiling(self) -> None:
        self.tiling = None

    def decode_grid(self, z_shape: tuple[int, ...], sizes: TileSizes) -> TileGrid | None:
        """Tiles of decoding latents of ``z_shape`` [B, z_dim, T', h, w] (None: one tile)."""
        cfg = self.config
        return decode_grid(tuple(z_shape[-2:]), sizes, cfg.spatial_factor, cfg.patch)

    def decode_memory_bytes(self, z_shape: tuple[int, ...]) -> int:
        """Estimated peak bytes of an untiled :meth:`decode` of latents ``z_shape``: the output
        video plus the decoder's full-resolution activations for one latent frame (tensors
        of ``decoder_dim * dim_mult[0]`` channels over the frames one latent frame becomes
        and the causal cache). Used only to decide on tiling (``vae_tiling='auto'``)."""
        return sum(self._decode_bytes(z_shape))

    def _decode_bytes(
        self, z_shape: tuple[int, ...], video_itemsize: int | None = None
    ) -> tuple[int, int]:
        """(output video, decoder activations) bytes of decoding latents ``z_shape``; the
        video in the VAE's dtype, or ``video_itemsize`` bytes a value (1: uint8 frames)."""
        b, _, frames, h, w = z_shape
        cfg = self.config
        s, size = cfg.spatial_factor, self.dtype.itemsize
        per_frame = 2 ** sum(cfg.temperal_downsample)
        pixels = b * 3 * (1 + (frames - 1) * per_frame) * h * s * w * s
        video = pixels * (size if video_itemsize is None else video_itemsize)
        width = cfg.decoder_dim * cfg.dim_mult[0]
        activations = _LIVE_DECODER_TENSORS * b * width * (per_frame + 2) * h * s * w * s * size
        return video, activations

    def fit_exact_tiles(
        self,
        z_shape: tuple[int, ...],
        budget: int,
        max_tiles: int = 64,
        multiple_of: int = 1,
        levels: bool = False,
    ) -> tuple[int, int] | None:
        """The ``(rows, cols)`` grid for :meth:`decode_exact_tiles` of latents ``z_shape``
        estimated to peak within ``budget`` bytes: of the grids of at most ``max_tiles``
        tiles that fit, the one with the least convolution work, halos included
        (:meth:`Decoder.tile_work`); None when none fits. A grid's peak estimate: the output
        video, the mid block's output over all latent frames, one tile's decode (its
        activations) with its full-resolution halo, and the tiles' videos held at once.
        ``multiple_of`` > 1: a parallel decode over that many ranks (tile counts divisible
        by it; a rank holds its whole share until the gather, then one gathered round).
        ``levels``: the decode returns uint8 frames (the videos are one byte per value)."""
        b, c, frames, h, w = z_shape
        s = self.config.spatial_factor
        video_itemsize = 1 if levels else None
        video, _ = self._decode_bytes(z_shape, video_itemsize)
        mid = b * self.config.decoder_dim * self.config.dim_mult[-1] * frames * h * w
        fixed = video + mid * self.dtype.itemsize
        halos = self.decoder.tile_halos()
        halo_last, _ = halos[-2]
        pad = -(-halo_last * self.config.patch // s)  # the last level's halo, in latents
        best: tuple[float, tuple[int, int]] | None = None
        for rows in range(1, min(h, max_tiles) + 1):
            for cols in range(1, min(w, max_tiles // rows) + 1):
                if (rows * cols) % multiple_of:
                    continue
                th = min(h, -(-h // rows) + 2 * pad) if rows > 1 else h
                tw = min(w, -(-w // cols) + 2 * pad) if cols > 1 else w
                tile_video, tile = self._decode_bytes((b, c, frames, th, tw), video_itemsize)
                # One rank writes each tile into the video at once; a rank of a parallel
                # decode holds its whole share until the gather, then one round of it.
                share = rows * cols // multiple_of + multiple_of if multiple_of > 1 else 1
                held = tile_video * share
                if fixed + held + tile > budget:
                    continue
                work = self.decoder.tile_work((h, w), rows, cols, halos)
                if best is None or work < best[0]:
                    best = (work, (rows, cols))
        return None if best is None else best[1]

    def decode_tile(self, z: Tensor) -> Tensor:
        """One spatial tile of latents [B, z_dim, T', h, w] -> [B, out_channels, T, s/p*h,
        s/p*w]: still folded by the patch (``p``) and not clamped, as the reference blends
        tiles (see :meth:`finish_decode`)."""
        return self._decode_frames(z, unfold=False)

    def finish_decode(self, x: Tensor) -> Tensor:
        """Blended tiles (as :meth:`decode_tile` returns) -> the video, clamped to [-1, 1]."""
        if self.config.patch > 1:
            x = unpatchify_space(x, self.config.patch)
        return x.clamp_(-1.0, 1.0)

    def prepare_encode(self, x: Tensor) -> Tensor:
        """Check a video [B, C, 1 + 4k, H, W] and fold it by the patch: the encoder's input."""
        if x.ndim != 5 or (x.shape[2] - 1) % ENCODE_CHUNK_FRAMES != 0:
            raise ValueError(
                f"encode expects [B, C, 1 + {ENCODE_CHUNK_FRAMES}k, H, W], got {tuple(x.shape)}"
            )
        p = self.config.patch
        if x.shape[3] % p or x.shape[4] % p:
            raise ValueError(f"encode: H and W must be multiples of patch_size {p}")
        x = x.to(self.dtype)
        return patchify_space(x, p) if p > 1 else x

    def encode_tile(self, x: Tensor) -> Tensor:
        """Folded video (or one spatial tile of it) -> posterior moments, chunk by chunk."""
        cache = FeatureCache()
        # Not x[:, :, 1:].split(...): splitting an empty dim still yields one (empty) chunk.
        starts = range(1, x.shape[2], ENCODE_CHUNK_FRAMES)
        chunks = [x[:, :, :1], *(x[:, :, s : s + ENCODE_CHUNK_FRAMES] for s in starts)]
        out = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        return self.quant_conv(out)

    def encode(self, x: Tensor) -> Tensor:
        """Video x [B, C, 1 + 4k, H, W] in [-1, 1] (C = in_channels / patch_size**2, i.e. RGB)
        -> posterior moments [B, 2 * z_dim, 1 + k, H/s, W/s] with s = ``spatial_factor``
        (8, or 16 for Wan 2.2): channels [:z_dim] are the mean, [z_dim:] the log-var.
        Tiled when :meth:`enable_tiling` was called and x exceeds one tile.
        """
        folded = self.prepare_encode(x)
        cfg = self.config
        grid = None
        if self.tiling is not None:
            grid = encode_grid(tuple(x.shape[-2:]), self.tiling, cfg.spatial_factor, cfg.patch)
        if grid is None:
            return self.encode_tile(folded)
        out = run_tiles(folded, grid, self.encode_tile)
        assert out is not None
        return out

    def decode(self, z: Tensor) -> Tensor:
        """Un-normalised latents z [B, z_dim, T', h, w] -> video [B, C, 1 + 4(T' - 1), s*h,
        s*w] (C = out_channels / patch_size**2, s = ``spatial_factor``), clamped to [-1, 1].
        Decodes one latent frame at a time (each unpatchified on its own: a pure relayout);
        tile by tile when :meth:`enable_tiling` was called and z exceeds one tile.
        """
        self._check_latents(z)
        grid = None if self.tiling is None else self.decode_grid(tuple(z.shape), self.tiling)
        if grid is not None:
            out = run_tiles(z, grid, self.decode_tile)
            assert out is not None
            return self.finish_decode(out)
        return self._decode_frames(z, unfold=True).clamp_(-1.0, 1.0)

    def decode_exact_tiles(
        self,
        z: Tensor,
        rows: int,
        cols: int,
        group: GroupView | None = None,
        levels: bool = False,
    ) -> Tensor | None:
        """:meth:`decode` with the up blocks run over a ``rows x cols`` grid of tiles of the
        latent frame, one tile at a time: the same video (the same arithmetic on every
        output pixel; only the convolutions' algorithms may differ with the shapes), with
        a peak of about one tile's activations instead of the whole frame's.

        Each tile takes, at every level, the halo its remaining convolutions need
        (:meth:`Decoder.tile_halos`) and is cut back to it after each block; its causal
        caches are its own, so every tile runs through all latent frames alone. The mid
        block (its attention spans the frame) runs once over the whole frame first.

        With a ``group`` of several ranks (all calling this alike), rank q decodes tiles q,
        q + n, ... (each rank runs the mid block) and the group's first rank writes them
        into the video, which it returns (None elsewhere): the same video again.

        ``levels``: return the video's 8-bit frames instead, uint8 [B, T, H, W, 3] (exactly
        ``to_levels`` of the video, channels last), each tile converted chunk by chunk as it
        is decoded: no float video is held, neither the whole one nor a tile's, and a
        parallel decode gathers uint8 tiles.
        """
        self._check_latents(z)
        b, _, frames, h, w = z.shape
        for name, n, extent in (("rows", rows, h), ("cols", cols, w)):
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= extent:
                raise ValueError(f"decode_exact_tiles: {name} must be an int in 1..{extent}")
        cfg = self.config
        k = cfg.spatial_factor  # output pixels per latent
        per_frame = 2 ** sum(cfg.temperal_downsample)
        tiles = [(r, c) for r in _spans(h, rows) for c in _spans(w, cols)]
        ranks, me = (1, 0) if group is None else (group.size, group.rank)
        mid = self._exact_mid(z)
        halos = self.decoder.tile_halos()
        convert = to_levels if levels else None
        decoded = (self._exact_tile_video(mid, r, c, halos, convert) for r, c in tiles[me::ranks])
        if ranks > 1:
            assert group is not None
            like = mid.new_empty((0,) * mid.ndim, dtype=torch.uint8) if levels else mid
            decoded = gather_tiles(group, list(decoded), len(tiles), like)
        out = None
        if me == 0:
            out = mid.new_empty(b, cfg.out_channels // cfg.patch**2,
                                1 + (frames - 1) * per_frame, h * k, w * k,
                                dtype=torch.uint8 if levels else mid.dtype)  # fmt: skip
        for ((r0, r1), (c0, c1)), tile in zip(tiles, decoded, strict=False):
            if out is not None:
                out[:, :, :, r0 * k : r1 * k, c0 * k : c1 * k] = tile
            del tile
        if out is None:
            return None
        del mid
        return out.permute(0, 2, 3, 4, 1).contiguous() if levels else out.clamp_(-1.0, 1.0)

    def _exact_mid(self, z: Tensor) -> Tensor:
        """conv_in + mid block of every latent frame: [B, C_mid, T', h, w]."""
        x = self.post_quant_conv(z.to(self.dtype))
        cache = FeatureCache()
        return self._frame_by_frame(
            x.shape[2], lambda i: self.decoder.middle(x[:, :, i : i + 1], cache), False, 1
        )

    def _exact_tile_video(
        self,
        mid: Tensor,
        rows: tuple[int, int],
        cols: tuple[int, int],
        halos: list[tuple[int, int]],
        convert: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """One exact tile through every latent frame -> its video [B, C, T, rows*k, cols*k],
        each chunk passed through ``convert`` first when given."""
        cache = FeatureCache()
        dec = self.decoder
        return self._frame_by_frame(
            mid.shape[2],
            lambda i: _exact_tile(dec, mid[:, :, i : i + 1], rows, cols, halos, cache),
            convert=convert,
        )

    def _frame_by_frame(
        self,
        latent_frames: int,
        decode: Callable[[int], Tensor],
        unfold: bool = True,
        per_frame: int | None = None,
        convert: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """``decode(i)`` of every latent frame i (unfolded by the patch when ``unfold``, then
        passed through ``convert`` when given), written in time order into one tensor (no
        concatenation copy): frame 0 decodes to as many frames as it gives, every later
        one to ``per_frame`` (default 2**k, the video's frames per latent frame)."""
        if per_frame is None:
            per_frame = 2 ** sum(self.config.temperal_downsample)
        out = None
        written = 0
        for i in range(latent_frames):
            frames = decode(i)
            if unfold and self.config.patch > 1:
                frames = unpatchify_space(frames, self.config.patch)
            if convert is not None:
                frames = convert(frames)
            if out is None:
                total = frames.shape[2] + (latent_frames - 1) * per_frame
                out = frames.new_empty(*frames.shape[:2], total, *frames.shape[3:])
            out[:, :, written : written + frames.shape[2]] = frames
            written += frames.shape[2]
            del frames
        assert out is not None and written == out.shape[2]
        return out

    def _check_latents(self, z: Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"decode expects [B, {self.z_dim}, T, h, w], got {tuple(z.shape)}")

    def _decode_frames(self, z: Tensor, unfold: bool) -> Tensor:
        """Latents -> the decoder's output frames, unfolded by the patch when ``unfold``."""
        self._check_latents(z)
        x = self.post_quant_conv(z.to(self.dtype))
        cache = FeatureCache()
        return self._frame_by_frame(
            x.shape[2], lambda i: self.decoder(x[:, :, i : i + 1], cache), unfold
        )

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Config latents_mean / latents_std as [1, z_dim, 1, 1, 1] in ``like``'s dtype/device."""
        cfg = self.config
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise ValueError(
                f"latents_mean/latents_std have {len(cfg.latents_mean)}/{len(cfg.latents_std)} "
                f"entries, expected z_dim = {cfg.z_dim}"
            )
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def unnormalize_latents(self, latents: Tensor) -> Tensor:
        """Diffusion-space latents [B, z_dim, T, h, w] -> VAE latents: ``latents * std + mean``.

        Written as diffusers' Wan pipeline does it (divide by the reciprocal, both computed in
        the latents' dtype) so that the result matches it bitwise, bf16 included.
        """
        mean, std = self._latent_stats(latents)
        return latents / (1.0 / std) + mean

    def normalize_latents(self, mean_latents: Tensor) -> Tensor:
        """VAE latents [B, z_dim, T, h, w] (e.g. ``encode(x)[:, :z_dim]``) -> diffusion space:
        ``(x - mean) / std``, computed as ``(x - mean) * (1 / std)`` like diffusers' pipelines.
        """
        mean, std = self._latent_stats(mean_latents)
        return (mean_latents - mean) * (1.0 / std)


def _spans(extent: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` near-equal consecutive [start, end) ranges covering ``extent``."""
    bounds = [round(i * extent / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _exact_tile(
    dec: Decoder,
    mid: Tensor,
    rows: tuple[int, int],
    cols: tuple[int, int],
    halos: list[tuple[int, int]],
    cache: FeatureCache,
) -> Tensor:
    """One latent frame's mid-block output [B, C, 1, h, w] -> the decoder's output over the
    tile ``rows x cols`` (latent units): each level's input cut to the tile plus its halo
    (clipped at the frame, where zero padding is the untiled decode's own)."""
    size = mid.shape[-2:]
    core = [rows, cols]  # the tile at the current level, in that level's pixels
    start = [0, 0]  # the frame position of x's first row / column
    x = mid
    blocks = [*dec.up_blocks, None]
    for block, (halo, scale) in zip(blocks, halos, strict=True):
        want = [(max(0, a - halo), min(n, e + halo)) for (a, e), n in zip(core, size, strict=True)]
        x = x[..., want[0][0] - start[0] : want[0][1] - start[0],
              want[1][0] - start[1] : want[1][1] - start[1]]  # fmt: skip
        if block is None:
            x = dec.head(x, cache)
            return x[..., core[0][0] - want[0][0] : core[0][1] - want[0][0],
                     core[1][0] - want[1][0] : core[1][1] - want[1][0]]  # fmt: skip
        x = block(x, cache)
        start = [a * scale for a, _ in want]
        core = [(a * scale, e * scale) for a, e in core]
        size = (size[0] * scale, size[1] * scale)
    raise AssertionError("unreachable: the head returns")
