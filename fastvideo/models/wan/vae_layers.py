"""Causal 3-D building blocks of the Wan video VAEs (2.1 and 2.2), names as in diffusers.

Time is processed in chunks (see :mod:`fastvideo.models.wan.vae`): every temporal conv keeps
the tail of its previous input in a :class:`FeatureCache`, so a chunk sees the frames just
before it instead of zero padding, and a block knows it sees the first chunk when its conv is
not in the cache yet. Shapes use B batch, C channels, T frames, H height, W width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "AttentionBlock",
    "CausalConv3d",
    "Downsample",
    "FeatureCache",
    "MidBlock",
    "RMSNorm",
    "ResidualBlock",
    "Upsample",
    "per_frame",
]

# Frames of history a kernel-3 causal temporal conv needs from the chunk before.
CACHE_T = 2


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time: ``2 * padding_t`` frames in front, none behind.

    Spatial padding is symmetric as usual. Padding is applied with ``F.pad`` rather than by the
    conv itself, as in the reference, so results agree to the last bit.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        pad_t, pad_h, pad_w = self.padding
        self.time_pad = 2 * pad_t
        self.space_pad = (pad_w, pad_w, pad_h, pad_h)  # F.pad order: W then H
        self.padding = (0, 0, 0)

    def forward(self, x: Tensor, prev: Tensor | None = None) -> Tensor:
        """x [B, C, t, H, W]; prev [B, C, <= time_pad, H, W] are the frames just before x.

        Frames of ``prev`` replace that many zero frames of the causal padding.
        """
        time_pad = self.time_pad
        if prev is None:
            # Pad even when all pads are 0 (1x1x1 convs): F.pad then hands the conv the same
            # memory layout as in the reference, which keeps kernel choice and rounding
            # identical.
            return super().forward(F.pad(x, (*self.space_pad, time_pad, 0)))
        # [zero frames, prev, x] zero-padded in space, written into one buffer: the same
        # tensor as F.pad(cat(prev, x)) without the intermediate copy.
        time_pad -= prev.shape[2]
        pw, _, ph, _ = self.space_pad
        b, c, t, h, w = x.shape
        t_prev = prev.shape[2]
        buf = x.new_zeros(b, c, time_pad + t_prev + t, h + 2 * ph, w + 2 * pw)
        buf[:, :, time_pad : time_pad + t_prev, ph : ph + h, pw : pw + w] = prev
        buf[:, :, time_pad + t_prev :, ph : ph + h, pw : pw + w] = x
        return super().forward(buf)


class FeatureCache:
    """Frames each temporal conv carries from one chunk to the next, for one encode/decode call.

    Keyed by the conv module itself, so blocks need no slot-index bookkeeping. A key present
    with value None means "saw the first chunk, kept no frames" (see :class:`Upsample`).
    """

    def __init__(self) -> None:
        self._frames: dict[nn.Module, Tensor | None] = {}

    def __contains__(self, conv: nn.Module) -> bool:
        return conv in self._frames

    def get(self, conv: nn.Module) -> Tensor | None:
        return self._frames.get(conv)

    def put(self, conv: nn.Module, frames: Tensor | None) -> None:
        self._frames[conv] = frames

    def causal_conv(self, conv: CausalConv3d, x: Tensor) -> Tensor:
        """Apply ``conv`` to the chunk x [B, C, t, H, W], continuing from the previous chunk."""
        prev = self._frames.get(conv)
        tail = x[:, :, -CACHE_T:]
        if tail.shape[2] < CACHE_T and prev is not None:
            # A 1-frame chunk: keep the previous chunk's last frame too, so the next chunk
            # still sees two real frames of history.
            tail = torch.cat([prev[:, :, -1:], tail], dim=2)
        else:
            # Copy: a slice would keep the whole chunk's activation alive until the next chunk.
            tail = tail.clone()
        self._frames[conv] = tail
        return conv(x, prev)


def per_frame(fn: nn.Module, x: Tensor) -> Tensor:
    """Apply a 2-D module to every frame: [B, C, T, H, W] -> [B, C', T, H', W'] (a view)."""
    b, c, t, h, w = x.shape
    y = fn(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return y.view(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)


class RMSNorm(nn.Module):
    """Normalise over channels (dim 1) to unit RMS, times a learned per-channel gamma.

    gamma is [C, 1, 1, 1] for video input [B, C, T, H, W] and [C, 1, 1] for frames [N, C, H, W].
    """

    def __init__(self, dim: int, video: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5  # F.normalize gives unit L2 norm; sqrt(C) makes it unit RMS
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1, 1) if video else (1, 1))))

    def forward(self, x: Tensor) -> Tensor:
        # The sum of squares over hundreds of channels is too coarse in half precision.
        low_precision = x.dtype.itemsize < 4
        if low_precision:
            # F.normalize's arithmetic (x / max(||x||, eps)), dividing the fp32 copy in place
            # so that only one full-size fp32 tensor exists.
            y = x.float()
            y = y.div_(y.norm(2, dim=1, keepdim=True).clamp_min(1e-12)).to(x.dtype)
        else:
            y = F.normalize(x, dim=1)
        # In place on the fresh tensor: the same products as y * scale * gamma.
        return y.mul_(self.scale).mul_(self.gamma)


