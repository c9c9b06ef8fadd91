#!/usr/bin/env bash
# rlp-jax bench on one GPU at the paper's shape (Qwen3-1.7B, context 2048, G 16), and the same
# command on a baseline checkout of rlp-jax for a side-by-side ratio, in one bounded script.
#
# Usage: OUT=results/ [BASELINE=/path/to/older/rlp-jax] bash launch/gpu_bench.sh
#   THOUGHT (1024), BATCH (2), REPEATS (2), MODEL (qwen3-1.7b), TIMEOUT (per run, 300 s) size it;
#   the paper's thoughts are 2048 tokens (THOUGHT=2048), which the old code needs minutes for.
# JSON + logs land in $OUT (docs/bench/ keeps them). Every run is bounded by `timeout`.
set -u
OUT=${OUT:-bench-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# JAX and PyTorch share the card in one process: allocate on demand instead of JAX's 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

# The same flags for both checkouts (the baseline's bench may not know --shape).
SHAPE=(--model "${MODEL:-qwen3-1.7b}" --dtype bfloat16 --remat full --batch "${BATCH:-2}" --rollouts 16
       --context 2048 --thought "${THOUGHT:-1024}" --targets 1 --decode-prompt 2048 --decode-new 128
       --decode-batches "16,64" --roofline-sizes "4096,8192" --repeats "${REPEATS:-2}" --skip-torch)

run() {  # name, checkout
  echo "=== $1 ($2)"
  (cd "$2" && PYTHONPATH="$2" timeout "${TIMEOUT:-300}" "$PY" -m rlp_jax.bench "${SHAPE[@]}" \
     --json "$OUT/$1.json") 2>&1 | tee "$OUT/$1.log"
  echo "=== $1 exit ${PIPESTATUS[0]}"
}

run paper-shape "$HERE"
if [ -n "${BASELINE:-}" ]; then run paper-shape-baseline "$BASELINE"; fi
# The HF peer on the same card, at a decode it can finish (its per-token cost is Python + launches).
echo "=== hf-peer"
PYTHONPATH="$HERE" timeout "${TIMEOUT:-300}" "$PY" -m rlp_jax.bench --model "${MODEL:-qwen3-1.7b}" --dtype bfloat16 \
  --remat full --batch 2 --rollouts 8 --context 256 --thought 256 --decode-prompt 1024 --decode-new 64 \
  --decode-batches 16 --roofline-sizes 4096 --repeats 2 --json "$OUT/hf-peer.json" 2>&1 | tee "$OUT/hf-peer.log"
