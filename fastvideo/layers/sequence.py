"""Video latents as a token sequence, and how that sequence is split across ranks.

Latents ``[B, C, F, H, W]`` are cut into ``pt x ph x pw`` patches; each patch becomes one
token whose features are ordered ``(pt, ph, pw, C)`` — the order the DiT's output
projection produces, so the scheduler can step tokens directly and sharded latents never
need re-assembling between steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastvideo.kernels_bridge.grid import TokenGrid

__all__ = ["SequenceShard", "TokenGrid", "patchify", "take_shard", "unpatchify"]


@dataclass(frozen=True)
class SequenceShard:
    """The slice ``[start, start + length)`` of a sequence padded to ``padded`` tokens
    (``total`` of them real). Shards are equal-sized; padding sits at the end."""

    total: int
    padded: int
    start: int
    length: int

    @classmethod
    def split(cls, total: int, parts: int, index: int) -> SequenceShard:
        length = -(-total // parts)  # ceil
        return cls(total=total, padded=length * parts, start=index * length, length=length)

    @property
    def valid(self) -> int:
        """Real (non-padding) tokens in this shard."""
        return max(0, min(self.length, self.total - self.start))


def patchify(latents: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, L, pt*ph*pw*C] tokens in (f, h, w) raster order."""
    b, c, f, h, w = latents.shape
    pt, ph, pw = patch
    x = latents.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # b, f', h', w', pt, ph, pw, c
    return x.reshape(b, (f // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def unpatchify(tokens: torch.Tensor, grid: TokenGrid, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, L, pt*ph*pw*C] -> [B, C, F, H, W] (inverse of :func:`patchify`)."""
    b = tokens.shape[0]
    pt, ph, pw = patch
    x = tokens.reshape(b, grid.frames, grid.height, grid.width, pt, ph, pw, -1)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # b, c, f', pt, h', ph, w', pw
    return x.reshape(b, -1, grid.frames * pt, grid.height * ph, grid.width * pw)


def take_shard(tokens: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """This rank's ``[B, shard.length, C]`` slice of ``[B, L, C]``, zero-padded at the end."""
    if shard.padded != tokens.shape[1]:
        tokens = F.pad(tokens, (0, 0, 0, shard.padded - tokens.shape[1]))
    return tokens[:, shard.start : shard.start + shard.length]