class ResidualBlock(nn.Module):
    """(RMSNorm, SiLU, causal 3x3x3 conv) twice, plus a skip (1x1x1 conv if channels change)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """x [B, in_dim, t, H, W] -> [B, out_dim, t, H, W]."""
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        # SiLU and the residual add in place on fresh tensors (same values, less memory);
        # every intermediate is released as soon as the next one exists.
        h = F.silu(self.norm1(x), inplace=True)
        del x
        h = cache.causal_conv(self.conv1, h)
        h = self.dropout(F.silu(self.norm2(h), inplace=True))
        h = cache.causal_conv(self.conv2, h)
        return h.add_(skip)


def frame_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA over one frame's positions. torch's memory-efficient CUDA kernel (the one fp32
    gets) refuses some small frames, e.g. a tiny VAE's edge tiles, with "query is not
    correctly aligned (strideM)" before it launches; those frames take the math kernel."""
    try:
        return F.scaled_dot_product_attention(q, k, v)
    except RuntimeError as e:
        if "not correctly aligned" not in str(e):
            raise
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v)


class AttentionBlock(nn.Module):
    """Single-head self-attention among the H*W positions of each frame, plus a skip.

    Frames do not attend to each other, so this block needs no feature cache.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, T, H, W] -> same shape."""
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames))  # [BT, 3C, H, W]
        qkv = qkv.reshape(b * t, 1, 3 * c, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)  # each [BT, 1 head, HW, C]
        out = frame_attention(q, k, v)
        out = out.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        out = self.proj(out).view(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        # `out + x`, not `x + out`: the sum takes the first operand's strides, and the later
        # channel reductions only match the reference bitwise with the same memory layout.
        return out + x


class Downsample(nn.Module):
    """Halve H and W with a stride-2 conv; with ``temporal``, also halve time (after chunk 0)."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        # Pad right/bottom only, so the stride-2 3x3 conv maps H -> H/2 for even H.
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """x [B, C, t, H, W] -> [B, C, t', H/2, W/2]; t' = t, or t/2 once past the first chunk."""
        x = per_frame(self.resample, x)
        if self.time_conv is None:
            return x
        first_chunk = self.time_conv not in cache
        prev = cache.get(self.time_conv)
        cache.put(self.time_conv, x[:, :, -1:].clone())
        if first_chunk:
            # The lone first frame stays one frame: that is the "1 +" in T = 1 + 4k.
            return x
        # Kernel 3, stride 2 over [last frame before, chunk]: 2n frames -> n, causally.
        return self.time_conv(torch.cat([prev, x], dim=2))


class _NearestUpsample2x(nn.Module):
    """2x nearest-exact spatial upsampling of [N, C, H, W], computed in fp32 as the reference."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)


class Upsample(nn.Module):
    """Double H and W; with ``temporal``, double time after chunk 0.

    The conv maps ``dim`` to ``out_dim`` channels: ``dim // 2`` in Wan 2.1 (the default),
    ``dim`` in Wan 2.2's residual up blocks.
    """

    def __init__(self, dim: int, temporal: bool, out_dim: int | None = None) -> None:
        super().__init__()
        out_dim = dim // 2 if out_dim is None else out_dim
        self.resample = nn.Sequential(_NearestUpsample2x(), nn.Conv2d(dim, out_dim, 3, padding=1))
        # Predicts two frames per input frame, stacked along channels.
        self.time_conv = (
            CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0)) if temporal else None
        )

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """x [B, C, t, H, W] -> [B, out_dim, t', 2H, 2W]; t' = t, or 2t past the first chunk."""
        if self.time_conv is not None:
            x = self._upsample_time(x, cache)
        return per_frame(self.resample, x)

    def _upsample_time(self, x: Tensor, cache: FeatureCache) -> Tensor:
        if self.time_conv not in cache:
            # The first latent frame decodes to one video frame (the reference marks this
            # state "Rep"); later chunks then start from zero history, i.e. plain causal padding.
            cache.put(self.time_conv, None)
            return x
        b, c, t, h, w = x.shape
        x = cache.causal_conv(self.time_conv, x)  # [B, 2C, t, H, W]
        # Channel half 0 is frame 2i, half 1 is frame 2i+1: interleave them in time.
        return x.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)


class MidBlock(nn.Module):
    """Residual block, attention, residual block, at the coarsest resolution."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)
