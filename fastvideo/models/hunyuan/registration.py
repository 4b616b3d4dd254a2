"""Registers the HunyuanVideo family: the checkpoints it serves, how to recognise them, and
the published defaults, STA windows and step-cache calibrations.

Importing this module must stay cheap (no torch): the driver reads it to validate requests.
"""

from __future__ import annotations

from pathlib import Path

from fastvideo.cache.calibration import MagCacheCalibration, TeaCacheCalibration
from fastvideo.models.registry import (
    ModelFamily,
    ModelVariant,
    config_int,
    read_json,
    register_family,
)
from fastvideo.wire.spec import ModelSpec

# Llama tokens the DiT attends to (after the prompt template is cropped): diffusers' default
# and what HunyuanVideo was trained with; requests may ask for fewer.
MAX_SEQUENCE_LENGTH = 256
# The rotary angles are computed for any grid (no table): this only bounds the positions
# per axis the way the other families' tables do.
MAX_POSITIONS = 1024


def read_hunyuan_spec(model_dir: Path) -> ModelSpec:
    dit_path = model_dir / "transformer" / "config.json"
    vae_path = model_dir / "vae" / "config.json"
    dit, vae = read_json(dit_path), read_json(vae_path)
    if dit.get("image_condition_type") is not None:
        raise ValueError(
            f"{dit_path}: image_condition_type={dit['image_condition_type']!r} is an "
            f"image-to-video HunyuanVideo checkpoint; only text-to-video is supported"
        )
    heads = config_int(dit_path, dit, "num_attention_heads", 24)
    patch = config_int(dit_path, dit, "patch_size", 2)
    patch_t = config_int(dit_path, dit, "patch_size_t", 1)
    layers = config_int(dit_path, dit, "num_layers", 20, minimum=0)
    single = config_int(dit_path, dit, "num_single_layers", 40, minimum=0)
    return ModelSpec(
        family="hunyuan",
        pipeline_class_name="HunyuanVideoPipeline",
        num_heads=heads,
        in_channels=config_int(dit_path, dit, "in_channels", 16),
        patch_size=(patch_t, patch, patch),
        vae_scale_spatial=config_int(vae_path, vae, "spatial_compression_ratio", 8),
        vae_scale_temporal=config_int(vae_path, vae, "temporal_compression_ratio", 4),
        max_positions=MAX_POSITIONS,
        hidden_size=heads * config_int(dit_path, dit, "attention_head_dim", 128),
        num_layers=layers + single,
        image_input="none",
        latent_channels=config_int(vae_path, vae, "latent_channels", 16),
        guidance="embedded",
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )


def _is_hunyuan_13b(cfg: dict) -> bool:
    return (
        cfg.get("num_layers") == 20
        and cfg.get("num_single_layers") == 40
        and cfg.get("num_attention_heads", 24) == 24
    )


# The published sampling defaults (diffusers' HunyuanVideoPipeline and the model card):
# guidance_scale is the embedded (distilled) guidance; true CFG is off (no negative prompt).
_SAMPLING = {
    "height": 720,
    "width": 1280,
    "num_frames": 129,
    "num_inference_steps": 50,
    "guidance_scale": 6.0,
    "true_cfg_scale": 1.0,
    "negative_prompt": None,
    "fps": 24,
    "max_sequence_length": MAX_SEQUENCE_LENGTH,
}

