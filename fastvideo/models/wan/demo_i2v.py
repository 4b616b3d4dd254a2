"""The built-in image-to-video demo model: a tiny Wan2.1 I2V checkpoint with RANDOM weights
(DiT with an image branch, Wan VAE, UMT5, and a tiny CLIP vision encoder with its image
processor saved by transformers), in the real diffusers layout. No download.

Like ``demo.py``'s text-to-video model it exists so ``fastvideo generate --model
fastvideo/wan2.1-i2v-tiny-random --image x.png --prompt ...`` runs offline on a CPU; its
video is noise.
"""

from __future__ import annotations

from pathlib import Path

from fastvideo.models.checkpoint_writer import write_pipeline
from fastvideo.models.wan.demo import (
    TINY_TRANSFORMER,
    WAN_SCHEDULER,
    _write_text_encoder,
    _write_tokenizer,
    _write_transformer,
    _write_vae,
    wan_model_index,
)

I2V_DEMO_MODEL_ID = "fastvideo/wan2.1-i2v-tiny-random"
_SEED = 2025
TINY_CLIP = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "projection_dim": 32,
}  # fmt: skip
TINY_I2V_TRANSFORMER = {
    **TINY_TRANSFORMER,
    "in_channels": 36,  # 16 noisy + 4 mask + 16 image latent channels
    "image_dim": TINY_CLIP["hidden_size"],
    "added_kv_proj_dim": TINY_TRANSFORMER["num_attention_heads"]
    * TINY_TRANSFORMER["attention_head_dim"],
}


def i2v_model_index(variant: str | None = None) -> dict:
    """model_index.json of a Wan2.1 I2V checkpoint in the diffusers layout."""
    index = wan_model_index(variant)
    index["_class_name"] = "WanImageToVideoPipeline"
    index["image_encoder"] = ["transformers", "CLIPVisionModel"]
    index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    index["boundary_ratio"] = None
    index["expand_timesteps"] = False
    return index


def write_i2v_demo_model(folder: Path) -> Path:
    """Write the tiny random Wan2.1 I2V checkpoint (diffusers layout) into ``folder``."""

    def components(folder: Path) -> None:
        _write_transformer(folder / "transformer", TINY_I2V_TRANSFORMER)
        _write_vae(folder / "vae")
        tokenizer = _write_tokenizer(folder / "tokenizer")
        _write_text_encoder(folder / "text_encoder", vocab_size=len(tokenizer))
        _write_image_encoder(folder / "image_encoder", folder / "image_processor")

    index = i2v_model_index("wan2.1-i2v-tiny-random")
    return write_pipeline(folder, _SEED, components, WAN_SCHEDULER, index)


def _write_image_encoder(encoder_folder: Path, processor_folder: Path) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(str(encoder_folder))
    side = TINY_CLIP["image_size"]
    processor = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    processor.save_pretrained(str(processor_folder))
