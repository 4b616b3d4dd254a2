"""Our Wan2.1 image-to-video DiT (I2V and FLF2V) against diffusers' WanTransformer3DModel.

Tiny random models are built with diffusers' class (``image_dim`` / ``added_kv_proj_dim``
set, 36 input channels) and their state dict is loaded into ours with ``strict=True``.

diffusers takes the text and the image states separately but concatenates them before the
blocks and splits them again in the attention processor assuming exactly 512 text tokens
(``image_context_length = L - 512``), so the text here is 512 tokens long, as its pipeline
always pads it. Our model keeps the two apart and needs no such assumption.

Tolerance: relative error ||ours - ref|| / ||ref|| < 1e-5 in fp32 (measured ~3e-7, as for
the text-to-video DiT), < 1e-2 in bf16. Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import pytest
import torch

from fastvideo.layers.sequence import SequenceShard, TokenGrid, patchify, unpatchify
from fastvideo.models.loader import load_checkpoint, meta_module
from fastvideo.models.wan.transformer import (
    FP32_PARAM_PATTERNS,
    WanTransformer3D,
    WanTransformerConfig,
)

diffusers = pytest.importorskip("diffusers")
WanTransformer3DModel = diffusers.WanTransformer3DModel

REL_TOL = 1e-5
BF16_REL_TOL = 1e-2  # bf16's relative step is 2**-8 ~ 4e-3
TEXT_TOKENS = 512  # what diffusers' processor assumes (see the module docstring)
CLIP_TOKENS = 257  # CLIP ViT-H/14 at 224px: 16 x 16 patches + the class token
IMAGE_DIM = 24
TINY_I2V = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=8,
    in_channels=36,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    image_dim=IMAGE_DIM,
    added_kv_proj_dim=32,  # = heads * head_dim, as in the real checkpoints
    rope_max_seq_len=256,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def build_reference(seed: int = 0, **overrides) -> WanTransformer3DModel:
    """A tiny diffusers I2V DiT whose norms and position embedding are randomised (their
    initial values, ones and zeros, would hide a mix-up)."""
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**{**TINY_I2V, **overrides}).eval()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if "norm" in name or "pos_embed" in name:
                param.add_(0.2 * torch.randn_like(param))
    return ref


def load_ours(ref: WanTransformer3DModel) -> WanTransformer3D:
    """Our DiT from the reference's config.json fields and state dict (strict)."""
    config = WanTransformerConfig.from_dict(dict(ref.config))
    with torch.device("meta"):
        model = WanTransformer3D(config)
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def i2v_pair() -> tuple[WanTransformer3DModel, WanTransformer3D]:
    ref = build_reference()
    return ref, load_ours(ref)


def _inputs(batch: int, frames: int, height: int, width: int, image_tokens: int = CLIP_TOKENS):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 36, frames, height, width, generator=g)
    t = torch.tensor([937.0, 251.0][:batch])
    text = torch.randn(batch, TEXT_TOKENS, TINY_I2V["text_dim"], generator=g)
    image = torch.randn(batch, image_tokens, IMAGE_DIM, generator=g)
    return x, t, text, image


@pytest.mark.parametrize(
    "shape", [(1, 4, 6, 10), (2, 1, 8, 8)], ids=["4-latent-frames-non-square", "image-batch2"]
)
def test_i2v_dit_matches_diffusers(i2v_pair, shape):
    ref, ours = i2v_pair
    x, t, text, image = _inputs(*shape)
    with torch.no_grad():
        expected = ref(x, t, text, encoder_hidden_states_image=image, return_dict=False)[0]
        out = ours(x, t, text, image)
        other_image = ours(x, t, text, torch.randn_like(image))
    err = _rel(out, expected)
    print(f"\nI2V {tuple(x.shape)}: DiT relative error {err:.2e}")
    assert out.shape == expected.shape == (shape[0], 16, *shape[1:])
    assert err < REL_TOL
    # The image branch matters: another image gives another prediction.
    assert _rel(other_image, expected) > 1e-3


def test_i2v_forward_tokens_keyword_image_and_padded_shard(i2v_pair):
    """The engine's call (positional arguments as for T2V, image as keyword) on a shard
    padded past the real tokens: the real rows equal the whole-video forward."""
    _, ours = i2v_pair
    x, t, text, image = _inputs(1, 2, 6, 10)  # 2 x 3 x 5 = 30 tokens
    grid = TokenGrid(2, 3, 5)
    tokens = patchify(x, (1, 2, 2))
    shard = SequenceShard(total=30, padded=32, start=0, length=32)
    padded = torch.cat([tokens, torch.randn(1, 2, tokens.shape[2])], dim=1)
    with torch.no_grad():
        full = ours.forward_tokens(tokens, t, text, grid, None, None, image=image)
        sharded = ours.forward_tokens(padded, t, text, grid, shard, image=image)
    assert torch.equal(unpatchify(full, grid, (1, 2, 2)), ours(x, t, text, image))
    torch.testing.assert_close(sharded[:, :30], full, rtol=1e-6, atol=1e-6)


