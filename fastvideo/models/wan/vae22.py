"""The parts of the Wan 2.2 VAE (TI2V-5B, ``is_residual=True``) that Wan 2.1 does not have.

* Residual down/up blocks: each level's resnets (+ resample) get a parameter-free shortcut
  that moves pixels between space/time and channels and averages (``avg_shortcut``:
  :class:`AvgDown3D` in the encoder, :class:`DupUp3D` in the decoder).
* A 2x2 spatial patchify of the video before the encoder and its inverse after the decoder
  (``patch_size=2``), which with the 8x of the network gives 16x spatial compression.

Module and parameter names are those of diffusers' ``AutoencoderKLWan``; the shared causal
layers live in :mod:`fastvideo.models.wan.vae_layers`, the model in
:mod:`fastvideo.models.wan.vae`. Shapes use B batch, C channels, T frames, H height, W width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from fastvideo.models.wan.vae_layers import Downsample, FeatureCache, ResidualBlock, Upsample

if TYPE_CHECKING:
    from fastvideo.models.wan.vae import WanVAEConfig

__all__ = [
    "WAN22_LATENTS_MEAN",
    "WAN22_LATENTS_STD",
    "AvgDown3D",
    "DupUp3D",
    "ResidualDownBlock",
    "ResidualUpBlock",
    "patchify_space",
    "residual_down_blocks",
    "residual_up_blocks",
    "unpatchify_space",
]

# Per-channel latent statistics published with Wan2.2-TI2V-5B (its vae/config.json). diffusers'
# defaults are Wan 2.1's 16 values, so a z_dim=48 config must carry these itself.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


def patchify_space(x: Tensor, p: int) -> Tensor:
    """[B, C, T, H, W] -> [B, C*p*p, T, H/p, W/p].

    Channel ``c*p*p + j*p + i`` holds the pixel at column offset j, row offset i of each
    p x p patch (width offset first): the reference's order, which conv_in's weights assume.
    """
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p)  # dims: b, c, t, h', i, w', j
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, t, h // p, w // p)


def unpatchify_space(x: Tensor, p: int) -> Tensor:
    """[B, C*p*p, T, H, W] -> [B, C, T, H*p, W*p], the inverse of :func:`patchify_space`."""
    b, cpp, t, h, w = x.shape
    x = x.view(b, cpp // (p * p), p, p, t, h, w)  # dims: b, c, j, i, t, h, w
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, cpp // (p * p), t, h * p, w * p)


class AvgDown3D(nn.Module):
    """Parameter-free shortcut: fold each ``ft x fs x fs`` block of a chunk into channels,
    then average groups of them down to ``out_dim`` channels.

    [B, in_dim, t, H, W] -> [B, out_dim, ceil(t / ft), H/fs, W/fs]. A chunk whose length is
    not a multiple of ft (the lone first frame) is zero-padded in front, per chunk, as in
    the reference.
    """

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        factor = factor_t * factor_s * factor_s
        if in_dim * factor % out_dim != 0:
            raise ValueError(
                f"AvgDown3D: in_dim {in_dim} x factor {factor} is not a multiple of out_dim "
                f"{out_dim}"
            )
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.group = in_dim * factor // out_dim

    def forward(self, x: Tensor) -> Tensor:
        ft, fs = self.factor_t, self.factor_s
        if x.shape[2] % ft:
            x = F.pad(x, (0, 0, 0, 0, ft - x.shape[2] % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs)
        # Channel-major, then the (ft, fs, fs) offsets: channel c*factor + offset; groups of
        # `group` consecutive channels are averaged into one output channel.
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut, the converse of :class:`AvgDown3D`: repeat each channel,
    then unfold groups of channels into ``ft x fs x fs`` blocks.

    [B, in_dim, t, H, W] -> [B, out_dim, t*ft, H*fs, W*fs]; on the first chunk the first
    ``ft - 1`` frames are dropped (one latent frame decodes to one frame there).
    """

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        factor = factor_t * factor_s * factor_s
        if out_dim * factor % in_dim != 0:
            raise ValueError(
                f"DupUp3D: out_dim {out_dim} x factor {factor} is not a multiple of in_dim {in_dim}"
            )
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.repeats = out_dim * factor // in_dim

    def forward(self, x: Tensor, first_chunk: bool) -> Tensor:
        ft, fs = self.factor_t, self.factor_s
        b, c, t, h, w = x.shape
        # Channel i of the input becomes channels i*repeats .. (i+1)*repeats - 1; written
        # as an expand so that the repeat and the unfold below are one copy.
        x = x.unsqueeze(2).expand(b, c, self.repeats, t, h, w)
        x = x.reshape(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1 :] if first_chunk else x


