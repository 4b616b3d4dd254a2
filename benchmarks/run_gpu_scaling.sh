#!/usr/bin/env bash
# Issue-3 GPU run (two GPUs, one call): GPU tests, a random full-size Wan2.1-T2V-1.3B
# checkpoint, our DiT vs diffusers' on one GPU, then 1 vs 2 GPUs with each plan.
# Usage on the GPU machine, from the repo root: bash benchmarks/run_gpu_scaling.sh OUTDIR
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 FASTVIDEO_CACHE_DIR=/tmp/fastvideo-cache
nvidia-smi --query-gpu=index,name,memory.total --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -s -m gpu tests/test_gpu.py -p no:cacheprovider
python3 -m benchmarks.common /tmp/wan13b 1.3B
python3 -m benchmarks.dit_forward --model /tmp/wan13b --attention-table --out "$out/dit_forward.json"
python3 -m benchmarks.parallel_scaling --model /tmp/wan13b --configs 1,2,2:ulysses,2:ring \
  --steps 5 --out "$out/parallel_scaling.json" --profile-dir "$out/prof" --profile-configs 1,2:ulysses
