"""LoRA adapters merged into a model's weights, several at once, exactly reversible.

    manager = LoraManager(transformer)
    name = manager.load("style.safetensors", scale=0.8)
    manager.set_scale(name, 0.5)
    manager.unload(name)            # the weights are bitwise what they were

Files (safetensors) in the formats in use (the model family maps its original module
names through its DiT's ``lora_aliases``):

- diffusers / PEFT: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` and ``.lora_B.weight``
  (the ``transformer.`` or ``base_model.model.`` prefix is optional), the rank and alpha in
  the file's ``lora_adapter_metadata`` (written by diffusers' ``save_lora_weights``) or in
  an ``adapter_config.json`` beside it (PEFT's ``save_pretrained``); optional ``.alpha``.
- a family's original module names (e.g. ComfyUI / musubi-tuner / DiffSynth files of Wan):
  ``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` (or ``lora_A``/``lora_B``), plus full deltas ``.diff`` (weight) and
  ``.diff_b`` (bias).
- kohya: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.


Merging: ``W = W0 + sum_i scale_i * alpha_i / rank_i * B_i @ A_i`` (alpha/sqrt(rank) for
rsLoRA), computed in fp32 from the untouched ``W0`` and cast once to the weight's dtype.
``W0`` of every touched parameter is kept (on the CPU by default), so any change of the
set of adapters or their scales recomputes from it, and unloading the last adapter of a
parameter restores it bitwise. The caller must not run the module while it changes.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fastvideo.logger import init_logger

logger = init_logger(__name__)

METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry
_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.", "model.diffusion_model.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
# module key + what the tensor is. Adapter-named PEFT keys (".lora_A.default.weight") too.
_SUFFIX = re.compile(
    r"^(?P<module>.+?)\.(?:"
    r"(?P<down>lora_A|lora_down|lora\.down)(?:\.[\w-]+)?\.weight"
    r"|(?P<up>lora_B|lora_up|lora\.up)(?:\.[\w-]+)?\.weight"
    r"|(?P<upbias>lora_B|lora_up)(?:\.[\w-]+)?\.bias"
    r"|(?P<alpha>alpha)"
    r"|(?P<diff>diff)"
    r"|(?P<diffb>diff_b)"
    r"|(?P<unsupported>lora_mid(?:\.[\w-]+)?\.weight|dora_scale|lora_magnitude_vector"
    r"(?:\.[\w-]+)?|hada_\w+|lokr_\w+)"
    r")$"
)
_SHOW = 8  # unmatched keys listed in an error


class LoraError(ValueError):
    """A LoRA file that cannot be read or does not fit the model (names the file)."""


def _aliases(name: str, module: nn.Module) -> set[str]:
    """Every spelling a LoRA file may use for our module/parameter ``name``: ours, the
    model family's original names (a model's ``lora_aliases(name)``, if it has one), each
    with the common prefixes and in kohya's underscore form."""
    names = {name}
    family_names = getattr(module, "lora_aliases", None)
    if family_names is not None:
        names.update(family_names(name))
    out = set(names)
    for n in names:
        out.update(prefix + n for prefix in _PREFIXES)
        out.update(prefix + n.replace(".", "_") for prefix in _KOHYA_PREFIXES)
    return out


@dataclass
class LoraDelta:
    """One parameter's change: ``factor * up @ down`` (LoRA) or ``full`` (a diff)."""

    target: str  # parameter name in the module
    down: torch.Tensor | None = None  # [rank, in]
    up: torch.Tensor | None = None  # [out, rank]
    full: torch.Tensor | None = None
    factor: float = 1.0

    def compute(self, device: torch.device) -> torch.Tensor:
        """The fp32 delta, shaped like the parameter, on ``device``."""
        if self.full is not None:
            return self.full.to(device=device, dtype=torch.float32)
        assert self.up is not None and self.down is not None
        up = self.up.to(device=device, dtype=torch.float32)
        down = self.down.to(device=device, dtype=torch.float32)
        return (up @ down).mul_(self.factor)


@dataclass
class _Module:
    """What one module key of a file holds."""

    down: str | None = None
    up: str | None = None
    up_bias: str | None = None
    alpha: str | None = None
    diff: str | None = None
    diff_b: str | None = None


