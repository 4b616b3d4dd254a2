"""One video end to end (text encoding, 50 denoising steps with CFG, VAE decode) at the
model's default size, on N GPUs.

    python -m benchmarks.common /tmp/wan13b 1.3B
    python -m benchmarks.end_to_end --model /tmp/wan13b --gpus 4 --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import environment, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prompt", default="a red fox running through a snowy forest")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from fastvideo import VideoGenerator

    start = time.perf_counter()
    with VideoGenerator.from_pretrained(args.model, num_gpus=args.gpus) as gen:
        load = time.perf_counter() - start
        out = gen.generate_video(args.prompt, num_inference_steps=args.steps, seed=0)
    print(out.plan, out.frames.shape, {k: round(v, 2) for k, v in out.timings.items()})
    if args.out:
        write_result(args.out, {
            "benchmark": "end_to_end", **environment(), "plan": out.plan,
            "frames_shape": list(out.frames.shape), "load_s": load, "timings": out.timings,
            "peak_memory_gib_per_rank": [b / 2**30 for b in out.peak_memory_bytes],
            "weights": "seeded random bf16; 1-layer UMT5 text encoder (its time is not UMT5-XXL)",
        })  # fmt: skip


if __name__ == "__main__":
    main()
