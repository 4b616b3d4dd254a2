"""HunyuanVideo prompt encoding against diffusers' ``HunyuanVideoPipeline.encode_prompt``.

A tiny HunyuanVideoPipeline is built with diffusers around a tiny transformers LlamaModel
and CLIPTextModel, with the demo model's tokenizers trained locally with the ``tokenizers``
package (a byte-level BPE with Llama-3's special tokens, and a character-level CLIP BPE;
``fastvideo.models.hunyuan.demo``), saved and reloaded as a checkpoint's tokenizers would
be. Results must be bitwise equal: both sides run the same tokenizer and encoder calls.
"""

from __future__ import annotations

import pytest
import torch

from fastvideo.models.hunyuan.demo import clip_tokenizer, llama_tokenizer
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
# A template whose prefix ends in a special token, so its crop is unambiguous.
SHORT_TEMPLATE = {
    "template": "<|start_header_id|>system<|end_header_id|>Describe:<|eot_id|>{}<|eot_id|>",
    "crop_start": None,
}


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
    llama_tok = llama_tokenizer(tmp_path_factory.mktemp("llama-tok"), PROMPTS)
    clip_tok = clip_tokenizer(tmp_path_factory.mktemp("clip-tok"))
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
