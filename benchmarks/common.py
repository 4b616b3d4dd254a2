"""Shared benchmark helpers: a random Wan2.1 checkpoint written in the diffusers layout by
our own classes, timing with peak memory, the environment record and JSON writing.

Speed does not depend on weight values, so random weights give real timings; anything
that does depend on them (cache skip counts, quality) is flagged where it is reported.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.provenance import git_state, gpu_kind, gpu_names

GIB = 2**30

WAN_1_3B = {
    "patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128,
    "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960,
    "num_layers": 30, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
    "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}  # fmt: skip
WAN_14B = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
# CPU smoke runs: the same code path at toy sizes (text width 32, tiny VAE).
WAN_TINY = {**WAN_1_3B, "num_attention_heads": 2, "attention_head_dim": 16, "text_dim": 32,
            "freq_dim": 32, "ffn_dim": 64, "num_layers": 2}  # fmt: skip
ARCHS = {"1.3B": WAN_1_3B, "14B": WAN_14B, "tiny": WAN_TINY}
TINY_VAE = {
    "base_dim": 8, "z_dim": 16, "dim_mult": [1, 1, 2, 2], "num_res_blocks": 1,
    "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0,
}  # fmt: skip
WEIGHTS_NOTE = (
    "seeded random weights: bf16 DiT, fp32 VAE, a 1-layer UMT5 of the real width (its "
    "text-encoding time is not UMT5-XXL's); speed does not depend on weight values"
)


def weights_note(model: Path | None) -> str:
    """WEIGHTS_NOTE, or for a checkpoint ``benchmarks.load.build`` wrote, its own sizes."""
    built = Path(model) / "BUILT" if model else None
    if built is None or not built.is_file():
        return WEIGHTS_NOTE
    layers = json.loads(built.read_text()).get("te_layers")
    full = " (the full UMT5-XXL)" if layers == 24 else ""
    return (f"seeded random weights: bf16 DiT, fp32 VAE, a {layers}-layer UMT5-XXL{full}; "
            "speed does not depend on weight values")  # fmt: skip


def write_random_wan(folder: Path, arch: str = "1.3B", seed: int = 0, device: str = "cuda") -> Path:
    """Wan2.1 T2V checkpoint with seeded random weights (bf16 DiT, fp32 VAE) at ``folder``.

    ``arch``: a key of ``ARCHS``. The text encoder is a 1-layer UMT5 of the DiT's text
    width, so the DiT sees real shapes; its own speed is therefore NOT the real UMT5-XXL's.
    The "tiny" arch also gets a tiny VAE (CPU smoke runs). An existing checkpoint is kept.
    """
    from transformers import UMT5Config, UMT5EncoderModel

    from fastvideo.models.checkpoint_writer import save_module, write_json
    from fastvideo.models.wan.demo import (
        WAN_SCHEDULER,
        _write_tokenizer,
        random_transformer,
        wan_model_index,
    )
    from fastvideo.models.wan.vae import WanVAE, WanVAEConfig

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(seed)
    cfg = ARCHS[arch]
    vae_cfg = TINY_VAE if arch == "tiny" else {}
    with torch.device(device):
        dit = random_transformer(cfg)
        vae = WanVAE(WanVAEConfig.from_dict(vae_cfg))
    save_module(dit, folder / "transformer", "WanTransformer3DModel", cfg, dtype=torch.bfloat16)
    save_module(vae, folder / "vae", "AutoencoderKLWan", vae_cfg, dtype=torch.float32)
    del dit, vae
    tokenizer = _write_tokenizer(folder / "tokenizer")
    width = cfg["text_dim"]
    te = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=64 if width >= 1024 else 8,
        d_ff=1024 if width >= 1024 else 64, num_layers=1, num_heads=64 if width >= 1024 else 4,
    ))  # fmt: skip
    te.to(torch.bfloat16).save_pretrained(str(folder / "text_encoder"))
    write_json(folder / "scheduler" / "scheduler_config.json", WAN_SCHEDULER)
    write_json(folder / "model_index.json", wan_model_index())
    free_memory()
    return folder


# --- environment and results -------------------------------------------------------------
def environment() -> dict[str, Any]:
    """Where and when a result was measured: date, command, versions, GPUs, commit, dirty."""
    gpus = gpu_names()
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": gpus,
        "gpu": gpus[0] if gpus else None,
        "gpu_kind": gpu_kind(gpus),
        **git_state(),
    }
    return info


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, non-finite floats as strings, paths as strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_result(path: Path | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON (atomically: a reader never sees half a file)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(payload), indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}", flush=True)


def args_record(args: Any) -> dict[str, str]:
    return {k: str(v) for k, v in vars(args).items()}


# --- timing ------------------------------------------------------------------------------
def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any], warmup: int, reps: int, device: torch.device
) -> dict[str, float | None]:
    """Median milliseconds of ``fn`` after ``warmup`` calls, and on CUDA the peak memory:
    ``peak_gib`` above what was allocated before the timed calls (activations) and
    ``peak_total_gib`` (everything, weights included). None on CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    cuda = device.type == "cuda"
    if cuda:
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    out: dict[str, float | None] = {"ms": statistics.median(times), "peak_gib": None,
                                    "peak_total_gib": None}  # fmt: skip
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        out["peak_gib"], out["peak_total_gib"] = (peak - base) / GIB, peak / GIB
    return out


def timed_first_call(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(result, seconds) of one call, synchronised (load + first call, compile)."""
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def psnr(a: Any, b: Any) -> float:
    """PSNR in dB of two uint8 arrays of the same shape (inf when equal)."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def default_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


if __name__ == "__main__":
    # python -m benchmarks.common FOLDER [ARCH] [DEVICE]: write the random checkpoint in its
    # own process (so a benchmark driver's GPU memory starts clean).
    arch = sys.argv[2] if len(sys.argv) > 2 else "1.3B"
    device = sys.argv[3] if len(sys.argv) > 3 else ("cuda" if torch.cuda.is_available() else "cpu")
    target = write_random_wan(Path(sys.argv[1]), arch, device=device)
    print(f"random checkpoint at {target}")
