"""What fits, and at what cost: VAE decode tiled vs whole, DiT offload vs resident, the
text encoder in fp8 vs bf16.

On one GPU, each case in its own process (clean peaks, no allocator state carried over):

* VAE decode of a full-size Wan2.1 VAE (random weights: speed and memory do not depend on
  their values) at 480p and 720p (81 frames), fp32 and bf16, whole and tiled (diffusers'
  default tiles 256/192): median time, peak allocated memory, and the estimate the
  ``vae_tiling='auto'`` rule uses (``WanVAE.decode_memory_bytes``), to calibrate it.
* One Wan2.1-14B DiT forward (= one denoising step without CFG) at 720p x 81 frames by
  default (``--dit-resolution``) with the weights resident vs layerwise-offloaded
  (``LayerwiseOffload``: blocks in pinned host memory, the next block copied while the
  current one computes), under memory budgets set with
  ``torch.cuda.set_per_process_memory_fraction`` (24, 48 and 80 GiB by default): a case
  that does not fit is reported as OOM.
* End to end (``e2e``): a random Wan2.1-T2V-14B checkpoint with a full-size UMT5-XXL
  (written once to ``--e2e-model``, about 40 GB) through ``VideoGenerator`` in this
  process (``executor='inproc'``) with ``device_memory_gb`` at each budget and every
  memory option on ``'auto'``: a 720p x 81-frame video of ``--e2e-steps`` steps, its time
  to ready, mean step, decode, peak memory and the memory plan the engine chose.
* A full-size UMT5-XXL text encoder (random weights) in bf16, then with its linears stored
  in fp8 (``text_encoder_precision="fp8"``): weights on the GPU, the time of one 512-token
  encode, and the fp8 output's relative error against bf16 (random weights: a real
  checkpoint's error can differ).

With ``--device cpu`` (a smoke run of the same code) the models are toy-sized and no
memory is measured. Needs torch, transformers, safetensors, psutil and msgspec
(``fastvideo.distributed`` imports it); not diffusers. The JSON is rewritten after every
case.

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

from benchmarks.common import (
    TINY_VAE,
    WAN_14B,
    WAN_TINY,
    default_device,
    environment,
    measure,
    rel_err,
    write_result,
)

GIB = 2**30
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280), "smoke": (32, 48)}
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                num_heads=64, feed_forward_proj="gated-gelu")  # fmt: skip
UMT5_TINY = {**UMT5_XXL, "vocab_size": 512, "d_model": 64, "d_kv": 8, "d_ff": 128,
             "num_layers": 2, "num_heads": 4}  # fmt: skip
MARK = "MEMORY_FIT_RESULT "


# --- one case (child process) ------------------------------------------------------------
def _limit(budget_gb: float | None) -> None:
    if budget_gb is None:
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * GIB / total))


def _cuda(case: dict[str, Any]) -> bool:
    return case["device"] == "cuda"


def _peak_abs_gib(case: dict[str, Any]) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if _cuda(case) else None


def _allocated_gib(case: dict[str, Any]) -> float | None:
    return torch.cuda.memory_allocated() / GIB if _cuda(case) else None


def _timed(case: dict[str, Any], fn, warmup: int) -> tuple[float, float | None]:
    """(median ms, peak GiB above what was allocated before the timed calls)."""
    if _cuda(case):
        torch.cuda.reset_peak_memory_stats()
    out = measure(fn, warmup, case["reps"], torch.device(case["device"]))
    return out["ms"], out["peak_gib"]


@torch.no_grad()
def vae_case(case: dict[str, Any]) -> dict[str, Any]:
    from fastvideo.layers.vae_tiling import TileSizes
    from fastvideo.models.loader import DTYPES
    from fastvideo.models.wan.vae import WanVAE, WanVAEConfig

    height, width = RESOLUTIONS[case["resolution"]]
    dtype = DTYPES[case["precision"]]
    dev = case["device"]
    torch.manual_seed(0)
    with torch.device(dev):
        vae = WanVAE(WanVAEConfig.from_dict(TINY_VAE if not _cuda(case) else {})).to(dtype).eval()
    if case["tiled"] is True:
        if _cuda(case):
            vae.enable_tiling()
        else:  # tiles smaller than the toy frame, so the smoke run blends tiles too
            vae.enable_tiling(TileSizes(16, 16, 8, 8))
    z = torch.randn(1, 16, (case["frames"] - 1) // 4 + 1, height // 8, width // 8, device=dev)
    z = z.to(dtype)
    out: dict[str, Any] = {"estimate_gib": vae.decode_memory_bytes(tuple(z.shape)) / GIB}
    levels = bool(case.get("levels"))  # exact tiles converted to uint8 frames tile by tile
    if case["tiled"] == "exact":  # planned within a budget, or a given grid (CPU smoke run)
        grid = case.get("exact_grid") or vae.fit_exact_tiles(
            tuple(z.shape), int(case["exact_budget_gib"] * GIB), levels=levels
        )
        assert grid is not None, "no exact-tile grid fits the budget"
        out.update(grid=list(grid), tile_work=vae.decoder.tile_work(tuple(z.shape[-2:]), *grid))
        decode = lambda: vae.decode_exact_tiles(z, *grid, levels=levels)  # noqa: E731
    else:
        decode = lambda: vae.decode(z)  # noqa: E731
    ms, peak = _timed(case, decode, warmup=case["warmup"])
    out.update(ms=ms, peak_above_weights_gib=peak, peak_gib=_peak_abs_gib(case))
    return out


def _random_dit(offload: bool, device: str):
    """Wan2.1-14B (toy-sized on CPU) with seeded random weights, each made on the device
    and, for offload, moved to the host at once (so a budget smaller than the model still
    builds it)."""
    from fastvideo.layers.offload import LayerwiseOffload
    from fastvideo.models.wan.transformer import (
        FP32_PARAM_PATTERNS,
        WanTransformer3D,
        WanTransformerConfig,
    )

    with torch.device("meta"):
        dit = WanTransformer3D(
            WanTransformerConfig.from_dict(WAN_14B if device == "cuda" else WAN_TINY)
        )
    g = torch.Generator(device).manual_seed(0)
    for name, p in list(dit.named_parameters()):
        dtype = torch.float32 if any(s in name for s in FP32_PARAM_PATTERNS) else torch.bfloat16
        t = torch.randn(p.shape, device=device, dtype=torch.float32, generator=g)
        t = t.mul_(0.02 if not name.endswith("scale_shift_table") else dit.config.inner_dim**-0.5)
        t = t.to(dtype)
        owner, _, leaf = name.rpartition(".")
        t = t.cpu() if offload and name.startswith("blocks.") else t
        dit.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
    for module in dit.modules():  # rotary tables etc.
        for key, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                raise RuntimeError(f"buffer {key} was left on the meta device")
    dit.eval().requires_grad_(False)
    if offload:
        LayerwiseOffload.apply(dit, torch.device(device))
    return dit


@torch.no_grad()
def dit_case(case: dict[str, Any]) -> dict[str, Any]:
    from fastvideo.kernels_bridge import attention as bridge
    from fastvideo.layers.sequence import TokenGrid

    dev = case["device"]
    if _cuda(case):
        _limit(case["budget_gb"])
    height, width = RESOLUTIONS[case["resolution"]]
    grid = TokenGrid((case["frames"] - 1) // 4 + 1, height // 16, width // 16)
    start = time.perf_counter()
    dit = _random_dit(case["mode"] == "offload", dev)
    build_s = time.perf_counter() - start
    backend = bridge.resolve_backend("auto", torch.device(dev), torch.bfloat16)
    dit.set_attention(backend)
    text_dim = dit.config.text_dim
    tokens = torch.randn(1, grid.num_tokens, 64, device=dev, dtype=torch.bfloat16)
    t = torch.tensor([999.0], device=dev)
    text = torch.randn(1, 512, text_dim, device=dev, dtype=torch.bfloat16)
    ms, peak = _timed(
        case, lambda: dit.forward_tokens(tokens, t, text, grid), warmup=case["warmup"]
    )
    return dict(ms=ms, peak_gib=_peak_abs_gib(case), weights_on_gpu_gib=_allocated_gib(case),
                peak_above_weights_gib=peak, build_s=build_s, attention=backend,
                tokens=grid.num_tokens)  # fmt: skip


def e2e_checkpoint(folder: Path, device: str) -> Path:
    """The e2e part's checkpoint: 14B DiT + UMT5-XXL on a GPU, the tiny one on a CPU."""
    if (folder / "model_index.json").is_file():
        return folder
    if device == "cuda":
        from benchmarks.load import build

        build(folder, te_layers=24, dit_layers=None, device=device, arch="14B")
    else:
        from benchmarks.common import write_random_wan

        write_random_wan(folder, "tiny", device=device)
    return folder