def _resolve_file(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """(the safetensors file, a PEFT adapter_config.json beside it, if any)."""
    if path.is_dir():
        candidates = [path / "adapter_model.safetensors", path / "pytorch_lora_weights.safetensors"]
        found = [c for c in candidates if c.is_file()] or sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise LoraError(
                f"{path}: a LoRA folder must hold one *.safetensors file, found "
                f"{[f.name for f in found] or 'none'}"
            )
        path = found[0]
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    config_file = path.parent / "adapter_config.json"
    config = None
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            raise LoraError(f"{config_file}: not readable JSON: {e}") from None
    return path, config


def _adapter_config(
    metadata: dict[str, str] | None, beside: dict[str, Any] | None, path: Path
) -> dict[str, Any]:
    """The PEFT LoraConfig fields (r, lora_alpha, alpha_pattern, use_rslora, use_dora)."""
    raw = (metadata or {}).get(METADATA_KEY)
    if raw:
        try:
            packed = json.loads(raw)
        except ValueError as e:
            raise LoraError(f"{path}: bad {METADATA_KEY} metadata: {e}") from None
        # diffusers prefixes each field with the component ("transformer.lora_alpha").
        config = {k.removeprefix("transformer."): v for k, v in packed.items()}
        return config
    return dict(beside or {})


def _pattern_value(patterns: dict[str, Any], module: str) -> Any:
    """PEFT's pattern lookup: a pattern matches a module name ending in it."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def read_lora(path: str | Path, module: nn.Module) -> list[LoraDelta]:
    """Parse a LoRA file against ``module``: one delta per parameter it changes.

    Raises ``LoraError`` naming the file for unreadable files, unknown or unsupported
    keys, incomplete pairs and shape mismatches.
    """
    from safetensors import safe_open

    path, beside = _resolve_file(Path(path).expanduser())
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own types for bad headers
        raise LoraError(f"cannot read LoRA file {path} (not safetensors?): {e}") from None
    if not tensors:
        raise LoraError(f"LoRA file {path} holds no tensors")
    config = _adapter_config(metadata, beside, path)
    if config.get("use_dora"):
        raise LoraError(f"{path}: DoRA adapters (use_dora) are not supported")

    params = dict(module.named_parameters())
    linears = {n for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    with_weight = {n.rpartition(".")[0] for n in params if n.endswith(".weight")}
    with_bias = {n.rpartition(".")[0] for n in params if n.endswith(".bias")}
    bare = {n for n in params if not n.endswith((".weight", ".bias"))}
    lookup: dict[str, str] = {}
    for name in with_weight | bare:
        for alias in _aliases(name, module):
            lookup.setdefault(alias, name)

    modules: dict[str, _Module] = {}
    unmatched: list[str] = []
    unsupported: list[str] = []
    for key in tensors:
        m = _SUFFIX.match(key)
        if m is None:
            unmatched.append(key)
            continue
        if m.group("unsupported"):
            unsupported.append(key)
            continue
        entry = modules.setdefault(m.group("module"), _Module())
        kind = next(k for k in ("down", "up", "upbias", "alpha", "diff", "diffb") if m.group(k))
        attr = {"upbias": "up_bias", "diffb": "diff_b"}.get(kind, kind)
        setattr(entry, attr, key)
    if unsupported:
        raise LoraError(
            f"{path}: unsupported adapter types (LoCon mid, DoRA, LoHa, LoKr): "
            + _listing(unsupported)
        )

    deltas: list[LoraDelta] = []
    problems: list[str] = []
    for key, entry in modules.items():
        target = lookup.get(key)
        if target is None:
            if _all_zero_diffs(entry, tensors):
                logger.debug("%s: %s holds only zero diffs for no parameter; skipped", path, key)
                continue
            unmatched.extend(k for k in vars(entry).values() if k is not None)
            continue
        if (entry.down is None) != (entry.up is None):
            have, lack = ("lora_down/A", "lora_up/B") if entry.up is None else ("up", "down")
            problems.append(f"{key} has {have} but no {lack} weight")
            continue
        try:
            deltas.extend(_deltas(key, target, entry, tensors, params, linears, with_bias, config))
        except LoraError as e:
            problems.append(str(e))
    if unmatched:
        raise LoraError(
            f"{path}: {len(unmatched)} key(s) match no parameter of "
            f"{type(module).__name__}: {_listing(sorted(unmatched))}"
        )
    if problems:
        raise LoraError(f"{path}: " + "; ".join(problems[:_SHOW]))
    if not deltas:
        raise LoraError(f"{path}: no LoRA weights found")
    targets = [d.target for d in deltas]
    if len(set(targets)) != len(targets):
        dupes = sorted({t for t in targets if targets.count(t) > 1})
        raise LoraError(f"{path}: several keys change the same parameter(s): {_listing(dupes)}")
    return deltas


def _deltas(
    key: str,
    target: str,
    entry: _Module,
    tensors: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    linears: set[str],
    with_bias: set[str],
    config: dict[str, Any],
) -> list[LoraDelta]:
    out: list[LoraDelta] = []
    is_bare = target in params  # a parameter itself (scale_shift_table), not a module
    weight_name = target if is_bare else f"{target}.weight"
    if entry.down is not None and entry.up is not None:
        if target not in linears:
            raise LoraError(f"{key}: LoRA factors for {target}, which is not a Linear layer")
        down, up = tensors[entry.down], tensors[entry.up]
        out_f, in_f = params[weight_name].shape
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoraError(
                f"{key}: lora down {tuple(down.shape)} and up {tuple(up.shape)} are not a "
                f"rank-r pair"
            )
        if down.shape[1] != in_f or up.shape[0] != out_f:
            raise LoraError(
                f"{key}: LoRA shapes down {tuple(down.shape)}, up {tuple(up.shape)} do not "
                f"fit {target} (out {out_f}, in {in_f})"
            )
        rank = down.shape[0]
        alpha = _alpha(key, target, entry, tensors, config, rank)
        factor = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        out.append(LoraDelta(weight_name, down=down, up=up, factor=factor))
    if entry.diff is not None:
        out.append(_full(key, weight_name, tensors[entry.diff], params))
    bias = entry.up_bias or entry.diff_b
    if entry.up_bias is not None and entry.diff_b is not None:
        raise LoraError(f"{key} has both lora_B.bias and diff_b")
    if bias is not None:
        if target not in with_bias:
            raise LoraError(f"{key}: a bias delta for {target}, which has no bias")
        out.append(_full(key, f"{target}.bias", tensors[bias], params))
    if not out:
        raise LoraError(f"{key} has only an alpha")
    return out


def _alpha(
    key: str,
    target: str,
    entry: _Module,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    rank: int,
) -> float:
    """alpha: the file's ``.alpha``, else the adapter config (pattern, then global),
    else the rank (a factor of 1, as diffusers assumes)."""
    if entry.alpha is not None:
        value = tensors[entry.alpha]
        if value.numel() != 1:
            raise LoraError(f"{entry.alpha} must be a scalar, got shape {tuple(value.shape)}")
        return float(value.float().item())
    rank_pattern = _pattern_value(config.get("rank_pattern") or {}, target)
    configured_rank = rank_pattern if rank_pattern is not None else config.get("r")
    if configured_rank is not None and int(configured_rank) != rank:
        raise LoraError(f"{key}: rank {rank} in the file, {configured_rank} in its config")
    pattern = _pattern_value(config.get("alpha_pattern") or {}, target)
    if pattern is not None:
        return float(pattern)
    if config.get("lora_alpha") is not None:
        return float(config["lora_alpha"])
    return float(rank)


def _full(key: str, name: str, tensor: torch.Tensor, params: dict[str, torch.Tensor]) -> LoraDelta:
    shape = tuple(params[name].shape)
    if tuple(tensor.shape) != shape:
        if tensor.numel() == math.prod(shape):  # e.g. modulation [1, 6, D] saved as [6, D]
            tensor = tensor.reshape(shape)
        else:
            raise LoraError(f"{key}: delta of shape {tuple(tensor.shape)} for {name} {shape}")
    return LoraDelta(name, full=tensor)


def _all_zero_diffs(entry: _Module, tensors: dict[str, torch.Tensor]) -> bool:
    """Some trainers save zero ``.diff`` tensors for parameterless norms: harmless."""
    keys = [k for k in vars(entry).values() if k is not None]
    has_diffs = entry.diff is not None or entry.diff_b is not None
    only_diffs = has_diffs and entry.down is None and entry.up is None and entry.up_bias is None
    return only_diffs and all(k == entry.alpha or not tensors[k].any() for k in keys)


def _listing(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


@dataclass
class _Loaded:
    path: Path
    scale: float
    deltas: dict[str, LoraDelta]  # by target parameter


class LoraManager:
    """Merges LoRA adapters into ``module``'s weights and takes them out again.

    Args:
        module: the model (e.g. our ``WanTransformer3D``), diffusers parameter names.
        originals_device: where the untouched weights of changed parameters are kept
            ('cpu' by default, to spare accelerator memory; None: beside the weights).
    """

    def __init__(self, module: nn.Module, originals_device: str | torch.device | None = "cpu"):
        self.module = module
        self.originals_device = originals_device
        self._params = dict(module.named_parameters())
        self._originals: dict[str, torch.Tensor] = {}
        self._loras: OrderedDict[str, _Loaded] = OrderedDict()

    def load(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Read ``path``, merge it at ``scale`` and return its name (default: the file
        stem, made unique). Raises ``LoraError`` (nothing is changed) if it does not fit."""
        scale = _check_scale(scale)
        deltas = read_lora(path, self.module)
        if name is None:
            name = base = Path(path).stem
            i = 2
            while name in self._loras:
                name, i = f"{base}-{i}", i + 1
        elif name in self._loras:
            raise ValueError(f"a LoRA named {name!r} is already loaded (unload it first)")
        self._loras[name] = _Loaded(Path(path), scale, {d.target: d for d in deltas})
        self._apply({d.target for d in deltas})
        logger.info("LoRA %s (%s) merged at scale %g: %d tensors", name, path, scale, len(deltas))
        return name

    def set_scale(self, name: str, scale: float) -> None:
        lora = self._get(name)
        lora.scale = _check_scale(scale)
        self._apply(set(lora.deltas))

    def unload(self, name: str) -> None:
        lora = self._get(name)
        del self._loras[name]
        self._apply(set(lora.deltas))

    def unload_all(self) -> None:
        targets = {t for lora in self._loras.values() for t in lora.deltas}
        self._loras.clear()
        self._apply(targets)

    def loaded(self) -> dict[str, float]:
        """name -> scale, in load order."""
        return {name: lora.scale for name, lora in self._loras.items()}

    def _get(self, name: str) -> _Loaded:
        if name not in self._loras:
            raise KeyError(f"no LoRA named {name!r} is loaded (loaded: {list(self._loras)})")
        return self._loras[name]

    @torch.no_grad()
    def _apply(self, targets: set[str]) -> None:
        """Recompute each target from its original and every adapter that changes it."""
        for target in sorted(targets):
            param = self._params[target]
            active = [
                (lo.scale, lo.deltas[target]) for lo in self._loras.values() if target in lo.deltas
            ]
            if not active:
                original = self._originals.pop(target, None)
                if original is not None:
                    param.copy_(original)  # bitwise: the very values that were there
                continue
            if target not in self._originals:
                where = self.originals_device or param.device
                self._originals[target] = param.detach().to(where, copy=True)
            merged = self._originals[target].to(param.device, torch.float32, copy=True)
            for scale, delta in active:
                merged.add_(delta.compute(param.device), alpha=scale)
            param.copy_(merged.to(param.dtype))


def _check_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


def parse_lora_arg(value: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` (the CLI's ``--lora``) -> (path, scale); a path may hold colons."""
    path, sep, scale = value.rpartition(":")
    if sep and path:
        try:
            return path, _check_scale(float(scale))
        except ValueError:
            pass
    return value, 1.0


def load_loras(
    module: nn.Module, specs: list[str], originals_device: str | torch.device | None = "cpu"
) -> LoraManager:
    """A LoraManager with every ``PATH[:SCALE]`` of ``specs`` merged, in order (what a
    worker does after loading the DiT for ``--lora`` flags)."""
    manager = LoraManager(module, originals_device)
    for spec in specs:
        path, scale = parse_lora_arg(spec)
        manager.load(path, scale)
    return manager
