"""How each Wan component is read from its folder of a diffusers-layout checkpoint."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from fastvideo.logger import init_logger
from fastvideo.models.loader import load_checkpoint, meta_module
from fastvideo.models.registry import read_json
from fastvideo.models.samplers import build_scheduler
from fastvideo.models.text_encoders import (
    encode_prompts,
    load_text_encoder,
    load_tokenizer,
    text_encoder_class,
)
from fastvideo.models.wan.transformer import (
    FP32_PARAM_PATTERNS,
    WanTransformer3D,
    WanTransformerConfig,
)
from fastvideo.models.wan.vae import WanVAE, WanVAEConfig
from fastvideo.pipelines.base import PipelineRuntime, prepare_dit
from fastvideo.wire.messages import RequestItem

logger = init_logger(__name__)

# Text tokens the Wan DiT attends to (the UMT5 states are padded/cut to this length).
TEXT_MAX_LENGTH = 512


def load_transformer(folder: Path, env: PipelineRuntime) -> WanTransformer3D:
    config = WanTransformerConfig.from_dict(read_json(folder / "config.json"))
    model = meta_module(lambda: WanTransformer3D(config, env.runtime))
    dtype = env.dtypes["transformer"]

    def dtype_for(name: str) -> torch.dtype:
        # The reference keeps the time embedder, modulation tables and norms in fp32.
        return torch.float32 if any(p in name for p in FP32_PARAM_PATTERNS) else dtype

    model = load_checkpoint(
        model, folder, env.device, dtype_for, ignore_unexpected=("norm_added_q",)
    )
    return prepare_dit(model, env.settings)


@dataclass(frozen=True)
class LowNoiseExpert:
    """Wan2.2 A14B's second DiT and where it takes over: timesteps below
    ``boundary_ratio * num_train_timesteps``."""

    model: WanTransformer3D
    boundary_ratio: float


def load_second_expert(folder: Path, env: PipelineRuntime) -> LowNoiseExpert | None:
    """The low-noise expert, loaded and sharded like the first on every rank; None for
    one-expert checkpoints (a transformer_2 without boundary_ratio is unused, as in
    diffusers)."""
    if env.spec.experts < 2:
        return None
    ratio = read_json(folder.parent / "model_index.json")["boundary_ratio"]
    return LowNoiseExpert(load_transformer(folder, env), float(ratio))


def load_vae(folder: Path, env: PipelineRuntime) -> WanVAE:
    config = WanVAEConfig.from_dict(read_json(folder / "config.json"))
    model = meta_module(lambda: WanVAE(config))
    dtype = env.dtypes["vae"]
    return load_checkpoint(model, folder, env.device, lambda name: dtype)


def load_sampler(folder: Path, env: PipelineRuntime) -> Callable[[], object]:
    """A factory: every request gets a fresh sampler (they hold per-request state)."""
    config = read_json(folder / "scheduler_config.json")
    name = env.settings.sampler or config.get("_class_name", "")
    factory = functools.partial(build_scheduler, name, config, env.settings.flow_shift)
    factory()  # fail at load time, not on the first request, if the config is unsupported
    return factory


class WanTextEncoder:
    """prompts -> {"text": [B, L, D] UMT5 states, zero past each prompt's end; L is
    max_sequence_length (512 by default)}."""

    def __init__(self, tokenizer, encoder: torch.nn.Module, dtype: torch.dtype):
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.dtype = dtype

    def __call__(self, prompts: list[str], item: RequestItem) -> dict[str, torch.Tensor]:
        # As diffusers: the DiT attends to max_sequence_length positions (512 by default).
        length = item.max_sequence_length or TEXT_MAX_LENGTH
        states = encode_prompts(self.tokenizer, self.encoder, prompts, length, self.dtype)
        return {"text": states}


def text_output_spec(text_dim: int, dtype: torch.dtype):
    """What WanTextEncoder returns for n prompts (known on every rank)."""

    def spec(n: int, item: RequestItem) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"text": ((n, item.max_sequence_length or TEXT_MAX_LENGTH, text_dim), dtype)}

    return spec


def load_wan_text_encoder(folder: Path, env: PipelineRuntime) -> WanTextEncoder:
    """The tokenizer loads on a thread of its own while the encoder waits for its weights
    (the encoder is our UMT5 module: no other transformers import runs meanwhile)."""
    class_name = text_encoder_class(folder.parent)
    start = time.perf_counter()
    with ThreadPoolExecutor(1, thread_name_prefix="fastvideo-tokenizer") as pool:
        tokenizer = pool.submit(load_tokenizer, folder.parent / "tokenizer")
        encoder = load_text_encoder(folder, class_name, env.dtypes["text_encoder"], env.device)
        encoder_s = time.perf_counter() - start
        text = WanTextEncoder(tokenizer.result(), encoder, env.dtypes["transformer"])
    logger.debug("text encoder %.2fs, tokenizer done after %.2fs", encoder_s,
                 time.perf_counter() - start)  # fmt: skip
    return text
