"""Wan2.1 image-to-video and Wan2.2 variants: Hugging Face ids, published defaults, STA
windows and step-cache calibrations. Pure Python (no torch), like ``registration.py``.

Sources of the defaults (each variant says which numbers come from where):

* Wan2.1 I2V 14B 480P / 720P: diffusers' ``WanImageToVideoPipeline`` docstring example
  (480x832 / max area 720x1280, 81 frames, guidance 5.0, saved at 16 fps) and the Wan2.1
  reference ``generate.py`` (40 sampling steps for i2v; shift 5.0, 3.0 recommended at 480p).
* Wan2.2 A14B T2V / I2V and TI2V-5B: the Wan2.2 reference configs (``wan_t2v_A14B.py``:
  shift 12.0, 40 steps, boundary 0.875, guidance (low 3.0, high 4.0);
  ``wan_i2v_A14B.py``: shift 5.0, 40 steps, boundary 0.900, guidance (3.5, 3.5);
  ``wan_ti2v_5B.py``: 24 fps, shift 5.0, 50 steps, guidance 5.0, 121 frames) and its
  ``generate.py`` default sizes (1280*720 for A14B, 1280*704 for TI2V-5B). The boundary
  itself is read from the checkpoint's model_index.json (``boundary_ratio``), as diffusers
  does.

Image-taking variants give ``height``/``width`` as ``DefaultSize``: an image-to-video
request that leaves them at the default gets the image's aspect ratio at that area
(``fastvideo.wire.validation.DefaultSize``).
"""

from __future__ import annotations

from pathlib import Path

from fastvideo.cache.calibration import MagCacheCalibration
from fastvideo.models.registry import ModelVariant
from fastvideo.wire.validation import DefaultSize

# MagCache (github.com/Zehong-Ma/MagCache, MagCache4Wan2.1/magcache_generate.py): the
# published magnitude ratios of Wan2.1 I2V-14B for 40 UniPC steps (its i2v default), (cond,
# uncond) per step, the first step padded with 1.0; threshold 0.12, K = 2 and retention 0.2
# are the script's defaults, as for text-to-video.
MAGCACHE_I2V_480P = MagCacheCalibration(
    (1.0, 1.0, 0.98783, 0.98993, 0.97559, 0.97593, 0.98311, 0.98319, 0.98202, 0.98225, 0.9888,
     0.98878, 0.98762, 0.98759, 0.98957, 0.98971, 0.99052, 0.99043, 0.99383, 0.99384, 0.98857,
     0.9886, 0.99065, 0.99068, 0.98845, 0.98847, 0.99057, 0.99057, 0.98957, 0.98961, 0.98601,
     0.9861, 0.98823, 0.98823, 0.98756, 0.98759, 0.98808, 0.98814, 0.98721, 0.98724, 0.98571,
     0.98572, 0.98543, 0.98544, 0.98157, 0.98165, 0.98411, 0.98413, 0.97952, 0.97953, 0.98149,
     0.9815, 0.9774, 0.97742, 0.97825, 0.97826, 0.97355, 0.97361, 0.97085, 0.97087, 0.97056,
     0.97055, 0.96588, 0.96587, 0.96113, 0.96124, 0.9567, 0.95681, 0.94961, 0.94969, 0.93973,
     0.93988, 0.93217, 0.93224, 0.91878, 0.91896, 0.90955, 0.90954, 0.92617, 0.92616),
    default_thresh=0.12,
    max_skip_steps=2,
    retention_ratio=0.2,
)  # fmt: skip
MAGCACHE_I2V_720P = MagCacheCalibration(
    (1.0, 1.0, 0.99428, 0.99498, 0.98588, 0.98621, 0.98273, 0.98281, 0.99018, 0.99023, 0.98911,
     0.98917, 0.98646, 0.98652, 0.99454, 0.99456, 0.9891, 0.98909, 0.99124, 0.99127, 0.99102,
     0.99103, 0.99215, 0.99212, 0.99515, 0.99515, 0.99576, 0.99572, 0.99068, 0.99072, 0.99097,
     0.99097, 0.99166, 0.99169, 0.99041, 0.99042, 0.99201, 0.99198, 0.99101, 0.99101, 0.98599,
     0.98603, 0.98845, 0.98844, 0.98848, 0.98851, 0.98862, 0.98857, 0.98718, 0.98719, 0.98497,
     0.98497, 0.98264, 0.98263, 0.98389, 0.98393, 0.97938, 0.9794, 0.97535, 0.97536, 0.97498,
     0.97499, 0.973, 0.97301, 0.96827, 0.96828, 0.96261, 0.96263, 0.95335, 0.9534, 0.94649,
     0.94655, 0.93397, 0.93414, 0.91636, 0.9165, 0.89088, 0.89109, 0.8679, 0.86768),
    default_thresh=0.12,
    max_skip_steps=2,
    retention_ratio=0.2,
)  # fmt: skip

