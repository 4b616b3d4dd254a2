"""fastvideo's Wan 2.1 VAE against diffusers' AutoencoderKLWan, used only as a reference oracle.

Tiny random VAEs are built with diffusers, saved with ``save_pretrained`` and loaded into
``WanVAE`` from the saved files (meta device, strict, assign), which proves the checkpoint keys
match. Outputs are then compared in fp32 with a relative-error tolerance.
Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastvideo.models.wan.vae import WanVAE, WanVAEConfig

diffusers = pytest.importorskip("diffusers")
AutoencoderKLWan = diffusers.AutoencoderKLWan

# ||ours - ref|| / ||ref|| in fp32. The implementations run the same ops in the same order,
# so the measured error is expected to be 0; the tolerance leaves room for other CPU kernels.
REL_TOL = 1e-5
# bf16 has an 8-bit mantissa (relative step 2**-8 ~ 4e-3); again 0 is expected.
BF16_REL_TOL = 1e-2

TINY_CONFIGS = {
    "z4": dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ),
    # z_dim 16 with the default latents_mean/std, and a decoder wider than the encoder.
    "z16": dict(
        base_dim=8,
        decoder_base_dim=12,
        z_dim=16,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ),
}


def assert_rel_close(
    name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = REL_TOL
) -> float:
    """Assert ||ours - ref|| / ||ref|| < tol, print the measured error and return it."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype, f"{name}: dtype {ours.dtype} != {ref.dtype}"
    err = ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
    print(f"\n{name}: relative error {err:.3e} (tolerance {tol:.0e})")
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.0e}"
    return err


def load_ours(model_dir: Path) -> WanVAE:
    """Load a diffusers save_pretrained directory into WanVAE, the way fastvideo will."""
    config = WanVAEConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
    with torch.device("meta"):
        vae = WanVAE(config)
    state = load_file(str(model_dir / "diffusion_pytorch_model.safetensors"))
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.eval()


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def vae_pair(request, tmp_path_factory) -> tuple[AutoencoderKLWan, WanVAE]:
    """(diffusers reference, our WanVAE loaded from the reference's saved files)."""
    torch.manual_seed(0)
    ref = AutoencoderKLWan(**TINY_CONFIGS[request.param]).eval()
    with torch.no_grad():
        # gamma is initialised to ones; randomise it so a swapped norm would be caught.
        for name, param in ref.named_parameters():
            if name.endswith("gamma"):
                param.add_(0.2 * torch.randn_like(param))
    model_dir = tmp_path_factory.mktemp(f"wan_vae_{request.param}")
    ref.save_pretrained(model_dir)
    return ref, load_ours(model_dir)


# (batch, frames, height, width): a non-square 13-frame video (4 latent frames, 3 encoder
# chunks after the first frame), a batched 5-frame video and a non-square single image.
CASES = [(1, 13, 48, 80), (2, 5, 32, 48), (1, 1, 40, 24)]


