"""Registers the Wan2.1 text-to-video family: ids, detection and per-model defaults.

Importing this module must stay cheap (no torch): the driver reads it to validate requests.
"""

from __future__ import annotations

from pathlib import Path

from fastvideo.models.registry import (
    ModelFamily,
    ModelSpec,
    ModelVariant,
    read_json,
    register_family,
)

# The negative prompt Wan2.1 was published with (its own default, in Chinese).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def read_wan_spec(model_dir: Path) -> ModelSpec:
    index = read_json(model_dir / "model_index.json")
    if index.get("boundary_ratio") is not None or index.get("expand_timesteps"):
        raise ValueError(
            f"{model_dir}: a Wan2.2 checkpoint (boundary_ratio/expand_timesteps set); only "
            f"Wan2.1 text-to-video is supported yet"
        )
    dit = read_json(model_dir / "transformer" / "config.json")
    vae = read_json(model_dir / "vae" / "config.json")
    return ModelSpec(
        family="wan2.1-t2v",
        pipeline_class_name="WanPipeline",
        num_heads=int(dit.get("num_attention_heads", 40)),
        in_channels=int(dit.get("in_channels", 16)),
        patch_size=tuple(dit.get("patch_size", (1, 2, 2))),  # type: ignore[arg-type]
        vae_scale_spatial=int(vae.get("scale_factor_spatial") or 8),
        vae_scale_temporal=int(vae.get("scale_factor_temporal") or 4),
        max_positions=int(dit.get("rope_max_seq_len", 1024)),
    )


def _arch(layers: int, heads: int):
    return lambda cfg: cfg.get("num_layers") == layers and cfg.get("num_attention_heads") == heads


_COMMON = {
    "negative_prompt": WAN_NEGATIVE_PROMPT,
    "fps": 16,
    "num_inference_steps": 50,
    "guidance_scale": 5.0,
}

# TeaCache (github.com/ali-vilab/TeaCache, TeaCache4Wan2.1, "ret steps" mode: the modulated
# timestep input e0, first 5 steps always computed): the published rescaling polynomials.
# 0.08 is the 1.3B default FastVideo and SGLang ship; 0.2 for 14B is a setting seen in
# public TeaCache examples, not calibrated here.
TEACACHE_1_3B = (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02)
TEACACHE_14B = (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01)

# Sliding-tile attention: tiles of 3x8x8 tokens (192 = 3 FlexAttention blocks of 64). At
# 480x832x81 the token grid 21x30x52 is 7x4x7 tiles: a 5x2x5 window keeps ~25% of the key
# blocks; on an H200 that ran in 6.2 ms against cuDNN's 11.2 ms dense, while ~52% kept
# (7x3x5) was no faster than cuDNN (benchmarks/results/*attention_kernels_sweep.json).
# At 720x1280x81 (21x45x80 tokens, 7x6x10 tiles) 5x4x5 keeps ~24% (not timed).
STA_WINDOWS = {"480x832x81": (5, 2, 5), "720x1280x81": (5, 4, 5)}
_PIPELINE_COMMON = {
    "teacache_coefficients": TEACACHE_1_3B,
    "sta_tile_size": (3, 8, 8),
    "sta_window_size": STA_WINDOWS,
}

WAN_1_3B = ModelVariant(
    name="Wan2.1-T2V-1.3B",
    hf_ids=("Wan-AI/Wan2.1-T2V-1.3B-Diffusers",),
    sampling_defaults={**_COMMON, "height": 480, "width": 832, "num_frames": 81,
                       "teacache_thresh": 0.08},
    pipeline_defaults={**_PIPELINE_COMMON, "flow_shift": 3.0},
    matches=_arch(30, 12),
)
WAN_14B = ModelVariant(
    name="Wan2.1-T2V-14B",
    hf_ids=("Wan-AI/Wan2.1-T2V-14B-Diffusers",),
    sampling_defaults={**_COMMON, "height": 720, "width": 1280, "num_frames": 81,
                       "teacache_thresh": 0.2},
    pipeline_defaults={**_PIPELINE_COMMON, "teacache_coefficients": TEACACHE_14B,
                       "flow_shift": 5.0},
    matches=_arch(40, 40),
)
# The built-in tiny random model (fastvideo.models.demo): small sizes so it runs on a CPU.
WAN_TINY_DEMO = ModelVariant(
    name="wan2.1-t2v-tiny-random",
    hf_ids=("fastvideo/wan2.1-t2v-tiny-random",),
    sampling_defaults={
        **_COMMON,
        "height": 64,
        "width": 64,
        "num_frames": 5,
        "num_inference_steps": 8,
    },
    pipeline_defaults=dict(_PIPELINE_COMMON),
)
# Other Wan2.1 T2V checkpoints (fine-tunes, test models): the 1.3B sampling defaults, and
# the flow shift stored in the checkpoint's scheduler config.
WAN_OTHER = ModelVariant(
    name="Wan2.1-T2V",
    hf_ids=(),
    sampling_defaults={**_COMMON, "height": 480, "width": 832, "num_frames": 81},
    pipeline_defaults=dict(_PIPELINE_COMMON),
)

register_family(
    ModelFamily(
        name="wan2.1-t2v",
        class_names=("WanPipeline",),
        pipeline="fastvideo.models.wan.pipeline:WanT2VPipeline",
        read_spec=read_wan_spec,
        variants=(WAN_1_3B, WAN_14B, WAN_TINY_DEMO),
        fallback=WAN_OTHER,
        components=("transformer", "scheduler", "text_encoder", "tokenizer", "vae"),
    )
)
