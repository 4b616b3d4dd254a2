"""A tiny HunyuanVideo checkpoint with RANDOM weights, written in the real diffusers layout
by our own classes and transformers' (no download, no diffusers needed), and the tokenizers
it uses, trained here with the ``tokenizers`` package.

It exists so ``fastvideo/hunyuanvideo-tiny-random`` runs offline on a CPU in seconds; its
video is noise (only the shapes and the code path are real). The registry builds it on
first use (``fastvideo.models.hub.ensure_built``). The tests reuse the tokenizer builders
for the checkpoints they write with diffusers' classes.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from fastvideo.models.checkpoint_writer import save_module, write_pipeline
from fastvideo.models.hunyuan.text import DEFAULT_PROMPT_TEMPLATE

DEMO_MODEL_ID = "fastvideo/hunyuanvideo-tiny-random"
DEMO_VARIANT = "hunyuanvideo-tiny-random"
_SEED = 2025

# Llama-3's special tokens (BOS, EOS, the chat template's headers) and a pad token.
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>", "<pad>"]  # fmt: skip
# Text the demo's Llama tokenizer learns its merges from (besides the prompt template).
DEMO_CORPUS = ["a red fox walking through a snowy forest at dawn", "A cat.",
               "an astronaut riding a horse on the moon, cinematic lighting"]  # fmt: skip

# 6 heads: Ulysses 2 and 3 divide them. Dims are those of the tiny text encoders below.
TINY_TRANSFORMER = {
    "in_channels": 16, "out_channels": 16, "num_attention_heads": 6, "attention_head_dim": 8,
    "num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 1, "mlp_ratio": 2.0,
    "patch_size": 2, "patch_size_t": 1, "qk_norm": "rms_norm", "guidance_embeds": True,
    "text_embed_dim": 32, "pooled_projection_dim": 24, "rope_theta": 256.0,
    "rope_axes_dim": [2, 2, 4],
}  # fmt: skip
TINY_VAE = {"latent_channels": 16, "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1,
            "norm_num_groups": 4}  # fmt: skip
TINY_LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 512}  # fmt: skip
TINY_CLIP = {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 2, "max_position_embeddings": 77}  # fmt: skip
# The published checkpoint's scheduler (static shift 7).
HUNYUAN_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 7.0,
                     "num_train_timesteps": 1000, "use_dynamic_shifting": False}  # fmt: skip


def write_demo_model(folder: Path) -> Path:
    """Write the tiny random HunyuanVideo checkpoint (diffusers layout) into ``folder``."""

    def components(folder: Path) -> None:
        _write_transformer(folder / "transformer")
        _write_vae(folder / "vae")
        llama_tok = llama_tokenizer(folder / "tokenizer", DEMO_CORPUS)
        clip_tok = clip_tokenizer(folder / "tokenizer_2")
        tiny_llama(llama_tok).save_pretrained(str(folder / "text_encoder"))
        tiny_clip(clip_tok).save_pretrained(str(folder / "text_encoder_2"))

    index = hunyuan_model_index(DEMO_VARIANT)
    return write_pipeline(folder, _SEED, components, HUNYUAN_SCHEDULER, index)


def hunyuan_model_index(variant: str | None = None) -> dict:
    """model_index.json of a HunyuanVideo text-to-video checkpoint in the diffusers layout."""
    index = {
        "_class_name": "HunyuanVideoPipeline", "_diffusers_version": "0.32.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "LlamaModel"],
        "text_encoder_2": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "tokenizer_2": ["transformers", "CLIPTokenizerFast"],
        "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
    }  # fmt: skip
    if variant is not None:
        index["_fastvideo_variant"] = variant
    return index


# --- tokenizers and text encoders ----------------------------------------------------------
def llama_tokenizer(folder: Path, corpus: Sequence[str] = ()):
    """A byte-level BPE (vocabulary 400) with Llama-3's special tokens, trained on the
    prompt template and ``corpus``, saved to ``folder`` and reloaded from it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=LLAMA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # "{}" repeated so it becomes one token, as in Llama-3's vocabulary (diffusers' computed
    # crop_start assumes so).
    tok.train_from_iterator([DEFAULT_PROMPT_TEMPLATE["template"], *corpus, *["{}"] * 50], trainer)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|end_of_text|>", pad_token="<pad>"
    )
    wrapped.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def clip_tokenizer(folder: Path):
    """A character-level CLIP BPE (no merges, 77 positions), saved and reloaded."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer, CLIPTokenizerFast

    chars = sorted(set(pre_tokenizers.ByteLevel.alphabet()) | set(string.ascii_lowercase))
    pieces = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    tok = CLIPTokenizerFast(vocab={p: i for i, p in enumerate(pieces)}, merges=[])
    tok.model_max_length = 77
    tok.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def tiny_llama(tokenizer) -> nn.Module:
    """A random transformers ``LlamaModel`` sized for ``tokenizer`` (eval mode)."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TINY_LLAMA,
    )  # fmt: skip
    return LlamaModel(config).eval()


def tiny_clip(tokenizer) -> nn.Module:
    """A random transformers ``CLIPTextModel`` sized for ``tokenizer`` (eval mode)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_CLIP,
    )  # fmt: skip
    return CLIPTextModel(config).eval()


# --- our own modules -------------------------------------------------------------------------
def _write_transformer(folder: Path) -> None:
    from fastvideo.models.hunyuan.transformer import (
        HunyuanTransformer3D,
        HunyuanTransformerConfig,
    )

    model = HunyuanTransformer3D(HunyuanTransformerConfig.from_dict(TINY_TRANSFORMER))
    with torch.no_grad():  # norms start as ones: randomise them like the other weights
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                param.normal_(1.0, 0.2)
    save_module(model, folder, "HunyuanVideoTransformer3DModel", TINY_TRANSFORMER, "0.32.0")


def _write_vae(folder: Path) -> None:
    from fastvideo.models.hunyuan.vae import HunyuanVAE, HunyuanVAEConfig

    vae = HunyuanVAE(HunyuanVAEConfig.from_dict(TINY_VAE))
    save_module(vae, folder, "AutoencoderKLHunyuanVideo", TINY_VAE, "0.32.0")
