"""Turn a model name into a local diffusers-layout folder.

A name is, in order: the built-in demo model id, an existing local folder, or a Hugging
Face id (the local hub cache first, then a download unless HF_HUB_OFFLINE is set).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fastvideo import envs
from fastvideo.logger import init_logger
from fastvideo.models.registry import ModelVariant, find_hf_id

logger = init_logger(__name__)

# Files a diffusers pipeline folder needs; everything else in a repo is skipped.
_ALLOW_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*/*.safetensors",
    "*/*.json",
    "*/*.model",
    "*/*.txt",
]


class ModelNotFoundError(ValueError):
    """The model name is neither a local folder nor a reachable Hugging Face id."""


def _is_hub_id(model: str) -> bool:
    """'org/name' with no path-like prefix."""
    return not model.startswith((".", "/", "~")) and model.count("/") == 1


def resolve_model_path(model: str) -> Path:
    """Local folder holding ``model``'s model_index.json; downloads a hub id if needed."""
    if not isinstance(model, str) or not model.strip():
        raise ModelNotFoundError(f"model must be a non-empty string, got {model!r}")
    known = find_hf_id(model)
    if known is not None and known[1].build is not None:
        return ensure_built(known[1])
    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"model folder {local} has no model_index.json (expected the diffusers layout)"
            )
        return local.resolve()
    if not _is_hub_id(model):
        raise ModelNotFoundError(
            f"model {model!r}: no such local folder, and it is not a Hugging Face id "
            f"of the form 'org/name'"
        )
    return _download(model)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=_ALLOW_PATTERNS, local_files_only=True)
        )
    except Exception as cached_error:  # not in the cache: fall through to the network
        logger.debug("%s not in the local hub cache: %s", repo_id, cached_error)
    if envs.hf_offline():
        raise ModelNotFoundError(
            f"model {repo_id!r}: no local folder of that name, not in the Hugging Face cache, "
            f"and HF_HUB_OFFLINE is set so it was not downloaded. Download it where you are "
            f"online (`huggingface-cli download {repo_id}`) or pass a local folder."
        )
    logger.info("downloading %s from the Hugging Face Hub", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_ALLOW_PATTERNS))
    except Exception as e:
        raise ModelNotFoundError(
            f"model {repo_id!r}: no local folder of that name, not in the Hugging Face cache, "
            f"and the download failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
            f"Check the id and your network, or pass a local folder."
        ) from None


def ensure_built(variant: ModelVariant) -> Path:
    """The folder of a locally generated model (a demo model) in the user's cache, written
    on first use; written to a staging folder and renamed, so concurrent first uses never
    see half a model."""
    assert variant.build is not None
    target = envs.cache_dir() / "demo" / f"{variant.name}-v{variant.build_version}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        variant.build(staging)
        os.replace(staging, target)
        logger.info("wrote the demo model %s (random weights) to %s", variant.name, target)
    except OSError:
        if not (target / "model_index.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
