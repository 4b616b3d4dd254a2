"""Wan2.2 models against diffusers (the oracle): the DiT with per-token timesteps (TI2V-5B
style, 48 latent channels) and the residual, patchified VAE of TI2V-5B.

Tiny random models are built with diffusers' classes and their state dicts loaded into ours
with ``strict=True``. Tolerance (fp32): relative error ||ours - ref|| / ||ref|| < 1e-5.
Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastvideo.layers.sequence import SequenceShard, TokenGrid, patchify
from fastvideo.models.wan.transformer import WanTransformer3D, WanTransformerConfig
from fastvideo.models.wan.vae import WanVAE, WanVAEConfig
from fastvideo.models.wan.vae22 import (
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    patchify_space,
    unpatchify_space,
)

diffusers = pytest.importorskip("diffusers")

from tests.tiny_models import vae_pair  # noqa: E402 - needs diffusers

WanTransformer3DModel = diffusers.WanTransformer3DModel

REL_TOL = 1e-5
# TI2V-5B's shape in miniature: 48 latent channels in and out, no image branch.
TINY_TI2V = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=8,
    in_channels=48,
    out_channels=48,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    rope_max_seq_len=256,
)
# The published transformer configs (diffusers' conversion of the Wan2.2 checkpoints).
_WAN_COMMON = dict(
    added_kv_proj_dim=None, attention_head_dim=128, cross_attn_norm=True, eps=1e-6,
    freq_dim=256, patch_size=[1, 2, 2], qk_norm="rms_norm_across_heads", text_dim=4096,
    image_dim=None, rope_max_seq_len=1024, pos_embed_seq_len=None,
)  # fmt: skip
REAL_CONFIGS = {
    "TI2V-5B": dict(
        _WAN_COMMON, ffn_dim=14336, in_channels=48, out_channels=48, num_attention_heads=24,
        num_layers=30,
    ),
    "T2V-A14B": dict(
        _WAN_COMMON, ffn_dim=13824, in_channels=16, out_channels=16, num_attention_heads=40,
        num_layers=40,
    ),
    "I2V-A14B": dict(
        _WAN_COMMON, ffn_dim=13824, in_channels=36, out_channels=16, num_attention_heads=40,
        num_layers=40,
    ),
}  # fmt: skip


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def ti2v_pair() -> tuple[WanTransformer3DModel, WanTransformer3D]:
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**TINY_TI2V).eval()
    with torch.no_grad():
        for block in ref.blocks:  # randomise the affine norm so a mix-up would show
            block.norm2.weight.normal_(1.0, 0.2)
            block.norm2.bias.normal_(0.0, 0.2)
    config = WanTransformerConfig.from_dict(dict(ref.config))
    with torch.device("meta"):
        ours = WanTransformer3D(config)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def first_frame_timesteps(t: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """[B] -> [B, L] as diffusers' TI2V image-to-video builds them: the first latent frame
    (the conditioning image) at t = 0, every other token at the sample's t."""
    per_token = t[:, None].repeat(1, grid.num_tokens)
    per_token[:, : grid.height * grid.width] = 0
    return per_token


@pytest.mark.parametrize("kind", ["first-frame-zero", "random-per-token"])
def test_ti2v_dit_per_token_timesteps_match_diffusers(ti2v_pair, kind):
    ref, ours = ti2v_pair
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 48, 3, 6, 10, generator=g)  # 3 x 3 x 5 = 45 tokens, non-square
    grid = TokenGrid(3, 3, 5)
    t = torch.tensor([937.0, 251.0])
    if kind == "first-frame-zero":
        timestep = first_frame_timesteps(t, grid)
    else:
        timestep = torch.rand(2, grid.num_tokens, generator=g) * 1000
    text = torch.randn(2, 11, TINY_TI2V["text_dim"], generator=g)
    with torch.no_grad():
        expected = ref(x, timestep, text, return_dict=False)[0]
        out = ours(x, timestep, text)
        uniform = ours(x, t, text)
    err = _rel(out, expected)
    print(f"\nTI2V DiT, {kind} timesteps: relative error {err:.2e}")
    assert out.shape == expected.shape == x.shape
    assert err < REL_TOL
    # Per-token timesteps are used: the same t everywhere gives another prediction.
    assert _rel(uniform, expected) > 1e-3


def test_uniform_per_token_timesteps_equal_one_timestep_per_sample(ti2v_pair):
    """Wan2.2 TI2V text-to-video passes t for every token: same result as [B] timesteps."""
    _, ours = ti2v_pair
    x = torch.randn(1, 48, 2, 4, 6)
    t = torch.tensor([500.0])
    text = torch.randn(1, 7, TINY_TI2V["text_dim"])
    with torch.no_grad():
        per_sample = ours(x, t, text)
        per_token = ours(x, t[:, None].expand(1, 2 * 2 * 3), text)
    torch.testing.assert_close(per_token, per_sample, rtol=1e-6, atol=1e-6)


