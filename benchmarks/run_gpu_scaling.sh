#!/usr/bin/env bash
# Issue-3 GPU run (two GPUs, one call): a random full-size Wan2.1-T2V-1.3B checkpoint,
# our DiT vs diffusers' on one GPU, then 1 vs 2 GPUs with each plan.
# Usage on the GPU machine, from the repo root: bash benchmarks/run_gpu_scaling.sh OUTDIR
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 FASTVIDEO_CACHE_DIR=/tmp/fastvideo-cache
nvidia-smi --query-gpu=index,name,memory.total --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# Smoke test of the multi-GPU path on the tiny demo model first (fails fast and cheap).
python3 -m benchmarks.parallel_scaling --model fastvideo/wan2.1-t2v-tiny-random \
  --configs 1,2,2:ulysses,2:ring --height 64 --width 64 --frames 5 --steps 2
python3 -m benchmarks.common /tmp/wan13b 1.3B
python3 -m benchmarks.dit_forward --model /tmp/wan13b --attention-table --out "$out/dit_forward.json"
python3 -m benchmarks.parallel_scaling --model /tmp/wan13b --configs 1,2,2:ulysses,2:ring \
  --steps 5 --out "$out/parallel_scaling.json"
