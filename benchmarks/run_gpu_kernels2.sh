#!/usr/bin/env bash
# Issue-5 GPU run 2 (one GPU, sequential): the STA kernel sweep (tile shapes and FlexAttention
# block sizes), ours vs diffusers after the memory changes (DiT forward, VAE decode fp32 and
# bf16, peak memory), and our regional compile vs diffusers' torch.compile, each alone on
# the GPU. Usage on the GPU machine, from the repo root: bash benchmarks/run_gpu_kernels2.sh OUT
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
export CUDA_VISIBLE_DEVICES=0
python3 -m benchmarks.common /tmp/wan13b 1.3B
python3 -m benchmarks.attention_kernels --out "$out/attention_kernels_sweep.json" \
  --sta "3x8x8/64x64/7x4x7,7x3x5,5x2x5;3x8x8/128x64/7x4x7,7x3x5,5x2x5;3x16x8/128x128/7x2x7,7x1x7,5x1x5;3x8x16/128x128/7x4x4,7x2x4,7x2x2" \
  2>&1 | grep -v "Warn\|INFO"
python3 -m benchmarks.latency --model /tmp/wan13b --compare-diffusers \
  --out "$out/latency_exact.json" 2>&1 | grep -v "Warn\|warn\|Loading"
python3 -m benchmarks.latency --model /tmp/wan13b --compare-diffusers --skip text,vae \
  --compile --compile-diffusers --out "$out/latency_compile.json" 2>&1 | grep -v "Warn\|warn\|Loading"
