#!/usr/bin/env bash
# Issue-4 GPU run (two GPUs, one call): GPU tests, then offline throughput of 8 requests of
# the Wan2.1-T2V-1.3B architecture (random weights) at 256x256x17, 10 steps, batch 1 vs 4
# and latency vs throughput mode, the engine overhead with the tiny model, and a re-check
# of the 1 vs 2 GPU step time with the engine core in place.
# Usage on the GPU machine, from the repo root: bash benchmarks/run_gpu_engine.sh OUTDIR
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
python3 -m pytest -q -s -m gpu tests/test_gpu.py -p no:cacheprovider
python3 -m benchmarks.common /tmp/wan13b 1.3B
python3 -m benchmarks.throughput --model fastvideo/wan2.1-t2v-tiny-random --configs 1:b1 \
  --height 64 --width 64 --frames 5 --steps 4 --overhead-requests 50 --out "$out/engine_overhead_tiny.json"
python3 -m benchmarks.throughput --model /tmp/wan13b \
  --configs 1:b1,1:b4,2:latency,2:throughput,2:throughput-b4 --out "$out/throughput.json"
python3 -m benchmarks.parallel_scaling --model /tmp/wan13b --configs 1,2,2:ulysses --steps 4 \
  --out "$out/parallel_scaling_recheck.json"
