"""What fits, and at what cost: VAE decode tiled vs whole, DiT offload vs resident.

On one GPU, each case in its own process (clean peaks, no allocator state carried over):

* VAE decode of a full-size Wan2.1 VAE (random weights: speed and memory do not depend on
  their values) at 480p and 720p (81 frames), fp32 and bf16, whole and tiled (diffusers'
  default tiles 256/192): median time, peak allocated memory, and the estimate the
  ``vae_tiling='auto'`` rule uses (``WanVAE.decode_memory_bytes``), to calibrate it.
* One Wan2.1-14B DiT forward (= one denoising step without CFG) at 480p x 81 frames with
  the weights resident vs layerwise-offloaded (``LayerwiseOffload``: blocks in pinned host
  memory, the next block copied while the current one computes), under memory budgets set
  with ``torch.cuda.set_per_process_memory_fraction`` (24, 48 and 80 GiB by default): a
  case that does not fit is reported as OOM.

Needs torch, safetensors, psutil and msgspec (``fastvideo.distributed`` imports it; the
lent GPU machines' image has no msgspec: carry its wheel); not diffusers.

    python -m benchmarks.memory_fit --out benchmarks/results/DATE_h200_memory_fit.json
    python -m benchmarks.memory_fit --parts vae --precisions bf16
    python -m benchmarks.memory_fit --parts dit --budgets 24,80 --reps 2
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import WAN_14B, environment, measure_cuda, write_result

GIB = 2**30
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}
MARK = "MEMORY_FIT_RESULT "


# --- one case (child process) ------------------------------------------------------------
def _limit(budget_gb: float | None) -> None:
    if budget_gb is None:
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * GIB / total))


def _peak_abs_gib() -> float:
    return torch.cuda.max_memory_allocated() / GIB


@torch.no_grad()
def vae_case(case: dict[str, Any]) -> dict[str, Any]:
    from fastvideo.models.loader import DTYPES
    from fastvideo.models.wan.vae import WanVAE, WanVAEConfig

    height, width = RESOLUTIONS[case["resolution"]]
    dtype = DTYPES[case["precision"]]
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = WanVAE(WanVAEConfig()).to(dtype).eval()
    if case["tiled"]:
        vae.enable_tiling()
    z = torch.randn(1, 16, (case["frames"] - 1) // 4 + 1, height // 8, width // 8, device="cuda")
    z = z.to(dtype)
    out: dict[str, Any] = {"estimate_gib": vae.decode_memory_bytes(tuple(z.shape)) / GIB}
    torch.cuda.reset_peak_memory_stats()
    ms, peak = measure_cuda(lambda: vae.decode(z), warmup=1, reps=case["reps"])
    out.update(ms=ms, peak_above_weights_gib=peak, peak_gib=_peak_abs_gib())
    return out


def _random_dit(offload: bool):
    """Wan2.1-14B with seeded random weights, each made on the GPU and, for offload, moved
    to the host at once (so a budget smaller than the model still builds it)."""
    from fastvideo.layers.offload import LayerwiseOffload
    from fastvideo.models.wan.transformer import (
        FP32_PARAM_PATTERNS,
        WanTransformer3D,
        WanTransformerConfig,
    )

    with torch.device("meta"):
        dit = WanTransformer3D(WanTransformerConfig.from_dict(WAN_14B))
    g = torch.Generator("cuda").manual_seed(0)
    for name, p in dit.named_parameters():
        dtype = torch.float32 if any(s in name for s in FP32_PARAM_PATTERNS) else torch.bfloat16
        t = torch.randn(p.shape, device="cuda", dtype=torch.float32, generator=g)
        t = t.mul_(0.02 if not name.endswith("scale_shift_table") else dit.config.inner_dim**-0.5)
        t = t.to(dtype)
        p.data = t.cpu() if offload and name.startswith("blocks.") else t
    for module in dit.modules():  # rotary tables etc.
        for key, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                raise RuntimeError(f"buffer {key} was left on the meta device")
    dit.eval().requires_grad_(False)
    if offload:
        LayerwiseOffload.apply(dit, torch.device("cuda"))
    return dit


@torch.no_grad()
def dit_case(case: dict[str, Any]) -> dict[str, Any]:
    from fastvideo.kernels_bridge import attention as bridge
    from fastvideo.layers.sequence import TokenGrid

    _limit(case["budget_gb"])
    height, width = RESOLUTIONS[case["resolution"]]
    grid = TokenGrid((case["frames"] - 1) // 4 + 1, height // 16, width // 16)
    start = time.perf_counter()
    dit = _random_dit(case["mode"] == "offload")
    build_s = time.perf_counter() - start
    backend = bridge.resolve_backend("auto", torch.device("cuda"), torch.bfloat16)
    dit.set_attention(backend)
    tokens = torch.randn(1, grid.num_tokens, 64, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([999.0], device="cuda")
    text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    ms, peak = measure_cuda(
        lambda: dit.forward_tokens(tokens, t, text, grid), warmup=1, reps=case["reps"]
    )
    weights = torch.cuda.memory_allocated() / GIB
    return dict(ms=ms, peak_gib=_peak_abs_gib(), weights_on_gpu_gib=weights,
                peak_above_weights_gib=peak, build_s=build_s, attention=backend,
                tokens=grid.num_tokens)  # fmt: skip


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    try:
        result = vae_case(case) if case["kind"] == "vae" else dit_case(case)
        result["status"] = "ok"
    except torch.cuda.OutOfMemoryError as e:
        result = {"status": "OOM", "error": str(e).splitlines()[0]}
    gc.collect()
    return {**case, **result}


# --- driver --------------------------------------------------------------------------------
def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    parts = set(args.parts.split(","))
    if "vae" in parts:
        for res in args.resolutions.split(","):
            for prec in args.precisions.split(","):
                for tiled in (False, True):
                    out.append(dict(kind="vae", resolution=res, precision=prec, tiled=tiled,
                                    frames=args.frames, reps=args.reps))  # fmt: skip
    if "dit" in parts:
        for budget in [float(b) for b in args.budgets.split(",")]:
            for mode in ("resident", "offload"):
                out.append(dict(kind="dit", mode=mode, budget_gb=budget, resolution="480p",
                                frames=args.frames, reps=args.reps))  # fmt: skip
    return out


def _in_child(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.memory_fit", "--case", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "status": f"timeout after {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**case, "status": f"failed (exit {proc.returncode})", "error": " | ".join(tail)}


def _row(r: dict[str, Any]) -> str:
    if r["kind"] == "vae":
        what = f"VAE {r['resolution']} {r['precision']:<4} {'tiled' if r['tiled'] else 'whole'}"
    else:
        what = f"DiT 14B {r['mode']:<8} budget {r['budget_gb']:>4.0f} GiB"
    if r["status"] != "ok":
        return f"{what:<36} {r['status']}"
    extra = (
        f"estimate {r['estimate_gib']:6.2f} GiB"
        if r["kind"] == "vae"
        else f"weights on GPU {r['weights_on_gpu_gib']:6.2f} GiB"
    )
    return f"{what:<36} {r['ms']:10.1f} ms  peak {r['peak_gib']:6.2f} GiB  {extra}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default="vae,dit", help="comma list: vae, dit")
    p.add_argument("--resolutions", default="480p,720p")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--budgets", default="24,48,80", help="GiB per DiT case")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--case-timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path)
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case and print it
    args = p.parse_args()
    if args.case:
        print(MARK + json.dumps(run_case(json.loads(args.case))), flush=True)
        return
    results = []
    for case in cases(args):
        result = _in_child(case, args.case_timeout)
        print(_row(result), flush=True)
        results.append(result)
    if args.out:
        write_result(args.out, {**environment(), "benchmark": "memory_fit", "results": results})


if __name__ == "__main__":
    main()
