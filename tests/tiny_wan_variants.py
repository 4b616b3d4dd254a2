"""Tiny random Wan image-to-video and Wan2.2 checkpoints written by diffusers' own pipeline
classes with ``save_pretrained`` (the oracle), for fastvideo to load, and the comparisons
the pipeline tests share.

* ``build_wan21_i2v``: WanImageToVideoPipeline with a CLIP vision encoder (Wan2.1 I2V).
* ``build_wan22_a14b``: two experts and a boundary ratio, T2V (WanPipeline) or I2V
  (WanImageToVideoPipeline, 36 input channels, no CLIP).
* ``build_wan22_ti2v``: WanPipeline with expand_timesteps and the 48-channel Wan2.2 VAE;
  ``ti2v_image_pipeline`` is the same modules as WanImageToVideoPipeline (diffusers' image
  mode of that checkpoint).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKLWan,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    UMT5Config,
    UMT5EncoderModel,
)

from fastvideo.models.wan.demo import _write_tokenizer
from fastvideo.models.wan.vae22 import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD
from tests.tiny_models import unipc_scheduler

# diffusers 0.42.1's image-to-video pipeline calls ftfy even when it is not installed
# (WanPipeline checks first); use WanPipeline's identical cleaning, which checks.
pipeline_wan_i2v.basic_clean = pipeline_wan.basic_clean

PROMPT = "a red fox walking through a snowy forest at dawn"
NEGATIVE = "blurry, low quality"
CLIP_DIM = 24  # differs from the DiT width so a mix-up of the two would fail
LATENT_RTOL = 1e-5
FRAME_ATOL = 1


def random_image(seed: int, height: int = 40, width: int = 56) -> np.ndarray:
    """A random uint8 [H, W, 3] image (its aspect differs from the videos': it is resized)."""
    return (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)


def _transformer(in_channels: int, out_channels: int, seed: int, **extra) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8,
        in_channels=in_channels, out_channels=out_channels, text_dim=32, freq_dim=32,
        ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=256, **extra,
    )  # fmt: skip
    with torch.no_grad():
        for block in model.blocks:  # randomise the affine norm so a mix-up would show
            block.norm2.weight.normal_(1.0, 0.2)
            block.norm2.bias.normal_(0.0, 0.2)
    return model.eval()


def _text_parts() -> dict:
    tokenizer = _write_tokenizer(Path(tempfile.mkdtemp(prefix="tok-")))
    encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
        )
    ).eval()  # fmt: skip
    return {"tokenizer": tokenizer, "text_encoder": encoder}


def _vae21() -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True],
    ).eval()  # fmt: skip


def _vae22() -> AutoencoderKLWan:
    """The Wan2.2 VAE in miniature: residual, 2x2 patchify, 48 channels, 16x spatial."""
    return AutoencoderKLWan(
        base_dim=4, decoder_base_dim=6, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
        out_channels=12, patch_size=2, scale_factor_spatial=16,
        latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD),
    ).eval()  # fmt: skip


def _save(pipe, folder: Path):
    pipe.save_pretrained(str(folder))
    return pipe


def build_wan21_i2v(folder: Path, seed: int = 0) -> WanImageToVideoPipeline:
    torch.manual_seed(seed)
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=CLIP_DIM, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16,
        )
    ).eval()  # fmt: skip
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    dit = _transformer(36, 16, seed, image_dim=CLIP_DIM, added_kv_proj_dim=32)
    pipe = WanImageToVideoPipeline(
        **_text_parts(), vae=_vae21(), scheduler=unipc_scheduler(), image_processor=processor,
        image_encoder=clip, transformer=dit,
    )  # fmt: skip
    return _save(pipe, folder)


def build_wan22_a14b(folder: Path, image: bool, boundary: float, seed: int = 0):
    """Two experts (high-noise ``transformer``, low-noise ``transformer_2``)."""
    in_channels = 36 if image else 16
    parts = dict(
        **_text_parts(),
        vae=_vae21(),
        scheduler=unipc_scheduler(),
        transformer=_transformer(in_channels, 16, seed),
        transformer_2=_transformer(in_channels, 16, seed + 1),
        boundary_ratio=boundary,
    )
    cls = WanImageToVideoPipeline if image else WanPipeline
    return _save(cls(**parts), folder)


def build_wan22_ti2v(folder: Path, seed: int = 0) -> WanPipeline:
    parts = dict(**_text_parts(), vae=_vae22(), scheduler=unipc_scheduler(5.0))
    pipe = WanPipeline(**parts, transformer=_transformer(48, 48, seed), expand_timesteps=True)
    return _save(pipe, folder)


def ti2v_image_pipeline(pipe: WanPipeline) -> WanImageToVideoPipeline:
    """The TI2V checkpoint's modules as diffusers' image-to-video pipeline."""
    return WanImageToVideoPipeline(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
        scheduler=pipe.scheduler, transformer=pipe.transformer, expand_timesteps=True,
    )  # fmt: skip


def run_diffusers(pipe, seed: int, image: np.ndarray | None = None, **kwargs):
    """diffusers' output for PROMPT / NEGATIVE: float frames [T, H, W, 3] in [0, 1], or the
    latents [C, F, H, W] with output_type='latent'."""
    if image is not None:
        kwargs["image"] = Image.fromarray(image)
    out = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        generator=torch.Generator("cpu").manual_seed(seed),
        **kwargs,
    )
    frames = out.frames[0]
    return frames if kwargs.get("output_type") == "latent" else torch.from_numpy(frames)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float((ours.double() - ref.double()).norm() / ref.double().norm())


def frame_diff(ours: np.ndarray, ref: torch.Tensor) -> int:
    """Max |difference| in uint8 levels (diffusers' float frames rounded like ours)."""
    ref_u8 = (ref.numpy() * 255).round().astype(np.int16)
    assert ours.shape == ref_u8.shape, (ours.shape, ref_u8.shape)
    assert ours.std() > 1.0, "frames are flat: the comparison would prove nothing"
    return int(np.abs(ours.astype(np.int16) - ref_u8).max())
