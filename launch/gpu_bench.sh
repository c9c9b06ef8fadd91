#!/usr/bin/env bash
# rlp-jax bench on one GPU against HF transformers on the same GPU, at the paper's model sizes.
# Usage: OUT=results/ bash launch/gpu_bench.sh   (each run bounded; JSON + logs land in $OUT)
# The numbers in docs/benchmarks.md ("On one H100") come from this script.
set -u
OUT=${OUT:-bench-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# JAX and PyTorch share the card in one process: allocate on demand instead of JAX's 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
"$PY" -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"

# Paper-like RLP step: 4 prompts x 8 thoughts, 256 context tokens, 256 thought tokens.
STEP=(--dtype bfloat16 --batch 4 --rollouts 8 --context 256 --thought 256 --targets 1 --remat "${REMAT:-full}"
      --decode-prompt 256 --decode-new 64 --decode-batches "1,16,64" --roofline-sizes "4096,8192" --repeats 5)
# JAX's allocator keeps what the 1.7B update used, so HF's run in the same process would not fit.
for model in ${MODELS:-qwen3-0.6b qwen3-1.7b}; do
  echo "=== $model"
  extra=()
  [[ " ${SKIP_TORCH_FOR:-qwen3-1.7b} " == *" $model "* ]] && extra=(--skip-torch)
  timeout "${BENCH_TIMEOUT:-240}" "$PY" -m rlp_jax.bench --model "$model" "${STEP[@]}" "${extra[@]}" \
    --json "$OUT/$model.json" 2>&1 | tee "$OUT/$model.log"
  echo "=== $model exit ${PIPESTATUS[0]}"
done
