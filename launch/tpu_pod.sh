#!/usr/bin/env bash
# Runs `rlp-jax train` on every worker of a Cloud TPU VM slice (v5p, v5e, v6e, v4; one host or
# many), from this machine, with gcloud. jax.distributed finds the workers itself
# (RLP_JAX_DISTRIBUTED=auto): the same command starts on every worker with --worker=all.
#
# usage: launch/tpu_pod.sh --tpu NAME --zone ZONE [options] [--] TRAIN_ARGS...
#   TRAIN_ARGS   what `rlp-jax train` takes: --config configs/X.py --workdir DIR [--config.a.b=v ...]
#                (paths as seen on the TPU VMs; --workdir must be storage every worker shares)
# steps, in this order (each optional; with no step flag the script runs training only):
#   --create             create the TPU VM slice (needs --accelerator-type and --version)
#   --setup              copy this checkout to every worker and pip-install it with jax[tpu]
#                        (implied by --create)
#   --no-train           skip training (e.g. --create --setup --no-train)
#   --delete             delete the slice at the end, even when training failed
# options:
#   --tpu NAME                 TPU VM name (or env TPU_NAME)
#   --zone ZONE                zone (or env ZONE), e.g. us-east5-a
#   --project PROJECT          GCP project (or env PROJECT; default: gcloud's configured one)
#   --accelerator-type TYPE    for --create, e.g. v5p-128, v5litepod-16, v6e-8
#   --version RUNTIME          for --create, the TPU VM software version (see the Cloud TPU docs
#                              for your accelerator, e.g. tpu-ubuntu2204-base or v2-alpha-tpuv6e)
#   --spot                     for --create, a Spot slice
#   --remote-dir DIR           where the checkout goes on the workers (default: rlp-jax, in $HOME)
#   --log FILE                 on every worker, training output is also appended to FILE
#                              (relative to the remote dir; default rlp-jax-train.log)
#   --env KEY=VALUE            exported on every worker before training; repeatable
#                              (e.g. --env LIBTPU_INIT_ARGS="--xla_tpu_..." --env XLA_FLAGS=...)
#   -h, --help                 this text
# environment: TPU_NAME, ZONE, PROJECT as above.
#
# Logs: every worker's output streams to this terminal through gcloud (process 0 prints the
# progress lines; metrics.jsonl lands in the workdir). If a worker fails, the others block in their
# next collective; stop them with
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command "pkill -f 'rlp-jax train'"
#
# example:
#   launch/tpu_pod.sh --tpu rlp --zone us-east5-a --create --accelerator-type v5p-128 \
#     --version v2-alpha-tpuv5 --delete -- --config configs/rlp_qwen3_1p7b_v5p128.py \
#     --workdir /mnt/shared/runs/rlp --config.init.path=/mnt/shared/Qwen3-1.7B-Base \
#     --config.tokenizer=/mnt/shared/Qwen3-1.7B-Base --config.data.corpus=/mnt/shared/corpus
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

tpu="${TPU_NAME:-}"
zone="${ZONE:-}"
project="${PROJECT:-}"
accelerator=""
version=""
spot=0
do_create=0
do_setup=0
do_train=1
do_delete=0
remote_dir="rlp-jax"
log="rlp-jax-train.log"
extra_env=()

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value (see --help)."; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) need_value "$@"; tpu="$2"; shift 2 ;;
    --zone) need_value "$@"; zone="$2"; shift 2 ;;
    --project) need_value "$@"; project="$2"; shift 2 ;;
    --accelerator-type) need_value "$@"; accelerator="$2"; shift 2 ;;
    --version) need_value "$@"; version="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --create) do_create=1; do_setup=1; shift ;;
    --setup) do_setup=1; shift ;;
    --no-train) do_train=0; shift ;;
    --delete) do_delete=1; shift ;;
    --remote-dir) need_value "$@"; remote_dir="$2"; shift 2 ;;
    --log) need_value "$@"; log="$2"; shift 2 ;;
    --env) need_value "$@"; [[ "$2" == [A-Za-z_]*=* ]] || die "--env needs KEY=VALUE, got '$2'."
           extra_env+=("$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) if [[ "$1" == --config* || "$1" == --workdir* ]]; then break; fi
        die "unknown option $1 (see --help; training arguments go after --)." ;;
    *) break ;;
  esac
