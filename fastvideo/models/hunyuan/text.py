"""HunyuanVideo prompt encoding, exactly as diffusers' ``HunyuanVideoPipeline`` does it.

Two encoders (loaded elsewhere; any transformers ``LlamaModel`` / ``CLIPTextModel``):

- Llama (the DiT's ``encoder_hidden_states``): the prompt is formatted into a chat
  template that asks for a video description; the template's tokens before the prompt
  (``crop_start`` of them, BOS included) condition the encoder but are cut from its output,
  together with their attention-mask entries. The states are taken ``num_hidden_layers_to_skip``
  layers before the last (``hidden_states[-(skip + 1)]``: with skip 2 the output of layer
  N-2). The sequence is padded/truncated to ``crop_start + max_sequence_length`` tokens, so
  after the crop it is ``max_sequence_length`` (256) long with a right-padding mask.
- CLIP (the DiT's ``pooled_projections``): ``pooler_output`` of the prompt padded/truncated
  to 77 tokens (no attention mask is passed, as in the reference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fastvideo.logger import init_logger

logger = init_logger(__name__)

# The prompt template HunyuanVideo was trained with (diffusers' DEFAULT_PROMPT_TEMPLATE);
# crop_start = its tokens before the prompt with the Llama-3 tokenizer, BOS included.
DEFAULT_PROMPT_TEMPLATE: dict[str, Any] = {
    "template": (
        "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the "
        "following aspects: "
        "1. The main content and theme of the video."
        "2. The color, shape, size, texture, quantity, text, and spatial relationships of the "
        "objects."
        "3. Actions, events, behaviors temporal relationships, physical movement changes of the "
        "objects."
        "4. background environment, light, style and atmosphere."
        "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    ),
    "crop_start": 95,
}
CLIP_MAX_LENGTH = 77


def _as_list(prompts: str | Sequence[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _device(model: torch.nn.Module, device: torch.device | None) -> torch.device:
    return device if device is not None else next(model.parameters()).device


def template_crop_start(tokenizer: Any, template: Mapping[str, Any]) -> int:
    """``template["crop_start"]``, or when absent/None what diffusers computes: the template's
    token count minus 2 (the ``{}`` placeholder and the final ``<|eot_id|>``, one token each
    with the Llama-3 tokenizer)."""
    crop_start = template.get("crop_start")
    if crop_start is not None:
        return int(crop_start)
    ids = tokenizer(
        template["template"],
        padding="max_length",
        return_tensors="pt",
        return_length=False,
        return_overflowing_tokens=False,
        return_attention_mask=False,
    )["input_ids"]
    return ids.shape[-1] - 2


def _repeat(x: torch.Tensor, times: int) -> torch.Tensor:
    """[B, ...] -> [B * times, ...], each item repeated ``times`` times in a row."""
    return x if times == 1 else x.repeat_interleave(times, dim=0)


@torch.no_grad()
def llama_prompt_embeds(
    tokenizer: Any,
    text_encoder: torch.nn.Module,
    prompts: str | Sequence[str],
    template: Mapping[str, Any] = DEFAULT_PROMPT_TEMPLATE,
    *,
    max_sequence_length: int = 256,
    num_hidden_layers_to_skip: int = 2,
    num_videos_per_prompt: int = 1,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama states of the templated prompts (diffusers' ``_get_llama_prompt_embeds``).

    Returns:
        embeds [B * n, max_sequence_length, hidden] in ``dtype`` (default: the encoder's) and
        the attention mask [B * n, max_sequence_length] (int64, 1 = valid, right padding),
        ``n = num_videos_per_prompt``.
    """
    device = _device(text_encoder, device)
    dtype = dtype or next(text_encoder.parameters()).dtype
    texts = [template["template"].format(p) for p in _as_list(prompts)]
    crop_start = template_crop_start(tokenizer, template)
    inputs = tokenizer(
        texts,
        max_length=max_sequence_length + crop_start,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
        return_length=False,
        return_overflowing_tokens=False,
        return_attention_mask=True,
    )
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    out = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    embeds = out.hidden_states[-(num_hidden_layers_to_skip + 1)].to(dtype=dtype)
    if crop_start > 0:
        embeds, mask = embeds[:, crop_start:], mask[:, crop_start:]
    return _repeat(embeds, num_videos_per_prompt), _repeat(mask, num_videos_per_prompt)


@torch.no_grad()
def clip_pooled_embeds(
    tokenizer: Any,
    text_encoder: torch.nn.Module,
    prompts: str | Sequence[str],
    *,
    max_sequence_length: int = CLIP_MAX_LENGTH,
    num_videos_per_prompt: int = 1,
    device: torch.device | None = None,
) -> torch.Tensor:
    """CLIP ``pooler_output`` [B * n, hidden] of the prompts in the encoder's dtype
    (diffusers' ``_get_clip_prompt_embeds``; its ``dtype`` argument is unused there too)."""
    device = _device(text_encoder, device)
    prompts = _as_list(prompts)
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    untruncated = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] >= ids.shape[-1] and not torch.equal(ids, untruncated):
        removed = tokenizer.batch_decode(untruncated[:, max_sequence_length - 1 : -1])
        logger.warning(
            "CLIP truncated the prompt to %d tokens, dropping: %s", max_sequence_length, removed
        )
    pooled = text_encoder(ids.to(device), output_hidden_states=False).pooler_output
    return _repeat(pooled, num_videos_per_prompt)


def encode_prompt(
    llama_tokenizer: Any,
    llama: torch.nn.Module,
    clip_tokenizer: Any,
    clip: torch.nn.Module,
    prompts: str | Sequence[str],
    template: Mapping[str, Any] = DEFAULT_PROMPT_TEMPLATE,
    *,
    max_sequence_length: int = 256,
    num_videos_per_prompt: int = 1,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds, prompt_attention_mask) as diffusers'
    ``HunyuanVideoPipeline.encode_prompt`` returns them (which feeds CLIP the same prompts)."""
    embeds, mask = llama_prompt_embeds(
        llama_tokenizer, llama, prompts, template,
        max_sequence_length=max_sequence_length, num_videos_per_prompt=num_videos_per_prompt,
        device=device, dtype=dtype,
    )  # fmt: skip
    pooled = clip_pooled_embeds(
        clip_tokenizer, clip, prompts, num_videos_per_prompt=num_videos_per_prompt, device=device
    )
    return embeds, pooled, mask