def test_image_is_required_exactly_when_the_model_has_an_image_branch(i2v_pair):
    _, ours = i2v_pair
    x, t, text, image = _inputs(1, 1, 4, 4)
    tokens, grid = patchify(x, (1, 2, 2)), TokenGrid(1, 2, 2)
    with pytest.raises(ValueError, match="needs `image`"):
        ours.forward_tokens(tokens, t, text, grid)
    t2v = WanTransformerConfig.from_dict({**TINY_I2V, "image_dim": None, "added_kv_proj_dim": None})
    t2v_model = WanTransformer3D(t2v)
    with pytest.raises(ValueError, match="no image branch"):
        t2v_model.forward_tokens(patchify(x[:, :16], (1, 2, 2)), t, text, grid, image=image)


def test_flf2v_pos_embed_matches_diffusers():
    """FLF2V: diffusers takes the two images' CLIP states as consecutive rows [2B, L, D] and
    joins them per sample before adding ``pos_embed`` [1, 2L, D]; ours takes [B, 2L, D]."""
    ref = build_reference(seed=3, pos_embed_seq_len=2 * CLIP_TOKENS)
    ours = load_ours(ref)
    x, t, text, _ = _inputs(2, 2, 6, 8)
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2 * 2, CLIP_TOKENS, IMAGE_DIM, generator=g)  # (first, last) per sample
    with torch.no_grad():
        expected = ref(x, t, text, encoder_hidden_states_image=images, return_dict=False)[0]
        out = ours(x, t, text, images)
        grid = TokenGrid(2, 3, 4)
        joined = images.reshape(2, 2 * CLIP_TOKENS, IMAGE_DIM)
        tokens_out = ours.forward_tokens(patchify(x, (1, 2, 2)), t, text, grid, image=joined)
        ours.condition_embedder.image_embedder.pos_embed.zero_()
        no_pos = ours(x, t, text, images)
    err = _rel(out, expected)
    print(f"\nFLF2V {tuple(x.shape)}: DiT relative error {err:.2e}")
    assert err < REL_TOL
    assert torch.equal(unpatchify(tokens_out, grid, (1, 2, 2)), out)
    assert _rel(no_pos, expected) > 1e-3  # the position embedding is used
    with pytest.raises(ValueError, match="FLF2V"):
        ours.forward_tokens(patchify(x, (1, 2, 2)), t, text, grid, image=images)


def test_real_i2v_configs_parse_and_build_diffusers_state_dict_keys():
    """The published Wan2.1 I2V-14B / FLF2V-14B transformer configs: same parameter names and
    shapes as diffusers (meta device, so no memory), and the half-sized mistakes refused."""
    i2v = dict(
        image_dim=1280, added_kv_proj_dim=5120, attention_head_dim=128, cross_attn_norm=True,
        eps=1e-6, ffn_dim=13824, freq_dim=256, in_channels=36, num_attention_heads=40,
        num_layers=40, out_channels=16, patch_size=[1, 2, 2], qk_norm="rms_norm_across_heads",
        text_dim=4096, rope_max_seq_len=1024,
    )  # fmt: skip
    for cfg in (i2v, {**i2v, "pos_embed_seq_len": 2 * CLIP_TOKENS}):
        with torch.device("meta"):
            ref = WanTransformer3DModel(**{**cfg, "num_layers": 1})
            ours = WanTransformer3D(WanTransformerConfig.from_dict({**cfg, "num_layers": 1}))
        ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    with pytest.raises(ValueError, match="both"):
        WanTransformerConfig.from_dict({**i2v, "added_kv_proj_dim": None})
    with pytest.raises(ValueError, match="model width"):
        WanTransformerConfig.from_dict({**i2v, "added_kv_proj_dim": 1280})


def test_bf16_checkpoint_through_our_loader_matches_diffusers(tmp_path):
    """diffusers-saved safetensors read by our loader as the engine does (bf16, with the
    reference's fp32 parameters) against diffusers' own bf16 loading."""
    build_reference(seed=7, pos_embed_seq_len=2 * CLIP_TOKENS).save_pretrained(tmp_path)
    ref = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    config = WanTransformerConfig.from_dict(dict(ref.config))

    def dtype_for(name: str) -> torch.dtype:
        return torch.float32 if any(p in name for p in FP32_PARAM_PATTERNS) else torch.bfloat16

    ours = load_checkpoint(
        meta_module(lambda: WanTransformer3D(config)),
        tmp_path,
        torch.device("cpu"),
        dtype_for,
        ignore_unexpected=("norm_added_q",),
    )
    ref_dtypes = {k: v.dtype for k, v in ref.state_dict().items()}
    assert {k: v.dtype for k, v in ours.state_dict().items()} == ref_dtypes
    x, t, text, _ = _inputs(1, 2, 6, 8)
    images = torch.randn(2, CLIP_TOKENS, IMAGE_DIM, generator=torch.Generator().manual_seed(8))
    x, text, images = x.bfloat16(), text.bfloat16(), images.bfloat16()
    with torch.no_grad():
        expected = ref(x, t, text, encoder_hidden_states_image=images, return_dict=False)[0]
        out = ours(x, t, text, images)
    err = _rel(out, expected)
    print(f"\nI2V bf16 through the loader: relative error {err:.2e}")
    assert out.dtype == expected.dtype == torch.bfloat16
    assert err < BF16_REL_TOL
