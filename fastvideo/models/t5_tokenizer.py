"""The T5/UMT5 tokenizer (Wan's) built with the ``tokenizers`` library, without transformers.

Importing transformers' tokenizer classes costs a worker about two seconds of start-up, on
the critical path of ``from_pretrained`` (it holds the interpreter while the weights are
being read). For the checkpoints whose ``tokenizer_config.json`` names ``T5Tokenizer`` with a
Unigram ``tokenizer.json`` this module builds the tokenizer that transformers 5's
``T5Tokenizer.from_pretrained`` builds from the same files:

* the Unigram model (unk id 2, no byte fallback) and added tokens of ``tokenizer.json``;
* the normaliser: the SentencePiece ``Precompiled`` charsmap found in the file's normaliser
  (alone or inside a ``Sequence``), or none; transformers 5 keeps only that part;
* the pre-tokeniser: whitespace split, then ``Metaspace("▁", prepend_scheme="always")``;
* the post-processor: ``$A </s>``;
* padding and truncation per call, on the side ``tokenizer_config.json`` names (right by
  default), with the pad token it names.

transformers 4 builds its T5 tokenizer by other rules (``tokenizer.json`` as written, or a
conversion of ``spiece.model``), so with transformers 4 installed, and for every other
tokenizer class, ``load_tokenizer`` uses transformers' own class.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fastvideo.models.registry import read_json

T5_CLASSES = ("T5Tokenizer", "T5TokenizerFast")


@dataclass
class Tokenized:
    """What ``encode_prompts`` reads: [B, max_length] int64 ids and attention mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class T5UnigramTokenizer:
    """Prompts -> padded, truncated ids as transformers 5's ``T5Tokenizer`` gives them."""

    def __init__(self, backend: Any, pad_token: str, padding_side: str, truncation_side: str):
        pad_id = backend.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"tokenizer: the pad token {pad_token!r} is not in its vocabulary")
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"tokenizer_config.json: {name} is {side!r}; left or right")
        self.backend = backend
        self.pad_token, self.pad_token_id = pad_token, pad_id
        self.padding_side, self.truncation_side = padding_side, truncation_side

    @classmethod
    def from_folder(cls, folder: Path, config: dict[str, Any] | None = None) -> T5UnigramTokenizer:
        """The tokenizer of ``folder``; ``config``: its tokenizer_config.json, if read."""
        from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors

        config = tokenizer_config(folder) if config is None else config
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        charsmap = _precompiled_charsmap(backend.normalizer)
        backend.normalizer = normalizers.Precompiled(charsmap) if charsmap is not None else None
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            ]
        )
        eos = _token(config.get("eos_token"), "</s>")
        eos_id = backend.token_to_id(eos)
        if eos_id is None:
            raise ValueError(f"{folder}: the eos token {eos!r} is not in its vocabulary")
        backend.post_processor = processors.TemplateProcessing(
            single=["$A", eos], pair=["$A", eos, "$B", eos], special_tokens=[(eos, eos_id)]
        )
        backend.no_padding()
        backend.no_truncation()
        return cls(
            backend,
            _token(config.get("pad_token"), "<pad>"),
            config.get("padding_side", "right"),
            config.get("truncation_side", "right"),
        )

    def __call__(self, texts: list[str], max_length: int) -> Tokenized:
        """Each text with its ``</s>``, cut to ``max_length`` tokens and padded to it."""
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.backend.enable_truncation(max_length, direction=self.truncation_side)
        self.backend.enable_padding(
            direction=self.padding_side,
            pad_id=self.pad_token_id,
            pad_token=self.pad_token,
            length=max_length,
        )
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=True)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return Tokenized(ids.reshape(len(texts), max_length), mask.reshape(len(texts), max_length))


def builds_t5(folder: Path, config: dict[str, Any] | None = None) -> bool:
    """Whether ``T5UnigramTokenizer`` builds this folder's tokenizer as the installed
    transformers would (a T5 class, a Unigram tokenizer.json, transformers 5).
    ``config``: its tokenizer_config.json, if read."""
    config = tokenizer_config(folder) if config is None else config
    if config.get("tokenizer_class") not in T5_CLASSES:
        return False
    if not (folder / "tokenizer.json").is_file() or _transformers_major() < 5:
        return False
    return _unigram_as_transformers_builds_it(folder / "tokenizer.json")


def _transformers_major() -> int:
    try:
        return int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 0


def tokenizer_config(folder: Path) -> dict[str, Any]:
    """The folder's tokenizer_config.json ({} when it has none)."""
    path = folder / "tokenizer_config.json"
    return read_json(path) if path.is_file() else {}


def _token(value: Any, default: str) -> str:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


def _unigram_as_transformers_builds_it(path: Path) -> bool:
    """Whether tokenizer.json holds a Unigram model with unk id 2 and no byte fallback,
    the model transformers 5's T5Tokenizer rebuilds from the file's vocabulary. The keys
    are read around the vocabulary (the UMT5 file is 16 MB, its normaliser's charsmap and
    added tokens under 1 MB before the model): "type" and "unk_id" open the
    model, "byte_fallback" closes the file, in every file tokenizers writes; a full parse
    is the fallback."""
    with path.open("rb") as f:
        head = f.read(1 << 20).decode("utf-8", "ignore")
        f.seek(max(0, path.stat().st_size - 4096))
        tail = f.read().decode("utf-8", "ignore")
    model_key = re.search(r'"model"\s*:\s*\{', head)
    at = model_key.start() if model_key else -1
    found: dict[str, str] | None = {}
    for key, text in (("type", head[at:]), ("unk_id", head[at:]), ("byte_fallback", tail)):
        match = re.search(rf'"{key}"\s*:\s*("[^"]*"|[^,}}\s]+)', text) if at >= 0 else None
        if match is None:
            found = None
            break
        found[key] = match.group(1)
    if found is None or "vocab" not in head[at:]:
        model = json.loads(path.read_text(encoding="utf-8")).get("model") or {}
        found = {k: json.dumps(model.get(k)) for k in ("type", "unk_id", "byte_fallback")}
    return found == {"type": '"Unigram"', "unk_id": "2", "byte_fallback": "false"}


def _precompiled_charsmap(normalizer: Any) -> bytes | None:
    """The SentencePiece charsmap of a loaded normaliser (alone or in a Sequence)."""
    if normalizer is None:
        return None
    state = json.loads(normalizer.__getstate__())
    for part in [state, *state.get("normalizers", [])]:
        if isinstance(part, dict) and part.get("type") == "Precompiled":
            charsmap = part.get("precompiled_charsmap")
            if isinstance(charsmap, str):
                return base64.b64decode(charsmap)
    return None
