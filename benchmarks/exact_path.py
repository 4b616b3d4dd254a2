"""The exact path after the layout move, ours vs diffusers in one process on one GPU.

Full-size Wan2.1-T2V-1.3B architecture with seeded random bf16 weights (written to
/tmp by ``benchmarks.common.write_random_wan``), 480x832x81: one DiT forward (eager),
VAE decode fp32/bf16, and one 50-step CFG video through our engine: exact, then with
TeaCache and with MagCache at their default thresholds (skip counts and PSNR vs our
exact video; both depend on the random weights, so they are not what a real checkpoint
gives).

    python -m benchmarks.exact_path --out benchmarks/results/exact_path_h200.json
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import environment, measure, rel_err, write_random_wan, write_result


def measure_cuda(fn, warmup: int, reps: int) -> tuple[float, float]:
    """(median ms, peak GiB above what was allocated before) on the current GPU."""
    out = measure(fn, warmup, reps, torch.device("cuda"))
    return out["ms"], out["peak_gib"]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _runtime(model: Path, dtypes: dict):
    from fastvideo.distributed.runtime import ParallelRuntime
    from fastvideo.kernels_bridge.attention import resolve_backend
    from fastvideo.models.wan.registration import read_wan_spec
    from fastvideo.pipelines.base import PipelineRuntime, PipelineSettings

    dev = torch.device("cuda")
    backend = resolve_backend("auto", dev, torch.bfloat16)
    settings = PipelineSettings(attention_backend=backend)
    return PipelineRuntime(ParallelRuntime(0, 1, dev), dev, read_wan_spec(model), dtypes, settings)


@torch.no_grad()
def _time_dit(model: torch.nn.Module, args: tuple, reps: int) -> tuple[float, float, torch.Tensor]:
    ms, peak = measure_cuda(lambda: model(*args), 2, reps)
    return ms, peak, model(*args)


@torch.no_grad()
def dit_and_vae(model: Path, res: dict, reps: int) -> None:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from fastvideo.models.wan import components

    bf16 = torch.bfloat16
    lat = (16, 21, 60, 104)
    torch.manual_seed(0)
    x = torch.randn(1, *lat, device="cuda", dtype=bf16)
    t = torch.tensor([999], device="cuda")
    text = torch.randn(1, 512, 4096, device="cuda", dtype=bf16)
    env = _runtime(model, {"transformer": bf16})
    ms, peak, ours_out = _time_dit(components.load_transformer(model / "transformer", env),
                                   (x, t, text), reps)  # fmt: skip
    res["ours_dit_ms"], res["ours_dit_peak_gib"] = ms, peak
    _free()
    ref = WanTransformer3DModel.from_pretrained(str(model / "transformer"), torch_dtype=bf16)
    ms, peak, ref_out = _time_dit(_Returning(ref.cuda()), (x, t, text), reps)
    res["diffusers_dit_ms"], res["diffusers_dit_peak_gib"] = ms, peak
    res["dit_rel_err_vs_diffusers"] = rel_err(ours_out.float(), ref_out.float())
    del ref
    _free()
    z = torch.randn(1, *lat, device="cuda")
    for precision, dtype in (("fp32", torch.float32), ("bf16", bf16)):
        ours_vae = components.load_vae(model / "vae", _runtime(model, {"vae": dtype}))
        res[f"ours_vae_{precision}_ms"], res[f"ours_vae_{precision}_peak_gib"] = _time_decode(
            ours_vae.decode, z.to(dtype)
        )
        del ours_vae
        _free()
        theirs = AutoencoderKLWan.from_pretrained(str(model / "vae"), torch_dtype=dtype).cuda()
        res[f"diffusers_vae_{precision}_ms"], res[f"diffusers_vae_{precision}_peak_gib"] = (
            _time_decode(lambda zz, m=theirs: m.decode(zz, return_dict=False)[0], z.to(dtype))
        )
        del theirs
        _free()


class _Returning(torch.nn.Module):
    """diffusers' transformer returning its tensor (as ours does)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, text):
        return self.model(x, t, text, return_dict=False)[0]


@torch.no_grad()
def _time_decode(decode, z: torch.Tensor) -> tuple[float, float]:
    return measure_cuda(lambda: decode(z), 1, 2)


def videos(model: Path, res: dict, steps: int) -> None:
    from fastvideo import VideoGenerator

    size = dict(height=480, width=832, num_frames=81, num_inference_steps=steps, seed=7)
    with VideoGenerator.from_pretrained(str(model)) as gen:
        runs = {}
        for name, extra in (("exact", {}), ("teacache", {"cache": "teacache"}),
                            ("magcache", {"cache": "magcache"})):  # fmt: skip
            start = time.perf_counter()
            out = gen.generate_video("a red fox in the snow", **size, **extra)
            runs[name] = out
            res[f"video_{name}_s"] = time.perf_counter() - start
            res[f"video_{name}_step_ms"] = 1000 * out.timings["denoising_step_mean"]
            res[f"video_{name}_stats"] = out.stats
            print(name, round(res[f"video_{name}_s"], 2), out.stats, flush=True)
        for name in ("teacache", "magcache"):
            res[f"video_{name}_psnr_vs_exact_db"] = _psnr(runs[name].frames, runs["exact"].frames)
    res["cache_note"] = "random weights: skip counts and PSNR are not a real checkpoint's"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, default=Path("/tmp/wan13b"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-videos", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    write_random_wan(args.model)
    res: dict = {"benchmark": "exact_path", **environment(), "shape": "480x832x81",
                 "weights": "random bf16 (seeded)"}  # fmt: skip
    dit_and_vae(args.model, res, args.reps)
    print({k: v for k, v in res.items() if k.endswith(("_ms", "_err_vs_diffusers"))}, flush=True)
    if args.out:
        write_result(args.out, res)
    if not args.skip_videos:
        videos(args.model, res, args.steps)
        if args.out:
            write_result(args.out, res)


if __name__ == "__main__":
    main()
