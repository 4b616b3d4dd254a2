"""The built-in image-to-video demo model: a tiny Wan2.1 I2V checkpoint with RANDOM weights
(DiT with an image branch, Wan VAE, UMT5, and a tiny CLIP vision encoder with its image
processor saved by transformers), in the real diffusers layout. No download.

Like ``demo.py``'s text-to-video model it exists so ``fastvideo generate --model
fastvideo/wan2.1-i2v-tiny-random --image x.png --prompt ...`` runs offline on a CPU; its
video is noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastvideo.models.wan.demo import (
    TINY_TRANSFORMER,
    WAN_SCHEDULER,
    _save_module,
    _write_json,
    _write_text_encoder,
    _write_tokenizer,
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
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        _write_transformer(folder / "transformer")
        _write_vae(folder / "vae")
        tokenizer = _write_tokenizer(folder / "tokenizer")
        _write_text_encoder(folder / "text_encoder", vocab_size=len(tokenizer))
        _write_image_encoder(folder / "image_encoder", folder / "image_processor")
    _write_json(folder / "scheduler" / "scheduler_config.json", WAN_SCHEDULER)
    _write_json(folder / "model_index.json", i2v_model_index("wan2.1-i2v-tiny-random"))
    return folder


def _write_transformer(folder: Path) -> None:
    from fastvideo.models.wan.transformer import WanTransformer3D, WanTransformerConfig

    model = WanTransformer3D(WanTransformerConfig.from_dict(TINY_I2V_TRANSFORMER))
    dim = model.config.inner_dim
    for name, param in model.named_parameters():
        if name.endswith("scale_shift_table"):  # created empty; init as the reference does
            param.data.copy_(torch.randn(param.shape) / dim**0.5)
    _save_module(model, folder, "WanTransformer3DModel", TINY_I2V_TRANSFORMER)


def _write_image_encoder(encoder_folder: Path, processor_folder: Path) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(str(encoder_folder))
    side = TINY_CLIP["image_size"]
    processor = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    processor.save_pretrained(str(processor_folder))
