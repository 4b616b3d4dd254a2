"""The whole text-to-video pipeline against diffusers' WanPipeline: same checkpoint, seed,
prompt and negative prompt must give the same frames.

Tolerance: uint8 frames identical or off by at most 1 (we round to the nearest level;
diffusers' float frames are compared after the same rounding). Measured: see -s output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastvideo import PipelineConfig, VideoGenerator
from tests.tiny_models import run_diffusers

PROMPT = "a red fox walking through a snowy forest at dawn"
NEGATIVE = "blurry, low quality"


def _compare(ours: np.ndarray, ref: torch.Tensor) -> int:
    ref_u8 = (ref.numpy() * 255).round().astype(np.int16)
    assert ours.shape == ref_u8.shape, (ours.shape, ref_u8.shape)
    diff = np.abs(ours.astype(np.int16) - ref_u8)
    print(
        f"\nframes {ours.shape}: max |diff| {diff.max()}, differing values {(diff > 0).mean():.2e}"
    )
    assert diff.max() <= 1
    assert ours.std() > 1.0, "frames are flat: the comparison would prove nothing"
    return int(diff.max())


@pytest.mark.parametrize(
    "fixture, size",
    [
        ("tiny_a", dict(height=48, width=80, num_frames=13, num_inference_steps=6)),
        ("tiny_b", dict(height=64, width=32, num_frames=5, num_inference_steps=4)),
    ],
)
def test_frames_match_diffusers_inprocess(request, fixture, size):
    folder, pipe = request.getfixturevalue(fixture)
    ref = run_diffusers(pipe, PROMPT, NEGATIVE, seed=42, guidance_scale=5.0, **size)
    with VideoGenerator.from_pretrained(str(folder), executor="inproc") as gen:
        out = gen.generate_video(
            PROMPT, negative_prompt=NEGATIVE, seed=42, guidance_scale=5.0, **size
        )
    _compare(out.frames, ref)


def test_frames_match_diffusers_without_guidance(tiny_a):
    folder, pipe = tiny_a
    size = dict(height=32, width=48, num_frames=9, num_inference_steps=5)
    ref = run_diffusers(pipe, PROMPT, NEGATIVE, seed=7, guidance_scale=1.0, **size)
    with VideoGenerator.from_pretrained(str(folder), executor="inproc") as gen:
        out = gen.generate_video(
            PROMPT, negative_prompt=NEGATIVE, seed=7, guidance_scale=1.0, **size
        )
    _compare(out.frames, ref)


def test_frames_match_diffusers_in_a_worker_process(tiny_b):
    """The default multi-process executor, one worker: same frames as diffusers."""
    folder, pipe = tiny_b
    size = dict(height=48, width=48, num_frames=9, num_inference_steps=3)
    ref = run_diffusers(pipe, PROMPT, NEGATIVE, seed=3, guidance_scale=4.0, **size)
    config = PipelineConfig.from_pretrained(str(folder))
    with VideoGenerator.from_pretrained(str(folder), pipeline_config=config) as gen:
        out = gen.generate_video(
            PROMPT, negative_prompt=NEGATIVE, seed=3, guidance_scale=4.0, **size
        )
    assert out.plan == "single rank"
    _compare(out.frames, ref)


# --- latents: fp32 relative tolerance, on settings the output responds to ---------------------
LATENT_RTOL = 1e-5
POWER = 100 * LATENT_RTOL  # a setting "matters" when changing it moves the latents this much


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _diffusers_latents(pipe, prompt, negative, seed, **kwargs) -> torch.Tensor:
    out = pipe(prompt=prompt, negative_prompt=negative, output_type="latent",
               generator=torch.Generator("cpu").manual_seed(seed), **kwargs)  # fmt: skip
    return out.frames[0]


@pytest.mark.parametrize(
    "fixture, size, guidance",
    [
        ("tiny_a", dict(height=48, width=80, num_frames=9, num_inference_steps=6), 5.0),
        ("tiny_b", dict(height=64, width=32, num_frames=5, num_inference_steps=5), 3.0),
    ],
)
def test_latents_match_diffusers_and_respond_to_every_setting(request, fixture, size, guidance):
    """Our final latents equal diffusers' within 1e-5 (fp32); guidance, the negative prompt,
    the flow shift and the seed each move them far more than that, so the comparison has
    the power to catch a wrong formula for any of them."""
    folder, pipe = request.getfixturevalue(fixture)
    common = dict(output_type="latent", **size)
    ref = _diffusers_latents(pipe, PROMPT, NEGATIVE, 42, guidance_scale=guidance, **size)
    with VideoGenerator.from_pretrained(str(folder), executor="inproc") as gen:
        run = lambda **kw: gen.generate_video(  # noqa: E731
            PROMPT, **{"negative_prompt": NEGATIVE, "seed": 42, "guidance_scale": guidance,
                       **common, **kw}).latents  # fmt: skip
        ours = run()
        moved = {
            "guidance": _rel(run(guidance_scale=guidance + 1.0), ours),
            "negative prompt": _rel(run(negative_prompt="a blue sky"), ours),
            "seed": _rel(run(seed=43), ours),
        }
    with VideoGenerator.from_pretrained(str(folder), executor="inproc", flow_shift=7.0) as gen:
        shifted = gen.generate_video(PROMPT, negative_prompt=NEGATIVE, seed=42,
                                     guidance_scale=guidance, **common).latents  # fmt: skip
    moved["flow shift"] = _rel(shifted, ours)
    err = _rel(ours, ref)
    print(f"\n{fixture}: latents rel err vs diffusers {err:.2e}; moved by " +
          ", ".join(f"{k} {v:.1e}" for k, v in moved.items()))  # fmt: skip
    assert err < LATENT_RTOL
    for setting, change in moved.items():
        assert change > POWER, f"{setting} barely changes the latents ({change:.1e})"
    # diffusers agrees that guidance matters this much (its own g+1 run).
    ref_g = _diffusers_latents(pipe, PROMPT, NEGATIVE, 42, guidance_scale=guidance + 1, **size)
    assert _rel(ref_g, ref) > POWER
