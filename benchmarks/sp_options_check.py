"""GPU check that STA, TeaCache and regional compile work under sequence parallelism:
latents of 1 GPU vs Ulysses on N GPUs with the same options (bf16), and TeaCache's skip
counts equal on both.

    python -m benchmarks.sp_options_check --model /tmp/wan13b --gpus 2 --out x.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import environment, rel_err, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from fastvideo import VideoGenerator

    opts = dict(attention_backend="sta", enable_torch_compile=args.compile)
    req = dict(height=args.height, width=args.width, num_frames=args.frames, seed=0,
               num_inference_steps=args.steps, enable_teacache=True, teacache_thresh=0.2,
               output_type="latent")  # fmt: skip
    outs = {}
    for gpus, plan in ((1, {}), (args.gpus, dict(ulysses_degree=args.gpus, cfg_parallel=False))):
        with VideoGenerator.from_pretrained(args.model, num_gpus=gpus, **opts, **plan) as gen:
            outs[gpus] = gen.generate_video("a fox in the snow", **req)
        print(gpus, outs[gpus].plan, outs[gpus].stats, outs[gpus].timings["denoising_step_mean"])
    err = rel_err(outs[args.gpus].latents, outs[1].latents)
    same = outs[args.gpus].stats == outs[1].stats
    print(f"latents rel err {err:.2e}; same TeaCache decisions: {same}")
    if args.out:
        write_result(args.out, {"benchmark": "sp_options_check", **environment(),
                                "rel_err": err, "same_decisions": same,
                                "stats": {str(k): v.stats for k, v in outs.items()},
                                "plans": {str(k): v.plan for k, v in outs.items()},
                                "step_s": {str(k): v.timings["denoising_step_mean"]
                                           for k, v in outs.items()}})  # fmt: skip


if __name__ == "__main__":
    main()
