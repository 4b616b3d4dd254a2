"""Wan2.2 through the engine against diffusers: the A14B two-expert models (text- and
image-to-video, switched at ``boundary_ratio * num_train_timesteps``) and TI2V-5B (48-channel
VAE, per-token timesteps; text-only and with an image), on tiny checkpoints that diffusers
built and saved.

Tolerance: uint8 frames within 1 level, final latents within fp32 relative error 1e-5.
Power: the low-noise guidance scale, the boundary and the image each change the output
(and the changed output still matches diffusers'). Also here: what ``read_wan_spec`` and
the variants make of each checkpoint kind, and 2- and 3-worker runs.
"""

from __future__ import annotations

import json
import shutil

import pytest

from fastvideo import VideoGenerator
from fastvideo.engine.model_info import resolve_model
from fastvideo.models.registry import find_hf_id
from fastvideo.models.wan.registration import read_wan_spec
from fastvideo.wire.validation import DefaultSize
from tests.tiny_wan_variants import (
    FRAME_ATOL,
    LATENT_RTOL,
    NEGATIVE,
    PROMPT,
    build_wan22_a14b,
    build_wan22_ti2v,
    frame_diff,
    random_image,
    rel_err,
    run_diffusers,
    ti2v_image_pipeline,
)

# UniPC, shift 3, 4 steps: timesteps 999, 900, 750, 500. Boundary 875 (T2V) runs two steps
# on each expert; 900 (I2V) too, with t = 900 exactly on it (high-noise: t >= boundary).
A14B_SIZE = dict(height=32, width=80, num_frames=5, num_inference_steps=4)  # 20 tokens
TI2V_SIZE = dict(height=96, width=96, num_frames=9, num_inference_steps=4)  # 27 tokens
SEED = 3


def _ours(gen, size, **kwargs):
    out = gen.generate_video(PROMPT, negative_prompt=NEGATIVE, seed=SEED, **size, **kwargs)
    return out.latents if kwargs.get("output_type") == "latent" else out.frames


def _check(ours_frames, ref_frames, ours_latents, ref_latents, label: str) -> None:
    diff, err = frame_diff(ours_frames, ref_frames), rel_err(ours_latents, ref_latents)
    print(f"\n{label}: frames max |diff| {diff}, latents rel err {err:.1e}")
    assert diff <= FRAME_ATOL and err < LATENT_RTOL


# --- A14B -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    """{"t2v"/"i2v": (folder, diffusers pipeline)}."""
    t2v, i2v = tmp_path_factory.mktemp("a14b-t2v"), tmp_path_factory.mktemp("a14b-i2v")
    return {
        "t2v": (t2v, build_wan22_a14b(t2v, image=False, boundary=0.875)),
        "i2v": (i2v, build_wan22_a14b(i2v, image=True, boundary=0.9, seed=2)),
    }


def test_a14b_t2v_matches_diffusers_and_both_scales_matter(a14b, tmp_path):
    folder, pipe = a14b["t2v"]
    scales = dict(guidance_scale=4.0, guidance_scale_2=3.0)
    ref = run_diffusers(pipe, SEED, output_type="np", **scales, **A14B_SIZE)
    ref_lat = run_diffusers(pipe, SEED, output_type="latent", **scales, **A14B_SIZE)
    ref_low = run_diffusers(
        pipe, SEED, output_type="latent", guidance_scale=4.0, guidance_scale_2=1.5, **A14B_SIZE
    )
    with VideoGenerator.from_pretrained(str(folder), executor="inproc") as gen:
        frames = _ours(gen, A14B_SIZE, **scales)
        latents = _ours(gen, A14B_SIZE, output_type="latent", **scales)
        low = _ours(gen, A14B_SIZE, output_type="latent", guidance_scale=4.0, guidance_scale_2=1.5)
    _check(frames, ref, latents, ref_lat, "T2V-A14B")
    assert rel_err(low, ref_low) < LATENT_RTOL
    assert rel_err(low, latents) > 1e-3  # guidance_scale_2 drives the low-noise steps
    # Another boundary (0.6: only the last step on the low-noise expert) changes the video;
    # diffusers with that boundary agrees.
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    index = json.loads((moved / "model_index.json").read_text())
    (moved / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.6}))
    pipe.register_to_config(boundary_ratio=0.6)
    try:
        ref_moved = run_diffusers(pipe, SEED, output_type="latent", **scales, **A14B_SIZE)
    finally:
        pipe.register_to_config(boundary_ratio=0.875)
    with VideoGenerator.from_pretrained(str(moved), executor="inproc") as gen:
        ours_moved = _ours(gen, A14B_SIZE, output_type="latent", **scales)
    assert rel_err(ours_moved, ref_moved) < LATENT_RTOL
    assert rel_err(ours_moved, latents) > 1e-3


