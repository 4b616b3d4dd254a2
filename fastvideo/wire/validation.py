"""Request validation, shared by the driver (the API boundary) and the workers (which never
trust what arrives over a socket). Pure Python: every error names the field and what is
allowed, and is raised before any model work.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from fastvideo.wire.messages import RequestItem
from fastvideo.wire.spec import ModelSpec

MAX_SEED = 2**63 - 1
OUTPUT_TYPES = ("np", "pt", "pil", "latent")  # all but "latent" decode frames
STEP_CACHES = ("teacache", "magcache")


@dataclass(frozen=True)
class RequestLimits:
    """Upper bounds on one request's work, checked before it is queued.

    ``max_tokens`` bounds one video's DiT sequence (tokens grow with height x width x
    frames), ``max_token_steps`` the tokens x steps product (the work of its denoising
    loop). Raise them in ``PipelineConfig`` for bigger videos than the defaults allow.
    """

    max_inference_steps: int = 1000
    max_tokens: int = 262_144
    max_token_steps: int = 262_144 * 50
    max_prompt_chars: int = 20_000


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def require_number(name: str, value: Any, minimum: float = 0.0) -> None:
    """A finite int or float >= ``minimum`` (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value}")


def _nearest(valid: list[int]) -> str:
    return " or ".join(str(v) for v in sorted(set(valid)) if v >= 1)


def check_size(name: str, value: Any, multiple: int) -> None:
    require_int(name, value, 1)
    if value % multiple:
        lower = value // multiple * multiple
        raise ValueError(
            f"{name}={value} must be a multiple of {multiple}; nearest valid: "
            f"{_nearest([lower, lower + multiple])}"
        )


def check_num_frames(value: Any, temporal: int) -> None:
    require_int("num_frames", value, 1)
    if (value - 1) % temporal:
        lower = (value - 1) // temporal * temporal + 1
        raise ValueError(
            f"num_frames={value} must be of the form {temporal}k+1 (1, {temporal + 1}, "
            f"{2 * temporal + 1}, ...); nearest valid: {_nearest([lower, lower + temporal])}"
        )


