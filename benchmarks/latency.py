"""Latency of one video, ours vs diffusers, in one process on one GPU.

Full-size Wan2.1-T2V-1.3B architecture with seeded random weights (or a local checkpoint
via --model), 480x832x81 by default. Reports, each with peak GPU memory above the weights:
text encoding, one DiT forward (batch 1), VAE decode, and with --e2e the whole 50-step CFG
video through the engine. --compare-diffusers loads the same weights into diffusers'
WanTransformer3DModel and AutoencoderKLWan (and, with --e2e, WanPipeline) and prints the
ratios. --attention / --teacache / --compile select our optimisations; --compile-diffusers
compiles diffusers' transformer (torch.compile of the whole model).

With random weights TeaCache's skip count is NOT what real weights give (the timestep
embedding's change per step depends on the weights); the count used is reported.

    python -m benchmarks.latency --compare-diffusers --out benchmarks/results/x.json
    python -m benchmarks.latency --attention sta --teacache --e2e --compare-diffusers
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import environment, measure_cuda, rel_err, write_result

GIB = 2**30


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _env(model: Path, dtypes: dict, compile_blocks: bool = False):
    from fastvideo.distributed.runtime import ParallelRuntime
    from fastvideo.models.wan.registration import read_wan_spec
    from fastvideo.pipelines.base import PipelineRuntime

    dev = torch.device("cuda")
    options = {"compile": {"backend": "inductor", "mode": None}} if compile_blocks else {}
    return PipelineRuntime(ParallelRuntime(0, 1, dev), dev, read_wan_spec(model), dtypes, options)


def _set_attention(model: Path, name: str) -> str:
    from fastvideo.config import PipelineConfig
    from fastvideo.kernels_bridge import attention as bridge
    from fastvideo.models.wan.registration import read_wan_spec
    from fastvideo.worker.worker import sta_config

    config = PipelineConfig.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    chosen = bridge.resolve_backend(name, torch.device("cuda"), torch.bfloat16)
    bridge.set_backend(chosen, sta_config(config, read_wan_spec(model)))
    return chosen


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint folder (default: random 1.3B)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--attention", default="auto")
    p.add_argument("--teacache", action="store_true")
    p.add_argument("--teacache-thresh", type=float, default=0.08)
    p.add_argument("--compile", action="store_true", help="regional compile of our DiT blocks")
    p.add_argument(
        "--compile-diffusers", action="store_true", help="torch.compile diffusers' transformer"
    )
    p.add_argument("--compare-diffusers", action="store_true")
    p.add_argument("--diffusers-attention", help="diffusers attention backend, e.g. _native_cudnn")
    p.add_argument("--skip", default="", help="comma list of parts to skip: text,dit,vae")
    p.add_argument("--vae-precisions", default="fp32,bf16")
    p.add_argument("--e2e", action="store_true", help="also the whole video through the engine")
    p.add_argument("--e2e-exact", action="store_true", help="with --e2e: also our exact path")
    p.add_argument(
        "--e2e-teacache-dense", action="store_true", help="with --e2e: also dense + TeaCache"
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.model is None:
        args.model = Path("/tmp/wan13b")
        subprocess.run([sys.executable, "-m", "benchmarks.common", str(args.model)], check=True)
    from fastvideo.models.wan import components

    torch.manual_seed(0)
    lat = (16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    x = torch.randn(1, *lat, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([999], device="cuda")
    text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    res: dict = {"latent_shape": list(lat), "tokens": lat[1] * lat[2] * lat[3] // 4}
    res["attention_backend"] = _set_attention(args.model, args.attention)
    print(f"attention backend: {res['attention_backend']}")
    bf16 = torch.bfloat16

    if "text" not in skip:
        env = _env(args.model, {"text_encoder": bf16})
        tok = components.load_wan_tokenizer(args.model / "tokenizer", env)
        enc = components.load_wan_text_encoder(args.model / "text_encoder", env)
        from fastvideo.models.text_encoders import encode_prompts

        fn = lambda: encode_prompts(tok, enc, ["a red fox"] * 2, 512, bf16)  # noqa: E731
        res["ours_text_ms"], res["ours_text_peak_gib"] = measure_cuda(fn, 1, args.reps)
        res["text_note"] = "1-layer UMT5 of the real width: not UMT5-XXL's time"
        print(f"text encoding (1-layer UMT5): {res['ours_text_ms']:.1f} ms")
        del enc, tok
        _free()

    if "dit" not in skip:
        env = _env(args.model, {"transformer": bf16}, compile_blocks=args.compile)
        start = time.perf_counter()
        ours = components.load_transformer(args.model / "transformer", env)
        out_ours = ours(x, t, text)
        torch.cuda.synchronize()
        res["ours_dit_first_call_s"] = time.perf_counter() - start
        res["ours_dit_ms"], res["ours_dit_peak_gib"] = measure_cuda(
            lambda: ours(x, t, text), 2, args.reps
        )
        ms, peak, first = res["ours_dit_ms"], res["ours_dit_peak_gib"], res["ours_dit_first_call_s"]
        print(f"DiT forward   ours      {ms:8.1f} ms  peak +{peak:.2f} GiB"
              f"  (load+first call {first:.1f} s)")  # fmt: skip
        del ours
        _free()
        if args.compare_diffusers:
            from diffusers import WanTransformer3DModel

            ref = WanTransformer3DModel.from_pretrained(
                str(args.model / "transformer"), torch_dtype=bf16
            )
            ref = ref.to("cuda").eval()
            if args.diffusers_attention:
                ref.set_attention_backend(args.diffusers_attention)
            if args.compile_diffusers:
                ref = torch.compile(ref)
            start = time.perf_counter()
            out_ref = ref(x, t, text, return_dict=False)[0]
            torch.cuda.synchronize()
            res["diffusers_dit_first_call_s"] = time.perf_counter() - start
            fwd = lambda: ref(x, t, text, return_dict=False)[0]  # noqa: E731
            res["diffusers_dit_ms"], res["diffusers_dit_peak_gib"] = measure_cuda(fwd, 2, args.reps)
            res["dit_ratio_ours_over_diffusers"] = res["ours_dit_ms"] / res["diffusers_dit_ms"]
            res["dit_output_rel_err"] = rel_err(out_ours.float(), out_ref.float())
            ratio = res["dit_ratio_ours_over_diffusers"]
            print(f"DiT forward   diffusers {res['diffusers_dit_ms']:8.1f} ms  peak "
                  f"+{res['diffusers_dit_peak_gib']:.2f} GiB  ratio {ratio:.3f}"
                  f"  rel.err {res['dit_output_rel_err']:.2e}"
                  f"  (load+first call {res['diffusers_dit_first_call_s']:.1f} s)")  # fmt: skip
            del ref, out_ref
        del out_ours
        _free()

    if "vae" not in skip:
        from fastvideo.models.loader import DTYPES

        z = torch.randn(1, *lat, device="cuda")
        for prec in args.vae_precisions.split(","):
            dtype = DTYPES[prec]
            env = _env(args.model, {"vae": dtype})
            vae = components.load_vae(args.model / "vae", env)
            ms, peak = measure_cuda(lambda v=vae, d=dtype: v.decode(z.to(d)), 1, 2)
            res[f"ours_vae_{prec}_ms"], res[f"ours_vae_{prec}_peak_gib"] = ms, peak
            line = f"VAE decode {prec:<5} ours {ms:8.1f} ms  peak +{peak:.2f} GiB"
            del vae
            _free()
            if args.compare_diffusers:
                from diffusers import AutoencoderKLWan

                ref_vae = AutoencoderKLWan.from_pretrained(
                    str(args.model / "vae"), torch_dtype=dtype
                )
                ref_vae = ref_vae.to("cuda").eval()
                fn = lambda v=ref_vae, d=dtype: v.decode(z.to(d), return_dict=False)[0]  # noqa: E731
                ms_r, peak_r = measure_cuda(fn, 1, 2)
                res[f"diffusers_vae_{prec}_ms"], res[f"diffusers_vae_{prec}_peak_gib"] = (
                    ms_r,
                    peak_r,
                )
                res[f"vae_{prec}_ratio_ours_over_diffusers"] = ms / ms_r
                line += (
                    f" | diffusers {ms_r:8.1f} ms  peak +{peak_r:.2f} GiB  ratio {ms / ms_r:.3f}"
                )
                del ref_vae
                _free()
            print(line)

    if args.e2e:
        _e2e(args, res)
    if args.out:
        write_result(args.out, {"benchmark": "latency", **environment(),
                                "args": {k: str(v) for k, v in vars(args).items()},
                                "weights": "seeded random bf16 DiT, fp32 VAE, 1-layer UMT5",
                                **res})  # fmt: skip


def _e2e(args, res: dict) -> None:
    """Whole videos: our engine (fast path as flagged, and optionally exact) and diffusers'
    WanPipeline, same checkpoint, prompt, seed, size and steps."""
    from fastvideo import VideoGenerator

    prompt, seed = "a red fox running through a snowy forest", 0
    size = dict(height=args.height, width=args.width, num_frames=args.frames)
    videos = {}
    runs = [("fast", args.attention, args.teacache, args.compile)]
    if args.e2e_exact:
        runs.insert(0, ("exact", "auto", False, False))
    if args.e2e_teacache_dense:
        runs.append(("teacache_dense", "auto", True, args.compile))
    for name, attention, teacache, compiled in runs:
        with VideoGenerator.from_pretrained(
            str(args.model), attention_backend=attention, enable_torch_compile=compiled
        ) as gen:
            # A 2-step warm-up request first (kernel selection, compile), as a server
            # would run at start-up; the timed request is the second.
            gen.generate_video(prompt, num_inference_steps=2, seed=seed, **size)
            out = gen.generate_video(
                prompt, num_inference_steps=args.steps, seed=seed, enable_teacache=teacache,
                teacache_thresh=args.teacache_thresh, **size,
            )  # fmt: skip
        videos[name] = out.frames
        res[f"e2e_{name}"] = {
            "attention": attention, "teacache": teacache, "compile": compiled,
            "timings_s": out.timings, "stats": out.stats,
            "peak_gib": [b / GIB for b in out.peak_memory_bytes],
        }  # fmt: skip
        print(f"e2e {name:<6} ours {out.timings['end_to_end']:7.1f} s  {out.stats or ''}")
    for name in videos:
        if name != "exact" and "exact" in videos:
            res[f"e2e_{name}_psnr_vs_exact_db"] = _psnr(videos[name], videos["exact"])
            print(f"{name} vs exact PSNR {res[f'e2e_{name}_psnr_vs_exact_db']:.2f} dB")
    if args.compare_diffusers:
        from diffusers import AutoencoderKLWan, WanPipeline

        vae = AutoencoderKLWan.from_pretrained(str(args.model / "vae"), torch_dtype=torch.float32)
        pipe = WanPipeline.from_pretrained(str(args.model), vae=vae, torch_dtype=torch.bfloat16)
        pipe.to("cuda")
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator("cpu").manual_seed(seed)
        from fastvideo.models.wan.registration import WAN_NEGATIVE_PROMPT

        pipe(prompt=prompt, negative_prompt=WAN_NEGATIVE_PROMPT, guidance_scale=5.0,
             num_inference_steps=2, generator=gen, output_type="np", **size)  # fmt: skip
        gen = torch.Generator("cpu").manual_seed(seed)
        torch.cuda.synchronize()
        start = time.perf_counter()
        pipe(prompt=prompt, negative_prompt=WAN_NEGATIVE_PROMPT, guidance_scale=5.0,
             num_inference_steps=args.steps, generator=gen, output_type="np", **size)  # fmt: skip
        torch.cuda.synchronize()
        res["e2e_diffusers_s"] = time.perf_counter() - start
        for name in videos:
            res[f"e2e_{name}_speedup_vs_diffusers"] = (
                res["e2e_diffusers_s"] / res[f"e2e_{name}"]["timings_s"]["end_to_end"]
            )
        print(
            f"e2e diffusers {res['e2e_diffusers_s']:7.1f} s  speed-ups: "
            + ", ".join(f"{n} {res[f'e2e_{n}_speedup_vs_diffusers']:.2f}x" for n in videos)
        )
        del pipe
        _free()


if __name__ == "__main__":
    main()
