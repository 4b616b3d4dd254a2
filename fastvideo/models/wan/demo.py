"""The built-in demo model: a tiny Wan2.1 T2V checkpoint with RANDOM weights, written in
the real diffusers layout by our own classes (no download, no diffusers needed).

It exists so the README's commands work offline on a CPU in seconds. Its video is noise:
the weights are random, only the shapes and the code path are real. The registry builds
it on first use (``fastvideo.models.hub.ensure_built``).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from fastvideo.models.checkpoint_writer import save_module, write_pipeline

DEMO_MODEL_ID = "fastvideo/wan2.1-t2v-tiny-random"
DEMO_VERSION = "2"
_SEED = 2024

TINY_TRANSFORMER = {
    "patch_size": [1, 2, 2], "num_attention_heads": 6, "attention_head_dim": 16,
    "in_channels": 16, "out_channels": 16, "text_dim": 32, "freq_dim": 32, "ffn_dim": 192,
    "num_layers": 2, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}  # fmt: skip
TINY_VAE = {
    "base_dim": 8, "z_dim": 16, "dim_mult": [1, 1, 2, 2], "num_res_blocks": 1,
    "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0,
}  # fmt: skip
WAN_SCHEDULER = {
    "_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0,
    "solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
    "final_sigmas_type": "zero", "disable_corrector": [],
}  # fmt: skip


def write_demo_model(folder: Path) -> Path:
    """Write the tiny random Wan2.1 checkpoint (diffusers layout) into ``folder``."""

    def components(folder: Path) -> None:
        _write_transformer(folder / "transformer")
        _write_vae(folder / "vae")
        tokenizer = _write_tokenizer(folder / "tokenizer")
        _write_text_encoder(folder / "text_encoder", vocab_size=len(tokenizer))

    index = wan_model_index("wan2.1-t2v-tiny-random")
    return write_pipeline(folder, _SEED, components, WAN_SCHEDULER, index)


def wan_model_index(variant: str | None = None) -> dict:
    """model_index.json of a Wan2.1 T2V checkpoint in the diffusers layout."""
    index = {
        "_class_name": "WanPipeline", "_diffusers_version": "0.33.0",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }  # fmt: skip
    if variant is not None:
        index["_fastvideo_variant"] = variant
    return index


def random_transformer(config: dict):
    """Our Wan DiT with seeded random weights (the modulation tables, which the classes
    create empty, initialised as the reference does)."""
    from fastvideo.models.wan.transformer import WanTransformer3D, WanTransformerConfig

    model = WanTransformer3D(WanTransformerConfig.from_dict(config))
    dim = model.config.inner_dim
    for name, param in model.named_parameters():
        if name.endswith("scale_shift_table"):
            param.data.copy_(torch.randn(param.shape, device=param.device) / dim**0.5)
    return model


def _write_transformer(folder: Path, config: dict = TINY_TRANSFORMER) -> None:
    save_module(random_transformer(config), folder, "WanTransformer3DModel", config)


def _write_vae(folder: Path) -> None:
    from fastvideo.models.wan.vae import WanVAE, WanVAEConfig

    save_module(WanVAE(WanVAEConfig.from_dict(TINY_VAE)), folder, "AutoencoderKLWan", TINY_VAE)


def _write_tokenizer(folder: Path):
    """A small unigram tokenizer over printable ASCII (UMT5's real one is 256k pieces)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -2.0) for c in chars] + [(c, -3.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def _write_text_encoder(folder: Path, vocab_size: int) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    UMT5EncoderModel(config).save_pretrained(str(folder))
