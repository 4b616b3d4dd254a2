"""The one attention function every model layer calls, and the backends behind it.

All tensors use the model layout ``[B, L, H, D]``; backends receive the SDPA layout
``[B, H, L, D]`` as transposed *views* (no copy: cuDNN and flash take strided inputs).

Backends are selected by name (``PipelineConfig.attention_backend`` or the
``FASTVIDEO_ATTENTION_BACKEND`` environment variable). ``"auto"`` picks the fastest
available backend for the device and logs the choice once; a backend asked for by name
that cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastvideo.logger import init_logger

logger = init_logger(__name__)


@dataclass(frozen=True)
class AttentionBackend:
    """A named attention implementation.

    ``forward(q, k, v)`` takes and returns ``[B, H, L, D]`` tensors; ``forward_lse`` also
    returns the log-sum-exp of the attention scores ``[B, H, Lq]`` in fp32 (ring attention
    merges partial results with it).
    """

    name: str
    is_available: Callable[[torch.device, torch.dtype], bool]
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


_BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(backend: AttentionBackend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


# --- torch SDPA --------------------------------------------------------------------------
# On Hopper cuDNN's fused attention is the fastest dense bf16 kernel we measured
# (~590 TFLOP/s vs ~360 for flash at 32k tokens), so it goes first where it can run.
_CUDA_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def _sdpa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.is_cuda:
        with sdpa_kernel(_CUDA_PRIORITY, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def _sdpa_math_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v)


register_backend(AttentionBackend("sdpa", lambda device, dtype: True, _sdpa_forward))
register_backend(AttentionBackend("sdpa_math", lambda device, dtype: True, _sdpa_math_forward))


# --- backend selection -------------------------------------------------------------------
_active: str | None = None
_logged_choice: set[tuple[str, str]] = set()


def resolve_backend(name: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """Turn a requested backend name into the one that will run, or raise.

    ``None``/``"auto"`` picks the first available of the preference list and logs it.
    """
    if name in (None, "", "auto"):
        for candidate in ("sdpa",):
            if _BACKENDS[candidate].is_available(device, dtype):
                chosen = candidate
                break
        key = (chosen, str(device))
        if key not in _logged_choice:
            _logged_choice.add(key)
            logger.info("attention backend: %s (auto) on %s", chosen, device)
        return chosen
    if name not in _BACKENDS:
        raise ValueError(
            f"attention_backend={name!r} is unknown; allowed: 'auto', "
            + ", ".join(repr(n) for n in available_backends())
        )
    if not _BACKENDS[name].is_available(device, dtype):
        raise ValueError(f"attention_backend={name!r} cannot run on {device} with {dtype}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide backend (workers call this once after resolving it)."""
    global _active
    _active = name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention, no mask, default scale 1/sqrt(D).

    Args:
        q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
    Returns:
        [B, Lq, H, D] in q's dtype.
    """
    backend = _BACKENDS[_active or "sdpa"]
    out = backend.forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns the log-sum-exp of each query's scores.

    Args:
        q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
    Returns:
        out [B, Lq, H, D] (q's dtype) and lse [B, H, Lq] (fp32).
    """
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out, lse = _fused_lse(qt, kt, vt)
    return out.transpose(1, 2), lse.float().reshape(q.shape[0], q.shape[2], q.shape[1])


def _fused_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, L, D] attention returning (out, lse) from the fastest kernel that exposes it."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
        return out, lse
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        with contextlib.suppress(RuntimeError):
            res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, False, False
            )
            return res[0], res[1]
        with contextlib.suppress(RuntimeError):
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
            return res[0], res[1]
    if q.is_cuda:
        with contextlib.suppress(RuntimeError):
            res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
            return res[0], res[1]
    return _math_lse(q, k, v)


def _math_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
    return out, lse
