"""Decoded video -> 8-bit frame levels, one elementwise rule for every decode path.

The rule is per pixel, so a video converted tile by tile (as exact-tile decodes do, never
holding the whole float video) equals the whole video converted at once, bit for bit.
"""

from __future__ import annotations

import torch


def to_levels(video: torch.Tensor) -> torch.Tensor:
    """A decoded video (any float dtype, nominally in [-1, 1]) -> uint8 levels, same shape:
    clamped to [-1, 1], then ``round(255 * (x / 2 + 0.5))`` in fp32. One fp32 temporary,
    the rest in place."""
    x = video.to(torch.float32, copy=True).clamp_(-1.0, 1.0)
    return x.div_(2).add_(0.5).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