def test_padded_shard_takes_this_shards_timesteps(ti2v_pair):
    """With a shard the caller passes the shard's [B, L_shard] slice of the timesteps; the
    padding tokens' values are arbitrary and must not change the real tokens."""
    _, ours = ti2v_pair
    x = torch.randn(1, 48, 2, 6, 10)  # 2 x 3 x 5 = 30 tokens
    grid = TokenGrid(2, 3, 5)
    tokens = patchify(x, (1, 2, 2))
    timestep = first_frame_timesteps(torch.tensor([700.0]), grid)
    text = torch.randn(1, 7, TINY_TI2V["text_dim"])
    shard = SequenceShard(total=30, padded=32, start=0, length=32)
    padded_tokens = torch.cat([tokens, torch.randn(1, 2, tokens.shape[2])], dim=1)
    padded_t = torch.cat([timestep, torch.tensor([[123.0, 999.0]])], dim=1)
    with torch.no_grad():
        full = ours.forward_tokens(tokens, timestep, text, grid)
        sharded = ours.forward_tokens(padded_tokens, padded_t, text, grid, shard)
    torch.testing.assert_close(sharded[:, :30], full, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one per token"):
        ours.forward_tokens(padded_tokens, timestep, text, grid, shard)


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_wan22_configs_build_diffusers_state_dict_keys(name):
    """Published Wan2.2 configs parse; names and shapes equal diffusers' (meta device)."""
    cfg = {**REAL_CONFIGS[name], "num_layers": 1}
    with torch.device("meta"):
        ref = WanTransformer3DModel(**cfg)
        ours = WanTransformer3D(WanTransformerConfig.from_dict(cfg))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    assert ours.config.inner_dim == cfg["num_attention_heads"] * 128


# --- VAE ---------------------------------------------------------------------------------
# TI2V-5B's VAE in miniature: residual levels, 2x2 patchify (12 channels in and out), a
# decoder wider than the encoder, and a channel change inside the DupUp3D shortcut of the
# third up level (as 1024 -> 512 in the real model).
TINY_VAE22 = dict(
    base_dim=4,
    decoder_base_dim=6,
    z_dim=8,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    temperal_downsample=[False, True, True],
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=16,
    latents_mean=[0.0] * 8,
    latents_std=[1.0] * 8,
)
# Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json.
REAL_VAE22_CONFIG = {
    "_class_name": "AutoencoderKLWan", "_diffusers_version": "0.35.0.dev0", "attn_scales": [],
    "base_dim": 160, "clip_output": False, "decoder_base_dim": 256, "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0, "in_channels": 12, "is_residual": True,
    "latents_mean": list(WAN22_LATENTS_MEAN), "latents_std": list(WAN22_LATENTS_STD),
    "num_res_blocks": 2, "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16,
    "scale_factor_temporal": 4, "temperal_downsample": [False, True, True], "z_dim": 48,
}  # fmt: skip
# (batch, frames, height, width): non-square 9 frames (3 latent frames, two 4-frame encoder
# chunks after the first frame), and a batch of two non-square images.
VAE_CASES = [(1, 9, 64, 96), (2, 1, 48, 32)]


@pytest.fixture(scope="module")
def vae22_pair():
    return vae_pair(TINY_VAE22)


@pytest.mark.parametrize("batch, frames, height, width", VAE_CASES)
def test_vae22_encode_matches_diffusers(vae22_pair, batch, frames, height, width):
    ref, ours = vae22_pair
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, frames, height, width, generator=g) * 2 - 1
    with torch.no_grad():
        expected = ref._encode(x)
        posterior_mean = ref.encode(x).latent_dist.mean
        moments = ours.encode(x)
    latent_frames = 1 + (frames - 1) // 4
    assert moments.shape == (batch, 16, latent_frames, height // 16, width // 16)
    err = _rel(moments, expected)
    print(f"\nWan2.2 VAE encode {tuple(x.shape)}: relative error {err:.2e}")
    assert err < REL_TOL
    assert _rel(moments[:, :8], posterior_mean) < REL_TOL


@pytest.mark.parametrize("batch, frames, height, width", VAE_CASES)
def test_vae22_decode_matches_diffusers(vae22_pair, batch, frames, height, width):
    ref, ours = vae22_pair
    latent_frames = 1 + (frames - 1) // 4
    shape = (batch, 8, latent_frames, height // 16, width // 16)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.decode(z).sample
        video = ours.decode(z)
    assert video.shape == expected.shape == (batch, 3, frames, height, width)
    assert (video.abs() < 1).float().mean() > 0.9  # not saturated: the comparison means something
    err = _rel(video, expected)
    print(f"\nWan2.2 VAE decode {tuple(z.shape)}: relative error {err:.2e}")
    assert err < REL_TOL


def test_vae22_bf16_matches_diffusers(vae22_pair):
    ref, ours = (copy.deepcopy(m).to(torch.bfloat16) for m in vae22_pair)
    x = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z = torch.randn(1, 8, 2, 2, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert _rel(ours.encode(x), ref._encode(x.bfloat16())) < 1e-2
        assert _rel(ours.decode(z), ref.decode(z.bfloat16()).sample) < 1e-2


def test_patchify_round_trip_and_reference_channel_order():
    x = torch.randn(2, 3, 2, 4, 6)
    patched = patchify_space(x, 2)
    assert patched.shape == (2, 12, 2, 2, 3)
    assert torch.equal(unpatchify_space(patched, 2), x)
    # Channel c*4 + j*2 + i holds row offset i, column offset j (width offset first).
    assert torch.equal(patched[:, 1 * 4 + 1 * 2 + 0], x[:, 1, :, 0::2, 1::2])


def test_real_ti2v_vae_config_parses_and_matches_diffusers_keys():
    """The published config (with clip_output, which diffusers ignores) parses; parameter
    names and shapes equal diffusers' model built from it (meta device); no buffers."""
    config = WanVAEConfig.from_dict(REAL_VAE22_CONFIG)
    assert (config.z_dim, config.spatial_factor, config.patch) == (48, 16, 2)
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan.from_config(REAL_VAE22_CONFIG)
        ours = WanVAE(config)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    assert list(ours.buffers()) == []
    latents = torch.randn(1, 48, 2, 3, 4)
    with torch.device("meta"):
        vae = WanVAE(config)
    torch.testing.assert_close(vae.normalize_latents(vae.unnormalize_latents(latents)), latents)
    with pytest.raises(ValueError, match="patch_size"):
        WanVAEConfig.from_dict({**REAL_VAE22_CONFIG, "in_channels": 3})
