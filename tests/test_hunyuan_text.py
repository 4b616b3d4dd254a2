"""HunyuanVideo prompt encoding against diffusers' ``HunyuanVideoPipeline.encode_prompt``.

A tiny HunyuanVideoPipeline is built with diffusers around a tiny transformers LlamaModel
and CLIPTextModel, with tokenizers trained here with the ``tokenizers`` package (a byte-level
BPE with Llama-3's special tokens, and a character-level CLIP BPE), saved and reloaded as a
checkpoint's tokenizers would be. Results must be bitwise equal: both sides run the same
tokenizer and encoder calls.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

from fastvideo.models.hunyuan.text import (
    DEFAULT_PROMPT_TEMPLATE,
    clip_pooled_embeds,
    encode_prompt,
    llama_prompt_embeds,
    template_crop_start,
)

PROMPTS = [
    "a red fox walking through a snowy forest at dawn",
    "A cat.",
    "an astronaut riding a horse on the moon, cinematic lighting, 4k, " * 3,  # truncated
]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>", "<pad>"]  # fmt: skip
# A template whose prefix ends in a special token, so its crop is unambiguous.
SHORT_TEMPLATE = {
    "template": "<|start_header_id|>system<|end_header_id|>Describe:<|eot_id|>{}<|eot_id|>",
    "crop_start": None,
}


def _llama_tokenizer(folder: Path):
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
    corpus = [DEFAULT_PROMPT_TEMPLATE["template"], *PROMPTS, *["{}"] * 50]
    tok.train_from_iterator(corpus, trainer)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|end_of_text|>", pad_token="<pad>"
    )
    wrapped.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def _clip_tokenizer(folder: Path):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer, CLIPTokenizerFast

    chars = sorted(set(pre_tokenizers.ByteLevel.alphabet()) | set(string.ascii_lowercase))
    pieces = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    tok = CLIPTokenizerFast(vocab={p: i for i, p in enumerate(pieces)}, merges=[])
    tok.model_max_length = 77
    tok.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A tiny diffusers HunyuanVideoPipeline (random weights, local tokenizers)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    llama_tok = _llama_tokenizer(tmp_path_factory.mktemp("llama-tok"))
    clip_tok = _clip_tokenizer(tmp_path_factory.mktemp("clip-tok"))
    llama = LlamaModel(
        LlamaConfig(
            vocab_size=len(llama_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=llama_tok.pad_token_id, bos_token_id=llama_tok.bos_token_id,
            eos_token_id=llama_tok.eos_token_id,
        )
    ).eval()  # fmt: skip
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
        )
    ).eval()  # fmt: skip
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=24,
        rope_axes_dim=(2, 2, 4),
    )  # fmt: skip
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4
    )
    return HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=llama_tok, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=clip, tokenizer_2=clip_tok,
    )  # fmt: skip


def test_default_template_is_diffusers():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (
        DEFAULT_PROMPT_TEMPLATE as REFERENCE,
    )

    assert DEFAULT_PROMPT_TEMPLATE == REFERENCE


@pytest.mark.parametrize(
    "template, max_len, per_prompt",
    [
        (DEFAULT_PROMPT_TEMPLATE, 256, 1),
        (DEFAULT_PROMPT_TEMPLATE, 24, 2),
        (SHORT_TEMPLATE, 32, 1),
        ({**SHORT_TEMPLATE, "crop_start": 0}, 40, 1),
    ],
    ids=["default-256", "default-24-x2", "computed-crop", "no-crop"],
)
def test_encode_prompt_matches_pipeline(pipe, template, max_len, per_prompt):
    cpu = torch.device("cpu")
    expected = pipe.encode_prompt(
        PROMPTS, prompt_template=template, num_videos_per_prompt=per_prompt, device=cpu,
        max_sequence_length=max_len,
    )  # fmt: skip
    ours = encode_prompt(
        pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, PROMPTS,
        template, max_sequence_length=max_len, num_videos_per_prompt=per_prompt,
    )  # fmt: skip
    names = ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask")
    for name, a, b in zip(names, ours, expected, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a, b), name
    embeds, pooled, mask = ours
    assert embeds.shape == (len(PROMPTS) * per_prompt, max_len, 32)
    assert pooled.shape == (len(PROMPTS) * per_prompt, 24)
    assert mask.shape == (len(PROMPTS) * per_prompt, max_len)
    assert not torch.equal(pooled[0], pooled[-1])
    if template["template"] == SHORT_TEMPLATE["template"]:  # its window holds the prompt
        assert not torch.equal(embeds[0], embeds[-1])


def test_private_methods_match_pipeline(pipe):
    """The two halves against diffusers' ``_get_llama_prompt_embeds`` / ``_get_clip_...``."""
    embeds, mask = llama_prompt_embeds(
        pipe.tokenizer, pipe.text_encoder, PROMPTS[0], SHORT_TEMPLATE, max_sequence_length=20,
        num_hidden_layers_to_skip=1, dtype=torch.float64,
    )  # fmt: skip
    ref_embeds, ref_mask = pipe._get_llama_prompt_embeds(
        PROMPTS[0], SHORT_TEMPLATE, device=torch.device("cpu"), dtype=torch.float64,
        max_sequence_length=20, num_hidden_layers_to_skip=1,
    )  # fmt: skip
    assert embeds.dtype == torch.float64
    assert torch.equal(embeds, ref_embeds) and torch.equal(mask, ref_mask)
    pooled = clip_pooled_embeds(pipe.tokenizer_2, pipe.text_encoder_2, PROMPTS[1:])
    ref_pooled = pipe._get_clip_prompt_embeds(PROMPTS[1:], device=torch.device("cpu"))
    assert torch.equal(pooled, ref_pooled)


def test_crop_removes_exactly_the_template_prefix(pipe):
    """With a prefix ending in a special token, the computed crop is BOS + the prefix's
    tokens, and the valid tokens left are the prompt's plus the closing <|eot_id|>."""
    tok = pipe.tokenizer
    prefix = SHORT_TEMPLATE["template"].split("{}")[0]
    crop = template_crop_start(tok, SHORT_TEMPLATE)
    assert crop == len(tok(prefix).input_ids)
    assert template_crop_start(tok, DEFAULT_PROMPT_TEMPLATE) == 95
    _, mask = llama_prompt_embeds(
        tok, pipe.text_encoder, PROMPTS[:2], SHORT_TEMPLATE, max_sequence_length=32
    )
    for prompt, row in zip(PROMPTS[:2], mask, strict=True):
        n = len(tok(prompt + "<|eot_id|>", add_special_tokens=False).input_ids)
        assert row.tolist() == [1] * n + [0] * (32 - n)
