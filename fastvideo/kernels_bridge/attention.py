"""The one attention function every model layer calls, and the backends behind it.

All tensors use the model layout ``[B, L, H, D]``; backends receive the SDPA layout
``[B, H, L, D]`` as transposed *views* (no copy: cuDNN, flash and Sage take strided inputs).

Backends (``available_backends()`` lists what this install has):

- ``sdpa``: torch SDPA with the kernel picked per GPU (cuDNN first on CUDA: the fastest
  dense bf16 kernel measured on Hopper, then flash, memory-efficient, math);
- ``sdpa_cudnn`` / ``sdpa_flash`` / ``sdpa_efficient`` / ``sdpa_math``: one SDPA kernel only;
- ``flash_attn``: the flash-attn package (``pip install flash-attn``), when installed;
- ``sage``: SageAttention (the ``sageattention`` package, extra ``fastvideo[sage]``);
- ``sta``: sliding-tile attention on FlexAttention for video self-attention (window per
  model and resolution, see ``fastvideo.kernels_bridge.sta``); other attention (text
  cross-attention) stays dense.

Selected per model by ``PipelineConfig.attention_backend`` or
``FASTVIDEO_ATTENTION_BACKEND``.
``"auto"`` (the default) takes the first backend of the device's preference list that can
run, and logs which one runs; a backend asked for by name that cannot run is an error
naming why, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastvideo import envs
from fastvideo.kernels_bridge.eager import eager_under_compile
from fastvideo.kernels_bridge.grid import TokenGrid
from fastvideo.kernels_bridge.lazy_import import lazy_package_init
from fastvideo.kernels_bridge.sta import STAConfig, sta_attention, sta_attention_with_lse
from fastvideo.logger import init_logger

logger = init_logger(__name__)

HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionBackend:
    """A named attention implementation.

    ``forward(q, k, v)`` takes and returns ``[B, H, L, D]`` tensors. ``why_unavailable``
    returns ``None`` when the backend can run on (device, dtype), else the reason.
    ``video_only`` backends (STA) need the token grid: calls without one run dense SDPA.
    """

    name: str
    why_unavailable: Callable[[torch.device, torch.dtype], str | None]
    forward: Callable[..., torch.Tensor]
    video_only: bool = False
    # The start-up probe also compares the output with an fp32 reference (for kernels
    # whose packages are young: one that computes something else is passed over).
    checked: bool = False
    # ``forward_lse(q, k, v)`` -> (out, lse [B, H, L] natural-log, fp32), for ring
    # attention's merge; None: SDPA's kernels that expose it (``_fused_lse``).
    forward_lse: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


_BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(backend: AttentionBackend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def _always(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _cuda_half(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return f"it needs a CUDA device (got {device.type})"
    if dtype not in HALF:
        return f"it needs bf16 or fp16 (got {dtype}; set dit_precision='bf16')"
    return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a broken one
        return False


def _needs_package(
    module: str, pip: str, min_capability: tuple[int, int] = (8, 0)
) -> Callable[[torch.device, torch.dtype], str | None]:
    def check(device: torch.device, dtype: torch.dtype) -> str | None:
        if not _installed(module):
            return f"the {module!r} package is not installed (pip install {pip})"
        why = _cuda_half(device, dtype)
        if why is None and torch.cuda.get_device_capability(device) < min_capability:
            major, minor = min_capability
            why = f"it needs compute capability >= {major}.{minor}"
        return why

    return check


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


def _sdpa_only(kernel: SDPBackend) -> Callable[..., torch.Tensor]:
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([kernel]):
            return F.scaled_dot_product_attention(q, k, v)

    return forward


def _flash_attn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    # flash-attn takes [B, L, H, D]: the model's own layout, so transposing back is free.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def fa4_disk_cache() -> None:
    """Keep FlashAttention-4's compiled kernels on disk across processes (its JIT compile
    took 11 s of every worker's start-up on an H200): its own switches, read when
    ``flash_attn.cute`` is imported, defaulted to on and to FASTVIDEO_CACHE_DIR/fa4; values
    the user set are kept."""
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(envs.cache_dir() / "fa4"))


@functools.cache
def _fa4_env() -> None:
    """fa4_disk_cache once per process, not on every attention call."""
    fa4_disk_cache()


_fa4_import_lock = threading.Lock()
# When this process imported FA4 ("start", "end": time.time()), which a worker reports in
# its start-up breakdown (the import is the longest part of a warm start).
fa4_import_times: dict[str, float] = {}


def _fa4_func() -> Callable[..., Any]:
    """``flash_attn.cute.flash_attn_func``, imported after its cache switches are set."""
    if "flash_attn.cute" not in sys.modules:  # the first import: one importer at a time
        with _fa4_import_lock:  # (a preload thread or the caller)
            if "flash_attn.cute" not in sys.modules:
                _first_fa4_import()
    from flash_attn.cute import flash_attn_func

    return flash_attn_func


def _first_fa4_import() -> None:
    """Import ``flash_attn.cute`` (its cache switches set first), timed."""
    _fa4_env()
    fa4_import_times["start"] = time.time()
    if not os.environ.get("CUTE_DSL_PTXAS_PATH"):
        # quack.dsl: the side effect its __init__ exists for (CuTe tensor indexing).
        # With CUTE_DSL_PTXAS_PATH its __init__ must patch first: imported whole.
        with contextlib.suppress(Exception):
            lazy_package_init("quack", eager=("dsl",))
    import flash_attn.cute  # noqa: F401

    fa4_import_times["end"] = time.time()


def _asks_for_fa4(name: str | None) -> bool:
    """A requested backend under which FA4 may run: unset, ``auto`` or ``fa4``."""
    return name in (None, "", "auto", "fa4")


def preload(name: str | None, device: torch.device) -> threading.Thread | None:
    """Import the kernel package ``name`` would use on a thread (FA4's import takes
    seconds), so it overlaps the caller's weight reads; ``resolve_backend`` later finds it
    imported. None when there is nothing to import."""
    if device.type != "cuda" or not _asks_for_fa4(name):
        return None
    if name != "fa4" and "fa4" not in auto_preference(device):
        return None
    if _BACKENDS["fa4"].why_unavailable(device, torch.bfloat16) is not None:
        return None
    return _import_thread()


def preload_before_args(requested: str | None = None) -> threading.Thread | None:
    """In a CUDA worker still waiting for its arguments (a second or so after the fork):
    start FA4's import (seconds: the longest part of a warm start-up) when FA4 is
    installed and the backend asked for (``requested``, the driver's reading of the
    configuration; else FASTVIDEO_ATTENTION_BACKEND) is ``auto`` or ``fa4``. A guess made
    before the arguments: the probe still decides, and an unused import costs only this
    worker's time while it would have waited. Touches no CUDA state."""
    if not _asks_for_fa4(requested or envs.attention_backend()):
        return None
    if not _installed("flash_attn.cute"):
        return None
    return _import_thread()


