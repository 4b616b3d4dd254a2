"""Wan2.1 image-to-video through the engine against diffusers' WanImageToVideoPipeline:
same checkpoint (built and saved by diffusers, with a CLIP vision encoder), seed, image,
prompt and negative prompt.

Tolerance: uint8 frames within 1 level, final latents (output_type="latent") within fp32
relative error 1e-5 (||ours - ref|| / ||ref||). Also here: the image-derived size rule,
the API's image errors, the tiny I2V demo model from the command line, and 2- and 3-worker
runs (CFG-parallel, Ulysses) against the same reference.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastvideo import PipelineConfig, SamplingParam, VideoGenerator
from fastvideo.engine.core import build_item
from fastvideo.engine.images import request_size
from fastvideo.engine.model_info import resolve_model
from fastvideo.wire.validation import DefaultSize, size_for_image
from tests.tiny_wan_variants import (
    FRAME_ATOL,
    LATENT_RTOL,
    NEGATIVE,
    PROMPT,
    build_wan21_i2v,
    frame_diff,
    random_image,
    rel_err,
    run_diffusers,
)

SIZE = dict(height=48, width=48, num_frames=9, num_inference_steps=4)  # 27 tokens
COMMON = dict(negative_prompt=NEGATIVE, seed=5, guidance_scale=5.0, **SIZE)


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    """(folder, diffusers pipeline, {name: reference}) of the tiny Wan2.1 I2V checkpoint."""
    folder = tmp_path_factory.mktemp("wan21-i2v")
    pipe = build_wan21_i2v(folder)
    image = random_image(0)
    refs = {
        "frames": run_diffusers(pipe, 5, image, output_type="np", guidance_scale=5.0, **SIZE),
        "latents": run_diffusers(pipe, 5, image, output_type="latent", guidance_scale=5.0, **SIZE),
        "latents_no_cfg": run_diffusers(
            pipe, 5, image, output_type="latent", guidance_scale=1.0, **SIZE
        ),
    }
    return folder, pipe, refs


@pytest.fixture(scope="module")
def i2v_gen(i2v):
    folder, _, _ = i2v
    with VideoGenerator.from_pretrained(str(folder), executor="inproc") as gen:
        yield gen


def test_frames_and_latents_match_diffusers(i2v, i2v_gen):
    _, _, refs = i2v
    image = random_image(0)
    frames = i2v_gen.generate_video(PROMPT, image=image, **COMMON).frames
    diff = frame_diff(frames, refs["frames"])
    latents = i2v_gen.generate_video(PROMPT, image=image, output_type="latent", **COMMON).latents
    err = rel_err(latents, refs["latents"])
    print(f"\nI2V frames max |diff| {diff}, latents rel err {err:.1e}")
    assert diff <= FRAME_ATOL and err < LATENT_RTOL
    # Power: another image (same prompt and seed) gives another video.
    other = i2v_gen.generate_video(
        PROMPT, image=random_image(1), output_type="latent", **COMMON
    ).latents
    assert rel_err(other, refs["latents"]) > 1e-2


def test_batched_requests_keep_their_own_image(i2v, i2v_gen):
    """Two requests in one batch: each keeps its image (the PIL input of the first one
    too); the first matches diffusers, without guidance here."""
    _, _, refs = i2v
    first = SamplingParam().update(**{**COMMON, "guidance_scale": 1.0}, output_type="latent")
    first.image = Image.fromarray(random_image(0))
    second = first.copy().update(image=random_image(1))
    outs = i2v_gen.generate_video([PROMPT, PROMPT], sampling_param=[first, second])
    assert rel_err(outs[0].latents, refs["latents_no_cfg"]) < LATENT_RTOL
    assert rel_err(outs[1].latents, outs[0].latents) > 1e-2


@pytest.mark.slow
def test_two_workers_match_diffusers(i2v):
    """CFG-parallel with guidance; Ulysses 2 without (27 tokens: padded), the CLIP states
    and condition tokens broadcast from rank 0. (Ring attention over 3 ranks with image
    conditioning runs in test_wan22_pipeline.py, on the I2V-A14B model.)"""
    folder, _, refs = i2v
    image = random_image(0)
    with VideoGenerator.from_pretrained(str(folder), num_gpus=2, device="cpu") as gen:
        cfg = gen.generate_video(PROMPT, image=image, output_type="latent", **COMMON)
        plain = gen.generate_video(
            PROMPT, image=image, output_type="latent", **{**COMMON, "guidance_scale": 1.0}
        )
    assert (cfg.plan, plain.plan) == ("CFG 2", "Ulysses 2")
    assert rel_err(cfg.latents, refs["latents"]) < LATENT_RTOL
    assert rel_err(plain.latents, refs["latents_no_cfg"]) < LATENT_RTOL


# --- the size rule -------------------------------------------------------------------------
def test_size_follows_the_image_unless_given():
    # diffusers' example rule: round(sqrt(area * aspect)) // 16 * 16 (aspect = h / w).
    assert size_for_image(720, 1280, 480 * 832, 16) == (464, 832)
    assert size_for_image(1024, 1024, 480 * 832, 16) == (624, 624)
    assert size_for_image(1280, 720, 704 * 1280, 32) == (1248, 704)
    spec = resolve_model("fastvideo/wan2.1-i2v-tiny-random").spec
    image = torch.zeros(40, 56, 3, dtype=torch.uint8)
    auto = (DefaultSize(64), DefaultSize(64))
    assert request_size(spec, image, *auto) == (48, 64)  # area 64*64, aspect 40/56
    assert request_size(spec, image, 64, 64) == (64, 64)  # given by the caller: kept
    assert request_size(spec, None, *auto) == auto  # no image: the defaults


def test_cli_generates_with_image_on_the_demo_model(tmp_path, capsys):
    from fastvideo.entrypoints.cli import main

    path = tmp_path / "in.png"
    Image.fromarray(random_image(2, 40, 56)).save(path)
    args = ["generate", "--model", "fastvideo/wan2.1-i2v-tiny-random", "--image", str(path)]
    args += ["--prompt", "a cat", "--steps", "2", "--executor", "inproc"]
    assert main(args + ["--output", str(tmp_path)]) == 0
    assert "5 frames, 64x48" in capsys.readouterr().out  # width x height from the image
    assert main(args + ["--output", str(tmp_path / "x.mp4"), "--height", "32"]) == 0
    assert "5 frames, 64x32" in capsys.readouterr().out  # a side given: sizes as given


# --- API errors -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def infos(i2v):
    """Driver-side model info (no workers): the I2V checkpoint and the T2V demo model."""
    return resolve_model(str(i2v[0])), resolve_model("fastvideo/wan2.1-t2v-tiny-random")


def _build(info, **fields):
    config = PipelineConfig(model_path=info.name).update(**info.variant.pipeline_defaults)
    param = SamplingParam().update(**info.variant.sampling_defaults).update(**SIZE, **fields)
    return build_item(info.spec, config, "a fox", param, "r1")


def test_image_errors_at_the_api_boundary(infos, tmp_path):
    i2v, t2v = infos
    assert _build(i2v, image=random_image(0)).image.shape == (40, 56, 3)
    with pytest.raises(ValueError, match="image is required"):
        _build(i2v)
    with pytest.raises(ValueError, match="text-to-video only"):
        _build(t2v, image=random_image(0))
    with pytest.raises(ValueError, match="no such file"):
        _build(i2v, image=str(tmp_path / "missing.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        _build(i2v, image=str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="uint8"):
        _build(i2v, image=np.zeros((40, 56, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        _build(i2v, image=np.zeros((40, 56, 5), dtype=np.uint8))


# --- the CLIP encoder's checkpoint layouts ------------------------------------------------
@pytest.mark.parametrize("prefixed", [False, True])
def test_clip_encoder_loads_both_layouts(i2v, tmp_path, prefixed):
    """transformers 5 writes CLIPVisionModel's tensors without the ``vision_model.`` level,
    transformers 4 (the published Wan2.1 I2V checkpoints) with it: both load, and give the
    penultimate states transformers itself computes."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionModel

    from fastvideo.models.wan.image_encoder import load_clip_vision

    folder, pipe, _ = i2v
    target = tmp_path / "image_encoder"
    shutil.copytree(folder / "image_encoder", target)
    if prefixed:
        state = load_file(str(target / "model.safetensors"))
        save_file(
            {f"vision_model.{k}": v for k, v in state.items()}, str(target / "model.safetensors")
        )
    ours = load_clip_vision(target, "CLIPVisionModel", torch.float32, torch.device("cpu"))
    ref = CLIPVisionModel.from_pretrained(str(target)).eval()
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        b = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
