set -x
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
source benchmarks/gpu_env.sh
python3 -m benchmarks.common /tmp/wan13b 1.3B > /dev/null
python3 -m benchmarks.attention_kernels --grid 6x16x16 --windows 2x2x2,1x1x1 --out $OUT/ak.json 2>&1 | grep -v Warning | tail -15
python3 -m benchmarks.latency --model /tmp/wan13b --height 128 --width 128 --frames 9 --steps 8 --reps 2 \
  --compare-diffusers --compile --attention sta --teacache --teacache-thresh 0.5 --e2e --e2e-exact --out $OUT/lat.json 2>&1 | grep -v "Warning\|warn" | tail -25
python3 -m benchmarks.latency --model /tmp/wan13b --height 128 --width 128 --frames 9 --reps 2 --skip text,vae \
   --attention sage 2>&1 | tail -3
torchrun --nproc-per-node 2 -m benchmarks.diffusers_cp --model /tmp/wan13b --height 128 --width 128 --frames 9 --e2e-steps 4 --out $OUT/cp.json 2>&1 | grep -v "Warning\|warn" | tail -8
python3 -m benchmarks.sp_options_check --model /tmp/wan13b --gpus 2 --height 128 --width 128 --frames 9 --compile --out $OUT/sp.json 2>&1 | grep -v "Warning\|warn" | tail -6