def test_a14b_i2v_matches_diffusers(a14b):
    folder, pipe = a14b["i2v"]
    image, scales = random_image(0), dict(guidance_scale=3.5, guidance_scale_2=2.0)
    ref = run_diffusers(pipe, SEED, image, output_type="np", **scales, **A14B_SIZE)
    ref_lat = run_diffusers(pipe, SEED, image, output_type="latent", **scales, **A14B_SIZE)
    with VideoGenerator.from_pretrained(str(folder), executor="inproc") as gen:
        frames = _ours(gen, A14B_SIZE, image=image, **scales)
        latents = _ours(gen, A14B_SIZE, image=image, output_type="latent", **scales)
        other = _ours(gen, A14B_SIZE, image=random_image(1), output_type="latent", **scales)
    _check(frames, ref, latents, ref_lat, "I2V-A14B")
    assert rel_err(other, latents) > 1e-2


@pytest.mark.slow
def test_a14b_i2v_on_three_workers(a14b):
    """Ring attention over 3 ranks (4 heads), padded (20 tokens), both experts."""
    folder, pipe = a14b["i2v"]
    image, scales = random_image(0), dict(guidance_scale=3.5, guidance_scale_2=2.0)
    ref = run_diffusers(pipe, SEED, image, output_type="latent", **scales, **A14B_SIZE)
    with VideoGenerator.from_pretrained(str(folder), num_gpus=3, device="cpu") as gen:
        out = gen.generate_video(
            PROMPT, negative_prompt=NEGATIVE, seed=SEED, image=image, output_type="latent",
            **scales, **A14B_SIZE,
        )  # fmt: skip
    assert out.plan == "ring 3"
    assert rel_err(out.latents, ref) < LATENT_RTOL


# --- TI2V-5B ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    """(folder, diffusers WanPipeline, the same modules as WanImageToVideoPipeline, refs)."""
    folder = tmp_path_factory.mktemp("ti2v")
    pipe = build_wan22_ti2v(folder)
    image_pipe = ti2v_image_pipeline(pipe)
    image = random_image(0)
    refs = {
        "text": run_diffusers(pipe, SEED, output_type="np", guidance_scale=5.0, **TI2V_SIZE),
        "text_lat": run_diffusers(
            pipe, SEED, output_type="latent", guidance_scale=5.0, **TI2V_SIZE
        ),
        "image": run_diffusers(
            image_pipe, SEED, image, output_type="np", guidance_scale=5.0, **TI2V_SIZE
        ),
        "image_lat": run_diffusers(
            image_pipe, SEED, image, output_type="latent", guidance_scale=5.0, **TI2V_SIZE
        ),
        "image_lat_no_cfg": run_diffusers(
            image_pipe, SEED, image, output_type="latent", guidance_scale=1.0, **TI2V_SIZE
        ),
    }
    return folder, refs


