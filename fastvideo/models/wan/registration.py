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

WAN_1_3B = ModelVariant(
    name="Wan2.1-T2V-1.3B",
    hf_ids=("Wan-AI/Wan2.1-T2V-1.3B-Diffusers",),
    sampling_defaults={**_COMMON, "height": 480, "width": 832, "num_frames": 81},
    pipeline_defaults={"flow_shift": 3.0},
    matches=_arch(30, 12),
)
WAN_14B = ModelVariant(
    name="Wan2.1-T2V-14B",
    hf_ids=("Wan-AI/Wan2.1-T2V-14B-Diffusers",),
    sampling_defaults={**_COMMON, "height": 720, "width": 1280, "num_frames": 81},
    pipeline_defaults={"flow_shift": 5.0},
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
    pipeline_defaults={},
)
# Other Wan2.1 T2V checkpoints (fine-tunes, test models): the 1.3B sampling defaults, and
# the flow shift stored in the checkpoint's scheduler config.
WAN_OTHER = ModelVariant(
    name="Wan2.1-T2V",
    hf_ids=(),
    sampling_defaults={**_COMMON, "height": 480, "width": 832, "num_frames": 81},
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