_import_threads: list[threading.Thread] = []  # the latest preload thread


def _import_thread() -> threading.Thread:
    """A thread running FA4's import: the one already running (a worker's early preload
    when its weight reads start), else a new one."""
    if _import_threads and _import_threads[-1].is_alive():
        return _import_threads[-1]

    def run() -> None:
        try:
            _fa4_func()
        except Exception as e:  # noqa: BLE001 - the probe reports it on the main thread
            logger.debug("FA4 preload failed: %s", e)

    thread = threading.Thread(target=run, name="fastvideo-fa4-import", daemon=True)
    thread.start()
    _import_threads[:] = [thread]
    return thread


def _fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # FlashAttention-4 (CuTe DSL) takes [B, L, H, D] and returns (out, lse) in its 4.0
    # releases; an older build may return the output alone.
    out = _fa4_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


def _fa4_forward_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4 with its log-sum-exp ([B, H, L], natural log, fp32): [B, H, L, D] in and out."""
    # A ring chunk is a slice of the keys: strided in batch, so made dense for the kernel.
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out, lse = _fa4_func()(q, k, v, return_lse=True)
    return out.transpose(1, 2), lse


def _sage_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from sageattention import sageattn

    out = sageattn(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), tensor_layout="NHD",
        is_causal=False,
    )  # fmt: skip
    return out.transpose(1, 2)


def _sta_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: TokenGrid | None = None,
    sta: STAConfig | None = None,
) -> torch.Tensor:
    if grid is None:
        return _sdpa_forward(q, k, v)
    return sta_attention(q, k, v, grid, sta or STAConfig())


register_backend(AttentionBackend("sdpa", _always, _sdpa_forward))
register_backend(AttentionBackend("sdpa_cudnn", _cuda_half, _sdpa_only(SDPBackend.CUDNN_ATTENTION)))
register_backend(AttentionBackend("sdpa_flash", _cuda_half, _sdpa_only(SDPBackend.FLASH_ATTENTION)))
register_backend(
    AttentionBackend("sdpa_efficient", _always, _sdpa_only(SDPBackend.EFFICIENT_ATTENTION))
)
register_backend(AttentionBackend("sdpa_math", _always, _sdpa_only(SDPBackend.MATH)))
register_backend(
    AttentionBackend("flash_attn", _needs_package("flash_attn", "flash-attn"), _flash_attn_forward)
)
register_backend(
    AttentionBackend("sage", _needs_package("sageattention", "sageattention"), _sage_forward)
)
register_backend(
    AttentionBackend(
        "fa4",
        _needs_package("flash_attn.cute", "'fastvideo[fa4]'", min_capability=(9, 0)),
        _fa4_forward,
        checked=True,
        forward_lse=_fa4_forward_lse,
    )
)
register_backend(AttentionBackend("sta", _always, _sta_forward, video_only=True))


def auto_preference(device: torch.device) -> list[str]:
    """Backends ``auto`` tries, fastest first, for this device.

    Hopper and newer: FlashAttention-4 when installed (on an H200 at the Wan 480p shape it
    ran 9.76 ms against cuDNN's 11.65 ms, with the same error vs fp32), then SDPA with
    cuDNN first (the fastest of torch's kernels there). Older GPUs: flash-attn when
    installed, else SDPA (whose own priority falls back per kernel).
    """
    if device.type != "cuda":
        return ["sdpa"]
    major, _ = torch.cuda.get_device_capability(device)
    return ["fa4", "sdpa", "flash_attn"] if major >= 9 else ["flash_attn", "sdpa"]


# --- backend selection -------------------------------------------------------------------
_logged_choice: set[tuple[str, str]] = set()


# A checked backend's probe output may differ from fp32 by this much (relative L2 error;
# bf16 kernels give ~3e-3 on the probe's input).
PROBE_RTOL = 2e-2


def _probe(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the backend once on a small input (head dim 128, as the models use); the error
    text if it fails, or if a ``checked`` backend's output is not attention's."""
    backend = _BACKENDS[name]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 128, generator=gen).to(device, dtype) for _ in range(3))
    try:
        out = backend.forward(q, k, v)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot run here"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if backend.checked:
        ref = _math_lse(q.float(), k.float(), v.float())[0]
        if out.shape != ref.shape:
            return f"its output has shape {tuple(out.shape)}, not {tuple(ref.shape)}"
        err = ((out.float() - ref).norm() / ref.norm()).item()
        if not err < PROBE_RTOL:
            return f"its output differs from fp32 attention (relative error {err:.1e})"
    return None


