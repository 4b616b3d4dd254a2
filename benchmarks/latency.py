"""Latency of one video, ours vs diffusers, in one process on one GPU.

The full-size Wan2.1-T2V-1.3B architecture with seeded random weights (or a checkpoint via
--model), 480x832x81 by default. Parts (``--skip`` any of them):

- ``dit``: one DiT forward (batch 1), ours vs diffusers' WanTransformer3DModel, eager;
- ``compile``: the same with regional compile (ours: ``compile_blocks``; diffusers:
  ``compile_repeated_blocks``), first call (compile) and steady state;
- ``fp8``: our DiT with ``dit_precision="fp8"`` (torchao float8 matmuls in the blocks),
  eager and compiled, with its output's relative error against our bf16 forward (needs a
  GPU of compute capability 8.9+ and torchao; recorded as skipped otherwise); with ``e2e``
  also a 50-step fp8 video and its PSNR against the exact one;
- ``vae``: VAE decode of the video's latents in fp32 and bf16, ours vs AutoencoderKLWan;
- ``e2e``: one 50-step CFG video through the engine (``VideoGenerator``): exact, then with
  TeaCache and with MagCache at their default thresholds (skip counts, PSNR vs exact),
  and diffusers' WanPipeline with the same checkpoint, prompt, seed and size;
- ``floor``: the bf16 floor of one DiT forward at this shape (attention FLOPs at the
  fastest dense kernel measured here + linear FLOPs at ~790 TFLOP/s), and of the video;
- ``profile``: the GPU kernel time of our eager forward by kind (attention, matmul, the
  rest: norms, modulation, rotary, gating, copies) and its ten longest kernels: what is
  left above the floor.

Each part's time comes with the peak GPU memory above what was allocated before it. The
JSON is rewritten after every part.

    python -m benchmarks.latency --out /tmp/latency.json
    python -m benchmarks.latency --device cpu --arch tiny --height 32 --width 32 --frames 5 \
        --steps 3 --reps 1 --compile-backend aot_eager --executor inproc
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    ARCHS,
    args_record,
    default_device,
    environment,
    free_memory,
    measure,
    psnr,
    rel_err,
    synchronize,
    timed_first_call,
    weights_note,
    write_result,
)
from benchmarks.flops import wan_forward_flops
from fastvideo import envs
from fastvideo.kernels_bridge import fused

PARTS = ("dit", "compile", "fp8", "vae", "e2e", "floor", "profile")
PROMPT = "a red fox running through a snowy forest, cinematic"
CACHE_NOTE = (
    "step-cache skip counts depend on the weights (TeaCache compares the timestep "
    "modulation between steps); these are random, so the counts are not those of the "
    "released checkpoint"
)


def _runtime(
    model: Path, device: torch.device, dtypes: dict, args, compiled: bool = False, fp8: bool = False
):
    """The PipelineRuntime our loaders read (one rank), with this run's attention."""
    from fastvideo.config import PipelineConfig
    from fastvideo.distributed.runtime import ParallelRuntime
    from fastvideo.kernels_bridge.attention import resolve_backend
    from fastvideo.models.wan.registration import read_wan_spec
    from fastvideo.pipelines.base import CompileSettings, PipelineRuntime, PipelineSettings
    from fastvideo.worker.worker import sta_config

    spec = read_wan_spec(model)
    backend = resolve_backend(args.attention, device, dtypes.get("transformer", torch.bfloat16))
    config = PipelineConfig.from_pretrained(str(model))
    settings = PipelineSettings(
        attention_backend=backend,
        sta=sta_config(config, spec),
        compile=CompileSettings(args.compile_backend) if compiled else None,
        dit_fp8=fp8,
    )
    return PipelineRuntime(ParallelRuntime(0, 1, device), device, spec, dtypes, settings)