# Sliding-tile attention windows, derived as registration.STA_WINDOWS (tiles of 3x8x8
# tokens, ~25% of the key blocks kept; not timed). Wan2.1 I2V and Wan2.2 A14B share the
# Wan2.1 VAE and patch, so their token grids (and windows) are text-to-video's. TI2V-5B at
# 704x1280x121 (16x VAE, 2x2 patch): 31x22x40 tokens, 11x3x5 tiles; 7x2x3 keeps ~25%.
STA_WINDOWS_14B = {"480x832x81": (5, 2, 5), "720x1280x81": (5, 4, 5)}
STA_WINDOWS_TI2V = {"704x1280x121": (7, 2, 3)}
_STA = {"sta_tile_size": (3, 8, 8)}


def _size(height: int, width: int) -> dict[str, DefaultSize]:
    return {"height": DefaultSize(height), "width": DefaultSize(width)}


def _matches(kind: str, **config):
    """A recogniser of local checkpoints: the checkpoint kind (see
    ``registration.checkpoint_kind``) and transformer config fields."""

    def match(cfg: dict) -> bool:
        return cfg.get("_kind") == kind and all(cfg.get(k) == v for k, v in config.items())

    return match


def _i2v_common(negative_prompt: str) -> dict:
    return {
        "negative_prompt": negative_prompt,
        "fps": 16,
        "num_inference_steps": 40,
        "guidance_scale": 5.0,
        "num_frames": 81,
    }


def wan21_i2v_variants(negative_prompt: str, build_demo) -> tuple[ModelVariant, ...]:
    """Wan2.1 I2V-14B 480P and 720P, and the tiny random I2V demo model."""
    common = _i2v_common(negative_prompt)
    i2v_480p = ModelVariant(
        name="Wan2.1-I2V-14B-480P",
        hf_ids=("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",),
        sampling_defaults={**common, **_size(480, 832)},
        pipeline_defaults={
            **_STA,
            "sta_window_size": STA_WINDOWS_14B,
            "magcache": MAGCACHE_I2V_480P,
            "flow_shift": 3.0,
        },
        # 480P and 720P share the architecture: a local copy is recognised by its HF id in
        # the Hugging Face cache path; otherwise it gets the 480P defaults.
        matches=_matches("i2v", num_layers=40, num_attention_heads=40),
    )
    i2v_720p = ModelVariant(
        name="Wan2.1-I2V-14B-720P",
        hf_ids=("Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",),
        sampling_defaults={**common, **_size(720, 1280)},
        pipeline_defaults={
            **_STA,
            "sta_window_size": STA_WINDOWS_14B,
            "magcache": MAGCACHE_I2V_720P,
            "flow_shift": 5.0,
        },
    )
    demo = ModelVariant(
        name="wan2.1-i2v-tiny-random",
        hf_ids=("fastvideo/wan2.1-i2v-tiny-random",),
        sampling_defaults={**common, **_size(64, 64), "num_frames": 5, "num_inference_steps": 8},
        pipeline_defaults={"flow_shift": 3.0},
        build=build_demo,
        build_version="1",
    )
    return i2v_480p, i2v_720p, demo