def check_text(name: str, value: Any, max_chars: int, allow_empty: bool = False) -> None:
    """A str that encodes as UTF-8 (no lone surrogates), non-empty unless allowed."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    if len(value) > max_chars:
        raise ValueError(f"{name} has {len(value)} characters; at most {max_chars} are allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{name} is not valid text: character {e.start} ({value[e.start]!r}) cannot be "
            f"encoded as UTF-8 (a lone surrogate?)"
        ) from None


def check_seed(value: Any) -> None:
    if not is_int(value):
        raise TypeError(f"seed must be an int, got {type(value).__name__} {value!r}")
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63-1], got {value}")


MAX_IMAGE_SIDE = 8192
MIN_IMAGE_SIDE = 16


class DefaultSize(int):
    """A height or width that is the model's default, not the caller's choice.

    Image-to-video variants give their default size this way: it reads and computes as the
    plain int, but a request with an image whose height and width are both still
    ``DefaultSize`` takes its size from the image (``size_for_image``). Any int the caller
    sets (``height=480``) is a plain int and is kept as given.
    """

    def __repr__(self) -> str:
        return f"DefaultSize({int(self)})"


def size_for_image(
    image_height: int, image_width: int, area: int, multiple: int
) -> tuple[int, int]:
    """(height, width) with the image's aspect ratio and about ``area`` pixels, each side
    rounded to the nearest pixel, then down to ``multiple`` (at least one multiple).

    This is the rule of diffusers' Wan image-to-video examples: ``round(sqrt(area *
    aspect)) // multiple * multiple`` with ``aspect = image height / image width``.
    """
    aspect = image_height / image_width
    height = round(math.sqrt(area * aspect)) // multiple * multiple
    width = round(math.sqrt(area / aspect)) // multiple * multiple
    return max(multiple, height), max(multiple, width)


def cfg_scale(spec: ModelSpec, item: RequestItem) -> float:
    """The classifier-free guidance scale of ``item`` (``guidance_scale`` for CFG models;
    ``true_cfg_scale`` for models with embedded guidance, and only with a negative
    prompt, as diffusers does)."""
    if spec.guidance == "embedded":
        return item.true_cfg_scale if item.negative_prompt else 1.0
    return item.guidance_scale


def uses_cfg(spec: ModelSpec, item: RequestItem) -> bool:
    """Whether ``item`` runs the conditional and the unconditional pass."""
    scales = [cfg_scale(spec, item)]
    if item.guidance_scale_2 is not None and spec.guidance == "cfg":
        scales.append(item.guidance_scale_2)
    return any(s > 1.0 for s in scales)


def check_image(spec: ModelSpec, image: Any) -> None:
    """The image a model needs (or refuses): uint8 [H, W, 3] of a sane size."""
    if spec.image_input == "required" and image is None:
        raise ValueError("image is required: this is an image-to-video model (pass image=...)")
    if image is None:
        return
    if spec.image_input == "none":
        raise ValueError("image: this model is text-to-video only and takes no image")
    shape = tuple(getattr(image, "shape", ()))
    dtype = str(getattr(image, "dtype", ""))
    if len(shape) != 3 or shape[2] != 3 or not dtype.endswith("uint8"):
        raise ValueError(f"image must be uint8 [H, W, 3] (RGB), got {dtype} {shape}")
    if not (MIN_IMAGE_SIDE <= min(shape[:2]) and max(shape[:2]) <= MAX_IMAGE_SIDE):
        raise ValueError(
            f"image is {shape[1]}x{shape[0]}; each side must be in "
            f"[{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}] pixels"
        )


def validate_item(
    spec: ModelSpec,
    item: RequestItem,
    limits: RequestLimits = RequestLimits(),
    caches: Collection[str] = (),
) -> None:
    """Raise TypeError/ValueError for the first invalid field of ``item``.

    ``caches``: the step caches this model is calibrated for.
    """
    if not isinstance(item.request_id, str) or not item.request_id:
        raise TypeError(f"request_id must be a non-empty str, got {item.request_id!r}")
    check_text("prompt", item.prompt, limits.max_prompt_chars)
    check_text("negative_prompt", item.negative_prompt, limits.max_prompt_chars, allow_empty=True)
    check_size("height", item.height, spec.pixel_multiple)
    check_size("width", item.width, spec.pixel_multiple)
    check_num_frames(item.num_frames, spec.vae_scale_temporal)
    max_steps = min(limits.max_inference_steps, spec.num_train_timesteps)
    require_int("num_inference_steps", item.num_inference_steps, 1, max_steps)
    require_number("guidance_scale", item.guidance_scale)
    if item.guidance_scale_2 is not None:
        require_number("guidance_scale_2", item.guidance_scale_2)
        if spec.experts < 2:
            raise ValueError("guidance_scale_2 applies to two-expert models (Wan2.2 A14B) only")
    require_number("true_cfg_scale", item.true_cfg_scale)
    if item.true_cfg_scale != 1.0 and spec.guidance != "embedded":
        raise ValueError(
            "true_cfg_scale applies to models with embedded guidance (HunyuanVideo); this "
            "model's classifier-free guidance is guidance_scale"
        )
    if item.max_sequence_length is not None:
        require_int("max_sequence_length", item.max_sequence_length, 1, spec.max_sequence_length)
    check_seed(item.seed)
    if item.output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {item.output_type!r}")
    _check_cache(item, caches)
    check_image(spec, item.image)
    _check_positions(spec, item.height, item.width, item.num_frames)
    _check_work(spec, item, limits)


def _check_cache(item: RequestItem, caches: Collection[str]) -> None:
    if item.cache is None:
        return
    if item.cache not in STEP_CACHES:
        raise ValueError(f"cache must be one of {STEP_CACHES} or None, got {item.cache!r}")
    if item.cache not in caches:
        calibrated = ", ".join(sorted(caches)) or "none"
        raise ValueError(
            f"cache={item.cache!r}: this model has no {item.cache} calibration "
            f"(calibrated caches: {calibrated})"
        )
    require_number("cache_thresh", item.cache_thresh)


def _check_positions(spec: ModelSpec, height: int, width: int, num_frames: int) -> None:
    """The rotary tables cover ``max_positions`` tokens per axis."""
    axes = {
        "num_frames": (spec.latent_frames(num_frames) // spec.patch_size[0], num_frames),
        "height": (height // spec.pixel_multiple, height),
        "width": (width // spec.pixel_multiple, width),
    }
    for name, (tokens, value) in axes.items():
        if tokens > spec.max_positions:
            raise ValueError(
                f"{name}={value} gives {tokens} positions on that axis; the model supports "
                f"at most {spec.max_positions}"
            )


def _check_work(spec: ModelSpec, item: RequestItem, limits: RequestLimits) -> None:
    tokens = spec.num_tokens(item.height, item.width, item.num_frames)
    size = f"{item.height}x{item.width}x{item.num_frames}"
    if tokens > limits.max_tokens:
        raise ValueError(
            f"height x width x num_frames = {size} is {tokens} DiT tokens, above "
            f"max_tokens={limits.max_tokens} (PipelineConfig.max_tokens raises the limit)"
        )
    work = tokens * item.num_inference_steps
    if work > limits.max_token_steps:
        raise ValueError(
            f"num_inference_steps={item.num_inference_steps} at {size} ({tokens} tokens) is "
            f"{work} token-steps, above max_token_steps={limits.max_token_steps} "
            f"(PipelineConfig.max_token_steps raises the limit)"
        )


def batch_key(spec: ModelSpec, item: RequestItem) -> Hashable:
    """Items with equal keys can share one batched forward (everything the stages treat
    as one value per batch; each item keeps its own prompt, seed, scales and image)."""
    return (
        item.height,
        item.width,
        item.num_frames,
        item.num_inference_steps,
        uses_cfg(spec, item),
        item.output_type,
        item.cache,
        item.cache_thresh if item.cache is not None else None,
        item.image is not None,
        item.max_sequence_length,
    )


def validate_batch(
    spec: ModelSpec,
    items: Sequence[RequestItem],
    limits: RequestLimits = RequestLimits(),
    caches: Collection[str] = (),
) -> None:
    """Every item valid, ids unique, and all items batchable together."""
    if not items:
        raise ValueError("a batch needs at least one item")
    for item in items:
        validate_item(spec, item, limits, caches)
    if len({item.request_id for item in items}) != len(items):
        raise ValueError("a batch holds two items with the same request_id")
    if len({batch_key(spec, item) for item in items}) != 1:
        raise ValueError(
            "a batch mixes items that cannot share a forward (size, frames, steps, guidance "
            "on/off, output type or cache differ)"
        )
