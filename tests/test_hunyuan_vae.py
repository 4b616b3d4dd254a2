"""Our HunyuanVideo VAE against diffusers' AutoencoderKLHunyuanVideo (the oracle).

A tiny random VAE is built with diffusers, saved with ``save_pretrained`` and loaded into
``HunyuanVAE`` through our loader (meta device, strict), which proves the keys match.

Tolerance (fp32): relative error < 1e-5 and max |ours - ref| < 3e-5. Single frames match
bitwise; with several frames the mid-block attention differs in rounding only (ours runs it
frame by frame without the reference's L x L mask): measured up to 1.5e-5 max abs (run with
-s), which is the size of the reference's own fp32 error here (its fp32 output is 1.2e-5 from
its float64 output on the 7-frame case), so 1e-5 would test noise. In float64 both agree to
1e-12 (``test_decode_float64_matches_diffusers``): the only difference is rounding.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fastvideo.models.hunyuan.vae import HunyuanVAE, HunyuanVAEConfig
from fastvideo.models.loader import load_checkpoint, meta_module

ATOL = 3e-5
F64_ATOL = 1e-12
REL_TOL = 1e-5
BF16_REL_TOL = 2e-2
TINY = dict(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
            norm_num_groups=4)  # fmt: skip


def _compare(name: str, ours: torch.Tensor, ref: torch.Tensor, rel_tol: float = REL_TOL) -> None:
    assert ours.shape == ref.shape, f"{name}: {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype
    diff = (ours.double() - ref.double()).abs().max().item()
    rel = ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
    print(f"\n{name}: max abs {diff:.2e}, relative {rel:.2e}")
    assert rel < rel_tol
    if rel_tol == REL_TOL:
        assert diff < ATOL


@pytest.fixture(scope="module")
def vae_pair(tmp_path_factory):
    """(diffusers reference, our HunyuanVAE loaded from the reference's saved files)."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    ref = AutoencoderKLHunyuanVideo(**TINY).eval()
    with torch.no_grad():  # GroupNorm affine starts as (1, 0): randomise so swaps show
        for name, param in ref.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp("hunyuan-vae")
    ref.save_pretrained(str(folder))
    cfg = HunyuanVAEConfig.from_dict(json.loads((folder / "config.json").read_text()))
    ours = load_checkpoint(
        meta_module(lambda: HunyuanVAE(cfg)), folder, torch.device("cpu"), lambda _: torch.float32
    )
    return ref, ours


# (batch, latent frames, h, w): 1 frame; 3 and 4 frames in one pass; 6 and 7 frames in
# diffusers' overlapping temporal chunks (7 leaves a last chunk of one frame).
DECODE_CASES = [(1, 1, 3, 5), (2, 3, 2, 3), (1, 4, 3, 5), (1, 6, 3, 2), (1, 7, 2, 3)]


@pytest.mark.parametrize("batch, frames, h, w", DECODE_CASES)
def test_decode_matches_diffusers(vae_pair, batch, frames, h, w):
    ref, ours = vae_pair
    z = torch.randn(batch, 4, frames, h, w, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        expected = ref.decode(z).sample
        video = ours.decode(z)
    assert video.shape == (batch, 3, 1 + 4 * (frames - 1), 8 * h, 8 * w)
    _compare(f"decode {tuple(z.shape)}", video, expected)


@pytest.mark.parametrize("frames", [3, 7])
def test_decode_float64_matches_diffusers(vae_pair, frames):
    ref, ours = (copy.deepcopy(m).double() for m in vae_pair)
    z = torch.randn(1, 4, frames, 2, 3, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        diff = (ours.decode(z) - ref.decode(z.double()).sample).abs().max().item()
    print(f"\nfloat64 decode ({frames} latent frames): max abs {diff:.1e}")
    assert diff < F64_ATOL


def test_decode_chunk_is_one_pass(vae_pair):
    """decode_chunk = diffusers' decode without its temporal chunking."""
    ref, ours = vae_pair
    z = torch.randn(1, 4, 6, 2, 3, generator=torch.Generator().manual_seed(5))
    ref = copy.deepcopy(ref)
    ref.use_framewise_decoding = False
    with torch.no_grad():
        _compare("decode_chunk (6 frames)", ours.decode_chunk(z), ref.decode(z).sample)


# (batch, frames, H, W): an image, 9 frames in one pass, 21 frames in temporal chunks.
ENCODE_CASES = [(1, 1, 16, 24), (2, 9, 24, 16), (1, 21, 16, 24)]


@pytest.mark.parametrize("batch, frames, height, width", ENCODE_CASES)
def test_encode_matches_diffusers(vae_pair, batch, frames, height, width):
    ref, ours = vae_pair
    g = torch.Generator().manual_seed(frames)
    x = torch.rand(batch, 3, frames, height, width, generator=g) * 2 - 1
    with torch.no_grad():
        expected = ref._encode(x)
        moments = ours.encode(x)
        mode = ref.encode(x).latent_dist.mode()
    assert moments.shape == (batch, 8, 1 + (frames - 1) // 4, height // 8, width // 8)
    _compare(f"encode {tuple(x.shape)}", moments, expected)
    _compare(f"posterior mean {tuple(x.shape)}", ours.posterior_mean(moments), mode)


def test_bf16_decode_matches_diffusers(vae_pair):
    ref, ours = (copy.deepcopy(m).to(torch.bfloat16) for m in vae_pair)
    z = torch.randn(1, 4, 2, 2, 3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = ref.decode(z.bfloat16()).sample
        _compare("bf16 decode", ours.decode(z), expected, BF16_REL_TOL)


def test_latent_scaling_is_the_pipeline_formula():
    with torch.device("meta"):
        vae = HunyuanVAE(HunyuanVAEConfig())
    latents = torch.randn(1, 16, 2, 3, 4)
    assert vae.config.scaling_factor == 0.476986
    assert torch.equal(vae.unnormalize_latents(latents), latents / 0.476986)
    torch.testing.assert_close(vae.normalize_latents(vae.unnormalize_latents(latents)), latents)


def test_full_size_state_dict_matches_diffusers():
    """Default (real HunyuanVideo) config: same config fields, keys and shapes, no buffers."""
    from diffusers import AutoencoderKLHunyuanVideo

    with torch.device("meta"):
        ref = AutoencoderKLHunyuanVideo()
        ours = HunyuanVAE(HunyuanVAEConfig())
    assert HunyuanVAEConfig.from_dict(dict(ref.config)) == HunyuanVAEConfig()
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    assert list(ours.buffers()) == []


def test_config_rejects_unsupported_fields():
    with pytest.raises(ValueError, match="not_a_field"):
        HunyuanVAEConfig.from_dict({"not_a_field": 1})
    with pytest.raises(ValueError, match="temporal_compression_ratio"):
        HunyuanVAEConfig.from_dict({"temporal_compression_ratio": 8})
