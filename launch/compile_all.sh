#!/usr/bin/env bash
# Compiles every shipped accelerator config for its TARGET on this machine (no accelerator needed)
# and writes one JSON report per config into OUT (default docs/compile/): the numbers of the table
# in docs/launch.md. Heavy: a paper-size step takes minutes and several GB of host memory to
# compile, so configs run one at a time; pass config paths to run only those.
#
#   launch/compile_all.sh [--out DIR] [configs/X.py ...]
#   environment: RLP_JAX_COMPILERS   the compilers' folder (docs/launch.md), if not in the environment
set -euo pipefail
cd "$(dirname "$0")/.."

out=docs/compile
if [[ "${1:-}" == "--out" ]]; then
  out="$2"
  shift 2
fi
mkdir -p "$out"
if [[ $# -gt 0 ]]; then
  configs=("$@")
else
  mapfile -t configs < <(grep -l '^TARGET = ' configs/*.py)
fi

status=0
for config in "${configs[@]}"; do
  name="$(basename "$config" .py)"
  echo "== $config"
  if ! /usr/bin/time -v rlp-jax compile --config "$config" --json "$out/$name.json" 2> "$out/$name.log"; then
    status=1
    grep '^rlp-jax compile:' "$out/$name.log" || tail -n 5 "$out/$name.log"
  fi
  grep -E 'Maximum resident|Elapsed \(wall' "$out/$name.log" || true
done
exit "$status"
