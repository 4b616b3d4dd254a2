"""Writes checkpoints in the diffusers folder layout: the built-in demo models, the
benchmarks' full-size random checkpoints and the tests' tiny ones all go through here, so
what they write is what our loader reads from a downloaded model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["save_module", "write_json", "write_pipeline"]


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented UTF-8 JSON at ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_module(
    module: nn.Module,
    folder: Path,
    class_name: str,
    config: dict,
    diffusers_version: str = "0.33.0",
    dtype: torch.dtype | None = None,
) -> None:
    """One of our modules as a diffusers component: ``diffusion_pytorch_model.safetensors``
    (in ``dtype`` when given) and a ``config.json`` naming the diffusers class it stands
    for."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to(device="cpu", dtype=dtype or v.dtype).contiguous().clone()
        for k, v in module.state_dict().items()
    }
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    meta = {"_class_name": class_name, "_diffusers_version": diffusers_version}
    write_json(folder / "config.json", {**meta, **config})


def write_pipeline(
    folder: Path,
    seed: int,
    components: Callable[[Path], None],
    scheduler: dict,
    model_index: dict,
) -> Path:
    """A whole pipeline folder: ``components(folder)`` writes the weights under a fixed
    ``seed`` (the caller's RNG state is left as it was), then the scheduler config and
    ``model_index.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components(folder)
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    write_json(folder / "model_index.json", model_index)
    return folder
