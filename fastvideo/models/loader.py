"""Load safetensors checkpoints straight into modules built on the meta device.

No weight is initialised twice: the module is created on ``meta`` (shapes only), every
tensor is read from safetensors directly onto the target device, cast once to its target
dtype, and assigned. Missing files, truncated files, missing or unexpected keys and shape
mismatches raise ``CheckpointError`` naming the file and the keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from fastvideo.logger import init_logger

logger = init_logger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(RuntimeError):
    """A component's weights are missing, truncated or do not fit its architecture."""


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it.

    Uses ``*.safetensors.index.json`` when present (sharded checkpoints), else the single
    ``*.safetensors`` file of the folder.
    """
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors file in {folder}")
    plain = [f for f in files if f.name.count(".") == 1]  # not a variant like x.fp16.safetensors
    if len(files) > 1 and len(plain) == 1:
        files = plain
    if len(files) > 1:
        raise CheckpointError(
            f"{folder} holds several safetensors files ({', '.join(f.name for f in files)}) "
            f"but no *.safetensors.index.json saying which tensor is where"
        )
    keys = _file_keys(files[0])
    return dict.fromkeys(keys, files[0])


def _file_keys(path: Path) -> list[str]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"cannot read {path} (truncated or not safetensors): {e}") from None


def _describe(keys: set[str], limit: int = 8) -> str:
    shown = sorted(keys)[:limit]
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(shown) + more


def load_checkpoint(
    module: nn.Module,
    folder: Path,
    device: torch.device,
    dtype_for: Callable[[str], torch.dtype],
    *,
    tied: dict[str, str] | None = None,
    ignore_unexpected: tuple[str, ...] = (),
) -> nn.Module:
    """Fill a meta-device ``module`` from the safetensors of ``folder``.

    Args:
        dtype_for: target dtype of each parameter, by name.
        tied: parameters that share another one's tensor (``{target: source}``); targets
            may be absent from the checkpoint.
        ignore_unexpected: key substrings allowed in the file but unused by the module.
    """
    tied = tied or {}
    expected = dict(module.state_dict(keep_vars=True))
    where = checkpoint_files(folder)
    needed = set(expected) - set(tied)
    missing = needed - set(where)
    unexpected = {
        k for k in set(where) - set(expected) if not any(p in k for p in ignore_unexpected)
    }
    if missing or unexpected:
        files = ", ".join(sorted({p.name for p in where.values()}))
        parts = [f"missing keys: {_describe(missing)}"] if missing else []
        parts += [f"unexpected keys: {_describe(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{folder} ({files}) does not match the model: " + "; ".join(parts))
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for key in sorted(needed | (set(tied) & set(where))):
        by_file.setdefault(where[key], []).append(key)
    for path, keys in by_file.items():
        state.update(_read_file(path, keys, expected, device, dtype_for))
    for target, source in tied.items():
        state.setdefault(target, state[source])
    module.load_state_dict(state, strict=True, assign=True)
    _retie(module, tied)
    module.eval().requires_grad_(False)
    return module


def _read_file(
    path: Path,
    keys: list[str],
    expected: dict[str, torch.Tensor],
    device: torch.device,
    dtype_for: Callable[[str], torch.dtype],
) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in keys:
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[key].shape):
                    raise CheckpointError(
                        f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, the model "
                        f"expects {tuple(expected[key].shape)}"
                    )
                out[key] = tensor.to(dtype_for(key))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read {path} (truncated or corrupt?): {e}") from None
    return out


def _retie(module: nn.Module, tied: dict[str, str]) -> None:
    """Make tied targets the *same* Parameter object as their source again."""
    for target, source in tied.items():
        src = module.get_parameter(source)
        parent_name, _, attr = target.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, src)


def meta_module(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build ``factory()`` on the meta device: shapes only, no memory, no init."""
    with torch.device("meta"):
        return factory()
