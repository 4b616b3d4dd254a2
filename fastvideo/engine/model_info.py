"""What the driver knows about a model without loading weights: its folder, family,
variant (defaults) and architecture facts (``ModelSpec``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastvideo.models.hub import resolve_model_path
from fastvideo.models.registry import (
    ModelFamily,
    ModelSpec,
    ModelVariant,
    family_for_dir,
    find_hf_id,
)


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


def variant_defaults(model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(sampling defaults, pipeline defaults) of ``model``.

    A registered Hugging Face id answers without any download; any other name is resolved
    to a folder and recognised from its files.
    """
    known = find_hf_id(model) if isinstance(model, str) else None
    if known is not None:
        variant = known[1]
    else:
        variant = resolve_model(model).variant
    return dict(variant.sampling_defaults), dict(variant.pipeline_defaults)
