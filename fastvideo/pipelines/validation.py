"""Request validation shared by the driver (API boundary) and the workers (defence against
a malformed message). Pure Python: every error names the field and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

from fastvideo.models.registry import ModelSpec

MAX_SEED = 2**63 - 1
OUTPUT_TYPES = ("np", "latent")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _nearest(value: int, valid: list[int]) -> str:
    return " or ".join(str(v) for v in sorted(set(valid)) if v >= 1)


def check_size(name: str, value: Any, multiple: int) -> None:
    _require_int(name, value, 1)
    if value % multiple:
        lower = value // multiple * multiple
        raise ValueError(
            f"{name}={value} must be a multiple of {multiple}; nearest valid: "
            f"{_nearest(value, [lower, lower + multiple])}"
        )


def check_num_frames(value: Any, temporal: int) -> None:
    _require_int("num_frames", value, 1)
    if (value - 1) % temporal:
        lower = (value - 1) // temporal * temporal + 1
        raise ValueError(
            f"num_frames={value} must be of the form {temporal}k+1 (1, {temporal + 1}, "
            f"{2 * temporal + 1}, ...); nearest valid: {_nearest(value, [lower, lower + temporal])}"
        )


def check_prompt(name: str, value: Any, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} must be a non-empty string")


def check_guidance(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"guidance_scale must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {value}")


def check_seed(value: Any) -> None:
    if not _is_int(value):
        raise TypeError(f"seed must be an int, got {type(value).__name__} {value!r}")
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63-1], got {value}")


def validate_generation(
    spec: ModelSpec,
    *,
    prompt: Any,
    negative_prompt: Any,
    height: Any,
    width: Any,
    num_frames: Any,
    num_inference_steps: Any,
    guidance_scale: Any,
    seed: Any,
    fps: Any = 16,
    output_type: Any = "np",
) -> None:
    """Raise TypeError/ValueError for the first invalid field, before any model work."""
    check_prompt("prompt", prompt)
    if negative_prompt is not None:
        check_prompt("negative_prompt", negative_prompt, allow_empty=True)
    check_size("height", height, spec.pixel_multiple)
    check_size("width", width, spec.pixel_multiple)
    check_num_frames(num_frames, spec.vae_scale_temporal)
    _require_int("num_inference_steps", num_inference_steps, 1)
    check_guidance(guidance_scale)
    check_seed(seed)
    _require_int("fps", fps, 1)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    _check_positions(spec, height, width, num_frames)


def _check_positions(spec: ModelSpec, height: int, width: int, num_frames: int) -> None:
    """The rotary tables cover ``max_positions`` tokens per axis."""
    latent_frames = (num_frames - 1) // spec.vae_scale_temporal + 1
    axes = {
        "num_frames": (latent_frames // spec.patch_size[0], num_frames),
        "height": (height // spec.pixel_multiple, height),
        "width": (width // spec.pixel_multiple, width),
    }
    for name, (tokens, value) in axes.items():
        if tokens > spec.max_positions:
            raise ValueError(
                f"{name}={value} gives {tokens} positions on that axis; the model supports "
                f"at most {spec.max_positions}"
            )


def check_teacache(enable: Any, thresh: Any) -> None:
    """``enable_teacache`` a bool; ``teacache_thresh`` a finite number >= 0 when enabled."""
    if not isinstance(enable, bool):
        raise TypeError(f"enable_teacache must be a bool, got {type(enable).__name__}")
    if not enable:
        return
    if isinstance(thresh, bool) or not isinstance(thresh, (int, float)):
        raise TypeError(
            f"teacache_thresh must be a number when enable_teacache=True, got "
            f"{type(thresh).__name__} {thresh!r}"
        )
    if not math.isfinite(thresh) or thresh < 0:
        raise ValueError(f"teacache_thresh must be a finite number >= 0, got {thresh}")
