"""What the driver knows about a model without loading weights: its folder, family,
variant (defaults) and architecture facts (``ModelSpec``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastvideo.models.hub import resolve_model_path
from fastvideo.models.registry import ModelFamily, ModelVariant, family_for_dir
from fastvideo.wire.spec import ModelSpec


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    family: ModelFamily
    variant: ModelVariant
    spec: ModelSpec


def resolve_model(model: str) -> ModelInfo:
    """Find (downloading if needed) ``model`` and read what the driver needs of it."""
    path = resolve_model_path(model)
    family = family_for_dir(path)
    family.check_components(path)
    return ModelInfo(
        name=model,
        path=path,
        family=family,
        variant=family.variant_for(path),
        spec=family.read_spec(path),
    )
