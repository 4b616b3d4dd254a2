"""Fitting models and resolutions in memory: VAE tiling, parallel decode, CPU offload,
sharded DiT weights, and what the workers report about host memory.

* Tiled encode/decode against diffusers' ``AutoencoderKLWan.enable_tiling()`` with the same
  (small, non-square) tiles, on tiny VAEs (Wan 2.1, and Wan 2.2 with its 2x2 patch), so
  that several tiles, overlaps and short edge tiles occur. Decoded frames must agree within
  one uint8 level, latents within a tight relative error.
* Parallel decode through the engine on 2 and 3 CPU workers: bitwise the frames of the
  same engine decoding every tile on the output rank.
* Offload (layerwise DiT, text encoder, VAE, park/unpark) gives the very same frames as
  resident weights, with the copy logic running host -> host on CPU.
* Sharded weights under 2-rank Ulysses (gloo): latents equal the unsharded run and every
  rank holds about half of the block weights.

Multi-process tests are marked slow.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from diffusers import AutoencoderKLWan

from fastvideo.layers.vae_tiling import TileSizes, decode_grid, encode_grid
from fastvideo.models.wan.vae import WanVAE, WanVAEConfig

# Non-square tiles small enough that a tiny video spans several of them in each direction.
SIZES = TileSizes(min_height=32, min_width=48, stride_height=24, stride_width=32)
# Wan 2.2 has 16 pixels per latent: sizes must be multiples of 16.
SIZES22 = TileSizes(min_height=32, min_width=64, stride_height=16, stride_width=32)

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


def uint8(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> uint8 levels, as the engine rounds them."""
    return ((video.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.int16)


def max_level_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int((uint8(a) - uint8(b)).abs().max())


@pytest.fixture(scope="module", params=["wan21", "wan22"])
def vae_pair(request) -> tuple[AutoencoderKLWan, WanVAE]:
    torch.manual_seed(0)
    cfg = TINY_VAE21 if request.param == "wan21" else TINY_VAE22
    ref = AutoencoderKLWan(**cfg).eval()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if name.endswith("gamma"):  # ones at init: randomise so a swapped norm shows
                param.add_(0.2 * torch.randn_like(param))
    with torch.device("meta"):
        ours = WanVAE(WanVAEConfig.from_dict(dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def tiled_pair(ref: AutoencoderKLWan, ours: WanVAE) -> tuple[AutoencoderKLWan, WanVAE]:
    """Copies of both with tiling on, at the same tile sizes."""
    sizes = SIZES if ours.config.spatial_factor == 8 else SIZES22
    ref_tiled, ours_tiled = copy.deepcopy(ref), copy.deepcopy(ours)
    ref_tiled.enable_tiling(
        sizes.min_height, sizes.min_width, sizes.stride_height, sizes.stride_width
    )
    ours_tiled.enable_tiling(sizes)
    return ref_tiled, ours_tiled


# --- geometry ------------------------------------------------------------------------------
def test_grid_reproduces_diffusers_positions():
    # Latents 10 x 13 (80 x 104 pixels): latent tiles 4 x 6 every 3 x 4, short edge tiles.
    grid = decode_grid((10, 13), SIZES, spatial=8)
    assert grid.rows.starts == (0, 3, 6, 9) and grid.cols.starts == (0, 4, 8, 12)
    assert (grid.rows.size, grid.cols.size) == (4, 6)
    assert (grid.rows.keep, grid.rows.blend, grid.cols.keep, grid.cols.blend) == (24, 8, 32, 16)
    assert (grid.rows.total, grid.cols.total) == (80, 104)
    assert decode_grid((4, 6), SIZES, spatial=8) is None  # fits one tile: not tiled
    # Wan 2.2: tiles are cut from the 2x2-folded video with the pixel sizes unchanged.
    enc = encode_grid((64, 96), SIZES22, spatial=16, patch=2)
    assert enc.rows.starts == (0, 16) and enc.cols.starts == (0, 32)
    assert (enc.rows.size, enc.rows.keep, enc.rows.blend, enc.rows.total) == (32, 2, 2, 4)
    assert (enc.cols.size, enc.cols.keep, enc.cols.blend, enc.cols.total) == (64, 4, 4, 6)
    with pytest.raises(ValueError, match="tile_sample_stride_height=24 must be a multiple of 16"):
        decode_grid((10, 13), SIZES, spatial=16)


# --- against diffusers ---------------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 9])
def test_tiled_decode_matches_diffusers(vae_pair, frames):
    ref, ours = vae_pair
    s = ours.config.spatial_factor
    h, w = (10, 13) if s == 8 else (5, 7)  # several tiles and short edge tiles either way
    latent_frames = 1 + (frames - 1) // 4
    z = torch.randn(1, ours.z_dim, latent_frames, h, w, generator=torch.Generator().manual_seed(3))
    ref_tiled, tiled = tiled_pair(ref, ours)
    grid = tiled.decode_grid(tuple(z.shape), tiled.tiling)
    assert grid is not None and len(grid) >= 4
    with torch.no_grad():
        expected = ref_tiled.decode(z).sample
        got = tiled.decode(z)
        whole = ours.decode(z)
    assert got.shape == expected.shape == whole.shape
    diff = max_level_diff(got, expected)
    print(f"\ntiled decode {tuple(z.shape)}: {len(grid)} tiles, max uint8 diff {diff}")
    assert diff <= 1
    # Power: the tiles and their blend really changed the picture.
    assert max_level_diff(got, whole) > 1


def test_tiled_encode_matches_diffusers(vae_pair):
    ref, ours = vae_pair
    s = ours.config.spatial_factor
    height, width = (80, 104) if s == 8 else (96, 144)
    x = torch.rand(1, 3, 5, height, width, generator=torch.Generator().manual_seed(4)) * 2 - 1
    ref_tiled, tiled = tiled_pair(ref, ours)
    with torch.no_grad():
        expected = ref_tiled.encode(x).latent_dist.parameters
        got = tiled.encode(x)
        whole = ours.encode(x)
    assert got.shape == expected.shape == whole.shape
    err = ((got - expected).norm() / expected.norm()).item()
    print(f"\ntiled encode {tuple(x.shape)}: relative error {err:.2e}")
    assert err < 1e-5
    assert ((got - whole).norm() / whole.norm()).item() > 1e-3  # tiling changed the result


def test_tiled_decode_bf16_matches_diffusers(vae_pair):
    ref, ours = vae_pair
    if ours.config.spatial_factor != 8:
        pytest.skip("one bf16 case is enough")
    z = torch.randn(1, ours.z_dim, 2, 10, 13, generator=torch.Generator().manual_seed(5))
    ref_tiled, tiled = tiled_pair(ref, ours)
    ref_tiled.to(torch.bfloat16)
    tiled.to(torch.bfloat16)
    with torch.no_grad():
        expected = ref_tiled.decode(z.bfloat16()).sample
        got = tiled.decode(z)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert max_level_diff(got, expected) <= 1
