"""diffusers' own context parallelism (Ulysses) on N GPUs, for the side-by-side with our
engine: DiT time per denoising step with CFG (diffusers' WanPipeline runs the conditional
and unconditional passes as two forwards, so a step is two forwards) and one whole 50-step
video through WanPipeline. diffusers requires torchrun:

    torchrun --nproc-per-node 4 -m benchmarks.diffusers_cp --model /tmp/fastvideo-bench-wan-1.3B \
        --out /tmp/diffusers_cp.json
    torchrun --nproc-per-node 1 -m benchmarks.diffusers_cp --model /tmp/fastvideo-bench-wan-tiny \
        --device cpu --height 32 --width 32 --frames 5 --steps 1 --e2e-steps 2

Same random checkpoint as our benchmarks (benchmarks.common), bf16 DiT, fp32 VAE.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import WEIGHTS_NOTE, environment, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=4, help="timed denoising steps")
    p.add_argument("--e2e-steps", type=int, default=50, help="0: skip the whole video")
    p.add_argument("--attention", default="_native_cudnn", help="diffusers attention backend")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from diffusers import AutoencoderKLWan, ContextParallelConfig, WanPipeline

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    vae = AutoencoderKLWan.from_pretrained(str(args.model / "vae"), torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(str(args.model), vae=vae, torch_dtype=torch.bfloat16)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    dit = pipe.transformer
    if args.device == "cuda":
        dit.set_attention_backend(args.attention)
    if world > 1:
        dit.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))

    torch.manual_seed(0)
    lat = (16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    text_dim = dit.config.text_dim
    x = torch.randn(1, *lat, device=device, dtype=torch.bfloat16)
    t = torch.tensor([999], device=device)
    text = torch.randn(1, 512, text_dim, device=device, dtype=torch.bfloat16)
    neg = torch.randn(1, 512, text_dim, device=device, dtype=torch.bfloat16)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> None:
        with torch.no_grad():
            dit(x, t, text, return_dict=False)
            dit(x, t, neg, return_dict=False)

    step()
    step()
    sync()
    dist.barrier()
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    step_ms = sorted(times)[len(times) // 2] * 1000
    res = {"world_size": world, "plan": f"diffusers Ulysses {world}", "step_ms": step_ms,
           "attention": args.attention if device.type == "cuda" else "native (cpu)",
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30
           if device.type == "cuda" else None}  # fmt: skip
    if rank == 0:
        print(f"diffusers CP ulysses={world}: {step_ms:.1f} ms per step (2 forwards, CFG)")
    if args.e2e_steps:
        from fastvideo.models.wan.registration import WAN_NEGATIVE_PROMPT

        dist.barrier()
        sync()
        start = time.perf_counter()
        pipe(prompt="a red fox running through a snowy forest", negative_prompt=WAN_NEGATIVE_PROMPT,
             height=args.height, width=args.width, num_frames=args.frames, guidance_scale=5.0,
             num_inference_steps=args.e2e_steps, output_type="np",
             generator=torch.Generator("cpu").manual_seed(0))  # fmt: skip
        sync()
        res["e2e_s"] = time.perf_counter() - start
        res["e2e_steps"] = args.e2e_steps
        if rank == 0:
            secs = res["e2e_s"]
            print(f"diffusers CP ulysses={world}: one {args.e2e_steps}-step video {secs:.1f} s")
    if rank == 0 and args.out:
        write_result(
            args.out, {"benchmark": "diffusers_cp", **environment(), **res, "weights": WEIGHTS_NOTE}
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
