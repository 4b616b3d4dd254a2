"""How each Wan component is read from its folder of a diffusers-layout checkpoint."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch

from fastvideo.models.loader import load_checkpoint, meta_module
from fastvideo.models.registry import read_json
from fastvideo.models.schedulers import build_scheduler
from fastvideo.models.text_encoders import load_text_encoder, load_tokenizer, text_encoder_class
from fastvideo.models.wan.transformer import (
    FP32_PARAM_PATTERNS,
    WanTransformer3D,
    WanTransformerConfig,
)
from fastvideo.models.wan.vae import WanVAE, WanVAEConfig
from fastvideo.pipelines.base import PipelineRuntime


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
    if env.options.get("attention") is not None:
        model.set_attention(*env.options["attention"])
    compile_options = env.options.get("compile")
    if compile_options:
        model.compile_blocks(**compile_options)
    return model


def load_vae(folder: Path, env: PipelineRuntime) -> WanVAE:
    config = WanVAEConfig.from_dict(read_json(folder / "config.json"))
    model = meta_module(lambda: WanVAE(config))
    dtype = env.dtypes["vae"]
    return load_checkpoint(model, folder, env.device, lambda name: dtype)


def load_scheduler(folder: Path, env: PipelineRuntime) -> Callable[[], object]:
    """A factory: every request gets a fresh scheduler (they hold per-request state)."""
    config = read_json(folder / "scheduler_config.json")
    name = env.options.get("scheduler") or config.get("_class_name", "")
    factory = functools.partial(build_scheduler, name, config, env.options.get("flow_shift"))
    factory()  # fail at load time, not on the first request, if the config is unsupported
    return factory


def load_wan_text_encoder(folder: Path, env: PipelineRuntime):
    class_name = text_encoder_class(folder.parent)
    return load_text_encoder(folder, class_name, env.dtypes["text_encoder"], env.device)


def load_wan_tokenizer(folder: Path, env: PipelineRuntime):
    return load_tokenizer(folder)
