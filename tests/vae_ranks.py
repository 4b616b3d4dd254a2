"""Tiny seeded Wan VAEs, and a gloo rank that decodes exact tiles in a group: light to
import (torch and fastvideo only), so ``mp.spawn`` children start fast."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastvideo.distributed.runtime import GroupView
from fastvideo.models.wan.vae import WanVAE, WanVAEConfig

TINY_VAE21 = dict(
    base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
    temperal_downsample=[False, True, True],
)  # fmt: skip
TINY_VAE22 = dict(
    base_dim=4, decoder_base_dim=6, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
    temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
    out_channels=12, patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 8,
    latents_std=[1.0] * 8,
)  # fmt: skip


def random_vae(config: dict, conv_out_scale: float = 1.0) -> WanVAE:
    """A WanVAE with seeded random weights; ``conv_out_scale`` keeps the video off the
    clamp (a saturated pixel would hide a wrong one)."""
    torch.manual_seed(0)
    vae = WanVAE(WanVAEConfig.from_dict(config)).eval()
    for p in vae.parameters():
        nn.init.normal_(p, std=0.2)
    vae.decoder.conv_out.weight.data *= conv_out_scale
    return vae


def decode_exact_tiles_rank(
    rank: int, world: int, z: torch.Tensor, grids: list, init_file: str, out_dir: str
) -> None:
    """One rank of ``world``: decodes ``z`` in each exact-tile grid as uint8 levels over
    the whole group; the first rank saves what it got, the others that they got None."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        vae = random_vae(TINY_VAE21, conv_out_scale=0.5)
        group = GroupView(dist.new_group(list(range(world))), tuple(range(world)), rank)
        with torch.no_grad():
            got = [vae.decode_exact_tiles(z, r, c, group, levels=True) for r, c in grids]
        torch.save(got, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