def _dit_inputs(args, cfg: dict, device: torch.device) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    lat = (cfg["in_channels"], (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    x = torch.randn(1, *lat, device=device, dtype=torch.bfloat16)
    t = torch.tensor([999], device=device)
    text = torch.randn(1, 512, cfg["text_dim"], device=device, dtype=torch.bfloat16)
    return x, t, text


def _time_dit(name: str, model, inputs, device, args, res: dict, key: str, warmup: int) -> Any:
    """First call and steady-state forward of one DiT; returns its output."""
    out, first = timed_first_call(lambda: model(*inputs), device)
    m = measure(lambda: model(*inputs), warmup, args.reps, device)
    res[f"{key}_first_call_s"] = first
    res[f"{key}_ms"], res[f"{key}_peak_gib"] = m["ms"], m["peak_gib"]
    peak = f"  peak +{m['peak_gib']:.2f} GiB" if m["peak_gib"] is not None else ""
    print(f"{name:<28} {m['ms']:9.1f} ms{peak}  (first call {first:.1f} s)", flush=True)
    return out


def part_dit(args, res: dict, device: torch.device, compiled: bool) -> None:
    """Ours vs diffusers, one forward; ``compiled``: both with regional compile."""
    from diffusers import WanTransformer3DModel

    from fastvideo.models.wan.components import load_transformer

    bf16 = torch.bfloat16
    inputs = _dit_inputs(args, _dit_config(args.model), device)
    tag = "compiled" if compiled else "eager"
    env = _runtime(args.model, device, {"transformer": bf16}, args, compiled)
    res["attention_backend"] = env.settings.attention_backend
    ours = load_transformer(args.model / "transformer", env)
    out_ours = _time_dit(f"DiT {tag} ours", ours, inputs, device, args, res,
                         f"ours_dit_{tag}", warmup=1)  # fmt: skip
    if not compiled and device.type == "cuda" and fused.triton_available() and envs.fused_kernels():
        os.environ["FASTVIDEO_FUSED_KERNELS"] = "0"  # read at every call
        try:
            out_plain = _time_dit("DiT eager ours, unfused", ours, inputs, device, args, res,
                                  "ours_dit_eager_unfused", warmup=1)  # fmt: skip
        finally:
            os.environ["FASTVIDEO_FUSED_KERNELS"] = "1"
        res["dit_eager_fused_rel_err_vs_unfused"] = rel_err(out_ours.float(), out_plain.float())
        del out_plain
    if compiled and device.type == "cuda" and fused.triton_available() and envs.fused_kernels():
        # The other compile mode: our fused kernels kept as ops in the graph, or Inductor's
        # own fusion of the torch ops (FASTVIDEO_FUSED_UNDER_COMPILE picks the default).
        default = fused._UNDER_COMPILE
        fused._UNDER_COMPILE = not default
        torch._dynamo.reset()
        key = "ours_dit_compiled_inductor_fusion" if default else "ours_dit_compiled_our_kernels"
        try:
            out_alt = _time_dit(f"DiT compiled ours, {key.split('compiled_')[1]}", ours, inputs,
                                device, args, res, key, warmup=1)  # fmt: skip
        finally:
            fused._UNDER_COMPILE = default
            torch._dynamo.reset()
        res["compiled_fused_under_compile"] = default
        res[f"{key}_rel_err_vs_default"] = rel_err(out_alt.float(), out_ours.float())
        del out_alt
    del ours
    free_memory()
    ref = WanTransformer3DModel.from_pretrained(str(args.model / "transformer"), torch_dtype=bf16)
    ref = ref.to(device).eval()
    if args.diffusers_attention:
        ref.set_attention_backend(args.diffusers_attention)
    if compiled:
        ref.compile_repeated_blocks(backend=args.compile_backend)

    def call(*a, model=ref):
        return model(*a, return_dict=False)[0]

    out_ref = _time_dit(f"DiT {tag} diffusers", call, inputs, device, args, res,
                        f"diffusers_dit_{tag}", warmup=1)  # fmt: skip
    res[f"dit_{tag}_ratio_ours_over_diffusers"] = (
        res[f"ours_dit_{tag}_ms"] / res[f"diffusers_dit_{tag}_ms"]
    )
    res[f"dit_{tag}_rel_err_vs_diffusers"] = rel_err(out_ours.float(), out_ref.float())
    print(f"  ratio {res[f'dit_{tag}_ratio_ours_over_diffusers']:.3f}, output rel.err "
          f"{res[f'dit_{tag}_rel_err_vs_diffusers']:.2e}", flush=True)  # fmt: skip
    del ref, out_ref, out_ours
    free_memory()
    if compiled:
        torch._dynamo.reset()


def fp8_unavailable(device: torch.device) -> str | None:
    """Why dit_precision='fp8' cannot run here (None: it can)."""
    from fastvideo.config import PipelineConfig
    from fastvideo.engine.startup import check_device_options
    from fastvideo.layers.fp8 import check_fp8_matmul_device

    try:
        check_device_options(PipelineConfig(dit_precision="fp8"), device.type)
        check_fp8_matmul_device(device)
    except ValueError as e:
        return str(e)
    return None


def part_fp8(args, res: dict, device: torch.device) -> None:
    """Our DiT with float8 matmuls, eager then compiled, against our bf16 forward."""
    from fastvideo.models.wan.components import load_transformer

    why = fp8_unavailable(device)
    if why:
        res["fp8"] = {"skipped": why}
        print(f"fp8: skipped ({why})", flush=True)
        return
    bf16 = torch.bfloat16
    inputs = _dit_inputs(args, _dit_config(args.model), device)
    folder = args.model / "transformer"
    ours = load_transformer(folder, _runtime(args.model, device, {"transformer": bf16}, args))
    with torch.no_grad():
        exact = ours(*inputs).float()
    del ours
    free_memory()
    entry: dict[str, Any] = {}
    for tag, compiled in (("eager", False), ("compiled", True)):
        env = _runtime(args.model, device, {"transformer": bf16}, args, compiled, fp8=True)
        model = load_transformer(folder, env)
        with torch.no_grad():
            out = _time_dit(f"DiT {tag} ours fp8", model, inputs, device, args, entry,
                            f"ours_dit_fp8_{tag}", warmup=1)  # fmt: skip
        entry[f"{tag}_rel_err_vs_bf16"] = rel_err(out.float(), exact)
        print(f"  rel.err vs our bf16 forward {entry[f'{tag}_rel_err_vs_bf16']:.2e}", flush=True)
        del model, out
        free_memory()
        if compiled:
            torch._dynamo.reset()
    res["fp8"] = entry


def _dit_config(model: Path) -> dict:
    from fastvideo.models.registry import read_json

    return read_json(model / "transformer" / "config.json")


def part_vae(args, res: dict, device: torch.device) -> None:
    from diffusers import AutoencoderKLWan

    from fastvideo.models.loader import DTYPES
    from fastvideo.models.wan.components import load_vae

    torch.manual_seed(0)
    lat = (16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    z = torch.randn(1, *lat, device=device)
    for prec in args.vae_precisions.split(","):
        dtype = DTYPES[prec]
        vae = load_vae(args.model / "vae", _runtime(args.model, device, {"vae": dtype}, args))
        m = measure(lambda v=vae, d=dtype: v.decode(z.to(d)), 1, args.vae_reps, device)
        del vae
        free_memory()
        ref = AutoencoderKLWan.from_pretrained(str(args.model / "vae"), torch_dtype=dtype)
        ref = ref.to(device).eval()
        r = measure(lambda v=ref, d=dtype: v.decode(z.to(d), return_dict=False)[0], 1,
                    args.vae_reps, device)  # fmt: skip
        del ref
        free_memory()
        res[f"vae_{prec}"] = {"ours_ms": m["ms"], "ours_peak_gib": m["peak_gib"],
                              "diffusers_ms": r["ms"], "diffusers_peak_gib": r["peak_gib"],
                              "ratio_ours_over_diffusers": m["ms"] / r["ms"]}  # fmt: skip
        print(f"VAE decode {prec:<5} ours {m['ms']:9.1f} ms | diffusers {r['ms']:9.1f} ms"
              f"  ratio {m['ms'] / r['ms']:.3f}", flush=True)  # fmt: skip


def part_e2e(args, res: dict, device: torch.device, save) -> None:
    """Our engine: exact, TeaCache, MagCache (one engine, a 2-step warm-up first, as a
    server would run at start-up); then diffusers' WanPipeline."""
    from fastvideo import VideoGenerator

    size = dict(height=args.height, width=args.width, num_frames=args.frames, seed=0)
    videos: dict[str, Any] = {}
    with VideoGenerator.from_pretrained(
        str(args.model), device=device.type, executor=args.executor
    ) as gen:
        res.setdefault("attention_backend", f"{gen.config.attention_backend} (the engine's)")
        gen.generate_video(PROMPT, num_inference_steps=2, **size)
        for name, cache in (("exact", None), ("teacache", "teacache"), ("magcache", "magcache")):
            out = gen.generate_video(PROMPT, num_inference_steps=args.steps, cache=cache, **size)
            videos[name] = out.frames
            entry = {"cache": cache, "timings_s": out.timings, "stats": out.stats,
                     "seconds": out.timings["end_to_end"], "plan": out.plan,
                     "peak_gib": [b / 2**30 for b in out.peak_memory_bytes]}  # fmt: skip
            if cache is not None:
                entry["thresh"] = gen.config.cache_config.default_thresh(cache)
                entry["psnr_vs_exact_db"] = psnr(out.frames, videos["exact"])
                entry["skipped"] = {k: v for k, v in out.stats.items() if "_skipped_" in k}
            res[f"e2e_{name}"] = entry
            print(f"e2e {name:<9} ours {entry['seconds']:8.1f} s  {out.stats or ''}", flush=True)
            save()
    if ("fp8" in args.parts or args.e2e_fp8) and fp8_unavailable(device) is None:
        with VideoGenerator.from_pretrained(
            str(args.model), device=device.type, executor=args.executor, dit_precision="fp8"
        ) as gen:
            gen.generate_video(PROMPT, num_inference_steps=2, **size)
            out = gen.generate_video(PROMPT, num_inference_steps=args.steps, **size)
        res["e2e_fp8"] = {"seconds": out.timings["end_to_end"], "timings_s": out.timings,
                          "psnr_vs_exact_db": psnr(out.frames, videos["exact"]),
                          "note": "random weights: not a real checkpoint's PSNR"}  # fmt: skip
        print(f"e2e fp8       ours {res['e2e_fp8']['seconds']:8.1f} s  PSNR vs exact "
              f"{res['e2e_fp8']['psnr_vs_exact_db']:.1f} dB", flush=True)  # fmt: skip
        save()
    res["e2e_note"] = CACHE_NOTE
    res["e2e_diffusers"] = _diffusers_video(args, device, size)
    ref_s = res["e2e_diffusers"]["seconds"]
    res["e2e_diffusers"]["psnr_vs_ours_exact_db"] = psnr(
        res["e2e_diffusers"].pop("frames"), videos["exact"]
    )
    for name in videos:
        res[f"e2e_{name}"]["speedup_vs_diffusers"] = ref_s / res[f"e2e_{name}"]["seconds"]
    ups = ", ".join(f"{n} {res[f'e2e_{n}']['speedup_vs_diffusers']:.2f}x" for n in videos)
    print(f"e2e diffusers {ref_s:8.1f} s; speed-ups: {ups}", flush=True)


def _diffusers_video(args, device: torch.device, size: dict) -> dict[str, Any]:
    from diffusers import AutoencoderKLWan, WanPipeline

    from fastvideo.models.wan.registration import WAN_NEGATIVE_PROMPT

    vae = AutoencoderKLWan.from_pretrained(str(args.model / "vae"), torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(str(args.model), vae=vae, torch_dtype=torch.bfloat16)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, negative_prompt=WAN_NEGATIVE_PROMPT, guidance_scale=5.0,
                  height=size["height"], width=size["width"], num_frames=size["num_frames"],
                  output_type="np")  # fmt: skip
    pipe(**kwargs, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    frames = pipe(**kwargs, num_inference_steps=args.steps,
                  generator=torch.Generator("cpu").manual_seed(0)).frames[0]  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del pipe, vae
    free_memory()
    # diffusers' np frames are float in [0, 1]; ours uint8.
    frames_u8 = (frames * 255).round().clip(0, 255).astype("uint8")
    return {"seconds": seconds, "peak_gib": peak, "frames": frames_u8}


def part_floor(args, res: dict, device: torch.device) -> None:
    """bf16 floor: attention FLOPs at the fastest dense kernel's rate at this shape."""
    from benchmarks.attention_kernels import _time, runnable_backends
    from fastvideo.kernels_bridge import attention as bridge

    cfg = _dit_config(args.model)
    tokens = ((args.frames - 1) // 4 + 1) * (args.height // 16) * (args.width // 16)
    heads, d = cfg["num_attention_heads"], cfg["attention_head_dim"]
    qkv = [torch.randn(1, heads, tokens, d, device=device, dtype=torch.bfloat16) for _ in "qkv"]
    rates = {}
    for name, why in runnable_backends(device, torch.bfloat16).items():
        if why is None and not (name == "sdpa_math" and tokens > 8192):
            fwd = bridge._BACKENDS[name].forward
            ms = _time(lambda f=fwd, x=qkv: f(*x), device, 2, 5)
            rates[name] = 4 * tokens * tokens * d * heads / ms / 1e9
    del qkv
    best = max(rates, key=rates.get)
    flops = wan_forward_flops(cfg, tokens)
    floor = flops.record(rates[best])
    floor.update(best_kernel=best, kernel_tflops=rates, tokens=tokens,
                 video_forwards=2 * args.steps,
                 video_denoising_floor_s=2 * args.steps * floor["floor_ms"] / 1e3)  # fmt: skip
    res["floor"] = floor
    print(f"bf16 floor per DiT forward at {tokens} tokens: {floor['floor_ms']:.1f} ms "
          f"(attention {floor['attention_floor_ms']:.1f} ms at {rates[best]:.0f} TFLOP/s "
          f"[{best}] + linear {floor['linear_floor_ms']:.1f} ms at 790 TFLOP/s); "
          f"{2 * args.steps} forwards: {floor['video_denoising_floor_s']:.1f} s")  # fmt: skip


KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "attn", "cudnn", "sdpa")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "wgmma")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def gpu_idle(spans: list[tuple[float, float, str]], top: int = 8) -> dict[str, Any]:
    """GPU idle time inside one profiled forward, from kernel (start, end, name) spans in
    microseconds: the span from the first start to the last end, the time no kernel ran,
    and that idle time grouped by the kernel that ended each gap (the launch it waited
    for)."""
    if not spans:
        return {"gpu_span_ms": 0.0, "gpu_idle_ms": 0.0, "idle_before": []}
    spans = sorted(spans)
    busy_until = spans[0][1]
    idle = 0.0
    before: dict[str, list[float]] = {}
    for start, end, name in spans[1:]:
        if start > busy_until:
            idle += start - busy_until
            before.setdefault(name, []).append(start - busy_until)
        busy_until = max(busy_until, end)
    ranked = sorted(before.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "gpu_span_ms": (busy_until - spans[0][0]) / 1e3,
        "gpu_idle_ms": idle / 1e3,
        "idle_before": [{"name": n[:120], "kind": kernel_kind(n), "gaps": len(g),
                         "ms": sum(g) / 1e3} for n, g in ranked],
    }  # fmt: skip


def part_profile(args, res: dict, device: torch.device) -> None:
    """Kernel time of one eager forward of ours, by kind."""
    from torch.profiler import ProfilerActivity, profile

    from fastvideo.models.wan.components import load_transformer

    if device.type != "cuda":
        res["profile"] = {"skipped": "needs CUDA (kernel times)"}
        return
    inputs = _dit_inputs(args, _dit_config(args.model), device)
    env = _runtime(args.model, device, {"transformer": torch.bfloat16}, args)
    model = load_transformer(args.model / "transformer", env)
    with torch.no_grad():
        model(*inputs)
        synchronize(device)
        # Host time to enqueue one forward (no sync inside) against its wall time: equal
        # when the GPU waits for the CPU's launches.
        start = time.perf_counter()
        model(*inputs)
        host_ms = (time.perf_counter() - start) * 1e3
        synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(*inputs)
            synchronize(device)
    kernels: dict[str, list[float]] = {}
    spans: list[tuple[float, float, str]] = []
    for e in prof.events():
        if e.device_type.name == "CUDA":
            kernels.setdefault(e.name, []).append(e.device_time / 1e3)
            spans.append((e.time_range.start, e.time_range.end, e.name))
    by_kind: dict[str, float] = {}
    for name, times in kernels.items():
        kind = kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + sum(times)
    top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:10]
    res["profile"] = {
        "attention_backend": env.settings.attention_backend,
        "kernel_ms_by_kind": by_kind, "kernel_ms_total": sum(by_kind.values()),
        "host_enqueue_ms": host_ms, "wall_ms": wall_ms, **gpu_idle(spans),
        "top_kernels": [{"name": n[:120], "kind": kernel_kind(n), "calls": len(t),
                         "ms": sum(t)} for n, t in top],
    }  # fmt: skip
    print("kernel time by kind (one eager forward): " + ", ".join(
        f"{k} {v:.1f} ms" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))  # fmt: skip
    pr = res["profile"]
    print(f"host enqueue {host_ms:.1f} ms of {wall_ms:.1f} ms wall; GPU idle "
          f"{pr['gpu_idle_ms']:.1f} ms of a {pr['gpu_span_ms']:.1f} ms span")  # fmt: skip
    for g in pr["idle_before"]:
        print(f"  idle {g['ms']:7.2f} ms {g['gaps']:5d}x before [{g['kind']}] {g['name'][:80]}")
    for k in res["profile"]["top_kernels"]:
        print(f"  {k['ms']:8.1f} ms {k['calls']:5d}x  [{k['kind']}] {k['name'][:90]}")
    del model
    free_memory()


def _ensure_model(args, device: torch.device) -> None:
    if args.model is not None:
        return
    args.model = Path(f"/tmp/fastvideo-bench-wan-{args.arch}")
    # Written in its own process, so this one's GPU memory starts clean.
    cmd = [sys.executable, "-m", "benchmarks.common", str(args.model), args.arch, device.type]
    subprocess.run(cmd, check=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", help="cuda (default when available) or cpu")
    p.add_argument("--model", type=Path, help="checkpoint folder (default: random --arch)")
    p.add_argument("--arch", default="1.3B", choices=sorted(ARCHS), help="random checkpoint")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=5, help="timed DiT forwards")
    p.add_argument("--vae-reps", type=int, default=2)
    p.add_argument("--attention", default="auto", help="our attention backend")
    p.add_argument("--diffusers-attention", help="diffusers attention backend, e.g. _native_cudnn")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--vae-precisions", default="fp32,bf16")
    p.add_argument("--executor", default="mp", choices=["mp", "inproc"], help="engine executor")
    p.add_argument("--skip", default="", help=f"comma list of parts to skip: {','.join(PARTS)}")
    p.add_argument("--e2e-fp8", action="store_true",
                   help="e2e: the fp8 video too, with the fp8 part skipped")  # fmt: skip
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


@torch.no_grad()
def main() -> None:
    args = parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(PARTS):
        raise SystemExit(f"--skip: unknown parts {sorted(skip - set(PARTS))}; allowed: {PARTS}")
    args.parts = [p for p in PARTS if p not in skip]
    device = default_device(args.device)
    _ensure_model(args, device)
    lat_frames = (args.frames - 1) // 4 + 1
    res: dict[str, Any] = {
        "benchmark": "latency", **environment(), "args": args_record(args),
        "weights": weights_note(args.model), "model": str(args.model),
        "size": {"height": args.height, "width": args.width, "frames": args.frames},
        "tokens": lat_frames * (args.height // 16) * (args.width // 16), "steps": args.steps,
        "parts_done": [],
    }  # fmt: skip

    def save() -> None:
        write_result(args.out, res)

    save()  # a run stopped during its first part still records what it was
    for part in PARTS:
        if part in skip:
            continue
        if part in ("dit", "compile"):
            part_dit(args, res, device, compiled=part == "compile")
        elif part == "fp8":
            part_fp8(args, res, device)
        elif part == "vae":
            part_vae(args, res, device)
        elif part == "e2e":
            part_e2e(args, res, device, save)
        elif part == "profile":
            part_profile(args, res, device)
        else:
            part_floor(args, res, device)
        res["parts_done"].append(part)
        save()


if __name__ == "__main__":
    main()
