#!/usr/bin/env bash
# Issue 6's targets in one GPU call: quantize_into_cache against the copy bandwidth
# (every format; fp8 and nvfp4 again at a global scale that is not a power of two;
# the bound without rounding) and FP4 prefill against cuDNN bf16 flash attention.
# Each script measures its baseline in its own run. Logs go to $1 (default: ./out).
#
#     bash benchmarks/prefill_and_quantize_targets.sh "$OUT"
set -uo pipefail
logs=$(realpath -m "${1:-out}")
mkdir -p "$logs"
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$logs/gpu.txt"
python3 quantize_into_cache.py --cases bulk 2>&1 | tee "$logs/quantize.txt"
python3 prefill_attention.py --formats nvfp4,mxfp4,fp4_e2m1 --head-dims 128,64 \
  --implementations pallas_mosaic 2>&1 | tee "$logs/prefill.txt"
python3 quantize_into_cache.py --cases bulk --formats bf16,fp8_e4m3,fp8_e5m2,nvfp4 \
  --global-scale 0.09 2>&1 | tee "$logs/quantize_scale_0.09.txt"
python3 bound_quantize_into_cache.py 2>&1 | tee "$logs/quantize_bound.txt"
