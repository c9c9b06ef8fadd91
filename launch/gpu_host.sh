#!/usr/bin/env bash
# Runs `rlp-jax train` on one multi-GPU host: a single process drives every GPU (no
# jax.distributed needed), after checking that JAX sees the GPUs the config's mesh expects.
#
# usage: launch/gpu_host.sh [options] [--] TRAIN_ARGS...
#   TRAIN_ARGS   what `rlp-jax train` takes: --config configs/X.py --workdir DIR [--config.a.b=v ...]
# options:
#   -g, --gpus N        use the first N GPUs (sets CUDA_VISIBLE_DEVICES; default: all visible)
#   -l, --log FILE      also append the output to FILE (default: WORKDIR/train.log)
#   --skip-check        do not start JAX once to check that it sees the GPUs (saves ~10 s)
#   -h, --help          this text
# environment:
#   RLP_JAX_BIN         the command to run instead of `rlp-jax`
#   CUDA_VISIBLE_DEVICES   respected when --gpus is not given
#   XLA_PYTHON_CLIENT_MEM_FRACTION   GPU memory JAX may take (default here 0.90, the fraction
#                       `rlp-jax plan` counts as usable; JAX's own default is 0.75)
#
# example: launch/gpu_host.sh -- --config configs/rlp_qwen3_1p7b_h100x8.py --workdir runs/h100x8 \
#            --config.init.path=/data/Qwen3-1.7B-Base --config.tokenizer=/data/Qwen3-1.7B-Base \
#            --config.data.corpus=/data/corpus/*.jsonl
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "gpu_host.sh: $*" >&2; exit 2; }

gpus=""
log=""
check=1
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value (see --help)."; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -g|--gpus) need_value "$@"; gpus="$2"; shift 2 ;;
    -l|--log) need_value "$@"; log="$2"; shift 2 ;;
    --skip-check) check=0; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
train_args=("$@")

[[ ${#train_args[@]} -gt 0 ]] || die "no training arguments; pass --config FILE --workdir DIR (see --help)."
workdir=""
for ((i = 0; i < ${#train_args[@]}; i++)); do
  case "${train_args[$i]}" in
    --workdir) workdir="${train_args[$((i + 1))]:-}" ;;
    --workdir=*) workdir="${train_args[$i]#--workdir=}" ;;
  esac
done
[[ -n "$workdir" ]] || die "the training arguments have no --workdir DIR."

command -v nvidia-smi > /dev/null || die "nvidia-smi is not on PATH: no NVIDIA driver on this host."
available="$(nvidia-smi --list-gpus | wc -l)"
[[ "$available" -ge 1 ]] || die "nvidia-smi lists no GPU."
if [[ -n "$gpus" ]]; then
  [[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus must be a positive integer, got '$gpus'."
  [[ "$gpus" -le "$available" ]] || die "--gpus $gpus but this host has $available GPUs."
  CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((gpus - 1)))"
  export CUDA_VISIBLE_DEVICES
elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  gpus="$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .)"
else
  gpus="$available"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"

read -r -a command <<< "${RLP_JAX_BIN:-rlp-jax}"
command -v "${command[0]}" > /dev/null || die "'${command[0]}' is not on PATH; pip install -e . or set RLP_JAX_BIN."
if [[ $check -eq 1 ]]; then
  # Start JAX once without grabbing memory: it must see the GPUs, or the run would fall back to CPU.
  seen="$(XLA_PYTHON_CLIENT_PREALLOCATE=false "${command[@]}" info 2>&1)" \
    || die "'${command[*]} info' failed: $seen"
  grep -Eq "^backend (gpu|cuda): $gpus devices" <<< "$seen" \
    || die "JAX does not see $gpus GPUs ($(grep '^backend' <<< "$seen" || echo "$seen")); install \
the CUDA build: pip install -U 'jax[cuda12]'."
fi

mkdir -p "$workdir"
log="${log:-$workdir/train.log}"
echo "gpu_host.sh: $gpus GPUs, log $log" >&2
exec "${command[@]}" train "${train_args[@]}" > >(tee -a "$log") 2>&1
