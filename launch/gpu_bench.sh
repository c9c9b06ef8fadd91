#!/usr/bin/env bash
# rlp-jax bench on one GPU at the paper's shape (Qwen3-1.7B, context 2048, G 16), and the same
# command on a baseline checkout of rlp-jax for a side-by-side ratio, in one bounded script.
#
# Usage: OUT=results/ [BASELINE=/path/to/older/rlp-jax] bash launch/gpu_bench.sh
#   THOUGHT (1024), BATCH (2), REPEATS (2), MODELS (a space-separated list; default $MODEL or
#   qwen3-1.7b), TIMEOUT (per run, 300 s) size it; the paper's thoughts are 2048 tokens
#   (THOUGHT=2048), which the old code needs minutes for.
#   MODELS="qwen3-1.7b nemotron-nano-12b-v2" adds the Nemotron-H hybrid (12.3B: decode on its Mamba
#   conv+SSM state and attention KV, update, RLP step, NemotronHForCausalLM as the HF peer). Never
#   run yet: its bf16 weights, AdamW moments, float32 EMA and the bench's copies may not fit one
#   141 GB card; lower BATCH/THOUGHT first if it runs out of memory.
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

MODELS=${MODELS:-${MODEL:-qwen3-1.7b}}

# The same flags for both checkouts (the baseline's bench may not know --shape); --model per run.
SHAPE=(--dtype bfloat16 --remat full --batch "${BATCH:-2}" --rollouts 16
       --context 2048 --thought "${THOUGHT:-1024}" --targets 1 --decode-prompt 2048 --decode-new 128
       --decode-batches "16,64" --roofline-sizes "4096,8192" --repeats "${REPEATS:-2}" --skip-torch)

run() {  # name, checkout, model
  echo "=== $1 ($2)"
  (cd "$2" && PYTHONPATH="$2" timeout "${TIMEOUT:-300}" "$PY" -m rlp_jax.bench --model "$3" "${SHAPE[@]}" \
     --json "$OUT/$1.json") 2>&1 | tee "$OUT/$1.log"
  echo "=== $1 exit ${PIPESTATUS[0]}"
}

first=1
for model in $MODELS; do
  # The first model keeps the file names of a one-model run (paper-shape.json, hf-peer.json).
  suffix=$([ "$first" = 1 ] && echo "" || echo "-$model")
  run "paper-shape$suffix" "$HERE" "$model"
  if [ -n "${BASELINE:-}" ]; then run "paper-shape-baseline$suffix" "$BASELINE" "$model"; fi
  # The HF peer on the same card, at a decode it can finish (its per-token cost is Python + launches).
  echo "=== hf-peer$suffix"
  PYTHONPATH="$HERE" timeout "${TIMEOUT:-300}" "$PY" -m rlp_jax.bench --model "$model" --dtype bfloat16 \
    --remat full --batch 2 --rollouts 8 --context 256 --thought 256 --decode-prompt 1024 --decode-new 64 \
    --decode-batches 16 --roofline-sizes 4096 --repeats 2 --json "$OUT/hf-peer$suffix.json" 2>&1 | tee "$OUT/hf-peer$suffix.log"
  first=0
done