def e2e_case(case: dict[str, Any]) -> dict[str, Any]:
    """One video through the engine under ``device_memory_gb`` (GPU) with 'auto' memory."""
    import logging

    from fastvideo import VideoGenerator

    plans: list[str] = []

    class Plans(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "memory plan" in record.getMessage():
                plans.append(record.getMessage())

    logging.getLogger("fastvideo").addHandler(Plans())
    height, width = RESOLUTIONS[case["resolution"]]
    budget = case["budget_gb"]
    start = time.perf_counter()
    gen = VideoGenerator.from_pretrained(case["model"], executor="inproc", device=case["device"],
                                         device_memory_gb=budget)  # fmt: skip
    ready_s = time.perf_counter() - start
    try:
        out = gen.generate_video("a red fox running through a snowy forest", height=height,
                                 width=width, num_frames=case["frames"],
                                 num_inference_steps=case["steps"], seed=0,
                                 output_type="np")  # fmt: skip
    finally:
        gen.shutdown()
    peak = max(out.peak_memory_bytes) / GIB if out.peak_memory_bytes else _peak_abs_gib(case)
    return dict(ready_s=ready_s, end_to_end_s=out.timings.get("end_to_end"),
                step_ms=1e3 * out.timings.get("denoising_step_mean", float("nan")),
                decode_s=out.timings.get("decoding"), peak_gib=peak, memory_plan=plans,
                timings=out.timings, frames_shape=list(out.frames.shape))  # fmt: skip


@torch.no_grad()
def text_encoder_case(case: dict[str, Any]) -> dict[str, Any]:
    """UMT5 in bf16, then the same weights with fp8 linears: memory, encode time, error."""
    from transformers import UMT5Config, UMT5EncoderModel

    from fastvideo.layers.fp8 import store_linears_in_fp8

    dev = case["device"]
    cfg = UMT5Config(**(UMT5_XXL if _cuda(case) else UMT5_TINY))
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(dev):
        te = UMT5EncoderModel(cfg).to(torch.bfloat16).eval()
    build_s = time.perf_counter() - start
    ids = torch.randint(0, cfg.vocab_size, (1, 512), device=dev)
    mask = torch.ones_like(ids)

    def encode() -> torch.Tensor:
        return te(input_ids=ids, attention_mask=mask).last_hidden_state

    out: dict[str, Any] = {"build_s": build_s, "tokens": 512}
    for precision in ("bf16", "fp8"):
        if precision == "fp8":
            out["fp8_linears"] = store_linears_in_fp8(te)
            gc.collect()
            if _cuda(case):
                torch.cuda.empty_cache()
        weights = _allocated_gib(case)
        ms, peak = _timed(case, encode, warmup=case["warmup"])
        hidden = encode().float()
        if precision == "bf16":
            reference = hidden
        else:
            out["fp8_rel_err_vs_bf16"] = rel_err(hidden, reference)
        out[precision] = dict(weights_on_gpu_gib=weights, ms=ms, peak_above_weights_gib=peak)
    return out


CASES = {"vae": vae_case, "dit": dit_case, "text_encoder": text_encoder_case, "e2e": e2e_case}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    try:
        result = CASES[case["kind"]](case)
        result["status"] = "ok"
    except torch.cuda.OutOfMemoryError as e:
        result = {"status": "OOM", "error": str(e).splitlines()[0]}
    gc.collect()
    return {**case, **result}


# --- driver --------------------------------------------------------------------------------
def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The cases of each part, parts in the order given."""
    smoke = args.device == "cpu"
    base = dict(device=args.device, frames=5 if smoke else args.frames, reps=args.reps,
                warmup=args.warmup)  # fmt: skip
    dit_res = "smoke" if smoke else args.dit_resolution
    out = []
    for part in args.parts.split(","):
        if part == "vae":
            for res in ["smoke"] if smoke else args.resolutions.split(","):
                for prec in args.precisions.split(","):
                    for tiled in (False, True):
                        out.append(dict(base, kind="vae", resolution=res, precision=prec,
                                        tiled=tiled))  # fmt: skip
                    # Exact tiles within diffusers' measured tiled peak at 720p (fp32
                    # 3.89 GiB, bf16 1.96 GiB above the weights); 2x2 on the CPU.
                    exact = {"exact_grid": [2, 2]} if smoke else {
                        "exact_budget_gib": 1.96 if prec == "bf16" else 3.89}  # fmt: skip
                    # As the pipeline decodes them: to uint8 frames tile by tile, the
                    # budget not spent on a float video.
                    for levels in (False, True):
                        out.append(dict(base, kind="vae", resolution=res, precision=prec,
                                        tiled="exact", levels=levels, **exact))  # fmt: skip
        elif part == "dit":
            for budget in [float(b) for b in args.budgets.split(",")]:
                for mode in args.dit_modes.split(","):
                    out.append(dict(base, kind="dit", mode=mode, budget_gb=budget,
                                    resolution=dit_res))  # fmt: skip
        elif part == "text_encoder":
            out.append(dict(base, kind="text_encoder"))
        elif part == "e2e":
            model = f"{args.e2e_model}-tiny" if smoke else str(args.e2e_model)
            budgets = [None] if smoke else [float(b) for b in args.budgets.split(",")]
            for budget in budgets:  # no budget on a CPU (its memory is the host's)
                out.append(dict(base, kind="e2e", budget_gb=budget, model=model,
                                resolution=dit_res, steps=args.e2e_steps))  # fmt: skip
        else:
            raise SystemExit(f"--parts: unknown part {part!r}; allowed: vae, dit, text_encoder, "
                             "e2e")  # fmt: skip
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


def _gib(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.2f}"


def _row(r: dict[str, Any]) -> str:
    if r["kind"] == "vae":
        mode = {True: "tiled", False: "whole"}.get(r["tiled"], r["tiled"])
        mode += " uint8" if r.get("levels") else ""
        what = f"VAE {r['resolution']} {r['precision']:<4} {mode}"
    elif r["kind"] == "dit":
        what = f"DiT 14B {r['resolution']} {r['mode']:<8} budget {r['budget_gb']:>4.0f} GiB"
    elif r["kind"] == "e2e":
        budget = "none" if r["budget_gb"] is None else f"{r['budget_gb']:.0f} GiB"
        what = f"video 14B {r['resolution']} end to end, budget {budget}"
        if r["status"] == "ok":
            plan = " | ".join(r["memory_plan"])[:200]
            return (f"{what:<40} ready {r['ready_s']:.1f} s  step {r['step_ms']:.0f} ms  peak "
                    f"{_gib(r['peak_gib'])} GiB  plan: {plan}")  # fmt: skip
    else:
        what = "UMT5-XXL bf16 -> fp8 linears"
    if r["status"] != "ok":
        return f"{what:<40} {r['status']} {r.get('error', '')}"
    if r["kind"] == "text_encoder":
        b, f = r["bf16"], r["fp8"]
        return (f"{what:<40} weights {_gib(b['weights_on_gpu_gib'])} -> "
                f"{_gib(f['weights_on_gpu_gib'])} GiB  encode {b['ms']:.1f} -> {f['ms']:.1f} ms"
                f"  rel.err {r['fp8_rel_err_vs_bf16']:.2e}")  # fmt: skip
    extra = (
        f"estimate {r['estimate_gib']:6.2f} GiB"
        if r["kind"] == "vae"
        else f"weights on GPU {_gib(r['weights_on_gpu_gib'])} GiB"
    )
    return f"{what:<40} {r['ms']:10.1f} ms  peak {_gib(r['peak_gib'])} GiB  {extra}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", help="cuda (default when available) or cpu (toy sizes)")
    p.add_argument("--parts", default="vae,dit,text_encoder",
                   help="comma list: vae, dit, text_encoder, e2e")  # fmt: skip
    p.add_argument("--resolutions", default="480p,720p", help="VAE cases")
    p.add_argument("--precisions", default="fp32,bf16", help="VAE cases")
    p.add_argument("--dit-resolution", default="720p", choices=["480p", "720p"])
    p.add_argument("--budgets", default="24,48,80", help="GiB per DiT case")
    p.add_argument("--dit-modes", default="resident,offload")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--e2e-model", type=Path, default=Path("/tmp/fastvideo-memory-e2e-14B"),
                   help="e2e: the checkpoint (written there when missing)")  # fmt: skip
    p.add_argument("--e2e-steps", type=int, default=2, help="e2e: denoising steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--case-timeout", type=float, default=900.0)
    p.add_argument("--budget-s", type=float, help="stop starting cases after this long")
    p.add_argument("--out", type=Path)
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case and print it
    args = p.parse_args()
    if args.case:
        print(MARK + json.dumps(run_case(json.loads(args.case))), flush=True)
        return
    args.device = default_device(args.device).type
    results: list[dict[str, Any]] = []
    record = {**environment(), "benchmark": "memory_fit", "device": args.device,
              "weights": "seeded random", "results": results}  # fmt: skip
    deadline = time.perf_counter() + (args.budget_s or float("inf"))
    todo = cases(args)
    for model in sorted({c["model"] for c in todo if c["kind"] == "e2e"}):
        e2e_checkpoint(Path(model), args.device)  # written once, before any case runs
    for case in todo:
        left = deadline - time.perf_counter()
        if left < 15:
            result = {**case, "status": "skipped: out of --budget-s"}
        else:
            result = _in_child(case, min(args.case_timeout, left))
        print(_row(result), flush=True)
        results.append(result)
        write_result(args.out, record)


if __name__ == "__main__":
    main()