@pytest.mark.parametrize("batch, frames, height, width", CASES)
def test_encode_matches_diffusers(vae_pair, batch, frames, height, width):
    ref, ours = vae_pair
    x = torch.rand(batch, 3, frames, height, width, generator=torch.Generator().manual_seed(1))
    x = x * 2 - 1
    with torch.no_grad():
        expected = ref._encode(x)
        moments = ours.encode(x)
        posterior_mean = ref.encode(x).latent_dist.mean
    latent_frames = 1 + (frames - 1) // 4
    assert moments.shape == (batch, 2 * ours.z_dim, latent_frames, height // 8, width // 8)
    assert_rel_close(f"encode {tuple(x.shape)}", moments, expected)
    assert_rel_close(f"posterior mean {tuple(x.shape)}", moments[:, : ours.z_dim], posterior_mean)


@pytest.mark.parametrize("batch, frames, height, width", CASES)
def test_decode_matches_diffusers(vae_pair, batch, frames, height, width):
    ref, ours = vae_pair
    latent_frames = 1 + (frames - 1) // 4
    shape = (batch, ours.z_dim, latent_frames, height // 8, width // 8)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.decode(z).sample
        video = ours.decode(z)
    assert video.shape == (batch, 3, frames, height, width)
    # A saturated output would make the comparison vacuous.
    assert (video.abs() < 1).float().mean() > 0.9
    assert_rel_close(f"decode {tuple(z.shape)}", video, expected)


def test_bf16_matches_diffusers(vae_pair):
    """In bf16 (the usual inference dtype) too; fp32 inputs are cast to the VAE's dtype."""
    ref, ours = (copy.deepcopy(m).to(torch.bfloat16) for m in vae_pair)
    x = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z = torch.randn(1, ours.z_dim, 2, 4, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert_rel_close("bf16 encode", ours.encode(x), ref._encode(x.bfloat16()), BF16_REL_TOL)
        expected = ref.decode(z.bfloat16()).sample
        assert_rel_close("bf16 decode", ours.decode(z), expected, BF16_REL_TOL)


def test_full_size_state_dict_matches_diffusers():
    """Default (real Wan 2.1) config: same fields, same keys and shapes, no buffers."""
    with torch.device("meta"):
        ref = AutoencoderKLWan()
        ours = WanVAE(WanVAEConfig())
    ref_config = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert WanVAEConfig.from_dict(dict(ref.config)) == WanVAEConfig()
    assert set(ref_config) == set(vars(WanVAEConfig()))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert list(ours.buffers()) == []


def test_latent_unnormalization_matches_what_diffusers_decodes(tiny_a):
    """diffusers' WanPipeline turns its final latents into the VAE's input with its own
    formula: our unnormalize_latents must produce exactly what it hands to vae.decode."""
    folder, pipe = tiny_a
    seen = []
    decode = pipe.vae.decode

    def spy(z, *args, **kwargs):
        seen.append(z.clone())
        return decode(z, *args, **kwargs)

    kwargs = dict(prompt="a fox", height=32, width=32, num_frames=5, num_inference_steps=1,
                  guidance_scale=1.0)  # fmt: skip
    latents = pipe(**kwargs, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).frames  # fmt: skip
    pipe.vae.decode = spy
    try:
        pipe(**kwargs, output_type="np", generator=torch.Generator().manual_seed(0))
    finally:
        pipe.vae.decode = decode
    ours = WanVAE(WanVAEConfig.from_dict(dict(pipe.vae.config)))
    (z,) = seen
    assert torch.equal(ours.unnormalize_latents(latents), z)
    assert not torch.equal(latents, z), "the normalization must do something here"
    torch.testing.assert_close(ours.normalize_latents(z), latents)


def test_encode_rejects_frame_counts_other_than_1_plus_4k(vae_pair):
    _, ours = vae_pair
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        ours.encode(torch.zeros(1, 3, 12, 16, 16))


def test_config_from_dict_rejects_unknown_fields():
    base = {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.42.1", "z_dim": 16}
    assert WanVAEConfig.from_dict(base) == WanVAEConfig()
    with pytest.raises(ValueError, match="not_a_field"):
        WanVAEConfig.from_dict({**base, "not_a_field": 1})


def test_frame_attention_falls_back_to_math_when_the_fused_kernel_refuses(monkeypatch):
    """torch's memory-efficient CUDA kernel refuses some small frames with "query is not
    correctly aligned (strideM)" (seen on an H200, torch 2.11, a tiny VAE's edge tiles):
    that call takes the math kernel and gives attention's output; other errors propagate."""
    from torch.nn.attention import SDPBackend
    from torch.nn.functional import scaled_dot_product_attention as real

    from fastvideo.models.wan import vae_layers

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, 7, 16, generator=gen) for _ in range(3))
    calls = []

    def refusing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("query is not correctly aligned (strideM)")
        return real(*args, **kwargs)

    monkeypatch.setattr(vae_layers.F, "scaled_dot_product_attention", refusing)
    entered = []
    original = vae_layers.sdpa_kernel
    monkeypatch.setattr(vae_layers, "sdpa_kernel", lambda b: entered.append(b) or original(b))
    out = vae_layers.frame_attention(q, k, v)
    assert len(calls) == 2 and entered == [[SDPBackend.MATH]]
    assert torch.allclose(out, real(q, k, v), atol=1e-6)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(vae_layers.F, "scaled_dot_product_attention", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        vae_layers.frame_attention(q, k, v)
