"""3-D rotary position embedding (Wan style): the head dimension is split into a frame,
a height and a width part, each rotated by its own axis position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvideo.kernels_bridge import fused
from fastvideo.layers.sequence import SequenceShard, TokenGrid


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) rotary sizes: h and w get 2*(D//6) each, t the rest (44/42/42 for D=128)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(dim: int, max_positions: int, theta: float) -> torch.Tensor:
    """[max_positions, dim/2] rotation angles, computed in float64 for accuracy."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)


class RotaryEmbedding3D:
    """Cos/sin tables for token positions of a ``TokenGrid`` (no parameters, no buffers)."""

    def __init__(self, head_dim: int, max_positions: int = 1024, theta: float = 10000.0):
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self._tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        # Every step of a request asks for the same angles: keep the last answer.
        self._last: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _axis_tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._tables:
            tables = []
            for dim in axis_dims(self.head_dim):
                angles = _axis_angles(dim, self.max_positions, self.theta)
                tables += [angles.cos().float().to(device), angles.sin().float().to(device)]
            self._tables[device] = tuple(tables)
        return self._tables[device]

    def __call__(
        self, grid: TokenGrid, shard: SequenceShard | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [1, L_shard, 1, D/2] (fp32) for this rank's tokens.

        Padding positions (past the real sequence) get position 0; their outputs are
        discarded.
        """
        key = (grid, shard, device)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        start, length = (0, grid.num_tokens) if shard is None else (shard.start, shard.length)
        index = torch.arange(start, start + length, device=device)
        index = torch.where(index < grid.num_tokens, index, torch.zeros_like(index))
        f = index // (grid.height * grid.width)
        h = (index // grid.width) % grid.height
        w = index % grid.width
        cos_t, sin_t, cos_h, sin_h, cos_w, sin_w = self._axis_tables(device)
        cos = torch.cat([cos_t[f], cos_h[h], cos_w[w]], dim=-1)
        sin = torch.cat([sin_t[f], sin_h[h], sin_w[w]], dim=-1)
        result = cos[None, :, None, :], sin[None, :, None, :]
        self._last = (key, result)
        return result


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, L, H, D] by the given angles.

    The products are taken in fp32 (cos/sin are fp32) and cast back to x's dtype, which
    is what diffusers' Wan processor computes.
    """
    pairs = x.unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    # Written straight into x's dtype: no fp32 copy of the whole rotated tensor.
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


def norm_and_rotate(
    x: torch.Tensor, norm: nn.Module, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """``apply_rotary(norm(x).unflatten(2, (-1, Dh)), cos, sin).flatten(2)`` for x
    [B, L, D] (heads of Dh = 2 * cos.shape[-1]); one fused pass on a GPU
    (``kernels_bridge.fused.rms_norm_rotary``) when ``norm`` is an ``nn.RMSNorm`` over D."""
    if fused.in_graph(x) and type(norm) is nn.RMSNorm and norm.weight is not None:
        return torch.ops.fastvideo.norm_rotate(x, norm.weight, norm.eps, cos, sin)
    if fused.rotary_fusable(x, norm, cos, sin):
        return fused.rms_norm_rotary(x, norm, cos, sin)
    return _rotate(norm(x), cos, sin)


def _rotate(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return apply_rotary(h.unflatten(2, (-1, 2 * cos.shape[-1])), cos, sin).flatten(2)


@torch.library.custom_op("fastvideo::norm_rotate", mutates_args=())
def _norm_rotate_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float | None, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """``norm_and_rotate`` of an ``nn.RMSNorm`` given as its weight and eps: one opaque op
    of a compiled graph (``fused.in_graph``), the fused kernel or the torch ops at run time."""
    if fused.rotary_fusable_of(x, weight, cos, sin):
        return fused.rms_norm_rotary_of(x, weight, eps, cos, sin)
    return _rotate(F.rms_norm(x, x.shape[-1:], weight, eps), cos, sin).contiguous()


@_norm_rotate_op.register_fake
def _(x, weight, eps, cos, sin):  # noqa: ANN001, ANN202
    return fused.dense_like(x)
