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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pipeline(args: argparse.Namespace, device: torch.device, world: int):
    """WanPipeline (fp32 VAE, bf16 DiT) on this rank, its DiT split by Ulysses."""
    from diffusers import AutoencoderKLWan, ContextParallelConfig, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(str(args.model / "vae"), torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(str(args.model), vae=vae, torch_dtype=torch.bfloat16)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if device.type == "cuda":
        pipe.transformer.set_attention_backend(args.attention)
    if world > 1:
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    return pipe


@torch.no_grad()
def step_ms(args: argparse.Namespace, dit, device: torch.device) -> float:
    """Median ms of one CFG step: two forwards (conditional, unconditional), as WanPipeline."""
    torch.manual_seed(0)
    lat = (16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    x = torch.randn(1, *lat, device=device, dtype=torch.bfloat16)
    t = torch.tensor([999], device=device)
    text, neg = (torch.randn(1, 512, dit.config.text_dim, device=device, dtype=torch.bfloat16)
                 for _ in range(2))  # fmt: skip

    def step() -> None:
        dit(x, t, text, return_dict=False)
        dit(x, t, neg, return_dict=False)

    step()
    step()
    _sync(device)
    dist.barrier()
    times = []
    for _ in range(args.steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


def video_s(args: argparse.Namespace, pipe, device: torch.device) -> float:
    """Seconds of one whole WanPipeline video of --e2e-steps steps."""
    from fastvideo.models.wan.registration import WAN_NEGATIVE_PROMPT

    dist.barrier()
    _sync(device)
    start = time.perf_counter()
    pipe(prompt="a red fox running through a snowy forest", negative_prompt=WAN_NEGATIVE_PROMPT,
         height=args.height, width=args.width, num_frames=args.frames, guidance_scale=5.0,
         num_inference_steps=args.e2e_steps, output_type="np",
         generator=torch.Generator("cpu").manual_seed(0))  # fmt: skip
    _sync(device)
    return time.perf_counter() - start


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
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    pipe = _pipeline(args, device, world)
    ms = step_ms(args, pipe.transformer, device)
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    res = {"world_size": world, "plan": f"diffusers Ulysses {world}", "step_ms": ms,
           "attention": args.attention if cuda else "native (cpu)", "peak_gib": peak}  # fmt: skip
    if rank == 0:
        print(f"diffusers CP ulysses={world}: {ms:.1f} ms per step (2 forwards, CFG)")
    if args.e2e_steps:
        res.update(e2e_s=video_s(args, pipe, device), e2e_steps=args.e2e_steps)
        if rank == 0:
            print(f"diffusers CP ulysses={world}: one {args.e2e_steps}-step video "
                  f"{res['e2e_s']:.1f} s")  # fmt: skip
    if rank == 0 and args.out:
        write_result(
            args.out, {"benchmark": "diffusers_cp", **environment(), **res, "weights": WEIGHTS_NOTE}
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
