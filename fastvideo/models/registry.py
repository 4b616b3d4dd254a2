"""Which pipeline runs a checkpoint, and its best defaults.

A model family registers itself once (see ``fastvideo/models/wan/registration.py``):
the diffusers ``_class_name`` values it serves, the pipeline class, how to read the
architecture facts the driver needs (``ModelSpec``), and its variants — each with the
Hugging Face ids it answers to and its default sampling and pipeline settings.

This module never imports torch: the driver uses it to validate requests cheaply.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Modules whose import registers a built-in family.
_BUILTIN_FAMILIES = ("fastvideo.models.wan.registration",)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts the driver needs before any weights are loaded."""

    family: str
    pipeline_class_name: str
    num_heads: int
    in_channels: int
    patch_size: tuple[int, int, int]
    vae_scale_spatial: int
    vae_scale_temporal: int
    max_positions: int
    text_max_length: int = 512

    @property
    def pixel_multiple(self) -> int:
        """Height and width must be multiples of this (VAE stride x patch size)."""
        return self.vae_scale_spatial * max(self.patch_size[1], self.patch_size[2])


@dataclass(frozen=True)
class ModelVariant:
    """One published model (e.g. Wan2.1-T2V-1.3B) and its defaults."""

    name: str
    hf_ids: tuple[str, ...]
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    pipeline_defaults: dict[str, Any] = field(default_factory=dict)
    # Recognises a local checkpoint of this variant from its transformer config.
    matches: Callable[[dict[str, Any]], bool] = lambda cfg: False


@dataclass(frozen=True)
class ModelFamily:
    name: str
    class_names: tuple[str, ...]  # model_index.json `_class_name` values served
    pipeline: str  # "module:Class", imported lazily (only workers need it)
    read_spec: Callable[[Path], ModelSpec]
    variants: tuple[ModelVariant, ...]
    fallback: ModelVariant  # defaults for checkpoints that match no variant
    components: tuple[str, ...] = ()  # component folders a checkpoint must have

    def check_components(self, model_dir: Path) -> None:
        """Fail on the driver, before any worker starts, if a component folder is absent."""
        for name in self.components:
            if not (model_dir / name).is_dir():
                raise FileNotFoundError(
                    f"missing component folder {model_dir / name} (the {self.name} pipeline "
                    f"needs {', '.join(self.components)})"
                )

    def variant_for(self, model_dir: Path) -> ModelVariant:
        """The variant of a local checkpoint: named in model_index.json (our own demo model
        does this), else recognised from its transformer config."""
        named = read_json(model_dir / "model_index.json").get("_fastvideo_variant")
        for variant in self.variants:
            if variant.name == named:
                return variant
        cfg = read_json(model_dir / "transformer" / "config.json")
        return next((v for v in self.variants if v.matches(cfg)), self.fallback)

    def pipeline_class(self) -> type:
        module, _, name = self.pipeline.partition(":")
        return getattr(importlib.import_module(module), name)


_FAMILIES: dict[str, ModelFamily] = {}
_loaded_builtins = False


def register_family(family: ModelFamily) -> None:
    for class_name in family.class_names:
        _FAMILIES[class_name] = family


def _ensure_builtins() -> None:
    global _loaded_builtins
    if not _loaded_builtins:
        _loaded_builtins = True
        for module in _BUILTIN_FAMILIES:
            importlib.import_module(module)


def families() -> list[ModelFamily]:
    _ensure_builtins()
    return list({id(f): f for f in _FAMILIES.values()}.values())


def find_hf_id(model_id: str) -> tuple[ModelFamily, ModelVariant] | None:
    """The family and variant registered for a Hugging Face id (case-insensitive)."""
    wanted = model_id.strip().lower()
    for family in families():
        for variant in family.variants:
            if wanted in (i.lower() for i in variant.hf_ids):
                return family, variant
    return None


def family_for_dir(model_dir: Path) -> ModelFamily:
    """The family serving a diffusers-layout folder, from its model_index.json."""
    index = read_json(model_dir / "model_index.json")
    class_name = index.get("_class_name")
    _ensure_builtins()
    if class_name not in _FAMILIES:
        supported = ", ".join(sorted(_FAMILIES))
        raise ValueError(
            f"{model_dir / 'model_index.json'}: pipeline _class_name {class_name!r} is not "
            f"supported; supported: {supported}"
        )
    return _FAMILIES[class_name]


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