class ResidualDownBlock(nn.Module):
    """Encoder level: resnets, an optional :class:`Downsample`, plus the AvgDown3D shortcut
    of the level's input."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_res_blocks: int,
        dropout: float,
        temporal: bool,
        down: bool,
    ) -> None:
        super().__init__()
        factor_t, factor_s = (2 if temporal else 1), (2 if down else 1)
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t, factor_s)
        in_dims = [in_dim if i == 0 else out_dim for i in range(num_res_blocks)]
        self.resnets = nn.ModuleList([ResidualBlock(d, out_dim, dropout) for d in in_dims])
        self.downsampler = Downsample(out_dim, temporal) if down else None

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """x [B, in_dim, t, H, W] -> [B, out_dim, t', H/2, W/2] (or H, W on the last level)."""
        # The (smaller) shortcut first, so the level's input need not outlive the resnets.
        shortcut = self.avg_shortcut(x)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsampler is not None:
            x = self.downsampler(x, cache)
        return x.add_(shortcut)


class ResidualUpBlock(nn.Module):
    """Decoder level: ``num_res_blocks + 1`` resnets, an optional :class:`Upsample` (keeping
    the channel count), plus the DupUp3D shortcut of the level's input."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_res_blocks: int,
        dropout: float,
        temporal: bool,
        up: bool,
    ) -> None:
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        in_dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(d, out_dim, dropout) for d in in_dims])
        self.upsampler = Upsample(out_dim, temporal, out_dim=out_dim) if up else None

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """x [B, in_dim, t, H, W] -> [B, out_dim, t', 2H, 2W] (or H, W on the last level)."""
        time_conv = None if self.upsampler is None else self.upsampler.time_conv
        # Known before the upsampler registers its conv: is this latent frame 0?
        first_chunk = time_conv is not None and time_conv not in cache
        block_input = x  # the resnets never modify their input in place
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsampler is None:
            return x
        x = self.upsampler(x, cache)
        assert self.avg_shortcut is not None
        # The (larger) shortcut last, so it does not sit in memory through the resnets.
        return x.add_(self.avg_shortcut(block_input, first_chunk))


def residual_down_blocks(cfg: WanVAEConfig, dims: list[int]) -> list[nn.Module]:
    """The encoder's levels: dims[i] -> dims[i + 1], downsampling on all but the last."""
    last = len(cfg.dim_mult) - 1
    return [
        ResidualDownBlock(
            in_dim,
            out_dim,
            cfg.num_res_blocks,
            cfg.dropout,
            temporal=level < last and cfg.temperal_downsample[level],
            down=level < last,
        )
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True))
    ]


def residual_up_blocks(cfg: WanVAEConfig, dims: list[int]) -> list[nn.Module]:
    """The decoder's levels: dims[i] -> dims[i + 1], upsampling on all but the last."""
    last = len(cfg.dim_mult) - 1
    temporal_up = cfg.temperal_downsample[::-1]
    return [
        ResidualUpBlock(
            in_dim,
            out_dim,
            cfg.num_res_blocks,
            cfg.dropout,
            temporal=level < last and temporal_up[level],
            up=level < last,
        )
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True))
    ]