done
train_args=("$@")

command -v gcloud > /dev/null || die "gcloud is not installed; see https://cloud.google.com/sdk/docs/install."
[[ -n "$tpu" ]] || die "no TPU name; pass --tpu NAME or set TPU_NAME."
[[ -n "$zone" ]] || die "no zone; pass --zone ZONE or set ZONE."
if [[ $do_create -eq 1 ]]; then
  [[ -n "$accelerator" ]] || die "--create needs --accelerator-type (e.g. v5p-128, v5litepod-16, v6e-8)."
  [[ -n "$version" ]] || die "--create needs --version (the TPU VM software version for $accelerator)."
fi
if [[ $do_train -eq 1 ]]; then
  [[ ${#train_args[@]} -gt 0 ]] || die "no training arguments; pass -- --config FILE --workdir DIR (or --no-train)."
  printf '%s\n' "${train_args[@]}" | grep -q -- '^--workdir' \
    || die "the training arguments have no --workdir DIR (storage every worker shares)."
fi
[[ $do_create -eq 1 || $do_setup -eq 1 || $do_train -eq 1 || $do_delete -eq 1 ]] || die "nothing to do."
account="$(gcloud config get-value account 2> /dev/null || true)"
[[ -n "$account" ]] || die "gcloud has no account; run 'gcloud auth login' first."

where=(--zone "$zone")
[[ -z "$project" ]] || where+=(--project "$project")
tpu_vm() { gcloud compute tpus tpu-vm "$@"; }
on_all_workers() { tpu_vm ssh "$tpu" "${where[@]}" --worker=all --command "$1"; }

if [[ $do_delete -eq 1 ]]; then
  delete_slice() {
    echo "tpu_pod.sh: deleting $tpu" >&2
    tpu_vm delete "$tpu" "${where[@]}" --quiet || echo "tpu_pod.sh: could not delete $tpu; delete it by hand." >&2
  }
  trap delete_slice EXIT
fi

if [[ $do_create -eq 1 ]]; then
  create=(create "$tpu" "${where[@]}" --accelerator-type "$accelerator" --version "$version")
  [[ $spot -eq 0 ]] || create+=(--spot)
  echo "tpu_pod.sh: creating $tpu ($accelerator, $version)" >&2
  tpu_vm "${create[@]}"
else
  tpu_vm describe "$tpu" "${where[@]}" --format='value(state)' > /dev/null \
    || die "TPU VM $tpu was not found in $zone; create it with --create (see --help)."
fi

if [[ $do_setup -eq 1 ]]; then
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  [[ -f "$repo/pyproject.toml" ]] || die "$repo is not an rlp-jax checkout (no pyproject.toml)."
  archive="$(mktemp -t rlp-jax-XXXXXX.tar.gz)"
  tar -C "$repo" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ --exclude=runs \
    --exclude=local_cpu_logs -czf "$archive" .
  echo "tpu_pod.sh: copying $repo to ~/$remote_dir on every worker" >&2
  tpu_vm scp "$archive" "$tpu:rlp-jax.tar.gz" "${where[@]}" --worker=all
  rm -f "$archive"
  on_all_workers "set -e; mkdir -p $(printf '%q' "$remote_dir"); tar -xzf rlp-jax.tar.gz -C $(printf '%q' "$remote_dir"); \
    cd $(printf '%q' "$remote_dir") && python3 -m pip install --quiet --upgrade pip && \
    python3 -m pip install --quiet -e . 'jax[tpu]'"
fi

if [[ $do_train -eq 1 ]]; then
  quoted_args="$(printf '%q ' "${train_args[@]}")"
  exports="export RLP_JAX_DISTRIBUTED=auto"
  if [[ ${#extra_env[@]} -gt 0 ]]; then exports+=" $(printf '%q ' "${extra_env[@]}")"; fi
  remote="set -o pipefail; cd $(printf '%q' "$remote_dir") || exit 2; export PATH=\"\$HOME/.local/bin:\$PATH\"; \
$exports; \
command -v rlp-jax > /dev/null || { echo 'rlp-jax is not installed on this worker; run with --setup' >&2; exit 2; }; \
rlp-jax train $quoted_args 2>&1 | tee -a $(printf '%q' "$log")"
  echo "tpu_pod.sh: training on every worker of $tpu" >&2
  on_all_workers "$remote"
fi
