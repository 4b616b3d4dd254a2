"""Offline throughput: N requests submitted at once, videos per hour per engine setting,
and the engine's own overhead per request.

    python -m benchmarks.throughput --model /tmp/fastvideo-bench-wan-1.3B \
        --configs 1:b1,1:b4,2:latency,2:throughput --height 256 --width 256 --frames 17
    python -m benchmarks.throughput --model fastvideo/wan2.1-t2v-tiny-random --device cpu \
        --configs 1:b1,1:b4 --height 32 --width 32 --frames 5 --steps 2 --num-requests 4

Each config is ``GPUS:SETTING`` with SETTING one of b1/b4 (latency mode, max batch 1/4),
latency, throughput, throughput-b4. One warm-up request runs first (not timed). The
engine overhead is end-to-end time minus the workers' own time, per request, measured
with sequential single requests (``--overhead-requests``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.common import WEIGHTS_NOTE, args_record, environment, write_result

SETTINGS = {
    "b1": {"parallel_mode": "latency", "max_batch_size": 1},
    "b4": {"parallel_mode": "latency", "max_batch_size": 4},
    "latency": {"parallel_mode": "latency", "max_batch_size": 1},
    "throughput": {"parallel_mode": "throughput", "max_batch_size": 1},
    "throughput-b4": {"parallel_mode": "throughput", "max_batch_size": 4},
}


def run_config(args: argparse.Namespace, gpus: int, setting: str) -> dict:
    from fastvideo import VideoGenerator

    size = dict(
        height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps
    )
    prompts = [f"{args.prompt}, variation {i}" for i in range(args.num_requests)]
    with VideoGenerator.from_pretrained(
        args.model, num_gpus=gpus, device=args.device, **SETTINGS[setting]
    ) as gen:
        gen.generate_video("warm-up", **size)
        start = time.perf_counter()
        outputs = gen.generate_video(prompts, seed=0, **size)
        wall = time.perf_counter() - start
        overheads = []
        for i in range(args.overhead_requests):
            out = gen.generate_video(f"overhead {i}", **size)
            overheads.append(out.timings["end_to_end"] - out.timings["total"])
    return {
        "gpus": gpus,
        "setting": setting,
        "plans": sorted({o.plan for o in outputs}),
        "requests": len(outputs),
        "wall_s": wall,
        "videos_per_hour": len(outputs) / wall * 3600,
        "latency_mean_s": statistics.mean(o.timings["end_to_end"] for o in outputs),
        "engine_overhead_ms_median": statistics.median(overheads) * 1e3 if overheads else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--configs", default="1:b1,1:b4")
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--overhead-requests", type=int, default=10)
    p.add_argument("--prompt", default="a red fox running through fresh snow")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = []
    for item in args.configs.split(","):
        gpus, _, setting = item.partition(":")
        row = run_config(args, int(gpus), setting or "b1")
        rows.append(row)
        print(
            f"{item:>16}: {row['videos_per_hour']:8.0f} videos/h  wall {row['wall_s']:6.1f}s  "
            f"latency {row['latency_mean_s']:5.1f}s  overhead "
            f"{row['engine_overhead_ms_median']:.1f} ms  {row['plans']}",
            flush=True,
        )
    base = rows[0]["videos_per_hour"]
    for row in rows:
        row["throughput_vs_first"] = row["videos_per_hour"] / base
    print("\nconfig            videos/h   vs first")
    for row in rows:
        print(
            f"{row['gpus']}:{row['setting']:<14} {row['videos_per_hour']:9.0f} "
            f"{row['throughput_vs_first']:8.2f}x"
        )
    if args.out:
        write_result(
            args.out,
            {
                "benchmark": "throughput",
                **environment(),
                "args": args_record(args),
                "weights": WEIGHTS_NOTE,
                "rows": rows,
            },
        )


if __name__ == "__main__":
    main()
