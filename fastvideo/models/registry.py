"""Which pipeline runs a checkpoint, and its best defaults. Model families find themselves.

A family is one folder: ``fastvideo/models/<family>/registration.py`` calls
``register_family`` once with everything the engine needs to know about it (the diffusers
``_class_name`` values it serves, its pipeline class, how to read its ``ModelSpec``, its
variants with their Hugging Face ids and defaults, its demo models). Discovery imports the
registration module of every package under ``fastvideo/models``, of every package in the
folders listed in ``FASTVIDEO_FAMILY_PATH``, and of the ``fastvideo.families`` entry
points of installed packages. Nothing outside a family's folder names its classes.

This module never imports torch: the driver uses it to validate requests cheaply.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from fastvideo import envs
from fastvideo.logger import init_logger
from fastvideo.wire.spec import ModelSpec

logger = init_logger(__name__)

ENTRY_POINT_GROUP = "fastvideo.families"


@dataclass(frozen=True)
class ModelVariant:
    """One published model (e.g. Wan2.1-T2V-1.3B) and its defaults.

    ``build`` writes a checkpoint of this variant into a folder (the built-in demo models,
    which are generated locally instead of downloaded).
    """

    name: str
    hf_ids: tuple[str, ...]
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    pipeline_defaults: dict[str, Any] = field(default_factory=dict)
    # Recognises a local checkpoint of this variant from its transformer config.
    matches: Callable[[dict[str, Any]], bool] = lambda cfg: False
    build: Callable[[Path], Path] | None = None
    build_version: str = "1"  # bump when ``build`` writes a different checkpoint
    default_demo: bool = False  # the demo model the README and CLI point to


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
        """The variant of a local checkpoint: named in model_index.json (our demo models do
        this), else recognised from its transformer config."""
        named = read_json(model_dir / "model_index.json").get("_fastvideo_variant")
        for variant in self.variants:
            if variant.name == named:
                return variant
        transformer = model_dir / "transformer" / "config.json"
        cfg = read_json(transformer) if transformer.is_file() else {}
        return next((v for v in self.variants if v.matches(cfg)), self.fallback)

    def pipeline_class(self) -> type:
        module, _, name = self.pipeline.partition(":")
        return getattr(importlib.import_module(module), name)


_FAMILIES: dict[str, ModelFamily] = {}
_discovered = False


def register_family(family: ModelFamily) -> None:
    """Serve ``family``'s ``_class_name`` values (a later registration replaces one)."""
    for class_name in family.class_names:
        _FAMILIES[class_name] = family


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import fastvideo.models as builtin

    for root in builtin.__path__:
        for sub in sorted(Path(root).iterdir()):
            if (sub / "__init__.py").is_file() and (sub / "registration.py").is_file():
                importlib.import_module(f"fastvideo.models.{sub.name}.registration")
    for folder in envs.family_paths():
        _discover_folder(Path(folder))
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        importlib.import_module(entry.value)


def _discover_folder(folder: Path) -> None:
    """Import ``<pkg>.registration`` for every package in ``folder`` (put on sys.path)."""
    if not folder.is_dir():
        logger.warning("FASTVIDEO_FAMILY_PATH entry %s is not a folder; skipped", folder)
        return
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    for sub in sorted(folder.iterdir()):
        if (sub / "__init__.py").is_file() and (sub / "registration.py").is_file():
            importlib.import_module(f"{sub.name}.registration")


def families() -> list[ModelFamily]:
    _discover()
    return list({id(f): f for f in _FAMILIES.values()}.values())


def find_hf_id(model_id: str) -> tuple[ModelFamily, ModelVariant] | None:
    """The family and variant registered for a Hugging Face id (case-insensitive)."""
    wanted = model_id.strip().lower()
    for family in families():
        for variant in family.variants:
            if wanted in (i.lower() for i in variant.hf_ids):
                return family, variant
    return None


def default_demo() -> ModelVariant:
    """The built-in demo model that runs offline on a CPU (the README's and CLI's)."""
    for family in families():
        for variant in family.variants:
            if variant.default_demo and variant.hf_ids and variant.build is not None:
                return variant
    raise LookupError("no registered family provides a default demo model")


def default_demo_id() -> str:
    return default_demo().hf_ids[0]


def family_for_dir(model_dir: Path) -> ModelFamily:
    """The family serving a diffusers-layout folder, from its model_index.json."""
    index = read_json(model_dir / "model_index.json")
    class_name = index.get("_class_name")
    _discover()
    if class_name not in _FAMILIES:
        supported = ", ".join(sorted(_FAMILIES))
        raise ValueError(
            f"{model_dir / 'model_index.json'}: pipeline _class_name {class_name!r} is not "
            f"supported; supported: {supported}"
        )
    return _FAMILIES[class_name]


def model_defaults(model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(sampling defaults, pipeline defaults) of ``model``.

    A registered Hugging Face id answers without any download; any other name is resolved
    to a folder and recognised from its files.
    """
    known = find_hf_id(model) if isinstance(model, str) else None
    if known is not None:
        variant = known[1]
    else:
        from fastvideo.models.hub import resolve_model_path

        path = resolve_model_path(model)
        variant = family_for_dir(path).variant_for(path)
    return dict(variant.sampling_defaults), dict(variant.pipeline_defaults)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a clear error naming the file when it is missing, not
    JSON, or not an object."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(data).__name__}")
    return data


def config_int(path: Path, cfg: dict[str, Any], name: str, default: int, minimum: int = 1) -> int:
    """An integer config field, refusing floats like 6.5 and values below ``minimum``."""
    value = cfg.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{path}: {name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{path}: {name} must be >= {minimum}, got {value}")
    return value
