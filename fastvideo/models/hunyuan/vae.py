"""HunyuanVideo VAE: a causal 3-D convolutional autoencoder, 4x in time, 8x in space,
16 latent channels (scaling factor 0.476986).

Parameter names equal diffusers' ``AutoencoderKLHunyuanVideo`` so its safetensors load with
``strict=True``; :meth:`HunyuanVAE.encode` / :meth:`HunyuanVAE.decode` match its
``_encode`` / ``decode`` (tiling off). Like diffusers (``use_framewise_*``, on by default),
long clips are processed in overlapping temporal chunks blended linearly: a chunk is
decoded by :meth:`HunyuanVAE.decode_chunk` alone, and only the previous chunk is kept for
the blend, so spatial tiling can later be added inside ``decode_chunk``.

Every conv is causal in time (replicate-padded with 2 past frames, none future), so
``T = 1 + 4k`` frames map to ``1 + k`` latent frames and back. The mid-block attention is
causal per frame: frame f attends to frames <= f. It runs frame by frame with no mask (the
reference builds an L x L mask), which is the same softmax.

Shapes use B batch, C channels, T frames, H height, W width.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HunyuanVAE", "HunyuanVAEConfig"]

_DOWN = "HunyuanVideoDownBlock3D"
_UP = "HunyuanVideoUpBlock3D"


@dataclass
class HunyuanVAEConfig:
    """diffusers ``AutoencoderKLHunyuanVideo`` config (same field names and defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    down_block_types: tuple[str, ...] = (_DOWN,) * 4
    up_block_types: tuple[str, ...] = (_UP,) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    norm_num_groups: int = 32
    scaling_factor: float = 0.476986
    spatial_compression_ratio: int = 8
    temporal_compression_ratio: int = 4
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HunyuanVAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"VAE config has unknown fields: {', '.join(unknown)}")
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            setattr(cfg, name, tuple(getattr(cfg, name)))
        if set(cfg.down_block_types) != {_DOWN} or set(cfg.up_block_types) != {_UP}:
            raise ValueError(f"VAE block types must be {_DOWN} / {_UP}")
        if cfg.temporal_compression_ratio != 4 or cfg.act_fn != "silu":
            raise ValueError("only temporal_compression_ratio=4 and act_fn='silu' are supported")
        return cfg


