"""Every environment variable fastvideo reads, in one place.

Each one only sets a default; the same option is reachable from Python through
``PipelineConfig`` or ``SamplingParam``.
"""

from __future__ import annotations

import os
from pathlib import Path


def logging_level() -> str:
    """FASTVIDEO_LOGGING_LEVEL: level of the ``fastvideo`` logger (default INFO)."""
    return os.environ.get("FASTVIDEO_LOGGING_LEVEL", "INFO").upper()


def logging_handler() -> bool:
    """FASTVIDEO_LOGGING_HANDLER: 0 turns off the stderr handler fastvideo uses while the
    application configures no logging (records still propagate to its handlers)."""
    return os.environ.get("FASTVIDEO_LOGGING_HANDLER", "1").lower() not in ("0", "false", "no")


def attention_backend() -> str | None:
    """FASTVIDEO_ATTENTION_BACKEND: default for ``PipelineConfig.attention_backend``."""
    return os.environ.get("FASTVIDEO_ATTENTION_BACKEND") or None


def cache_dir() -> Path:
    """FASTVIDEO_CACHE_DIR: where the built-in demo models and torch.compile's on-disk
    caches (``torch_compile/``) are written.

    Defaults to ``$XDG_CACHE_HOME/fastvideo`` or ``~/.cache/fastvideo``.
    """
    if os.environ.get("FASTVIDEO_CACHE_DIR"):
        return Path(os.environ["FASTVIDEO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastvideo"


def worker_ready_timeout_s() -> float:
    """FASTVIDEO_WORKER_READY_TIMEOUT: seconds to wait for workers to load (default 1200)."""
    return float(os.environ.get("FASTVIDEO_WORKER_READY_TIMEOUT", "1200"))


def hf_offline() -> bool:
    """HF_HUB_OFFLINE (huggingface_hub's own variable): no network look-ups for hub ids."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def ray_address() -> str | None:
    """RAY_ADDRESS (Ray's own variable): the cluster ``executor='ray'`` joins when
    ``PipelineConfig.ray_address`` is not set."""
    return os.environ.get("RAY_ADDRESS") or None


def torch_profile_dir() -> str | None:
    """FASTVIDEO_TORCH_PROFILE_DIR: rank 0 writes a torch.profiler op table per request here."""
    return os.environ.get("FASTVIDEO_TORCH_PROFILE_DIR") or None


def family_paths() -> list[str]:
    """FASTVIDEO_FAMILY_PATH: folders (os.pathsep-separated) whose packages with a
    ``registration.py`` are model families to register, beside the built-in ones."""
    value = os.environ.get("FASTVIDEO_FAMILY_PATH", "")
    return [p for p in value.split(os.pathsep) if p]


def fused_kernels() -> bool:
    """FASTVIDEO_FUSED_KERNELS: 0 runs the DiT blocks' norms, modulation and gating as torch
    ops instead of the fused Triton kernels (``kernels_bridge.fused``; CUDA only)."""
    return os.environ.get("FASTVIDEO_FUSED_KERNELS", "1").lower() not in ("0", "false", "no")


def fused_under_compile() -> bool:
    """FASTVIDEO_FUSED_UNDER_COMPILE: 1 (default) keeps the fused kernels (as opaque ops)
    inside graphs compiled by ``enable_torch_compile``; 0 leaves those regions to Inductor's
    own fusion (474.1 vs 458.4 ms for our kernels per 1.3B 480p forward on an H200). Read
    once, at import of ``kernels_bridge.fused``; off with FASTVIDEO_FUSED_KERNELS=0."""
    if not fused_kernels():
        return False
    return os.environ.get("FASTVIDEO_FUSED_UNDER_COMPILE", "1").lower() not in ("0", "false", "no")


def worker_start() -> str:
    """FASTVIDEO_WORKER_START: how worker processes start: ``auto`` (default: forked from
    the driver where that is safe, see ``fastvideo.executor.forked``; else spawned),
    ``fork`` or ``spawn``."""
    value = os.environ.get("FASTVIDEO_WORKER_START", "auto").strip().lower() or "auto"
    if value not in ("auto", "fork", "spawn"):
        raise ValueError(f"FASTVIDEO_WORKER_START={value!r}: use auto, fork or spawn")
    return value


def worker_plugins() -> list[str]:
    """FASTVIDEO_WORKER_PLUGINS: modules (comma-separated) every worker imports once at
    start-up, before loading; a module's ``register(worker)`` is called if it has one."""
    value = os.environ.get("FASTVIDEO_WORKER_PLUGINS", "")
    return [m.strip() for m in value.split(",") if m.strip()]
