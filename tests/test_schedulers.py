"""Our flow-matching schedulers against diffusers 0.42.1 as the oracle (CPU, a few seconds).

Tolerance: in every denoising loop we require, after every step,
``max |ours - diffusers| <= 1e-6 * max(1, max |diffusers|)`` (absolute 1e-6 for samples of
order 1, relative 1e-6 beyond). On CPU with torch 2.x the measured difference is exactly 0:
the implementations do the same fp32/bf16 operations in the same order.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from fastvideo.models.samplers import (
    FlowMatchEulerScheduler,
    FlowScheduler,
    FlowUniPCMultistepScheduler,
    build_scheduler,
)

REL_TOL = 1e-6

# The scheduler_config.json shipped with the Wan2.1 diffusers checkpoints.
WAN21_SCHEDULER_CONFIG = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}
WAN21_UNIPC = {  # the fields of the Wan2.1 config that matter, for the parametrized cases
    "solver_order": 2,
    "solver_type": "bh2",
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "predict_x0": True,
}
VIDEO_SHAPE = (1, 4, 3, 6, 6)  # [B, C, T, H, W]
TOKEN_SHAPE = (2, 54, 8)  # [B, L, C]


def _diffusers_unipc(**kw: object) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, **kw)


def _fake_model(sample: torch.Tensor, step: int, noise: torch.Tensor, dtype: torch.dtype):
    """A deterministic stand-in for the transformer: depends on the sample and the step."""
    return (0.3 * sample.float() + torch.sin(torch.tensor(0.37 * step + 0.1)) * noise).to(dtype)


def _max_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference, after checking that the step produced a finite tensor of the same
    shape and dtype as diffusers'."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.isfinite(ref).all()
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= REL_TOL * max(1.0, ref.float().abs().max().item()), diff
    return diff


def _run_loops(
    ours: FlowScheduler,
    ref: UniPCMultistepScheduler | FlowMatchEulerDiscreteScheduler,
    steps: int,
    shape: tuple[int, ...],
    model_dtype: torch.dtype = torch.float32,
) -> float:
    """Run both schedulers closed-loop (each model output computed from its own sample) and
    compare after every step; returns the largest difference seen."""
    ref.set_timesteps(steps)
    ref.set_begin_index(0)  # as diffusers' WanPipeline does
    ours.set_timesteps(steps)
    gen = torch.Generator().manual_seed(1234)
    x_ref = torch.randn(shape, generator=gen)
    noise = torch.randn(shape, generator=gen)
    x_ours = x_ref.clone()
    worst = 0.0
    for step, t in enumerate(ref.timesteps):
        out_ref = _fake_model(x_ref, step, noise, model_dtype)
        x_ref = ref.step(out_ref, t, x_ref, return_dict=False)[0]
        x_ours = ours.step(_fake_model(x_ours, step, noise, model_dtype), x_ours)
        worst = max(worst, _max_diff(x_ours, x_ref))
    assert x_ours.dtype == torch.float32
    return worst


@pytest.mark.parametrize(
    "overrides, steps",
    [
        ({"flow_shift": 3.0}, 10),
        ({"flow_shift": 3.0}, 50),
        ({"flow_shift": 5.0}, 25),
        ({"flow_shift": 1.0, "solver_order": 3}, 7),
        ({"flow_shift": 2.0, "final_sigmas_type": "sigma_min"}, 1),
    ],
)
def test_unipc_schedule_matches_diffusers(overrides: dict, steps: int) -> None:
    kw = {**WAN21_UNIPC, **overrides}
    ref, ours = _diffusers_unipc(**kw), FlowUniPCMultistepScheduler(**kw)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert ours.timesteps.dtype == ref.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.sigmas.dtype == torch.float32 and ours.sigmas.device.type == "cpu"
    assert torch.equal(ours.sigmas, ref.sigmas)


@pytest.mark.parametrize(
    "overrides, steps, shape, model_dtype",
    [
        ({"flow_shift": 3.0}, 10, VIDEO_SHAPE, torch.float32),
        ({"flow_shift": 3.0}, 25, TOKEN_SHAPE, torch.float32),
        ({"flow_shift": 5.0}, 25, VIDEO_SHAPE, torch.float32),
        ({"flow_shift": 3.0, "solver_order": 3}, 10, TOKEN_SHAPE, torch.float32),
        ({"flow_shift": 5.0, "solver_order": 3}, 25, VIDEO_SHAPE, torch.float32),
        ({"flow_shift": 3.0, "solver_order": 1}, 10, TOKEN_SHAPE, torch.float32),
        (
            {
                "flow_shift": 3.0,
                "solver_type": "bh1",
                "solver_order": 3,
                "final_sigmas_type": "sigma_min",
            },
            10,
            VIDEO_SHAPE,
            torch.float32,
        ),
        ({"flow_shift": 3.0, "disable_corrector": [0, 3]}, 10, TOKEN_SHAPE, torch.float32),
        (
            {"flow_shift": 3.0, "final_sigmas_type": "sigma_min", "lower_order_final": False},
            10,
            TOKEN_SHAPE,
            torch.float32,
        ),
        ({"flow_shift": 3.0}, 10, VIDEO_SHAPE, torch.bfloat16),
        ({"flow_shift": 5.0, "solver_order": 3}, 25, TOKEN_SHAPE, torch.bfloat16),
    ],
)
def test_unipc_denoising_loop_matches_diffusers(
    overrides: dict, steps: int, shape: tuple[int, ...], model_dtype: torch.dtype
) -> None:
    kw = {**WAN21_UNIPC, **overrides}
    worst = _run_loops(
        FlowUniPCMultistepScheduler(**kw), _diffusers_unipc(**kw), steps, shape, model_dtype
    )
    assert worst == 0.0  # measured: bit-identical (the tolerance above is the contract)


def test_unipc_bh1_last_step_to_zero_is_finite() -> None:
    """bh1 stepping to sigma 0: diffusers multiplies B(h) = h = -inf by its zero higher-order
    term on the last step and returns NaN; we leave the absent term out. Every earlier step
    matches bit for bit, and the last is the exact order-1 limit: the data prediction."""
    kw = {**WAN21_UNIPC, "flow_shift": 3.0, "solver_type": "bh1"}
    ours, ref = FlowUniPCMultistepScheduler(**kw), _diffusers_unipc(**kw)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    ref.set_begin_index(0)
    gen = torch.Generator().manual_seed(3)
    x_ours, noise = torch.randn(TOKEN_SHAPE, generator=gen), torch.randn(TOKEN_SHAPE, generator=gen)
    x_ref = x_ours.clone()
    for step, t in enumerate(ref.timesteps):
        v_ours = _fake_model(x_ours, step, noise, torch.float32)
        x_ref = ref.step(_fake_model(x_ref, step, noise, torch.float32), t, x_ref)[0]
        x0 = x_ours - ours.sigmas[step] * v_ours
        x_ours = ours.step(v_ours, x_ours)
        if step < 9:
            _max_diff(x_ours, x_ref)
    assert torch.isnan(x_ref).all() and torch.equal(x_ours, x0)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("steps", [1, 10, 25, 50])
def test_euler_schedule_matches_diffusers(shift: float, steps: int) -> None:
    ref, ours = FlowMatchEulerDiscreteScheduler(shift=shift), FlowMatchEulerScheduler(shift=shift)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert ours.timesteps.dtype == ref.timesteps.dtype == torch.float32
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.sigmas.dtype == torch.float32 and ours.sigmas.device.type == "cpu"
    assert torch.equal(ours.sigmas, ref.sigmas)


@pytest.mark.parametrize("steps, shape", [(10, VIDEO_SHAPE), (25, TOKEN_SHAPE)])
def test_euler_denoising_loop_matches_diffusers(steps: int, shape: tuple[int, ...]) -> None:
    ours, ref = FlowMatchEulerScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert _run_loops(ours, ref, steps, shape) == 0.0


def test_euler_bf16_output_keeps_fp32_sample() -> None:
    """diffusers returns the model output's dtype (bf16); we keep the fp32 sample and return
    the same fp32 value before that cast. Teacher-forced: both step from our sample."""
    ours, ref = FlowMatchEulerScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    ref.set_begin_index(0)
    gen = torch.Generator().manual_seed(7)
    sample, noise = torch.randn(TOKEN_SHAPE, generator=gen), torch.randn(TOKEN_SHAPE, generator=gen)
    for step, t in enumerate(ref.timesteps):
        out = _fake_model(sample, step, noise, torch.bfloat16)
        expected = sample + (ours.sigmas[step + 1] - ours.sigmas[step]) * out
        from_ref = ref.step(out, t, sample, return_dict=False)[0]
        sample = ours.step(out, sample)
        assert sample.dtype == torch.float32 and torch.equal(sample, expected)
        assert from_ref.dtype == torch.bfloat16 and torch.equal(sample.to(torch.bfloat16), from_ref)


def test_build_scheduler_accepts_wan21_config() -> None:
    config = copy.deepcopy(WAN21_SCHEDULER_CONFIG)
    ours = build_scheduler(config["_class_name"], config)
    assert isinstance(ours, FlowUniPCMultistepScheduler) and ours.flow_shift == 3.0
    assert config == WAN21_SCHEDULER_CONFIG  # not mutated
    ref = UniPCMultistepScheduler.from_config(WAN21_SCHEDULER_CONFIG)
    assert _run_loops(ours, ref, 10, VIDEO_SHAPE) == 0.0

    shifted = build_scheduler("UniPCMultistepScheduler", config, flow_shift=5.0)
    assert isinstance(shifted, FlowUniPCMultistepScheduler) and shifted.flow_shift == 5.0
    ref5 = UniPCMultistepScheduler.from_config({**WAN21_SCHEDULER_CONFIG, "flow_shift": 5.0})
    assert _run_loops(shifted, ref5, 25, TOKEN_SHAPE) == 0.0


def test_build_scheduler_short_names_and_euler() -> None:
    unipc = build_scheduler("unipc", {}, flow_shift=3.0)
    assert isinstance(unipc, FlowUniPCMultistepScheduler) and unipc.flow_shift == 3.0
    euler = build_scheduler("euler", {"num_train_timesteps": 1000}, flow_shift=5.0)
    assert isinstance(euler, FlowMatchEulerScheduler) and euler.shift == 5.0
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "base_shift": 0.5}
    euler = build_scheduler("FlowMatchEulerDiscreteScheduler", cfg)
    assert isinstance(euler, FlowMatchEulerScheduler) and euler.shift == 3.0


UNIPC = "UniPCMultistepScheduler"
EULER = "FlowMatchEulerDiscreteScheduler"


@pytest.mark.parametrize(
    "class_name, changes, field",
    [
        ("DDIMScheduler", {}, "DDIMScheduler"),
        (UNIPC, {"prediction_type": "epsilon"}, "prediction_type"),
        (UNIPC, {"use_flow_sigmas": False}, "use_flow_sigmas"),
        (UNIPC, {"predict_x0": False}, "predict_x0"),
        (UNIPC, {"use_karras_sigmas": True}, "use_karras_sigmas"),
        (UNIPC, {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
        (UNIPC, {"use_beta_sigmas": True}, "use_beta_sigmas"),
        (UNIPC, {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
        (UNIPC, {"thresholding": True}, "thresholding"),
        (UNIPC, {"solver_order": 4}, "solver_order"),
        (UNIPC, {"solver_type": "dpm"}, "solver_type"),
        (UNIPC, {"final_sigmas_type": "one"}, "final_sigmas_type"),
        (UNIPC, {"lower_order_final": False}, "lower_order_final"),
        (
            UNIPC,
            {"lower_order_final": False, "solver_order": 3, "final_sigmas_type": "sigma_min"},
            "lower_order_final",
        ),
        (UNIPC, {"shift_terminal": 0.1}, "shift_terminal"),
        (UNIPC, {"solver_p": "DPMSolverMultistepScheduler"}, "solver_p"),
        (UNIPC, {"flow_shift": -1.0}, "flow_shift"),
        (UNIPC, {"no_such_field": 1}, "no_such_field"),
        (EULER, {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
        (EULER, {"invert_sigmas": True}, "invert_sigmas"),
        (EULER, {"stochastic_sampling": True}, "stochastic_sampling"),
        (EULER, {"use_karras_sigmas": True}, "use_karras_sigmas"),
        (EULER, {"shift_terminal": 0.1}, "shift_terminal"),
        (EULER, {"flow_shift": 3.0}, "flow_shift"),  # UniPC's name for Euler's `shift`
    ],
)
def test_build_scheduler_rejects_unsupported(class_name: str, changes: dict, field: str) -> None:
    base = WAN21_SCHEDULER_CONFIG if class_name == UNIPC else {"shift": 3.0}
    with pytest.raises(ValueError, match=field):
        build_scheduler(class_name, {**base, **changes})


def test_build_scheduler_uses_diffusers_defaults_for_diffusers_names() -> None:
    # diffusers' UniPC defaults to epsilon prediction: a config that omits the field is not ours.
    with pytest.raises(ValueError, match="prediction_type"):
        build_scheduler(UNIPC, {"flow_shift": 3.0})


def test_step_index_guards_and_reset() -> None:
    ours = FlowUniPCMultistepScheduler(flow_shift=3.0)
    x = torch.zeros(TOKEN_SHAPE)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        ours.step(x, x)
    ours.set_timesteps(2)
    first = ours.step(x + 1, x)
    ours.step(x, first)
    with pytest.raises(RuntimeError, match="already taken"):
        ours.step(x, x)
    ours.set_timesteps(2)  # a new schedule forgets the history
    assert ours.step_index == 0 and torch.equal(ours.step(x + 1, x), first)


def test_runtime_does_not_import_diffusers() -> None:
    package = Path(__file__).resolve().parents[1] / "fastvideo" / "models" / "schedulers"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(name.split(".")[0] == "diffusers" for name in names), path
