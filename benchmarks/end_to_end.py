"""One video end to end (text encoding, 50 denoising steps with CFG, VAE decode) at the
model's default size (or --height/--width/--frames), on N GPUs, after a 2-step warm-up
request (as a server runs at start-up).

    python -m benchmarks.common /tmp/fastvideo-bench-wan-1.3B 1.3B
    python -m benchmarks.end_to_end --model /tmp/fastvideo-bench-wan-1.3B --gpus 4 --out e2e.json
    python -m benchmarks.end_to_end --model fastvideo/wan2.1-t2v-tiny-random --device cpu --steps 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import WEIGHTS_NOTE, args_record, environment, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--height", type=int, help="default: the model's")
    p.add_argument("--width", type=int, help="default: the model's")
    p.add_argument("--frames", type=int, help="default: the model's")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prompt", default="a red fox running through a snowy forest")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from fastvideo import VideoGenerator

    size = {k: v for k, v in (("height", args.height), ("width", args.width),
                              ("num_frames", args.frames)) if v is not None}  # fmt: skip
    start = time.perf_counter()
    with VideoGenerator.from_pretrained(args.model, num_gpus=args.gpus, device=args.device) as gen:
        load = time.perf_counter() - start
        gen.generate_video(args.prompt, num_inference_steps=2, seed=0, **size)
        out = gen.generate_video(args.prompt, num_inference_steps=args.steps, seed=0, **size)
    print(out.plan, out.frames.shape, {k: round(v, 2) for k, v in out.timings.items()})
    if args.out:
        write_result(args.out, {
            "benchmark": "end_to_end", **environment(), "args": args_record(args), "plan": out.plan,
            "frames_shape": list(out.frames.shape), "load_s": load, "timings": out.timings,
            "peak_memory_gib_per_rank": [b / 2**30 for b in out.peak_memory_bytes],
            "weights": WEIGHTS_NOTE,
        })  # fmt: skip


if __name__ == "__main__":
    main()
