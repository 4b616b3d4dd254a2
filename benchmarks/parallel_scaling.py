"""DiT time per denoising step on 1..N GPUs, and equality of the latents across plans.

    python -m benchmarks.parallel_scaling --model /tmp/fastvideo-bench-wan-1.3B \
        --configs 1,2,2:ulysses,2:ring --out /tmp/scaling.json
    python -m benchmarks.parallel_scaling --model fastvideo/wan2.1-t2v-tiny-random \
        --device cpu --configs 1,2,2:ring --height 32 --width 32 --frames 5 --steps 2

Each config is ``GPUS[:PLAN]`` with PLAN one of auto (default), ulysses, ring, cfg.
For each: a 2-step request (also the warm-up) whose latents are compared with the first
config's, then a timed request of --steps steps. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import WEIGHTS_NOTE, args_record, environment, rel_err, write_result

PLANS = {
    "auto": {},
    "cfg": {"cfg_parallel": True},
    "ulysses": lambda n: {"cfg_parallel": False, "ulysses_degree": n},
    "ring": lambda n: {"cfg_parallel": False, "ring_degree": n},
}


def _overrides(gpus: int, plan: str) -> dict:
    spec = PLANS[plan]
    return spec(gpus) if callable(spec) else dict(spec)


def run(args: argparse.Namespace) -> dict:
    from fastvideo import VideoGenerator

    size = dict(
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        seed=0,
        guidance_scale=args.guidance,
        output_type="latent",
    )
    rows, reference = [], None
    for item in args.configs.split(","):
        gpus_s, _, plan = item.partition(":")
        gpus, plan = int(gpus_s), plan or "auto"
        start = time.perf_counter()
        with VideoGenerator.from_pretrained(
            args.model, num_gpus=gpus, device=args.device, **_overrides(gpus, plan)
        ) as gen:
            load_s = time.perf_counter() - start
            check = gen.generate_video(args.prompt, num_inference_steps=2, **size)
            timed = gen.generate_video(args.prompt, num_inference_steps=args.steps, **size)
        if args.profile_dir and item in args.profile_configs.split(","):
            _profile(args, item, gpus, plan, size)
        reference = reference if reference is not None else check.latents
        row = {
            "gpus": gpus,
            "plan_requested": plan,
            "plan": timed.plan,
            "step_s": timed.timings["denoising_step_mean"],
            "load_s": load_s,
            "latents_rel_err_vs_first": rel_err(check.latents, reference),
            "peak_memory_gib_per_rank": [b / 2**30 for b in timed.peak_memory_bytes],
            "timings": timed.timings,
        }
        rows.append(row)
        if args.out:  # after every config, so a run cut short still leaves its figures
            _write(args, rows)
        print(
            f"{item:>12}: {row['plan']:<22} {row['step_s'] * 1e3:8.1f} ms/step  "
            f"err {row['latents_rel_err_vs_first']:.2e}  "
            f"peak {', '.join(f'{m:.1f}' for m in row['peak_memory_gib_per_rank'])} GiB",
            flush=True,
        )
    _add_speedups(rows)
    return {"rows": rows}


def _add_speedups(rows: list[dict]) -> None:
    for row in rows:
        row["speedup_vs_first"] = rows[0]["step_s"] / row["step_s"]


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    _add_speedups(rows)
    payload = {
        "benchmark": "parallel_scaling",
        **environment(),
        "args": args_record(args),
        "weights": WEIGHTS_NOTE,
        "rows": rows,
    }
    write_result(args.out, payload)


def _profile(args: argparse.Namespace, item: str, gpus: int, plan: str, size: dict) -> None:
    """One more 2-step request under torch.profiler (rank 0's op table to --profile-dir)."""
    import os

    from fastvideo import VideoGenerator

    os.environ["FASTVIDEO_TORCH_PROFILE_DIR"] = os.path.join(
        args.profile_dir, item.replace(":", "-")
    )
    try:
        with VideoGenerator.from_pretrained(
            args.model, num_gpus=gpus, device=args.device, **_overrides(gpus, plan)
        ) as gen:
            gen.generate_video(args.prompt, num_inference_steps=2, **size)
    finally:
        del os.environ["FASTVIDEO_TORCH_PROFILE_DIR"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (see benchmarks.common)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--configs", default="1,2,2:ulysses")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after a 2-step warm-up)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--prompt", default="a fox running through a snowy forest, cinematic")
    p.add_argument("--out", type=Path, default=None, help="JSON result path")
    p.add_argument("--profile-dir", default=None, help="write rank-0 profiler tables here")
    p.add_argument("--profile-configs", default="", help="comma list of configs to profile")
    args = p.parse_args()
    result = run(args)
    print("\nconfig                     ms/step   speedup  rel.err(latents)")
    for r in result["rows"]:
        print(
            f"{r['gpus']} GPU {r['plan']:<20} {r['step_s'] * 1e3:9.1f} "
            f"{r['speedup_vs_first']:8.2f}x  {r['latents_rel_err_vs_first']:.2e}"
        )


if __name__ == "__main__":
    main()
