"""Shared benchmark helpers: a random full-size Wan2.1 checkpoint written in the diffusers
layout by our own classes, device facts, and the JSON result record.

Speed does not depend on weight values, so random weights give real timings; anything
that does depend on them (cache skip counts, quality) is flagged where it is reported.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

WAN_1_3B = {
    "patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128,
    "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960,
    "num_layers": 30, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
    "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}  # fmt: skip
WAN_14B = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
ARCHS = {"1.3B": WAN_1_3B, "14B": WAN_14B}


def write_random_wan(folder: Path, arch: str = "1.3B", seed: int = 0, device: str = "cuda") -> Path:
    """Full-size Wan2.1 T2V checkpoint with seeded random weights (bf16 DiT, fp32 VAE).

    The text encoder is a 1-layer UMT5 with the real width (4096) so the DiT sees real
    shapes; its own speed is therefore NOT the real UMT5-XXL's.
    """
    from safetensors.torch import save_file
    from transformers import UMT5Config, UMT5EncoderModel

    from fastvideo.models.wan.demo import (
        WAN_SCHEDULER,
        _write_json,
        _write_tokenizer,
        wan_model_index,
    )
    from fastvideo.models.wan.transformer import WanTransformer3D, WanTransformerConfig
    from fastvideo.models.wan.vae import WanVAE, WanVAEConfig

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(seed)
    cfg = ARCHS[arch]
    with torch.device(device):
        dit = WanTransformer3D(WanTransformerConfig.from_dict(cfg))
        for name, p in dit.named_parameters():
            if name.endswith("scale_shift_table"):
                p.data.normal_().div_(dit.config.inner_dim**0.5)
        vae = WanVAE(WanVAEConfig())
    for sub, module, dtype, cls, conf in (
        ("transformer", dit, torch.bfloat16, "WanTransformer3DModel", cfg),
        ("vae", vae, torch.float32, "AutoencoderKLWan", {}),
    ):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(dtype).cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(folder / sub / "diffusion_pytorch_model.safetensors"))
        _write_json(folder / sub / "config.json", {"_class_name": cls, **conf})
        del state
    del dit, vae
    tokenizer = _write_tokenizer(folder / "tokenizer")
    te = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=1024, num_layers=1, num_heads=64,
    ))  # fmt: skip
    te.to(torch.bfloat16).save_pretrained(str(folder / "text_encoder"))
    _write_json(folder / "scheduler" / "scheduler_config.json", WAN_SCHEDULER)
    _write_json(folder / "model_index.json", wan_model_index())
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return folder


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    info.update(_commit())
    gpus = _gpu_names()
    if gpus:
        info["gpus"], info["gpu"] = gpus, gpus[0]
    return info


def _commit() -> dict[str, Any]:
    """The commit measured and whether the tree was dirty: FASTVIDEO_COMMIT /
    FASTVIDEO_DIRTY when set (a copied tree's own git state can be another commit's),
    else git."""
    import os
    import subprocess

    if os.environ.get("FASTVIDEO_COMMIT"):
        return {
            "commit": os.environ["FASTVIDEO_COMMIT"],
            "dirty": os.environ.get("FASTVIDEO_DIRTY", "unknown"),
        }
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                                    text=True, timeout=10).stdout.strip())  # fmt: skip
        return {"commit": head, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {
            "commit": os.environ.get("FASTVIDEO_COMMIT", "unknown"),
            "dirty": os.environ.get("FASTVIDEO_DIRTY", "unknown"),
        }


def _gpu_names() -> list[str]:
    """GPU names from nvidia-smi, so a benchmark driver never creates a CUDA context."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def write_result(path: Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def measure_cuda(fn, warmup: int, reps: int) -> tuple[float, float]:
    """(median ms of ``fn``, peak GiB above the memory allocated before the timed calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], (torch.cuda.max_memory_allocated() - base) / 2**30


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


if __name__ == "__main__":
    # python -m benchmarks.common FOLDER [ARCH]: write the random checkpoint (own process,
    # so benchmark drivers never initialise CUDA themselves).
    target = write_random_wan(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "1.3B")
    print(f"random checkpoint at {target}")
