#!/usr/bin/env bash
# Issue-5 GPU run (two GPUs of one machine, one call, each GPU its own job, no sharing):
# GPU 0: the attention kernel table with STA; ours vs diffusers at 480x832x81 (exact path:
#   DiT forward, VAE decode fp32/bf16, peak memory); 50-step CFG videos: ours exact, ours
#   fast (STA + TeaCache 0.08), ours dense + TeaCache, diffusers' WanPipeline.
# GPU 1: our regional compile vs diffusers' torch.compile (DiT forward).
# Usage on the GPU machine, from the repo root: bash benchmarks/run_gpu_kernels.sh OUTDIR
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
python3 -m benchmarks.common /tmp/wan13b 1.3B
(
  export CUDA_VISIBLE_DEVICES=1
  python3 -m benchmarks.latency --model /tmp/wan13b --compare-diffusers --skip text,vae \
    --compile --compile-diffusers --out "$out/latency_compile.json" > "$out/compile.log" 2>&1
) &
export CUDA_VISIBLE_DEVICES=0
python3 -m benchmarks.attention_kernels --out "$out/attention_kernels.json" 2>&1 | grep -v Warn
python3 -m benchmarks.latency --model /tmp/wan13b --compare-diffusers \
  --out "$out/latency_exact.json" 2>&1 | grep -v "Warn\|warn\|Loading"
python3 -m benchmarks.latency --model /tmp/wan13b --skip text,dit,vae --attention sta --teacache \
  --e2e --e2e-exact --e2e-teacache-dense --compare-diffusers \
  --out "$out/latency_e2e.json" 2>&1 | grep -v "Warn\|warn\|Loading"
wait
grep -v "Warn\|warn\|Loading" "$out/compile.log" | tail -8
