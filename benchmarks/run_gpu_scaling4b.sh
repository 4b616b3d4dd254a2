#!/usr/bin/env bash
# Issue-6 side-by-side (four GPUs, one call), plus two issue-5 measurements on spare GPUs.
# Phase 1, concurrently on separate GPUs: our 50-step video on 1 GPU (GPU 0); our regional
#   compile vs diffusers compiled with its cuDNN attention (GPU 2); the STA kernel sweep
#   (GPU 3).
# Phase 2, all four GPUs, one job at a time: our DiT step time on 1, 2, 4 GPUs (automatic,
#   forced Ulysses 4, ring 4; latents after 2 steps vs 1 GPU), our 50-step video on 4 GPUs,
#   diffusers' Ulysses context parallelism (torchrun) on 4 GPUs and diffusers on 1 GPU.
# Usage on the GPU machine, from the repo root: bash benchmarks/run_gpu_scaling4b.sh OUTDIR
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
python3 -m benchmarks.common /tmp/wan13b 1.3B
filter() { grep -v "Warn\|warn\|Loading\|INFO\|deprecate\|Writing"; }
( CUDA_VISIBLE_DEVICES=0 python3 -m benchmarks.end_to_end --model /tmp/wan13b --gpus 1 \
    --out "$out/end_to_end_1gpu.json" > "$out/e2e1.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=2 python3 -m benchmarks.latency --model /tmp/wan13b --compare-diffusers \
    --skip text,vae --compile --compile-diffusers --diffusers-attention _native_cudnn \
    --out "$out/latency_compile_cudnn.json" > "$out/compile.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=3 python3 -m benchmarks.attention_kernels \
    --out "$out/attention_kernels_sweep.json" \
    --sta "3x8x8/64x64/7x4x7,7x3x5,5x2x5;3x8x8/128x64/7x4x7,7x3x5,5x2x5;3x16x8/128x128/7x2x7,7x1x7,5x1x5;3x8x16/128x128/7x4x4,7x2x4,7x2x2" \
    > "$out/sweep.log" 2>&1 ) &
wait
for f in e2e1 compile sweep; do echo "== $f"; filter < "$out/$f.log" | tail -22; done
python3 -m benchmarks.parallel_scaling --model /tmp/wan13b --configs 1,2,4,4:ulysses,4:ring \
  --steps 3 --out "$out/parallel_scaling_4gpu.json" 2>&1 | filter | tail -12
python3 -m benchmarks.end_to_end --model /tmp/wan13b --gpus 4 \
  --out "$out/end_to_end_4gpu.json" 2>&1 | filter | tail -3
torchrun --nproc-per-node 4 -m benchmarks.diffusers_cp --model /tmp/wan13b \
  --out "$out/diffusers_cp_4gpu.json" 2>&1 | filter | tail -4
CUDA_VISIBLE_DEVICES=0 torchrun --nproc-per-node 1 -m benchmarks.diffusers_cp \
  --model /tmp/wan13b --e2e-steps 0 --out "$out/diffusers_1gpu.json" 2>&1 | filter | tail -3
