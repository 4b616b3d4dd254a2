#!/usr/bin/env bash
# Issue-5 GPU run 3 (one GPU, sequential): 50-step CFG videos with the shipped STA window
# (ours exact, ours STA + TeaCache 0.08, ours cuDNN + TeaCache 0.08, diffusers WanPipeline),
# then ours vs diffusers DiT forward and VAE decode (time and peak memory) on the final code.
# Usage on the GPU machine, from the repo root: bash benchmarks/run_gpu_kernels3.sh OUTDIR
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
filter() { grep -v "Warn\|warn\|Loading\|INFO\|deprecate\|Writing"; }
python3 -m benchmarks.common /tmp/wan13b 1.3B
python3 -m benchmarks.latency --model /tmp/wan13b --skip text,dit,vae --attention sta --teacache \
  --e2e --e2e-exact --e2e-teacache-dense --compare-diffusers \
  --out "$out/latency_e2e_50steps_v2.json" 2>&1 | filter
python3 -m benchmarks.latency --model /tmp/wan13b --compare-diffusers \
  --out "$out/latency_exact_v3.json" 2>&1 | filter
