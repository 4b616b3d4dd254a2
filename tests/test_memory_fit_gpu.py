"""The CUDA paths of offload and tiling (side-stream copies, pinned host memory, freed
device memory): GPU only, skipped elsewhere. The CPU suite (test_memory_fit.py) runs the
same logic host to host."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastvideo.layers.offload import LayerwiseOffload, OnDemand, is_parked, park, unpark
from fastvideo.layers.vae_tiling import TileSizes
from fastvideo.models.wan.vae import WanVAE, WanVAEConfig
from fastvideo.pipelines.stages.decoding import to_uint8_frames

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


class Blocks(nn.Module):
    def __init__(self, width: int = 1024, depth: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(64, width)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
             for _ in range(depth)]
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x


@torch.no_grad()
def test_layerwise_offload_on_cuda_equals_resident_and_frees_memory():
    torch.manual_seed(0)
    model = Blocks().to(CUDA, torch.bfloat16).eval()
    x = torch.randn(512, 64, device=CUDA, dtype=torch.bfloat16)
    expected = model(x)
    resident = torch.cuda.memory_allocated()
    offloaded = LayerwiseOffload.apply(copy.deepcopy(model).cpu(), CUDA)
    del model
    torch.cuda.empty_cache()
    for _ in range(3):
        assert torch.equal(offloaded(x), expected)
    torch.cuda.synchronize()
    block_params = [p for b in offloaded.blocks for p in b.parameters()]
    assert all(p.device.type == "cpu" and p.is_pinned() for p in block_params)
    # Between calls only the embedding and block 0 (prefetched for the next call) stay:
    # the other seven blocks' bytes are freed. (Counted as a difference: the allocator's
    # total also holds cuBLAS's workspace, 32 MiB on Hopper.)
    block_bytes = sum(p.numel() * p.element_size() for p in offloaded.blocks[0].parameters())
    assert resident - torch.cuda.memory_allocated() >= 6.5 * block_bytes
    assert offloaded._fastvideo_offload.copies == 8 * 3 + 1


@torch.no_grad()
def test_park_unpark_and_on_demand_on_cuda():
    torch.manual_seed(0)
    model = Blocks(depth=2).to(CUDA).eval()
    x = torch.randn(4, 64, device=CUDA)
    expected = model(x)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    before = torch.cuda.memory_allocated()
    park(model)
    # Every weight byte left the device (a difference: cuBLAS's workspace stays allocated).
    assert is_parked(model) and before - torch.cuda.memory_allocated() >= 0.99 * weights
    unpark(model, CUDA)
    assert torch.equal(model(x), expected)
    park(model)
    wrapped = OnDemand(model, CUDA)
    assert torch.equal(wrapped(x), expected) and wrapped.moves == 1
    assert is_parked(model)


@torch.no_grad()
def test_tiled_decode_on_cuda_matches_cpu():
    torch.manual_seed(0)
    cfg = WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    vae = WanVAE(cfg).eval()
    vae.enable_tiling(TileSizes(32, 48, 24, 32))
    z = torch.randn(1, 4, 3, 10, 13)
    on_cpu = vae.decode(z)
    on_gpu = copy.deepcopy(vae).to(CUDA).decode(z.to(CUDA)).cpu()
    levels = lambda v: ((v / 2 + 0.5).clamp(0, 1) * 255).round()  # noqa: E731
    assert (levels(on_cpu) - levels(on_gpu)).abs().max() <= 1


@torch.no_grad()
def test_exact_tiles_on_cuda_fit_their_budget_and_equal_the_whole_decode():
    """Full-size Wan 2.1 VAE (seeded random weights, fp32) at 480x832, 21 frames: the grid
    fit_exact_tiles plans within 2 GiB decodes within it (peak above the weights and
    latents) and gives the whole decode's video; the whole decode needs more."""
    torch.manual_seed(0)
    with torch.device(CUDA):
        vae = WanVAE(WanVAEConfig()).eval()
        z = torch.randn(1, 16, 6, 60, 104)
    for p in vae.parameters():
        nn.init.normal_(p, std=0.02)
    budget = 2 << 30
    grid = vae.fit_exact_tiles(tuple(z.shape), budget)
    assert grid is not None and grid[0] * grid[1] > 1

    def peak(fn):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    whole, whole_peak = peak(lambda: vae.decode(z))
    tiled, tiled_peak = peak(lambda: vae.decode_exact_tiles(z, *grid))
    assert tiled_peak <= budget < whole_peak, (grid, tiled_peak / 2**30, whole_peak / 2**30)
    assert (tiled - whole).abs().max() < 1e-4
    # As the pipeline decodes: uint8 frames tile by tile, planned without the float video.
    grid8 = vae.fit_exact_tiles(tuple(z.shape), budget, levels=True)
    assert grid8 is not None
    frames, frames_peak = peak(lambda: vae.decode_exact_tiles(z, *grid8, levels=True))
    assert frames_peak <= budget, (grid8, frames_peak / 2**30)
    assert (frames.int() - to_uint8_frames(whole).int()).abs().max() <= 1
