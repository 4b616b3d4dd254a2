"""Wan 2.1 video VAE: a causal 3-D convolutional autoencoder, 4x in time and 8x in space.

Parameter names and shapes are those of diffusers' ``AutoencoderKLWan`` (Wan 2.1 variant), so
its ``diffusion_pytorch_model.safetensors`` loads unchanged with ``strict=True``, and the
outputs of :meth:`WanVAE.encode` / :meth:`WanVAE.decode` match its ``_encode`` / ``_decode``.

Time is processed in chunks, never as a whole clip: the encoder sees the first frame alone and
then chunks of 4 frames; the decoder sees one latent frame at a time. Every temporal conv keeps
the tail of its previous input in a :class:`FeatureCache`, so a chunk sees the frames just
before it instead of zero padding. The first chunk is special (its temporal down/upsampling is
skipped), which is what makes ``T = 1 + 4k`` frames map to ``1 + k`` latent frames and back, and
lets an image be a 1-frame video. This chunked pass *is* the model; there is no other path.

Shapes use B batch, C channels, T frames, H height, W width.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureCache", "WanVAE", "WanVAEConfig"]

# Frames of history a kernel-3 causal temporal conv needs from the chunk before.
CACHE_T = 2
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


@dataclass
class WanVAEConfig:
    """Hyper-parameters, named (and spelled: ``temperal``) as in diffusers' VAE config.json."""

    base_dim: int = 96
    decoder_base_dim: int | None = None  # None: same as base_dim
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
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
        _reject_wan22(self.is_residual, self.patch_size)
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample has {len(self.temperal_downsample)} entries, expected "
                f"len(dim_mult) - 1 = {len(self.dim_mult) - 1}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WanVAEConfig:
        """Build from a parsed diffusers config.json; keys starting with '_' are metadata."""
        # Check Wan 2.2 first: its configs also carry keys we do not know (e.g. clip_output),
        # and "not supported yet" is the more useful message.
        _reject_wan22(d.get("is_residual", False), d.get("patch_size"))
        kwargs = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown WanVAEConfig keys: {', '.join(unknown)}")
        return cls(**kwargs)

    @property
    def decoder_dim(self) -> int:
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim


def _reject_wan22(is_residual: bool, patch_size: int | None) -> None:
    if is_residual:
        raise ValueError("is_residual=True: Wan 2.2 VAE is not supported yet")
    if patch_size is not None:
        raise ValueError(f"patch_size={patch_size!r}: Wan 2.2 VAE is not supported yet")


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


def _per_frame(fn: nn.Module, x: Tensor) -> Tensor:
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
        out = F.scaled_dot_product_attention(q, k, v)
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
        x = _per_frame(self.resample, x)
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
    """Double H and W (conv halves channels); with ``temporal``, double time after chunk 0."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(_NearestUpsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        # Predicts two frames per input frame, stacked along channels.
        self.time_conv = (
            CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0)) if temporal else None
        )

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """x [B, C, t, H, W] -> [B, C/2, t', 2H, 2W]; t' = t, or 2t once past the first chunk."""
        if self.time_conv is not None:
            x = self._upsample_time(x, cache)
        return _per_frame(self.resample, x)

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


class Encoder(nn.Module):
    """Video chunk [B, in_channels, t, H, W] -> [B, 2 * z_dim, t', H/8, W/8] (pre quant_conv)."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        # One flat list, as in the checkpoint: res blocks (+ attention), then a downsample.
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
        self.down_blocks = nn.ModuleList(blocks)
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
    """Latent chunk [B, z_dim, t, h, w] -> [B, out_channels, t', 8h, 8w] (not clamped)."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.decoder_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], cfg.dropout)
        blocks = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            # Each Upsample's conv halves the channels, so every block after the first
            # receives half of the previous block's width.
            if level > 0:
                in_dim //= 2
            upsample = level < len(mult) - 1
            temporal = upsample and temporal_up[level]
            blocks.append(
                UpBlock(in_dim, out_dim, cfg.num_res_blocks, cfg.dropout, upsample, temporal)
            )
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = cache.causal_conv(self.conv_in, x)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return cache.causal_conv(self.conv_out, F.silu(self.norm_out(x), inplace=True))


class WanVAE(nn.Module):
    """Wan 2.1 video VAE. Holds parameters only (no buffers), so it can be built on the meta
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

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, x: Tensor) -> Tensor:
        """Video x [B, in_channels, 1 + 4k, H, W] in [-1, 1] -> posterior moments
        [B, 2 * z_dim, 1 + k, H/8, W/8]: channels [:z_dim] are the mean, [z_dim:] the log-var.
        """
        if x.ndim != 5 or (x.shape[2] - 1) % ENCODE_CHUNK_FRAMES != 0:
            raise ValueError(
                f"encode expects [B, C, 1 + {ENCODE_CHUNK_FRAMES}k, H, W], got {tuple(x.shape)}"
            )
        x = x.to(self.dtype)
        cache = FeatureCache()
        # Not x[:, :, 1:].split(...): splitting an empty dim still yields one (empty) chunk.
        starts = range(1, x.shape[2], ENCODE_CHUNK_FRAMES)
        chunks = [x[:, :, :1], *(x[:, :, s : s + ENCODE_CHUNK_FRAMES] for s in starts)]
        out = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        return self.quant_conv(out)

    def decode(self, z: Tensor) -> Tensor:
        """Un-normalised latents z [B, z_dim, T', h, w] -> video [B, out_channels,
        1 + 4(T' - 1), 8h, 8w], clamped to [-1, 1]. Decodes one latent frame at a time.
        """
        if z.ndim != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"decode expects [B, {self.z_dim}, T, h, w], got {tuple(z.shape)}")
        x = self.post_quant_conv(z.to(self.dtype))
        cache = FeatureCache()
        out = None
        written = 0
        for i in range(x.shape[2]):
            frames = self.decoder(x[:, :, i : i + 1], cache)
            if out is None:  # latent frame 0 decodes to 1 frame, every later one to 2**k
                per_frame = 2 ** sum(self.config.temperal_downsample)
                total = frames.shape[2] + (x.shape[2] - 1) * per_frame
                out = frames.new_empty(*frames.shape[:2], total, *frames.shape[3:])
            out[:, :, written : written + frames.shape[2]] = frames
            written += frames.shape[2]
            del frames
        assert out is not None and written == out.shape[2]
        return out.clamp_(-1.0, 1.0)

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