def resolve_backend(name: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """Turn a requested backend name into the one that will run, or raise ValueError.

    ``None``/``"auto"`` tries the device's preference list, falls back past backends that
    cannot run, and logs the one chosen (and why others were passed over).
    """
    if name in (None, "", "auto"):
        skipped = []
        chosen = "sdpa"
        for candidate in auto_preference(device):
            why = _BACKENDS[candidate].why_unavailable(device, dtype)
            if why is None and candidate != "sdpa":  # SDPA falls back per kernel itself
                why = _probe(candidate, device, dtype)
            if why is None:
                chosen = candidate
                break
            skipped.append(f"{candidate}: {why}")
        key = (chosen, str(device))
        if key not in _logged_choice:
            _logged_choice.add(key)
            note = f" (passed over {'; '.join(skipped)})" if skipped else ""
            logger.info("attention backend: %s (auto) on %s%s", chosen, device, note)
        return chosen
    if name not in _BACKENDS:
        raise ValueError(
            f"attention_backend={name!r} is unknown; allowed: 'auto', "
            + ", ".join(repr(n) for n in available_backends())
        )
    why = _BACKENDS[name].why_unavailable(device, dtype) or _probe(name, device, dtype)
    if why is not None:
        raise ValueError(f"attention_backend={name!r} cannot run on {device} with {dtype}: {why}")
    logger.info("attention backend: %s on %s", name, device)
    return name


def active_backend(name: str | None = None) -> str:
    """The backend a call runs: the model's resolved one, or plain SDPA."""
    return name or "sdpa"


def needs_whole_sequence(name: str | None = None) -> bool:
    """The backend needs every key of the video locally (no ring attention)."""
    return _BACKENDS[active_backend(name)].video_only


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: TokenGrid | None = None,
    backend: str | None = None,
    sta: STAConfig | None = None,
) -> torch.Tensor:
    """Softmax attention, no mask, default scale 1/sqrt(D).

    Under ``torch.compile`` a dense backend is one opaque op of the graph
    (``torch.ops.fastvideo.dense_attention``), so a compiled block is one graph; sparse
    video attention (STA with its grid) stays an eager region (a graph break).

    Args:
        q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
        grid: the video's token grid when this is the video's self-attention over its
            whole sequence (sparse video backends use it; others ignore it).
        backend: a resolved backend name (the model's); None: plain SDPA.
        sta: STA tiles and windows for the ``sta`` backend; None: its defaults.
    Returns:
        [B, Lq, H, D] in q's dtype.
    """
    impl = _BACKENDS[active_backend(backend)]
    if impl.video_only and grid is not None:
        return _video_attention(q, k, v, grid, impl.name, sta)
    # A video-only backend without the grid runs dense SDPA (text cross-attention).
    name = "sdpa" if impl.video_only else impl.name
    if torch.compiler.is_compiling():
        return torch.ops.fastvideo.dense_attention(q, k, v, name)
    return _dense(q, k, v, name)


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str) -> torch.Tensor:
    """A dense backend over [B, L, H, D] tensors: its output as a [B, Lq, H, D] view."""
    out = _BACKENDS[name].forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@torch.library.custom_op("fastvideo::dense_attention", mutates_args=())
