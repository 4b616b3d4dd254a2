"""Text encoders from transformers (UMT5 for Wan), loaded through our own loader, and the
prompt encoding the Wan pipeline uses (cleaning, padding to a fixed length, zeroing the
states past each prompt's end).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import torch
import torch.nn as nn

from fastvideo.logger import init_logger
from fastvideo.models import t5_tokenizer
from fastvideo.models.loader import fill_meta_buffers, load_checkpoint, meta_module
from fastvideo.models.registry import read_json

logger = init_logger(__name__)


def load_text_encoder(folder: Path, class_name: str, dtype: torch.dtype, device: torch.device):
    """Build the encoder on meta and fill it from ``folder``: UMT5 encoders with our own
    module (``fastvideo.models.umt5``: no transformers modeling import, the slowest part
    of a worker's start-up), every other class with transformers'."""
    if class_name == "UMT5EncoderModel":
        from fastvideo.models import umt5

        cfg = read_json(folder / "config.json")
        why = umt5.supports(cfg)
        if why is None:
            config = umt5.UMT5Config.from_dict(cfg)
            return _fill(folder, meta_module(lambda: umt5.UMT5Encoder(config)), dtype, device)
        logger.info("%s: UMT5 config with %s: transformers' encoder", folder, why)
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise ValueError(f"{folder}: transformers has no text encoder class {class_name!r}")
    config = transformers.AutoConfig.from_pretrained(str(folder))
    model = _fill(folder, meta_module(lambda: cls(config)), dtype, device)
    return fill_meta_buffers(model, lambda: cls(config))


def _fill(folder: Path, model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:  # transformers keeps these in fp32 only for fp16
        keep_fp32 |= set(getattr(model, "_keep_in_fp32_modules", None) or [])

    def dtype_for(name: str) -> torch.dtype:
        return torch.float32 if any(f".{m}." in f".{name}" for m in keep_fp32) else dtype

    return load_checkpoint(model, folder, device, dtype_for, tied=_tied_keys(model))


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """{target: source} of tied embeddings (transformers 5 uses a dict, 4.x a list)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(tied, dict):
        return dict(tied)
    source = next(
        n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight
    )
    return {t: source for t in tied if t != source}


def load_tokenizer(folder: Path):
    """``AutoTokenizer.from_pretrained(folder)``'s tokenizer: T5's built by
    ``t5_tokenizer`` (the same ids, without importing transformers), the others from the
    class its ``tokenizer_config.json`` names (its fast variant first, as AutoTokenizer
    picks) without importing transformers' auto classes: on some installs they import its
    whole modeling and generation stack (10 s of a worker's start-up measured on the H200
    machine)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"missing tokenizer folder {folder}")
    config = t5_tokenizer.tokenizer_config(folder)
    if t5_tokenizer.builds_t5(folder, config):  # Wan's UMT5 tokenizer: no transformers import
        return t5_tokenizer.T5UnigramTokenizer.from_folder(folder, config)
    import transformers

    name = config.get("tokenizer_class")
    if isinstance(name, str) and name.isidentifier():
        base = name.removesuffix("Fast")
        cls = getattr(transformers, f"{base}Fast", None) or getattr(transformers, base, None)
        if cls is not None:
            return cls.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def clean_prompt(text: str) -> str:
    """Unescape HTML entities and collapse white space, as the reference pipeline does
    (ftfy's mojibake repair is applied too when ftfy happens to be installed)."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_prompts(
    tokenizer, encoder: nn.Module, prompts: list[str], max_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """Prompts -> [B, max_length, D] encoder states, zero past each prompt's last token."""
    device = next(encoder.parameters()).device
    texts = [clean_prompt(p) for p in prompts]
    if isinstance(tokenizer, t5_tokenizer.T5UnigramTokenizer):
        inputs = tokenizer(texts, max_length)
    else:
        inputs = tokenizer(
            texts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    states = encoder(ids, mask).last_hidden_state.to(dtype)
    keep = torch.arange(max_length, device=device)[None, :] < mask.gt(0).sum(dim=1)[:, None]
    return states.masked_fill(~keep[..., None], 0.0)


def text_encoder_class(model_dir: Path) -> str:
    """The transformers class named for ``text_encoder`` in model_index.json."""
    entry = read_json(model_dir / "model_index.json").get("text_encoder")
    if not entry or len(entry) != 2:
        raise ValueError(f"{model_dir / 'model_index.json'} names no text_encoder component")
    return entry[1]