# TeaCache (github.com/ali-vilab/TeaCache, TeaCache4HunyuanVideo): the published rescaling
# polynomial of the relative L1 change of the first dual-stream block's modulated input.
# Its thresholds: 0.1 (about 1.6x faster) and 0.15 (about 2.1x), the default of its script.
# It always computes the first step (warm-up 1) and also the last one, which our generic
# TeaCache does not force.
TEACACHE = TeaCacheCalibration(
    (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02),
    warmup_steps=1,
    default_thresh=0.15,
)
# MagCache (github.com/Zehong-Ma/MagCache, MagCache4HunyuanVideo): the published magnitude
# ratios for 50 steps at 720p, one per step (the model runs without CFG), the first padded
# with 1.0; each is given for both branches here. Its configurations: E012K04R02 (threshold
# 0.12, K = 4, retention 0.2, the default here) and E024K06R02 (0.24, K = 6: faster).
_MAG_720P = (
    1.0, 1.0754, 1.27807, 1.11596, 1.09504, 1.05188, 1.00844, 1.05779, 1.00657, 1.04142,
    1.03101, 1.00679, 1.02556, 1.00908, 1.06949, 1.05438, 1.02214, 1.02321, 1.03019, 1.00779,
    1.03381, 1.01886, 1.01161, 1.02968, 1.00544, 1.02822, 1.00689, 1.02119, 1.0105, 1.01044,
    1.01572, 1.02972, 1.0094, 1.02368, 1.0226, 0.98965, 1.01588, 1.02146, 1.0018, 1.01687,
    0.99436, 1.00283, 1.01139, 0.97122, 0.98251, 0.94513, 0.97656, 0.90943, 0.85703, 0.75456,
)  # fmt: skip
MAGCACHE = MagCacheCalibration(
    tuple(r for ratio in _MAG_720P for r in (ratio, ratio)),
    default_thresh=0.12,
    max_skip_steps=4,
    retention_ratio=0.2,
)

# Sliding-tile attention: tiles of 3x8x8 tokens (192 = 3 FlexAttention blocks of 64), as
# for Wan. At 720x1280x129 the token grid 33x45x80 is 11x6x10 tiles (33 and 80 divide
# exactly; 45 rows pad to 48: no tile whose volume is a multiple of 64 divides 45, since
# 45 is odd and a tile width dividing 80 holds at most a factor 16). A 7x4x6 window keeps
# 25.5% of the tiles and 24.4% of the key blocks (the padded tile row has one block of
# padding only). Not timed yet. In the joint video+text attention a video query attends
# to the video keys of its window and to every valid text key, a text query to every key
# (``layers/joint_attention.py``).
STA_WINDOWS = {"720x1280x129": (7, 4, 6)}
_PIPELINE = {
    "teacache": TEACACHE,
    "magcache": MAGCACHE,
    "sta_tile_size": (3, 8, 8),
    "sta_window_size": STA_WINDOWS,
}


def _build_demo(folder: Path) -> Path:
    from fastvideo.models.hunyuan.demo import write_demo_model

    return write_demo_model(folder)


HUNYUAN_VIDEO = ModelVariant(
    name="HunyuanVideo",
    hf_ids=("hunyuanvideo-community/HunyuanVideo",),
    sampling_defaults=dict(_SAMPLING),
    pipeline_defaults={**_PIPELINE, "flow_shift": 7.0},
    matches=_is_hunyuan_13b,
)
# The built-in tiny random model (demo.py): small sizes so it runs on a CPU.
HUNYUAN_TINY_DEMO = ModelVariant(
    name="hunyuanvideo-tiny-random",
    hf_ids=("fastvideo/hunyuanvideo-tiny-random",),
    sampling_defaults={
        **_SAMPLING,
        "height": 64,
        "width": 64,
        "num_frames": 5,
        "num_inference_steps": 8,
    },
    pipeline_defaults=dict(_PIPELINE),
    build=_build_demo,
    build_version="1",
)
# Other HunyuanVideo T2V checkpoints (fine-tunes, test models): the published sampling
# defaults, and the flow shift stored in the checkpoint's scheduler config.
HUNYUAN_OTHER = ModelVariant(
    name="HunyuanVideo-T2V",
    hf_ids=(),
    sampling_defaults=dict(_SAMPLING),
    pipeline_defaults=dict(_PIPELINE),
)

register_family(
    ModelFamily(
        name="hunyuan",
        class_names=("HunyuanVideoPipeline",),
        pipeline="fastvideo.models.hunyuan.pipeline:HunyuanVideoT2VPipeline",
        read_spec=read_hunyuan_spec,
        variants=(HUNYUAN_VIDEO, HUNYUAN_TINY_DEMO),
        fallback=HUNYUAN_OTHER,
        components=(
            "transformer",
            "scheduler",
            "text_encoder",
            "tokenizer",
            "text_encoder_2",
            "tokenizer_2",
            "vae",
        ),
    )
)