def wan22_variants(negative_prompt: str) -> tuple[ModelVariant, ...]:
    """Wan2.2 T2V-A14B, I2V-A14B and TI2V-5B."""
    t2v = ModelVariant(
        name="Wan2.2-T2V-A14B",
        hf_ids=("Wan-AI/Wan2.2-T2V-A14B-Diffusers",),
        sampling_defaults={
            "negative_prompt": negative_prompt,
            "fps": 16,
            "num_inference_steps": 40,
            "guidance_scale": 4.0,  # the high-noise expert's ("transformer")
            "guidance_scale_2": 3.0,  # the low-noise expert's ("transformer_2")
            "height": 720,
            "width": 1280,
            "num_frames": 81,
        },
        pipeline_defaults={**_STA, "sta_window_size": STA_WINDOWS_14B, "flow_shift": 12.0},
        matches=_matches("t2v-a14b", num_layers=40, num_attention_heads=40),
    )
    i2v = ModelVariant(
        name="Wan2.2-I2V-A14B",
        hf_ids=("Wan-AI/Wan2.2-I2V-A14B-Diffusers",),
        sampling_defaults={
            **_i2v_common(negative_prompt),
            "guidance_scale": 3.5,
            "guidance_scale_2": 3.5,
            **_size(720, 1280),
        },
        pipeline_defaults={**_STA, "sta_window_size": STA_WINDOWS_14B, "flow_shift": 5.0},
        matches=_matches("i2v-a14b", num_layers=40, num_attention_heads=40),
    )
    ti2v = ModelVariant(
        name="Wan2.2-TI2V-5B",
        hf_ids=("Wan-AI/Wan2.2-TI2V-5B-Diffusers",),
        sampling_defaults={
            "negative_prompt": negative_prompt,
            "fps": 24,
            "num_inference_steps": 50,
            "guidance_scale": 5.0,
            "num_frames": 121,
            **_size(704, 1280),
        },
        pipeline_defaults={**_STA, "sta_window_size": STA_WINDOWS_TI2V, "flow_shift": 5.0},
        matches=_matches("ti2v", num_layers=30, num_attention_heads=24),
    )
    return t2v, i2v, ti2v


def fallback_variants(negative_prompt: str) -> dict[str, ModelVariant]:
    """Defaults of checkpoints that match no published variant (fine-tunes, test models),
    per checkpoint kind; the flow shift is the checkpoint's own scheduler config."""
    i2v = {**_i2v_common(negative_prompt), **_size(480, 832)}
    wan22 = {"negative_prompt": negative_prompt, "fps": 16, "num_inference_steps": 40}
    return {
        "i2v": ModelVariant(name="Wan2.1-I2V", hf_ids=(), sampling_defaults=i2v),
        "t2v-a14b": ModelVariant(
            name="Wan2.2-T2V",
            hf_ids=(),
            sampling_defaults={
                **wan22,
                "guidance_scale": 4.0,
                "guidance_scale_2": 3.0,
                "height": 720,
                "width": 1280,
                "num_frames": 81,
            },
        ),
        "i2v-a14b": ModelVariant(
            name="Wan2.2-I2V",
            hf_ids=(),
            sampling_defaults={
                **i2v,
                "guidance_scale": 3.5,
                "guidance_scale_2": 3.5,
                **_size(720, 1280),
            },
        ),
        "ti2v": ModelVariant(
            name="Wan2.2-TI2V",
            hf_ids=(),
            sampling_defaults={
                "negative_prompt": negative_prompt,
                "fps": 24,
                "num_inference_steps": 50,
                "guidance_scale": 5.0,
                "num_frames": 121,
                **_size(704, 1280),
            },
        ),
    }


def hf_id_in_path(path: Path, variants: tuple[ModelVariant, ...]) -> ModelVariant | None:
    """The variant whose Hugging Face id names the cache folder ``path`` lies in
    (``.../models--Wan-AI--Wan2.1-I2V-14B-720P-Diffusers/snapshots/<hash>``)."""
    parts = {p.lower() for p in Path(path).resolve().parts}
    for variant in variants:
        for hf_id in variant.hf_ids:
            if "models--" + hf_id.lower().replace("/", "--") in parts:
                return variant
    return None