def _dense_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str
) -> torch.Tensor:
    """``_dense`` as one op for torch.compile: the kernels stay ours (FA4's CuTe code is not
    traceable), the graph around them unbroken. The output is made dense [B, Lq, H, D],
    the layout the fake below promises the compiler."""
    return _dense(q, k, v, backend).contiguous()


@_dense_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@eager_under_compile
def _video_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: TokenGrid,
    name: str,
    sta: STAConfig | None,
) -> torch.Tensor:
    """A video-only backend (STA) over the whole video's tokens: [B, L, H, D] in and out."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return _BACKENDS[name].forward(qt, kt, vt, grid, sta).transpose(1, 2)


def sta_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: TokenGrid, sta: STAConfig | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-tile attention of the video's queries over all its keys, with the
    log-sum-exp: q [B, Lq, H, D] (Lq >= N), k, v [B, N, H, D] -> out [B, Lq, H, D], lse
    [B, H, Lq] (fp32)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out, lse = sta_attention_with_lse(qt, kt, vt, grid, sta or STAConfig())
    return out.transpose(1, 2), lse


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns the log-sum-exp of each query's scores.

    Args:
        q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
        backend: a resolved backend name (the model's): its own kernel when it returns
            the log-sum-exp (FA4), else SDPA's kernels that do.
    Returns:
        out [B, Lq, H, D] (q's dtype) and lse [B, H, Lq] (fp32).
    """
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    own = _BACKENDS[active_backend(backend)].forward_lse
    out, lse = (own or _fused_lse)(qt, kt, vt)
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
