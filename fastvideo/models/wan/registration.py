"""Registers the Wan family: the checkpoints it serves, how to recognise them, and the
published defaults, STA windows and step-cache calibrations of each variant.

Importing this module must stay cheap (no torch): the driver reads it to validate requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastvideo.cache.calibration import MagCacheCalibration, TeaCacheCalibration
from fastvideo.models.registry import (
    ModelFamily,
    ModelVariant,
    config_int,
    read_json,
    register_family,
)
from fastvideo.models.wan.variants import (
    fallback_variants,
    hf_id_in_path,
    wan21_i2v_variants,
    wan22_variants,
)
from fastvideo.wire.spec import ModelSpec

# The negative prompt Wan2.1 was published with (its own default, in Chinese).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


# model_index.json `_class_name` values this family serves.
T2V_CLASS = "WanPipeline"
I2V_CLASS = "WanImageToVideoPipeline"


def _wan22_flags(model_dir: Path, index: dict) -> tuple[float | None, bool]:
    """(boundary_ratio, expand_timesteps) of a checkpoint, checked."""
    where = model_dir / "model_index.json"
    ratio = index.get("boundary_ratio")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ValueError(f"{where}: boundary_ratio must be a number in (0, 1), got {ratio!r}")
        if not (model_dir / "transformer_2" / "config.json").is_file():
            raise ValueError(
                f"{where}: boundary_ratio is set but the checkpoint has no transformer_2 (the "
                f"low-noise expert that runs below the boundary)"
            )
    expand = index.get("expand_timesteps", False)
    if not isinstance(expand, bool):
        raise ValueError(f"{where}: expand_timesteps must be true or false, got {expand!r}")
    return ratio, expand


def _image_input(model_dir: Path, index: dict, dit: dict, z_dim: int, in_channels: int) -> str:
    """What the checkpoint does with an image, checked against its DiT's input channels."""
    where = model_dir / "transformer" / "config.json"
    if dit.get("pos_embed_seq_len") is not None:
        raise ValueError(
            f"{where}: pos_embed_seq_len is set: a first-last-frame (FLF2V) model, which "
            f"needs a last image; only one conditioning image is supported"
        )
    _, expand = _wan22_flags(model_dir, index)
    if expand:  # Wan2.2 TI2V: the image latents replace the first latent frame
        wanted, mode = z_dim, "optional"
    elif index.get("_class_name") == I2V_CLASS:  # mask (4) + image latents concatenated
        wanted, mode = 2 * z_dim + 4, "required"
    else:
        wanted, mode = z_dim, "none"
    if in_channels != wanted:
        raise ValueError(
            f"{where}: in_channels={in_channels}, but a {index.get('_class_name')} checkpoint "
            f"{'with expand_timesteps ' if expand else ''}and a {z_dim}-channel VAE needs "
            f"{wanted}"
        )
    if dit.get("image_dim") is not None:
        for folder in ("image_encoder", "image_processor"):
            if not (model_dir / folder).is_dir():
                raise FileNotFoundError(
                    f"missing component folder {model_dir / folder} (the transformer has an "
                    f"image branch: image_dim={dit['image_dim']})"
                )
    return mode


def read_wan_spec(model_dir: Path) -> ModelSpec:
    """The ModelSpec of a Wan2.1 (T2V, I2V) or Wan2.2 (A14B T2V/I2V, TI2V-5B) checkpoint."""
    index = read_json(model_dir / "model_index.json")
    dit_path = model_dir / "transformer" / "config.json"
    vae_path = model_dir / "vae" / "config.json"
    dit, vae = read_json(dit_path), read_json(vae_path)
    heads = config_int(dit_path, dit, "num_attention_heads", 40)
    patch = dit.get("patch_size", (1, 2, 2))
    if not (isinstance(patch, (list, tuple)) and len(patch) == 3):
        raise ValueError(f"{dit_path}: patch_size must be three integers, got {patch!r}")
    patch_size = tuple(config_int(dit_path, {"p": p}, "p", 1) for p in patch)
    z_dim = config_int(vae_path, vae, "z_dim", 16)
    in_channels = config_int(dit_path, dit, "in_channels", 16)
    ratio, _ = _wan22_flags(model_dir, index)
    return ModelSpec(
        family="wan",
        pipeline_class_name=str(index.get("_class_name")),
        num_heads=heads,
        in_channels=in_channels,
        patch_size=patch_size,  # type: ignore[arg-type]
        vae_scale_spatial=config_int(vae_path, vae, "scale_factor_spatial", 8),
        vae_scale_temporal=config_int(vae_path, vae, "scale_factor_temporal", 4),
        max_positions=config_int(dit_path, dit, "rope_max_seq_len", 1024),
        hidden_size=heads * config_int(dit_path, dit, "attention_head_dim", 128),
        num_layers=config_int(dit_path, dit, "num_layers", 40),
        image_input=_image_input(model_dir, index, dit, z_dim, in_channels),
        latent_channels=z_dim,
        experts=1 if ratio is None else 2,
    )


