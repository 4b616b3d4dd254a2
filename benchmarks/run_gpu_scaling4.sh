#!/usr/bin/env bash
# Issue-6 run (four GPUs, one call): 1, 2 and 4 GPUs on the full-size Wan2.1-T2V-1.3B
# architecture (random weights), automatic plan and forced Ulysses 4 / ring 4, latents
# after 2 steps compared with 1 GPU. JSON is rewritten after every config.
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
python3 -m benchmarks.common /tmp/wan13b 1.3B
python3 -m benchmarks.parallel_scaling --model /tmp/wan13b --configs 1,2,4,4:ulysses,4:ring \
  --steps 3 --out "$out/parallel_scaling_4gpu.json"