def test_ti2v_text_and_image_match_diffusers(ti2v):
    folder, refs = ti2v
    image = random_image(0)
    with VideoGenerator.from_pretrained(str(folder), executor="inproc") as gen:
        text = _ours(gen, TI2V_SIZE, guidance_scale=5.0)
        text_lat = _ours(gen, TI2V_SIZE, guidance_scale=5.0, output_type="latent")
        frames = _ours(gen, TI2V_SIZE, guidance_scale=5.0, image=image)
        latents = _ours(gen, TI2V_SIZE, guidance_scale=5.0, image=image, output_type="latent")
    _check(text, refs["text"], text_lat, refs["text_lat"], "TI2V text")
    _check(frames, refs["image"], latents, refs["image_lat"], "TI2V image")
    assert rel_err(latents, text_lat) > 1e-2  # the image changes the video


@pytest.mark.slow
def test_ti2v_on_two_workers(ti2v):
    """CFG-parallel with the image; Ulysses 2 without guidance (27 tokens: padded, the first
    frame's 9 tokens all on rank 0)."""
    folder, refs = ti2v
    image = random_image(0)
    with VideoGenerator.from_pretrained(str(folder), num_gpus=2, device="cpu") as gen:
        cfg = gen.generate_video(
            PROMPT, negative_prompt=NEGATIVE, seed=SEED, image=image, output_type="latent",
            guidance_scale=5.0, **TI2V_SIZE,
        )  # fmt: skip
        plain = gen.generate_video(
            PROMPT, negative_prompt=NEGATIVE, seed=SEED, image=image, output_type="latent",
            guidance_scale=1.0, **TI2V_SIZE,
        )  # fmt: skip
    assert (cfg.plan, plain.plan) == ("CFG 2", "Ulysses 2")
    assert rel_err(cfg.latents, refs["image_lat"]) < LATENT_RTOL
    assert rel_err(plain.latents, refs["image_lat_no_cfg"]) < LATENT_RTOL


# --- what the engine makes of each checkpoint ------------------------------------------------
def test_specs_and_variants_of_each_kind(a14b, ti2v):
    t2v, i2v, ti = a14b["t2v"][0], a14b["i2v"][0], ti2v[0]
    spec = read_wan_spec(t2v)
    assert (spec.image_input, spec.experts, spec.in_channels) == ("none", 2, 16)
    spec = read_wan_spec(i2v)
    assert (spec.image_input, spec.experts, spec.in_channels) == ("required", 2, 36)
    spec = read_wan_spec(ti)
    assert (spec.image_input, spec.experts, spec.in_channels) == ("optional", 1, 48)
    assert (spec.latent_channels, spec.vae_scale_spatial, spec.pixel_multiple) == (48, 16, 32)
    # Unpublished checkpoints get their kind's defaults (A14B: two guidance scales).
    assert resolve_model(str(t2v)).variant.sampling_defaults["guidance_scale_2"] == 3.0
    assert isinstance(resolve_model(str(ti)).variant.sampling_defaults["height"], DefaultSize)
    _, published = find_hf_id("Wan-AI/Wan2.2-TI2V-5B-Diffusers")
    d = published.sampling_defaults
    assert (d["height"], d["width"], d["num_frames"], d["fps"]) == (704, 1280, 121, 24)
    _, published = find_hf_id("Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    assert (published.sampling_defaults["guidance_scale"], published.sampling_defaults[
        "guidance_scale_2"]) == (4.0, 3.0)  # fmt: skip


def test_inconsistent_checkpoints_are_refused(a14b, tmp_path):
    broken = tmp_path / "no-expert"
    shutil.copytree(a14b["t2v"][0], broken)
    shutil.rmtree(broken / "transformer_2")
    with pytest.raises(ValueError, match="no transformer_2"):
        read_wan_spec(broken)
    config = json.loads((broken / "transformer" / "config.json").read_text())
    (broken / "transformer" / "config.json").write_text(json.dumps({**config, "in_channels": 36}))
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": None}))
    with pytest.raises(ValueError, match="in_channels=36"):
        read_wan_spec(broken)