def _arch(layers: int, heads: int):
    """Recognises a Wan2.1 text-to-video checkpoint of this depth and width."""
    return lambda cfg: (
        cfg.get("_kind") == "t2v"
        and cfg.get("num_layers") == layers
        and cfg.get("num_attention_heads") == heads
    )


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
TEACACHE_1_3B = TeaCacheCalibration(
    (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    warmup_steps=5,
    default_thresh=0.08,
)
TEACACHE_14B = TeaCacheCalibration(
    (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
    warmup_steps=5,
    default_thresh=0.2,
)
# MagCache (github.com/Zehong-Ma/MagCache, MagCache4Wan2.1): the published magnitude ratios
# of the blocks' residual for 50 UniPC steps, (cond, uncond) per step, the first step padded
# with 1.0; threshold 0.12, K = 2 and retention 0.2 are its script's defaults.
MAGCACHE_1_3B = MagCacheCalibration(
    (1.0, 1.0, 1.0124, 1.02213, 1.00166, 1.0041, 0.99791, 1.00061, 0.99682, 0.99762, 0.99634,
     0.99685, 0.99567, 0.99586, 0.99416, 0.99422, 0.99578, 0.99575, 0.9957, 0.99563, 0.99511,
     0.99506, 0.99535, 0.99531, 0.99552, 0.99549, 0.99541, 0.99539, 0.9954, 0.99536, 0.99489,
     0.99485, 0.99518, 0.99514, 0.99484, 0.99478, 0.99481, 0.99479, 0.99415, 0.99413, 0.99419,
     0.99416, 0.99396, 0.99393, 0.99388, 0.99386, 0.99349, 0.99349, 0.99309, 0.99304, 0.9927,
     0.9927, 0.99228, 0.99226, 0.99171, 0.9917, 0.99137, 0.99135, 0.99068, 0.99063, 0.99005,
     0.99003, 0.98944, 0.98942, 0.98849, 0.98849, 0.98758, 0.98757, 0.98644, 0.98643, 0.98504,
     0.98503, 0.9836, 0.98359, 0.98202, 0.98201, 0.97977, 0.97978, 0.97717, 0.97718, 0.9741,
     0.97411, 0.97003, 0.97002, 0.96538, 0.96541, 0.9593, 0.95933, 0.95086, 0.95089, 0.94013,
     0.94019, 0.92402, 0.92414, 0.90241, 0.9026, 0.86821, 0.86868, 0.81838, 0.81939),
    default_thresh=0.12,
    max_skip_steps=2,
    retention_ratio=0.2,
)  # fmt: skip
MAGCACHE_14B = MagCacheCalibration(
    (1.0, 1.0, 1.02504, 1.03017, 1.00025, 1.00251, 0.9985, 0.99962, 0.99779, 0.99771, 0.9966,
     0.99658, 0.99482, 0.99476, 0.99467, 0.99451, 0.99664, 0.99656, 0.99434, 0.99431, 0.99533,
     0.99545, 0.99468, 0.99465, 0.99438, 0.99434, 0.99516, 0.99517, 0.99384, 0.9938, 0.99404,
     0.99401, 0.99517, 0.99516, 0.99409, 0.99408, 0.99428, 0.99426, 0.99347, 0.99343, 0.99418,
     0.99416, 0.99271, 0.99269, 0.99313, 0.99311, 0.99215, 0.99215, 0.99218, 0.99215, 0.99216,
     0.99217, 0.99163, 0.99161, 0.99138, 0.99135, 0.98982, 0.9898, 0.98996, 0.98995, 0.9887,
     0.98866, 0.98772, 0.9877, 0.98767, 0.98765, 0.98573, 0.9857, 0.98501, 0.98498, 0.9838,
     0.98376, 0.98177, 0.98173, 0.98037, 0.98035, 0.97678, 0.97677, 0.97546, 0.97543, 0.97184,
     0.97183, 0.96711, 0.96708, 0.96349, 0.96345, 0.95629, 0.95625, 0.94926, 0.94929, 0.93964,
     0.93961, 0.92511, 0.92504, 0.90693, 0.90678, 0.8796, 0.87945, 0.86111, 0.86189),
    default_thresh=0.12,
    max_skip_steps=2,
    retention_ratio=0.2,
)  # fmt: skip

# Sliding-tile attention: tiles of 3x8x8 tokens (192 = 3 FlexAttention blocks of 64). At
# 480x832x81 the token grid 21x30x52 is 7x4x7 tiles: a 5x2x5 window keeps ~25% of the key
# blocks; on an H200 that ran in 6.2 ms against cuDNN's 11.2 ms dense, while ~52% kept
# (7x3x5) was no faster than cuDNN. At 720x1280x81 (21x45x80 tokens, 7x6x10 tiles) 5x4x5
# keeps ~24% (not timed).
STA_WINDOWS = {"480x832x81": (5, 2, 5), "720x1280x81": (5, 4, 5)}
_PIPELINE_COMMON = {
    "teacache": TEACACHE_1_3B,
    "magcache": MAGCACHE_1_3B,
    "sta_tile_size": (3, 8, 8),
    "sta_window_size": STA_WINDOWS,
}


def _build_demo(folder: Path) -> Path:
    from fastvideo.models.wan.demo import write_demo_model

    return write_demo_model(folder)


WAN_1_3B = ModelVariant(
    name="Wan2.1-T2V-1.3B",
    hf_ids=("Wan-AI/Wan2.1-T2V-1.3B-Diffusers",),
    sampling_defaults={**_COMMON, "height": 480, "width": 832, "num_frames": 81},
    pipeline_defaults={**_PIPELINE_COMMON, "flow_shift": 3.0},
    matches=_arch(30, 12),
)
WAN_14B = ModelVariant(
    name="Wan2.1-T2V-14B",
    hf_ids=("Wan-AI/Wan2.1-T2V-14B-Diffusers",),
    sampling_defaults={**_COMMON, "height": 720, "width": 1280, "num_frames": 81},
    pipeline_defaults={
        **_PIPELINE_COMMON,
        "teacache": TEACACHE_14B,
        "magcache": MAGCACHE_14B,
        "flow_shift": 5.0,
    },
    matches=_arch(40, 40),
)
# The built-in tiny random model (demo.py): small sizes so it runs on a CPU.
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
    build=_build_demo,
    build_version="2",
    default_demo=True,
)
# Other Wan2.1 T2V checkpoints (fine-tunes, test models): the 1.3B sampling defaults, and
# the flow shift stored in the checkpoint's scheduler config.
WAN_OTHER = ModelVariant(
    name="Wan2.1-T2V",
    hf_ids=(),
    sampling_defaults={**_COMMON, "height": 480, "width": 832, "num_frames": 81},
    pipeline_defaults=dict(_PIPELINE_COMMON),
)


def _build_i2v_demo(folder: Path) -> Path:
    from fastvideo.models.wan.demo_i2v import write_i2v_demo_model

    return write_i2v_demo_model(folder)


WAN21_I2V_480P, WAN21_I2V_720P, WAN_I2V_TINY_DEMO = wan21_i2v_variants(
    WAN_NEGATIVE_PROMPT, _build_i2v_demo
)
WAN22_T2V_A14B, WAN22_I2V_A14B, WAN22_TI2V_5B = wan22_variants(WAN_NEGATIVE_PROMPT)
FALLBACKS = {"t2v": WAN_OTHER, **fallback_variants(WAN_NEGATIVE_PROMPT)}


def checkpoint_kind(model_dir: Path) -> str:
    """'t2v', 'i2v' (Wan2.1), 't2v-a14b', 'i2v-a14b' (Wan2.2 two experts) or 'ti2v'
    (Wan2.2 expand_timesteps), from model_index.json."""
    index = read_json(model_dir / "model_index.json")
    if index.get("expand_timesteps"):
        return "ti2v"
    kind = "i2v" if index.get("_class_name") == I2V_CLASS else "t2v"
    return kind if index.get("boundary_ratio") is None else f"{kind}-a14b"


@dataclass(frozen=True)
class WanFamily(ModelFamily):
    """The Wan family: variants are told apart by checkpoint kind first (Wan2.2 A14B's
    experts have Wan2.1 14B's transformer config), and each kind has its own fallback."""

    fallbacks: dict[str, ModelVariant] = field(default_factory=dict)

    def variant_for(self, model_dir: Path) -> ModelVariant:
        named = read_json(model_dir / "model_index.json").get("_fastvideo_variant")
        for variant in self.variants:
            if variant.name == named:
                return variant
        cached = hf_id_in_path(model_dir, self.variants)
        if cached is not None:
            return cached
        kind = checkpoint_kind(model_dir)
        transformer = model_dir / "transformer" / "config.json"
        cfg = {**(read_json(transformer) if transformer.is_file() else {}), "_kind": kind}
        match = next((v for v in self.variants if v.matches(cfg)), None)
        return match or self.fallbacks.get(kind, self.fallback)


register_family(
    WanFamily(
        name="wan",
        class_names=(T2V_CLASS, I2V_CLASS),
        pipeline="fastvideo.models.wan.pipeline:WanVideoPipeline",
        read_spec=read_wan_spec,
        variants=(
            WAN_1_3B,
            WAN_14B,
            WAN_TINY_DEMO,
            WAN21_I2V_480P,
            WAN21_I2V_720P,
            WAN_I2V_TINY_DEMO,
            WAN22_T2V_A14B,
            WAN22_I2V_A14B,
            WAN22_TI2V_5B,
        ),
        fallback=WAN_OTHER,
        components=("transformer", "scheduler", "text_encoder", "tokenizer", "vae"),
        fallbacks=FALLBACKS,
    )
)
