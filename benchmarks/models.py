"""Time per denoising step, ours vs diffusers, in one process on one GPU, for the large
models at their published sizes (``benchmarks.model_zoo``): Wan2.1-I2V-14B at 480x832x81,
Wan2.2-A14B at 720x1280x81 (both experts resident; the expert switch cost measured),
Wan2.2-TI2V-5B at 704x1280x121 and HunyuanVideo at 720x1280x129.

A step is what each pipeline runs per denoising step: ours one forward of batch 2 with
CFG (conditional and unconditional rows together), diffusers two forwards of batch 1 (as
its pipelines call the transformer); HunyuanVideo uses embedded guidance, one forward of
batch 1 on both sides. Weights are random (seeded) and shared by both implementations;
the relative error of the step's outputs is reported. Each model is built directly on the
device and freed before the next; the JSON is rewritten after every model.

    python -m benchmarks.models --out /tmp/models.json
    python -m benchmarks.models --only wan2.2-ti2v-5b,hunyuanvideo --reps 2
    python -m benchmarks.models --device cpu --smoke
    python -m benchmarks.models --only hunyuanvideo --attention sta --vs-dense --ours-only

``--vs-dense`` times our model a second time with the dense backend ``auto`` picks (the
sparse backend's speed-up and its output's distance from dense); ``--ours-only`` skips
diffusers' timing (its model is still built: ours takes its weights).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    GIB,
    args_record,
    default_device,
    environment,
    free_memory,
    measure,
    rel_err,
    synchronize,
    timed_first_call,
    write_result,
)
from benchmarks.flops import hunyuan_forward_flops, wan_forward_flops
from benchmarks.model_zoo import (
    CASES,
    ModelCase,
    build_diffusers,
    build_ours,
    step_inputs,
    tiny_case,
)

Step = Callable[[], torch.Tensor]


def case_flops(case: ModelCase) -> dict[str, Any]:
    batch = 2 if case.cfg else 1
    if case.family == "hunyuan":
        flops = hunyuan_forward_flops(case.config, case.tokens, case.text_valid or 0, batch)
    else:
        flops = wan_forward_flops(case.config, case.tokens, batch, case.text_tokens,
                                  case.image_tokens, case.per_token_timestep)  # fmt: skip
    return flops.record(None)


def _steps(case: ModelCase, ours, ref, inputs) -> tuple[Step, Step]:
    """(our step, diffusers' step) for one expert: each returns [B, C, F, H, W]."""
    from fastvideo.layers.sequence import unpatchify

    grid = inputs.ours["grid"]

    def ours_step() -> torch.Tensor:
        return unpatchify(ours.forward_tokens(**inputs.ours), grid, case.patch)

    def ref_step() -> torch.Tensor:
        return torch.cat([ref(**kwargs)[0] for kwargs in inputs.diffusers])

    return ours_step, ref_step


def _time_impl(step: Step, device: torch.device, args) -> tuple[torch.Tensor, dict[str, Any]]:
    out, first = timed_first_call(step, device)  # also the warm-up
    m = measure(step, args.warmup, args.reps, device)
    return out, {"first_call_s": first, "step_ms": m["ms"], "peak_gib": m["peak_gib"],
                 "peak_total_gib": m["peak_total_gib"]}  # fmt: skip


def _one_call_ms(step: Step, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def switch_cost(second: Step, steady_ms: float, device: torch.device) -> dict[str, float]:
    """One step of ``second`` right after the timed steps of the first expert: minus the
    first expert's steady step time (the experts have the same shape) it is what switching
    experts costs. One extra step per implementation (a step at 720p is ~30 s)."""
    after_switch = _one_call_ms(second, device)
    return {"after_switch_ms": after_switch, "steady_ms": steady_ms,
            "switch_ms": after_switch - steady_ms}  # fmt: skip


@torch.no_grad()
def move_cost(model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """Seconds to copy ``model``'s weights device -> pinned host -> device: what a switch
    costs when the idle expert does not stay on the GPU."""
    params = [p for p in model.parameters()]
    sizes = [p.numel() * p.element_size() for p in params]
    padded = [-(-n // 64) * 64 for n in sizes]  # each view starts aligned for any dtype
    host = torch.empty(sum(padded), dtype=torch.uint8, pin_memory=device.type == "cuda")
    views, offset = [], 0
    for p, n, step in zip(params, sizes, padded, strict=True):
        views.append(host[offset : offset + n].view(p.dtype).view(p.shape))
        offset += step
    total = sum(sizes)
    seconds = {}
    directions = (("to_host_s", views, params), ("to_device_s", params, views))
    for name, targets, sources in directions:
        synchronize(device)
        start = time.perf_counter()
        for dst, src in zip(targets, sources, strict=True):
            dst.copy_(src, non_blocking=True)
        synchronize(device)
        seconds[name] = time.perf_counter() - start
    return {
        **seconds,
        "gib": total / GIB,
        "to_device_gib_per_s": total / GIB / seconds["to_device_s"],
    }


def shipped_sta(case: ModelCase):
    """The STA tile and window the case's registered variant ships for this size
    (``--attention sta``); None when it ships none (STA then picks its default window)."""
    from fastvideo.kernels_bridge.sta import STAConfig
    from fastvideo.models.registry import model_defaults

    shipped = model_defaults(case.hf_id)[1]
    window = (shipped.get("sta_window_size") or {}).get(f"{case.height}x{case.width}x{case.frames}")
    if window is None:
        return None
    return STAConfig(tile=tuple(shipped["sta_tile_size"]), default_window=tuple(window))


def run_case(case: ModelCase, args, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from fastvideo.kernels_bridge.attention import resolve_backend

    backend = resolve_backend(args.attention, device, dtype)
    refs = [build_diffusers(case, device, dtype, args.seed + i) for i in range(case.experts)]
    ours = [build_ours(case, r, dtype, backend) for r in refs]
    sta = shipped_sta(case) if backend == "sta" else None
    for model in ours if sta is not None else []:
        model.set_attention(backend, sta)
    if args.diffusers_attention:
        for r in refs:
            r.set_attention_backend(args.diffusers_attention)
    res: dict[str, Any] = {
        "size": {"height": case.height, "width": case.width, "frames": case.frames},
        "latent_shape": list(case.latent_shape), "tokens": case.tokens, "config": case.config,
        "experts": case.experts, "attention_backend": backend, "notes": list(case.notes),
        "sta_window": None if sta is None else list(sta.default_window),
        "ours_layout": f"1 forward of batch {2 if case.cfg else 1}",
        "diffusers_layout": f"{2 if case.cfg else 1} forward(s) of batch 1",
        "weights_gib": torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None,
        "flops": case_flops(case),
    }  # fmt: skip
    inputs = step_inputs(case, device, dtype, args.seed)
    steps = [_steps(case, o, r, inputs) for o, r in zip(ours, refs, strict=True)]
    out_ours, res["ours"] = _time_impl(steps[0][0], device, args)
    if case.experts == 2:  # right after the first expert's timed steps
        res["switch"] = {"ours": switch_cost(steps[1][0], res["ours"]["step_ms"], device)}
    res["outputs_finite"] = bool(torch.isfinite(out_ours).all())
    if args.vs_dense:
        res["dense"] = _vs_dense(ours[0], steps[0][0], out_ours, res["ours"], device, dtype, args)
    if not args.ours_only:
        out_ref, res["diffusers"] = _time_impl(steps[0][1], device, args)
        if case.experts == 2:
            res["switch"]["diffusers"] = switch_cost(steps[1][1], res["diffusers"]["step_ms"],
                                                     device)  # fmt: skip
        res["rel_err_vs_diffusers"] = rel_err(out_ours.float(), out_ref.float())
        res["outputs_finite"] &= bool(torch.isfinite(out_ref).all())
        del out_ref
        res["ratio_ours_over_diffusers"] = res["ours"]["step_ms"] / res["diffusers"]["step_ms"]
    del out_ours
    sparse = backend == "sta"  # the FLOPs are dense attention's: no rate for a sparse step
    for side in ("ours", "diffusers"):
        if side in res and not (side == "ours" and sparse):
            res[side]["tflops"] = res["flops"]["total"] / res[side]["step_ms"] / 1e9
    if case.experts == 2:
        res["switch"]["move"] = (
            move_cost(ours[1], device) if args.expert_move and device.type == "cuda"
            else "both experts resident on the GPU: no weights move (--expert-move times "
            "copying one expert device -> pinned host -> device)"
        )  # fmt: skip
    del steps, inputs, ours, refs
    return res


def _vs_dense(model, step: Step, out: torch.Tensor, timed: dict[str, Any], device, dtype,
              args) -> dict[str, Any]:  # fmt: skip
    """Our step again with the dense backend ``auto`` picks, after the chosen one."""
    from fastvideo.kernels_bridge.attention import resolve_backend

    chosen, sta = model.dist_attn.backend, model.dist_attn.sta
    dense = resolve_backend("auto", device, dtype)
    if dense == chosen:
        return {"backend": dense, "note": "the chosen backend is the dense one"}
    model.set_attention(dense, None)
    try:
        out_dense, timing = _time_impl(step, device, args)
    finally:
        model.set_attention(chosen, sta)
    return {"backend": dense, **timing, "speedup_of_chosen": timing["step_ms"] / timed["step_ms"],
            "rel_err_chosen_vs_dense": rel_err(out.float(), out_dense.float())}  # fmt: skip


def _print_case(name: str, res: dict[str, Any]) -> None:
    if "error" in res:
        print(f"{name:<16} failed: {res['error']}", flush=True)
        return
    if "dense" in res and "step_ms" in res["dense"]:
        d = res["dense"]
        print(f"{name:<16} {res['attention_backend']} {res['ours']['step_ms']:.1f} ms vs "
              f"{d['backend']} {d['step_ms']:.1f} ms: {d['speedup_of_chosen']:.2f}x, rel.err "
              f"{d['rel_err_chosen_vs_dense']:.2e}", flush=True)  # fmt: skip
    if "diffusers" not in res:
        return
    o, d = res["ours"], res["diffusers"]
    peak = ""
    if o["peak_gib"] is not None:
        peak = f"  peak +{o['peak_gib']:.1f} / +{d['peak_gib']:.1f} GiB"
    print(f"{name:<16} {res['tokens']:>7} tok  ours {o['step_ms']:9.1f} ms  diffusers "
          f"{d['step_ms']:9.1f} ms  ratio {res['ratio_ours_over_diffusers']:.3f}{peak}  "
          f"rel.err {res['rel_err_vs_diffusers']:.2e}", flush=True)  # fmt: skip
    for side, s in res.get("switch", {}).items():
        if isinstance(s, dict) and "switch_ms" in s:
            print(f"  expert switch ({side}): {s['switch_ms']:+.1f} ms", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", help="cuda (default when available) or cpu")
    p.add_argument("--only", default=",".join(CASES), help=f"comma list of: {', '.join(CASES)}")
    p.add_argument("--smoke", action="store_true", help="toy sizes of the same models (CPU)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps after the first call")
    p.add_argument("--reps", type=int, default=1, help="timed steps per implementation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default="auto", help="our attention backend")
    p.add_argument("--diffusers-attention", help="diffusers attention backend, e.g. _native_cudnn")
    p.add_argument("--expert-move", action="store_true", help="also time moving one expert")
    p.add_argument("--vs-dense", action="store_true",
                   help="also time ours with the dense backend auto picks")  # fmt: skip
    p.add_argument("--ours-only", action="store_true", help="skip diffusers' timing")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


@torch.no_grad()
def main() -> None:
    args = parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"--only: unknown models {unknown}; allowed: {', '.join(CASES)}")
    device = default_device(args.device)
    dtype = torch.bfloat16
    res: dict[str, Any] = {"benchmark": "models", **environment(), "args": args_record(args),
                           "dtype": "bf16", "smoke": args.smoke, "cases": {},
                           "weights": "seeded random, shared by both implementations"}  # fmt: skip
    for name in names:
        case = tiny_case(CASES[name]) if args.smoke else CASES[name]
        start = time.perf_counter()
        try:
            out = run_case(case, args, device, dtype)
        except Exception as e:  # noqa: BLE001 - one model failing (e.g. OOM) must not stop the rest
            out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        out["seconds"] = time.perf_counter() - start
        free_memory()
        res["cases"][name] = out
        _print_case(name, out)
        write_result(args.out, res)
    ok = [r for r in res["cases"].values() if "ratio_ours_over_diffusers" in r]
    if ok:
        mean = statistics.mean(r["ratio_ours_over_diffusers"] for r in ok)
        print(f"mean step-time ratio ours/diffusers over {len(ok)} model(s): {mean:.3f}")


if __name__ == "__main__":
    main()
