#!/usr/bin/env bash
# Issue-3 GPU run (two GPUs, one call): GPU tests, a random full-size Wan2.1-T2V-1.3B
# checkpoint, our DiT vs diffusers' on one GPU, then 1 vs 2 GPUs with each plan.
# Usage on the GPU machine, from the repo root: bash benchmarks/run_gpu_scaling.sh OUTDIR
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -s -m gpu tests/test_gpu.py -p no:cacheprovider
python3 -m benchmarks.common /tmp/wan13b 1.3B
python3 -m benchmarks.dit_forward --model /tmp/wan13b --attention-table --out "$out/dit_forward.json"
python3 -m benchmarks.parallel_scaling --model /tmp/wan13b --configs 1,2,2:ulysses,2:ring \
  --steps 5 --out "$out/parallel_scaling.json" --profile-dir "$out/prof" --profile-configs 1,2:ulysses