# --- layers ------------------------------------------------------------------------------
class CausalConv3d(nn.Module):
    """Conv3d after replicate padding: k//2 each side in space, k-1 past frames in time."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, stride: Any = 1, padding: int = 0):
        super().__init__()
        self.pad = (k // 2, k // 2, k // 2, k // 2, k - 1, 0)
        self.conv = nn.Conv3d(c_in, c_out, k, stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, T, H, W] -> [B, C_out, T', H', W']."""
        return self.conv(F.pad(x, self.pad, mode="replicate"))


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (1x1x1-projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = CausalConv3d(c_in, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = CausalConv3d(c_out, c_out)
        self.conv_shortcut = CausalConv3d(c_in, c_out, k=1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous()
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class FrameCausalAttention(nn.Module):
    """Single-head self-attention over all T*H*W positions, causal per frame, residual."""

    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, T, H, W] -> same shape."""
        b, c, t, h, w = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).flatten(1, 3)  # [B, L, C]
        normed = self.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        q, k, v = (p(normed).unsqueeze(1) for p in (self.to_q, self.to_k, self.to_v))
        per_frame = h * w
        out = torch.empty_like(q)
        for f in range(t):  # frame f's queries see the keys of frames 0..f
            rows = slice(f * per_frame, (f + 1) * per_frame)
            end = (f + 1) * per_frame
            out[:, :, rows] = F.scaled_dot_product_attention(
                q[:, :, rows], k[:, :, :end], v[:, :, :end]
            )
        out = self.to_out[0](out.squeeze(1).to(q.dtype)) + tokens
        return out.unflatten(1, (t, h, w)).permute(0, 4, 1, 2, 3)


class MidBlock(nn.Module):
    def __init__(self, dim: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(dim, dim, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([FrameCausalAttention(dim, groups) if attention else None])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Resample(nn.Module):
    """Down- (strided conv) or up-sampling (nearest, then conv) by ``factor`` (t, h, w).

    Upsampling treats the first frame alone (space only), so 1 + k frames become
    1 + 2k when time is upsampled."""

    def __init__(self, dim: int, factor: tuple[int, int, int], up: bool):
        super().__init__()
        self.factor, self.up = factor, up
        self.conv = CausalConv3d(dim, dim, stride=1 if up else factor)

    def forward(self, x: Tensor) -> Tensor:
        if not self.up:
            return self.conv(x)
        first, rest = x.split((1, x.shape[2] - 1), dim=2)
        first = F.interpolate(first.squeeze(2), scale_factor=self.factor[1:], mode="nearest")
        x = first.unsqueeze(2)
        if rest.shape[2] > 0:
            rest = F.interpolate(rest.contiguous(), scale_factor=self.factor, mode="nearest")
            x = torch.cat((x, rest), dim=2)
        return self.conv(x)


class ResampleBlock(nn.Module):
    """Resnets then an optional resampler (``downsamplers`` / ``upsamplers``)."""

    def __init__(
        self, c_in: int, c_out: int, layers: int, groups: int, factor: tuple[int, ...], up: bool
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(layers)]
        )
        resamplers = None
        if factor != (1, 1, 1):
            resamplers = nn.ModuleList([Resample(c_out, factor, up)])  # type: ignore[arg-type]
        self._kind = "upsamplers" if up else "downsamplers"
        setattr(self, self._kind, resamplers)

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        resamplers = getattr(self, self._kind)
        return x if resamplers is None else resamplers[0](x)


def _factors(cfg: HunyuanVAEConfig) -> Iterator[tuple[int, int, int]]:
    """(t, h, w) resampling of each block, outermost first: space in the first log2(8)
    blocks, time in the two before the last (as the reference lays them out)."""
    n = len(cfg.block_out_channels)
    spatial = int(math.log2(cfg.spatial_compression_ratio))
    temporal = int(math.log2(cfg.temporal_compression_ratio))
    for i in range(n):
        s = 2 if i < spatial else 1
        t = 2 if (i >= n - 1 - temporal and i != n - 1) else 1
        yield (t, s, s)


class Encoder(nn.Module):
    def __init__(self, cfg: HunyuanVAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0])
        self.down_blocks = nn.ModuleList(
            [
                ResampleBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, f, up=False)
                for i, f in enumerate(_factors(cfg))
            ]
        )
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: HunyuanVAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0])
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            [
                ResampleBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, f, up=True)
                for i, f in enumerate(_factors(cfg))
            ]
        )
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# --- model -------------------------------------------------------------------------------
def _blend_chunks(
    chunks: Iterator[Tensor], blend: int, keep: int, total: int
) -> Tensor:  # fmt: skip
    """Concatenate overlapping temporal chunks along dim 2 the reference's way.

    Chunk i > 0 (its shared first frame already dropped) has its first ``blend`` frames
    cross-faded with the previous chunk's last ones (after that chunk's own fade), then
    its first ``keep`` frames are kept (``keep + 1`` of chunk 0); the result is cut to
    ``total`` frames. Only the previous chunk is held.
    """
    out: list[Tensor] = []
    prev: Tensor | None = None
    for cur in chunks:
        if prev is None:
            out.append(cur[:, :, : keep + 1])
        else:
            n = min(prev.shape[2], cur.shape[2], blend)
            for x in range(n):
                cur[:, :, x] = prev[:, :, x - n] * (1 - x / n) + cur[:, :, x] * (x / n)
            out.append(cur[:, :, :keep])
        prev = cur
    return torch.cat(out, dim=2)[:, :, :total]


class HunyuanVAE(nn.Module):
    """HunyuanVideo VAE (parameters only, no buffers: builds on the meta device).

    ``encode`` / ``decode`` cast their input to the parameters' dtype and return that dtype;
    wrap calls in ``torch.inference_mode()``. ``framewise`` (diffusers'
    ``use_framewise_encoding/decoding``, default on) splits clips longer than
    ``tile_sample_min_num_frames`` into overlapping chunks ``tile_sample_stride_num_frames``
    apart.
    """

    def __init__(self, config: HunyuanVAEConfig) -> None:
        super().__init__()
        self.config = config
        z = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv3d(2 * z, 2 * z, kernel_size=1)
        self.post_quant_conv = nn.Conv3d(z, z, kernel_size=1)
        self.framewise = True
        self.tile_sample_min_num_frames = 16
        self.tile_sample_stride_num_frames = 12

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode(self, x: Tensor) -> Tensor:
        """Video x [B, in_channels, 1 + 4k, H, W] in [-1, 1] -> posterior moments
        [B, 2 * latent_channels, 1 + k, H/8, W/8]: channels [:latent_channels] are the mean
        (the latent diffusers' ``latent_dist.mode()`` returns), the rest the log-variance."""
        x = x.to(self.dtype)
        t, r = x.shape[2], self.config.temporal_compression_ratio
        if not self.framewise or t <= self.tile_sample_min_num_frames:
            return self.quant_conv(self.encoder(x))
        size, stride = self.tile_sample_min_num_frames, self.tile_sample_stride_num_frames
        chunks = (
            self.quant_conv(self.encoder(x[:, :, i : i + size + 1]))[:, :, (1 if i else 0) :]
            for i in range(0, t, stride)
        )
        keep, blend = stride // r, size // r - stride // r
        return _blend_chunks(chunks, blend, keep, (t - 1) // r + 1)

    def decode_chunk(self, z: Tensor) -> Tensor:
        """Latents [B, latent_channels, T', h, w] -> video [B, out_channels, 1 + 4(T'-1),
        8h, 8w] in one pass (no temporal chunking)."""
        return self.decoder(self.post_quant_conv(z.to(self.dtype)))

    def decode(self, z: Tensor) -> Tensor:
        """VAE latents (``unnormalize_latents`` of the diffusion latents) [B, latent_channels,
        T', h, w] -> video [B, out_channels, 1 + 4(T'-1), 8h, 8w], not clamped (as diffusers)."""
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"decode expects [B, {self.config.latent_channels}, T, h, w], got {tuple(z.shape)}"
            )
        t, r = z.shape[2], self.config.temporal_compression_ratio
        size, stride = self.tile_sample_min_num_frames // r, self.tile_sample_stride_num_frames // r
        if not self.framewise or t <= size:
            return self.decode_chunk(z)
        chunks = (
            self.decode_chunk(z[:, :, i : i + size + 1])[:, :, (1 if i else 0) :]
            for i in range(0, t, stride)
        )
        blend = self.tile_sample_min_num_frames - self.tile_sample_stride_num_frames
        return _blend_chunks(chunks, blend, self.tile_sample_stride_num_frames, (t - 1) * r + 1)

    def unnormalize_latents(self, latents: Tensor) -> Tensor:
        """Diffusion-space latents -> VAE latents, as diffusers' pipeline: ``x / scaling``."""
        return latents / self.config.scaling_factor

    def normalize_latents(self, mean_latents: Tensor) -> Tensor:
        """VAE latents (e.g. ``encode(x)[:, :latent_channels]``) -> diffusion space."""
        return mean_latents * self.config.scaling_factor

    def posterior_mean(self, moments: Tensor) -> Tensor:
        """The posterior mean [B, latent_channels, ...] of ``encode``'s moments."""
        return moments[:, : self.config.latent_channels]
