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

import contextlib
import copy
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file
from torch import nn

from fastvideo import PipelineConfig, VideoGenerator
from fastvideo.layers.offload import (
    GiB,
    LayerwiseOffload,
    OnDemand,
    is_parked,
    park,
    plan_offload,
    unpark,
)
from fastvideo.layers.vae_tiling import TileSizes, decode_grid, encode_grid
from fastvideo.models import loader, weight_reader
from fastvideo.models.wan.vae import WanVAE, WanVAEConfig
from fastvideo.pipelines.stages.decoding import to_uint8_frames
from tests.live_bytes import traced_peak
from tests.tiny_models import TinyWan, build_diffusers_pipeline
from tests.tiny_models import vae_pair as tiny_vae_pair
from tests.vae_ranks import TINY_VAE21, TINY_VAE22, decode_exact_tiles_rank, random_vae

# Non-square tiles small enough that a tiny video spans several of them in each direction.
SIZES = TileSizes(min_height=32, min_width=48, stride_height=24, stride_width=32)
# Wan 2.2 has 16 pixels per latent: sizes must be multiples of 16.
SIZES22 = TileSizes(min_height=32, min_width=64, stride_height=16, stride_width=32)


def uint8(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> uint8 levels, as the engine rounds them."""
    return ((video.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.int16)


def max_level_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int((uint8(a) - uint8(b)).abs().max())


@pytest.fixture(scope="module", params=["wan21", "wan22"])
def vae_pair(request) -> tuple[AutoencoderKLWan, WanVAE]:
    return tiny_vae_pair(TINY_VAE21 if request.param == "wan21" else TINY_VAE22)


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
@pytest.mark.parametrize("frames", [1, 5])
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


# --- offload building blocks ---------------------------------------------------------------
class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16)) for _ in range(3)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return x


def test_layerwise_offload_streams_blocks_and_gives_the_same_output():
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = model(x)
    offloaded = LayerwiseOffload.apply(copy.deepcopy(model), torch.device("cpu"))
    state = offloaded._fastvideo_offload
    homes = [{p.data_ptr() for p in b.parameters()} for b in offloaded.blocks]
    seen = []
    for i, block in enumerate(offloaded.blocks):  # what a block computes with (after the
        block.register_forward_pre_hook(  # offload's own pre-hook made it resident)
            lambda m, a, i=i: seen.append({p.data_ptr() for p in m.parameters()} & homes[i])
        )
    with torch.no_grad():
        got = offloaded(x)
        again = offloaded(x)
    assert torch.equal(got, expected) and torch.equal(again, expected)
    assert seen == [set()] * 6  # every block ran on a copy, never on its host weights
    # Between calls the blocks point at their host copies again; each call copied 3 blocks
    # plus the prefetch of block 0 for the next call (the first call's block 0 was fetched
    # on demand).
    assert [{p.data_ptr() for p in b.parameters()} for b in offloaded.blocks] == homes
    assert state.copies == 7
    with torch.no_grad():  # power: the same machinery with a wrong weight shows
        offloaded.blocks[1][0].weight.add_(1.0)
        assert not torch.equal(offloaded(x), expected)


def test_park_unpark_keeps_in_place_changes():
    torch.manual_seed(0)
    model = TwoBlocks().eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model(x)
    park(model)
    assert is_parked(model)
    unpark(model, torch.device("cpu"))
    assert not is_parked(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
        model.embed.bias.add_(1.0)  # e.g. a LoRA merge while on the device
    park(model)
    unpark(model, torch.device("cpu"))
    with torch.no_grad():
        assert not torch.equal(model(x), expected)  # the change survived parking
        model.embed.bias.sub_(1.0)
        assert torch.allclose(model(x), expected)


def test_plan_offload_offloads_cheapest_first_until_it_fits():
    sizes = {"transformer": 28 * GiB, "text_encoder": 11 * GiB, "vae": GiB}
    auto = dict.fromkeys(sizes, "auto")
    fits = plan_offload(auto, sizes, free=80 * GiB, headroom=8 * GiB, layerwise={"transformer"})
    assert fits.whole == () and fits.layerwise == ()
    tight = plan_offload(auto, sizes, free=40 * GiB, headroom=8 * GiB, layerwise={"transformer"})
    assert tight.whole == ("text_encoder",) and tight.layerwise == ()
    small = plan_offload(auto, sizes, free=24 * GiB, headroom=8 * GiB, layerwise={"transformer"})
    assert small.whole == ("text_encoder", "vae") and small.layerwise == ("transformer",)
    forced = plan_offload(
        {**auto, "vae": True, "text_encoder": False}, sizes, 80 * GiB, 8 * GiB, {"transformer"}
    )
    assert forced.whole == ("vae",) and "vae (asked)" in forced.summary


def test_device_memory_cap_is_what_auto_plans_within(monkeypatch):
    """device_memory_gb=24 on a 140 GiB GPU: the allocator gets the fraction 24/140, and
    the free and total memory the planner sees stop at 24 GiB, so the 14B case that stays
    resident on the whole card is offloaded under the cap."""
    from types import SimpleNamespace

    from fastvideo.layers import offload

    fractions = []
    monkeypatch.setattr(offload, "_CAPS", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(total_memory=140 * GiB))  # fmt: skip
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda f, d: fractions.append((f, d)))  # fmt: skip
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (130 * GiB, 140 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 2 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 1 * GiB)
    gpu = torch.device("cuda", 0)
    sizes = {"transformer": 28 * GiB, "text_encoder": 11 * GiB, "vae": GiB}
    auto = dict.fromkeys(sizes, "auto")
    assert offload.free_memory_bytes(gpu) == 131 * GiB
    whole = plan_offload(auto, sizes, offload.free_memory_bytes(gpu), 8 * GiB, {"transformer"})
    assert whole.whole == () and whole.layerwise == ()
    offload.cap_device_memory(gpu, 24)
    assert fractions == [(24 / 140, gpu)]
    assert offload.free_memory_bytes(gpu) == 23 * GiB  # the cap less what is allocated
    assert offload.total_memory_bytes(gpu) == 24 * GiB
    capped = plan_offload(auto, sizes, offload.free_memory_bytes(gpu), 8 * GiB, {"transformer"})
    assert capped.layerwise == ("transformer",) and "text_encoder" in capped.whole
    assert offload.free_memory_bytes(torch.device("cuda", 1)) == 131 * GiB  # per device
    with pytest.raises(ValueError, match="more than cuda:1's 140.0 GiB"):
        offload.cap_device_memory(torch.device("cuda", 1), 200)


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True])
def test_memory_sizes_are_validated(value):
    with pytest.raises(ValueError, match=r"device_memory_gb must be a finite number > 0"):
        PipelineConfig().update(device_memory_gb=value).validate()
    if value != 0:
        with pytest.raises(ValueError, match=r"offload_headroom_gb must be a finite number >= 0"):
            PipelineConfig().update(offload_headroom_gb=value).validate()


def test_device_memory_gb_is_refused_on_a_cpu_engine(tiny_a):
    with pytest.raises(ValueError, match="caps the memory of each GPU"):
        VideoGenerator.from_pretrained(str(tiny_a[0]), device="cpu", device_memory_gb=8)


def test_placement_options_are_validated_before_loading(tiny_a):
    config = PipelineConfig(num_gpus=2).update(dit_sharded_weights=True)
    with pytest.raises(ValueError, match="parallel_mode='latency'"):
        config.validate()
    config.update(parallel_mode="latency").validate()
    with pytest.raises(ValueError, match="exclude each other"):
        PipelineConfig().update(dit_sharded_weights=True, dit_cpu_offload=True).validate()
    with pytest.raises(ValueError, match="vae_tiling must be one of"):
        PipelineConfig().update(vae_tiling="yes").validate()
    with pytest.raises(ValueError, match="tile_sample_stride_width=320 exceeds"):
        PipelineConfig().update(tile_sample_stride_width=320).validate()
    config = PipelineConfig.from_pretrained(
        str(tiny_a[0]), vae_tiling=True, tile_sample_min_height=128, text_encoder_cpu_offload=True
    )
    assert config.vae_config.vae_tiling is True
    assert config.vae_config.tile_sizes().min_height == 128
    assert config.offload_config.text_encoder_cpu_offload is True


# --- through the engine --------------------------------------------------------------------
PROMPT = "a red fox walking through a snowy forest at dawn"
# Latents 2 x 8 x 12: 3 x 3 tiles of SIZES, with short ones at the right and bottom edges.
RUN = dict(seed=5, num_inference_steps=2, height=64, width=96, num_frames=5)
TILE_FIELDS = dict(
    tile_sample_min_height=SIZES.min_height,
    tile_sample_min_width=SIZES.min_width,
    tile_sample_stride_height=SIZES.stride_height,
    tile_sample_stride_width=SIZES.stride_width,
)


def load_vae(folder) -> WanVAE:
    config = WanVAEConfig.from_dict(json.loads((folder / "vae" / "config.json").read_text()))
    with torch.device("meta"):
        vae = WanVAE(config)
    state = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.eval()


def test_offload_gives_the_same_frames(tiny_a):
    folder, _ = tiny_a
    with VideoGenerator.from_pretrained(str(folder), executor="inproc") as gen:
        expected = gen.generate_video(PROMPT, guidance_scale=5.0, **RUN)
    offload = dict(dit_cpu_offload=True, text_encoder_cpu_offload=True, vae_cpu_offload=True)
    with VideoGenerator.from_pretrained(str(folder), executor="inproc", **offload) as gen:
        got = gen.generate_video(PROMPT, guidance_scale=5.0, **RUN)
        components = gen.executor._worker.pipeline.components
        dit = components["transformer"]
        blocks_home = [{p.device.type for p in b.parameters()} for b in dit.blocks]
        text_encoder, vae = components["text_encoder"], components["vae"]
    assert np.array_equal(got.frames, expected.frames)
    # The offload really ran: 2 steps x 2 blocks streamed, the encoder and VAE each moved
    # in once, everything parked again afterwards.
    assert dit._fastvideo_offload.copies >= 4
    assert isinstance(text_encoder, OnDemand) and text_encoder.moves == 1
    assert isinstance(vae, OnDemand) and vae.moves == 1
    assert is_parked(text_encoder.encoder) and is_parked(vae._component)
    assert blocks_home == [{"cpu"}] * len(dit.blocks)


def test_fp8_linear_is_the_dequantised_float8_weight():
    """Fp8WeightLinear against an explicit reference: per-row scale amax/448, e4m3 data,
    the linear computed with the dequantised weight in the input's dtype."""
    from fastvideo.layers.fp8 import Fp8WeightLinear

    torch.manual_seed(0)
    linear = nn.Linear(64, 24).to(torch.bfloat16)
    layer = Fp8WeightLinear(linear)
    w = linear.weight.float()
    scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    q = (w / scale).to(torch.float8_e4m3fn)
    assert layer.qdata.dtype == torch.float8_e4m3fn and torch.equal(layer.qdata, q)
    torch.testing.assert_close(layer.scale, scale)
    assert layer.weight.dtype == torch.bfloat16  # what T5's feed-forward reads
    x = torch.randn(3, 64).to(torch.bfloat16)
    dequantised = q.float() * scale.to(torch.bfloat16).float()
    expected = x.float() @ dequantised.to(torch.bfloat16).float().T + linear.bias.float()
    assert layer(x).dtype == torch.bfloat16
    torch.testing.assert_close(layer(x).float(), expected, rtol=1e-2, atol=1e-2)
    rel = ((layer(x).float() - linear(x).float()).norm() / linear(x).float().norm()).item()
    assert 0 < rel < 0.08, rel  # e4m3 keeps 3 mantissa bits


def test_fp8_text_encoder_stores_float8_weights_and_stays_close(tiny_a):
    """text_encoder_precision='fp8': every linear of the text encoder holds float8 (e4m3)
    weights with per-row scales, about half of bf16's bytes; for random token ids its
    states stay within float8's error of the bf16 encoder's (but are not the same), and
    the engine generates with it."""
    from fastvideo.layers.fp8 import Fp8WeightLinear

    folder, _ = tiny_a
    states, linear_bytes, latents = {}, {}, {}
    for precision in ("bf16", "fp8"):
        with VideoGenerator.from_pretrained(
            str(folder), executor="inproc", text_encoder_precision=precision
        ) as gen:
            encoder = gen.executor._worker.pipeline.components["text_encoder"].encoder
            kind = Fp8WeightLinear if precision == "fp8" else nn.Linear
            linears = [m for m in encoder.modules() if isinstance(m, (nn.Linear, Fp8WeightLinear))]
            assert linears and all(type(m) is kind for m in linears)
            tensors = [t for m in linears for t in (*m.parameters(), *m.buffers())]
            linear_bytes[precision] = sum(t.numel() * t.element_size() for t in tensors)
            gen_ids = torch.Generator().manual_seed(0)
            ids = torch.randint(0, encoder.config.vocab_size, (2, 12), generator=gen_ids)
            with torch.no_grad():
                states[precision] = encoder(ids).last_hidden_state.float()
            latents[precision] = gen.generate_video(PROMPT, output_type="latent", **RUN).latents
    ratio = linear_bytes["fp8"] / linear_bytes["bf16"]
    rel = ((states["fp8"] - states["bf16"]).norm() / states["bf16"].norm()).item()
    print(f"\nfp8 text encoder: linear weights {ratio:.2f}x bf16's bytes, states rel err {rel:.1e}")
    assert ratio < 0.6
    assert 0 < rel < 0.1
    assert torch.isfinite(latents["fp8"]).all() and not torch.equal(latents["fp8"], latents["bf16"])


def test_fp8_text_encoder_options_are_checked_before_loading():
    with pytest.raises(ValueError, match=r"dit_precision must be one of"):
        PipelineConfig().update(dit_precision="fp4").validate()
    with pytest.raises(ValueError, match="not with text_encoder_cpu_offload=True"):
        PipelineConfig().update(
            text_encoder_precision="fp8", text_encoder_cpu_offload=True
        ).validate()
    PipelineConfig().update(
        text_encoder_precision="fp8", text_encoder_cpu_offload="auto"
    ).validate()


def test_fp8_dit_is_refused_clearly_without_a_fp8_gpu(tiny_a, monkeypatch):
    """dit_precision='fp8' (torchao float8 matmuls) fails at the API boundary where it
    cannot run: on the CPU, with options that swap or merge into the weights, without
    torchao; nothing is loaded and no worker is left."""
    from fastvideo.engine import startup
    from fastvideo.layers.fp8 import check_fp8_matmul_device

    for options, needle in [
        (dict(device="cpu"), "not device='cpu'"),
        (dict(lora=[str(tiny_a[0])]), "not with lora="),
        (dict(dit_cpu_offload=True), "not with dit_cpu_offload=True"),
        (dict(dit_sharded_weights=True), "dit_sharded_weights=True"),
    ]:
        with pytest.raises(ValueError, match=rf"dit_precision='fp8': .*{re.escape(needle)}"):
            PipelineConfig().update(dit_precision="fp8", **options).validate()
    PipelineConfig().update(dit_precision="fp8", dit_cpu_offload="auto").validate()
    with pytest.raises(ValueError, match="no CUDA device is visible"):  # this machine: no GPU
        VideoGenerator.from_pretrained(str(tiny_a[0]), dit_precision="fp8")
    monkeypatch.setattr(startup.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=re.escape("pip install 'fastvideo[fp8]'")):
        startup.check_device_options(PipelineConfig().update(dit_precision="fp8"), "cuda")
    startup.check_device_options(PipelineConfig(), "cpu")  # other precisions: nothing to check
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        check_fp8_matmul_device(torch.device("cpu"))


def test_fp8_dit_targets_the_block_linears_only(tiny_a):
    """The float8 matmuls go to every linear layer inside the repeated blocks (Wan: the
    attention projections and the feed-forward) and to nothing outside them."""
    from fastvideo.layers.fp8 import fp8_matmul_targets
    from fastvideo.models.hunyuan.transformer import HunyuanTransformer3D, HunyuanTransformerConfig
    from fastvideo.models.wan.transformer import WanTransformer3D, WanTransformerConfig

    wan_cfg = json.loads((tiny_a[0] / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        wan = WanTransformer3D(WanTransformerConfig.from_dict(wan_cfg))
        hunyuan = HunyuanTransformer3D(HunyuanTransformerConfig.from_dict({
            "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2,
            "num_single_layers": 2, "num_refiner_layers": 1, "text_embed_dim": 32,
            "pooled_projection_dim": 16, "rope_axes_dim": [4, 6, 6],
        }))  # fmt: skip
    hunyuan_blocks = ("transformer_blocks.", "single_transformer_blocks.")
    for model, prefixes in [(wan, ("blocks.",)), (hunyuan, hunyuan_blocks)]:
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        expected = {n for n in linears if n.startswith(prefixes)}
        targets = fp8_matmul_targets(model)
        assert set(targets) == expected, type(model).__name__
        assert len(targets) < len(linears), "the embedders and the head stay out"
    assert {n.split(".", 2)[2].split(".")[0] for n in fp8_matmul_targets(wan)} >= {
        "attn1", "attn2", "ffn"
    }  # fmt: skip


def test_tiled_decode_through_the_engine_and_vae_offload(tiny_a):
    """One rank, tiled decode with the VAE offloaded: the VAE moves in once for all tiles,
    and the frames are the tiled decode of the run's latents."""
    folder, _ = tiny_a
    with VideoGenerator.from_pretrained(
        str(folder), executor="inproc", vae_tiling=True, vae_cpu_offload=True, **TILE_FIELDS
    ) as gen:
        video = gen.generate_video(PROMPT, guidance_scale=1.0, **RUN)
        latents = gen.generate_video(PROMPT, guidance_scale=1.0, output_type="latent", **RUN)
        vae = gen.executor._worker.pipeline.components["vae"]
    assert video.stats["vae_tiles"] == 9 and video.stats["vae_decode_ranks"] == 1
    assert vae.moves == 1
    expected, whole = local_decodes(folder, latents.latents)
    assert np.array_equal(video.frames, expected)
    assert np.abs(video.frames.astype(int) - whole.astype(int)).max() > 1


def test_auto_tiling_follows_free_memory(tiny_a, monkeypatch):
    """vae_tiling='auto' (the default) decodes whole while the estimate fits what is free,
    and in tiles once it does not."""
    from fastvideo.pipelines.stages import decoding

    folder, _ = tiny_a
    free = {"bytes": 1 << 50}
    monkeypatch.setattr(decoding, "free_memory_bytes", lambda device: free["bytes"])
    with VideoGenerator.from_pretrained(str(folder), executor="inproc", **TILE_FIELDS) as gen:
        roomy = gen.generate_video(PROMPT, guidance_scale=1.0, **RUN)
        free["bytes"] = 1 << 20  # less than the tiny VAE's estimate (~30 MB)
        short = gen.generate_video(PROMPT, guidance_scale=1.0, **RUN)
    assert "vae_tiles" not in roomy.stats and short.stats["vae_tiles"] == 9
    assert np.abs(short.frames.astype(int) - roomy.frames.astype(int)).max() > 1


@contextlib.contextmanager
def threads(n: int):
    """Run with ``n`` intra-op threads, as a CPU worker of the engine does."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def local_decodes(folder, latents: torch.Tensor, num_threads: int | None = None):
    """(single-rank tiled decode, whole decode) of final latents [C, F, h, w] as uint8
    [T, H, W, 3] frames, decoded in this process."""
    vae = load_vae(folder)
    tiled = copy.deepcopy(vae)
    tiled.enable_tiling(SIZES)
    n = num_threads or torch.get_num_threads()
    with torch.no_grad(), threads(n):
        z = vae.unnormalize_latents(latents[None].to(vae.dtype))
        expected = to_uint8_frames(tiled.decode(z))[0].numpy()
        whole = to_uint8_frames(vae.decode(z))[0].numpy()
    return expected, whole


def _no_weights_in_the_driver(*args, **kwargs):
    raise AssertionError("the driver process opened a safetensors file")


@pytest.mark.slow
@pytest.mark.parametrize("num_gpus", [2, 3])
def test_parallel_decode_equals_single_rank_tiled_decode(tiny_a, num_gpus, monkeypatch):
    folder, _ = tiny_a
    with monkeypatch.context() as patch:
        # The driver never reads weights: only the workers do, straight from the files.
        patch.setattr(safetensors, "safe_open", _no_weights_in_the_driver)
        for module in (weight_reader, loader):
            patch.setattr(module, "read_header", _no_weights_in_the_driver)
        with VideoGenerator.from_pretrained(
            str(folder), num_gpus=num_gpus, device="cpu", vae_tiling=True, **TILE_FIELDS
        ) as gen:
            video = gen.generate_video(PROMPT, guidance_scale=1.0, **RUN)
            latents = gen.generate_video(PROMPT, guidance_scale=1.0, output_type="latent", **RUN)
            ready = gen.executor.ready
    assert video.stats["vae_tiles"] == 9 and video.stats["vae_decode_ranks"] == num_gpus
    # The workers ran one intra-op thread each (2 cores); decode here the same way.
    expected, whole = local_decodes(folder, latents.latents, num_threads=1)
    assert np.array_equal(video.frames, expected)
    assert np.abs(video.frames.astype(int) - whole.astype(int)).max() > 1
    assert all(r.host_rss_bytes > 100 << 20 for r in ready.values())  # torch alone is more


@pytest.mark.slow
@pytest.mark.parametrize("num_gpus", [2, 3])
def test_parallel_decode_in_exact_tiles_gives_the_whole_decode(tiny_a, num_gpus):
    """The default vae_tiling='auto' on 2 and 3 ranks: each decodes its share of exact
    tiles (a multiple of the ranks of them) and the output rank's frames are the whole
    decode's."""
    folder, _ = tiny_a
    with VideoGenerator.from_pretrained(str(folder), num_gpus=num_gpus, device="cpu") as gen:
        video = gen.generate_video(PROMPT, guidance_scale=1.0, **RUN)
        latents = gen.generate_video(PROMPT, guidance_scale=1.0, output_type="latent", **RUN)
    tiles = video.stats["vae_tiles"]
    assert video.stats["vae_decode_ranks"] == num_gpus and tiles >= num_gpus
    assert tiles % num_gpus == 0
    _, whole = local_decodes(folder, latents.latents, num_threads=1)
    diff = np.abs(video.frames.astype(int) - whole.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999


@pytest.fixture(scope="module")
def tiny_deep(tmp_path_factory):
    """A tiny checkpoint with 8 blocks, so the blocks hold most of the DiT's weights."""
    folder = tmp_path_factory.mktemp("tiny-deep")
    build_diffusers_pipeline(TinyWan("tiny-deep", layers=8, seed=2), folder)
    return folder


def run_two_ranks(folder, out_dir, monkeypatch, **options):
    monkeypatch.setenv("FASTVIDEO_WORKER_PLUGINS", "tests.plugins.param_bytes")
    monkeypatch.setenv("FASTVIDEO_TEST_PARAM_BYTES_DIR", str(out_dir))
    with VideoGenerator.from_pretrained(
        str(folder), num_gpus=2, device="cpu", parallel_mode="latency", cfg_parallel=False,
        **options,
    ) as gen:  # fmt: skip
        out = gen.generate_video(PROMPT, guidance_scale=5.0, output_type="latent", **RUN)
    facts = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    return out, facts


@pytest.mark.slow
def test_sharded_weights_equal_unsharded_and_halve_the_blocks(tiny_deep, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain, plain_facts = run_two_ranks(tiny_deep, tmp_path / "a", monkeypatch)
    sharded, facts = run_two_ranks(tiny_deep, tmp_path / "b", monkeypatch,
                                   dit_sharded_weights=True)  # fmt: skip
    assert torch.equal(sharded.latents, plain.latents)
    assert sharded.plan == "Ulysses 2"
    blocks = plain_facts[0]["block_bytes"]
    for rank, (p, s) in enumerate(zip(plain_facts, facts, strict=True)):
        # Each rank keeps half of the (padded) flat block weights, and nothing else of them.
        assert blocks / 2 <= s["shard_bytes"] <= blocks / 2 + 8 * 64, (rank, s)
        assert s["dit_bytes"] == p["dit_bytes"] - blocks + s["shard_bytes"], (rank, s, p)
        assert s["dit_bytes"] < 0.6 * p["dit_bytes"], (rank, s, p)


LOAD_RSS = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from torch import nn
    from fastvideo.models.loader import load_checkpoint

    def status(key):  # kB -> bytes
        line = next(x for x in open("/proc/self/status") if x.startswith(key))
        return int(line.split()[1]) * 1024

    folder, n = Path(sys.argv[1]), int(sys.argv[2])
    with torch.device("meta"):
        module = nn.ParameterDict({f"w{i}": nn.Parameter(torch.empty(1024, 1024))
                                  for i in range(n)})
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    load_checkpoint(module, folder, torch.device("cpu"), lambda name: torch.float32)
    total = sum(float(p.sum()) for p in module.values())  # touch every weight
    print(status("VmHWM") - before)
""")


@pytest.mark.slow
def test_loading_holds_the_weights_once_in_host_memory(tmp_path):
    """A worker's load reads each weight from its file once: the peak resident memory grows
    by about the weights' size, not twice it (no staging copy beside the module's)."""
    from safetensors.torch import save_file

    n = 48  # 48 x 4 MiB = 192 MiB of fp32 weights
    save_file({f"w{i}": torch.randn(1024, 1024) for i in range(n)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", LOAD_RSS, str(tmp_path), str(n)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    grown, weights = int(out.stdout.split()[-1]), n * 4 << 20
    print(f"\npeak RSS grew {grown / 2**20:.0f} MiB for {weights / 2**20:.0f} MiB of weights")
    assert 0.5 * weights < grown < 1.4 * weights


def test_memory_options_on_the_command_line(capsys):
    from fastvideo.entrypoints import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    for flag in (
        "--vae-tiling",
        "--tile-sample-stride-width",
        "--dit-cpu-offload",
        "--vae-parallel-decode",
        "--dit-sharded-weights",
        "--offload-headroom-gb",
    ):
        assert flag in shown  # fmt: skip
    assert cli._bool_or_word("auto") == "auto" and cli._bool_or_word("true") is True


def test_memory_fit_end_to_end_part_runs_on_cpu(tmp_path):
    """benchmarks.memory_fit --parts e2e at toy size on the CPU: its checkpoint is written,
    one video goes through the engine and the engine's memory plan is recorded (the GPU run
    adds device_memory_gb budgets)."""
    out = tmp_path / "mf.json"
    cmd = [sys.executable, "-m", "benchmarks.memory_fit", "--device", "cpu", "--parts", "e2e",
           "--warmup", "0", "--reps", "1", "--e2e-model", str(tmp_path / "ck"),
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (case,) = json.loads(out.read_text())["results"]
    assert case["status"] == "ok", case
    assert case["budget_gb"] is None and case["frames_shape"][0] == 5
    assert case["memory_plan"] and "memory plan" in case["memory_plan"][0]


def _corner_kernels(vae: WanVAE) -> None:
    """Every 3x3 kernel after the mid block reads only its top-left input: each layer
    shifts the picture by one row and one column, so the zero padding at a tile's edge
    travels inward undamped, a row per layer (random kernels spread it thinly)."""
    g = torch.Generator().manual_seed(1)
    for m in [*vae.decoder.up_blocks.modules(), vae.decoder.conv_out]:
        if isinstance(m, nn.Conv3d | nn.Conv2d) and m.weight.shape[-1] == 3:
            w = torch.zeros_like(m.weight)
            w[..., 0, 0] = torch.randn(w[..., 0, 0].shape, generator=g) * 0.5
            m.weight.data.copy_(w)


EXACT_VAES = {
    "wan2.1": (TINY_VAE21, (20, 22)),
    "wan2.2": (TINY_VAE22, (9, 11)),
}


@pytest.mark.parametrize("family", sorted(EXACT_VAES))
def test_exact_tiles_decode_the_whole_decodes_video(family):
    """decode_exact_tiles: any grid (one tile, 2x3, one latent row per tile) gives the
    untiled decode's video to fp32 rounding, for Wan 2.1's VAE and Wan 2.2's (residual
    levels, 2x2 patches); the video is not saturated, so every pixel counts."""
    config, hw = EXACT_VAES[family]
    vae = random_vae(config, conv_out_scale=0.05)
    z = torch.randn(1, vae.z_dim, 3, *hw)
    with torch.no_grad():
        whole = vae.decode(z)
        assert (whole.abs() < 0.99).float().mean() > 0.99
        for rows, cols in ((1, 1), (2, 3), (hw[0], 1)):
            tiled = vae.decode_exact_tiles(z, rows, cols)
            assert tiled.shape == whole.shape
            torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
    for bad in ((0, 1), (1, hw[1] + 1), (True, 1), (1.5, 1)):
        with pytest.raises(ValueError, match="decode_exact_tiles"):
            vae.decode_exact_tiles(z, *bad)


@pytest.mark.parametrize("family", sorted(EXACT_VAES))
def test_exact_tiles_as_levels_are_the_tiled_video_converted(family):
    """decode_exact_tiles(levels=True), each tile converted chunk by chunk: bit-equal to
    to_uint8_frames of the float tiled video, for a video off the clamp (many levels) and
    a saturated one (levels 0 and 255), Wan 2.1's VAE and Wan 2.2's (2x2 patches)."""
    config, hw = EXACT_VAES[family]
    z = torch.randn(1, EXACT_VAES[family][0]["z_dim"], 3, *hw)
    for scale in (0.5, 4.0):
        vae = random_vae(config, conv_out_scale=scale)
        with torch.no_grad():
            for rows, cols in ((1, 1), (2, 3)):
                levels = vae.decode_exact_tiles(z, rows, cols, levels=True)
                expected = to_uint8_frames(vae.decode_exact_tiles(z, rows, cols))
                assert levels.dtype == torch.uint8 and levels.shape == expected.shape
                assert torch.equal(levels, expected), (scale, rows, cols)
        if scale == 0.5:
            assert levels.unique().numel() > 40
        else:
            assert (levels == 0).any() and (levels == 255).any()


def test_exact_tiles_as_levels_over_ranks_equal_one_rank(tmp_path):
    """Two gloo ranks decode exact tiles as uint8 levels: the first rank gets one rank's
    frames bit for bit (one tile: the other rank has none to send; 1x3: uneven shares;
    2x3), the other rank gets None."""
    import torch.multiprocessing as mp

    grids = [(1, 1), (1, 3), (2, 3)]
    z = torch.randn(1, TINY_VAE21["z_dim"], 3, 12, 14)
    mp.spawn(decode_exact_tiles_rank, args=(2, z, grids, str(tmp_path / "init"), str(tmp_path)),
             nprocs=2, join=True)  # fmt: skip
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    vae = random_vae(TINY_VAE21, conv_out_scale=0.5)
    with torch.no_grad():
        for (rows, cols), got in zip(grids, first, strict=True):
            assert torch.equal(got, vae.decode_exact_tiles(z, rows, cols, levels=True)), (
                rows,
                cols,
            )
    assert second == [None] * len(grids)


@pytest.mark.parametrize("family", sorted(EXACT_VAES))
def test_exact_tile_halos_are_needed(family, monkeypatch):
    """With kernels that carry a tile's edge inward a row per layer, the halos of
    Decoder.tile_halos still give the whole decode's video (to fp32 rounding), and one row
    less at the last up block or at the head shows at the tile edges (over 100x that)."""
    config, hw = EXACT_VAES[family]
    vae = random_vae(config, conv_out_scale=0.05)
    _corner_kernels(vae)
    z = torch.randn(1, vae.z_dim, 3, *hw)
    halos = vae.decoder.tile_halos
    with torch.no_grad():
        whole = vae.decode(z)
        assert (whole.abs() < 0.99).float().mean() > 0.99
        # To fp32 rounding (the convolutions of a tile and of the whole frame may take
        # different CPU kernels: bit-equal on some CPUs, 7e-7 apart on others).
        torch.testing.assert_close(vae.decode_exact_tiles(z, 2, 3), whole, rtol=0, atol=1e-5)
        for level in (-2, -1):
            short = [list(h) for h in halos()]
            short[level][0] -= 1
            monkeypatch.setattr(vae.decoder, "tile_halos", lambda s=short: [tuple(h) for h in s])
            assert (vae.decode_exact_tiles(z, 2, 3) - whole).abs().max() > 1e-4, level
            monkeypatch.undo()


def test_exact_tile_grids_fit_the_budget_with_the_fewest_pixels():
    """fit_exact_tiles: a roomier budget never gives more tiles; nothing fits a budget
    the output video alone exceeds; tile_work grows with every cut."""
    with torch.device("meta"):  # full-size Wan 2.1: only its shapes are read
        vae = WanVAE(WanVAEConfig())
    z_shape = (1, 16, 21, 90, 160)  # 720x1280, 81 frames
    whole = vae.decode_memory_bytes(z_shape)
    grids = {}
    for share in (0.5, 0.25, 0.12):
        grid = vae.fit_exact_tiles(z_shape, int(whole * share))
        assert grid is not None and grid[0] * grid[1] > 1, share
        grids[share] = grid[0] * grid[1]
    assert grids[0.5] <= grids[0.25] <= grids[0.12]
    # Work relative to one whole-frame pass: halos make every cut cost more.
    work = [vae.decoder.tile_work((90, 160), 1, n) for n in (1, 2, 4, 8)]
    assert work[0] == 1.0 and work == sorted(work) and work[1] > 1.0
    video, _ = vae._decode_bytes(z_shape)
    assert vae.fit_exact_tiles(z_shape, video) is None


def test_exact_tiles_as_levels_fit_fewer_tiles():
    """fit_exact_tiles(levels=True): without the float video (4 bytes a value) the same
    budget fits grids with less halo work, never more; a parallel decode, whose ranks hold
    their whole share of tile videos until the gather, fits no less work than one rank."""
    with torch.device("meta"):
        vae = WanVAE(WanVAEConfig())
    z_shape = (1, 16, 21, 90, 160)  # 720x1280, 81 frames
    halos = vae.decoder.tile_halos()

    def work(grid):
        return vae.decoder.tile_work((90, 160), *grid, halos)

    fewer = 0
    for gib in (2.5, 3.0, 3.89):
        budget = int(gib * (1 << 30))
        floats, levels = (
            vae.fit_exact_tiles(z_shape, budget),
            vae.fit_exact_tiles(z_shape, budget, levels=True),
        )
        assert work(levels) <= work(floats), gib
        fewer += work(levels) < work(floats)
        for ranks in (2, 4):
            shared = vae.fit_exact_tiles(z_shape, budget, multiple_of=ranks)
            assert shared[0] * shared[1] % ranks == 0 and work(shared) >= work(floats)
    assert fewer == 3
    # At diffusers' tiled fp32 peak (3.89 GiB): 2x5 tiles as floats, 2x4 as levels.
    budget = int(3.89 * (1 << 30))
    assert vae.fit_exact_tiles(z_shape, budget) == (2, 5)
    assert vae.fit_exact_tiles(z_shape, budget, levels=True) == (2, 4)


def test_exact_tile_plans_fit_their_budget_when_traced():
    """Full-size Wan 2.1 VAE traced under FakeTensorMode (tensor bytes, no arithmetic):
    every grid fit_exact_tiles plans within a budget peaks at most 0.85 of it (the rest
    is left for the convolutions' workspaces, which a trace does not see), as floats and
    as uint8 levels; and the uint8 decode of a grid holds no float video: its peak is
    lower by at least 0.9 of what a float video costs beyond its uint8 frames."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        vae = WanVAE(WanVAEConfig()).eval()
        shape = (1, 16, 6, 60, 104)  # 480x832, 21 frames
        z = torch.randn(*shape)
        for gib in (1.5, 3.0):
            budget = int(gib * (1 << 30))
            for levels in (False, True):
                grid = vae.fit_exact_tiles(shape, budget, levels=levels)
                assert grid is not None, (gib, levels)
                peak = traced_peak(
                    lambda g=grid, lv=levels: vae.decode_exact_tiles(z, *g, levels=lv)
                )
                assert peak <= 0.85 * budget, (gib, levels, grid, peak / (1 << 30))
        long = (1, 16, 13, 30, 52)  # 240x416, 49 frames: the video is a large share
        z = torch.randn(*long)
        floats = traced_peak(lambda: vae.decode_exact_tiles(z, 2, 2))
        levels = traced_peak(lambda: vae.decode_exact_tiles(z, 2, 2, levels=True))
    video, _ = vae._decode_bytes(long)
    assert floats - levels >= 0.9 * (video - video // 4), (floats, levels, video)


def test_auto_tiling_decodes_in_exact_tiles_when_short(tiny_a, monkeypatch):
    """vae_tiling='auto' with the tile fields at their defaults: a decode that does not fit
    whole runs in exact tiles sized to the free memory, and the frames are the whole
    decode's."""
    from fastvideo.pipelines.stages import decoding

    folder, _ = tiny_a
    run = dict(RUN, height=64, width=512)
    free = {"bytes": 1 << 50}
    monkeypatch.setattr(decoding, "free_memory_bytes", lambda device: free["bytes"])
    with VideoGenerator.from_pretrained(str(folder), executor="inproc") as gen:
        latents = gen.generate_video(PROMPT, guidance_scale=1.0, output_type="latent", **run)
        vae = gen.executor._worker.pipeline.components["vae"]
        z_shape = (1, *latents.latents.shape)
        free["bytes"] = int(vae.decode_memory_bytes(z_shape) * 0.99)
        video = gen.generate_video(PROMPT, guidance_scale=1.0, **run)
    rows, cols = vae.fit_exact_tiles(z_shape, int(free["bytes"] * decoding.FIT_MARGIN), levels=True)
    assert rows * cols > 1 and video.stats["vae_tiles"] == rows * cols
    whole = load_vae(folder)
    with torch.no_grad():
        z = whole.unnormalize_latents(latents.latents[None].to(whole.dtype))
        expected = to_uint8_frames(whole.decode(z))[0].numpy()
    diff = np.abs(video.frames.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999
