#!/usr/bin/env bash
# Runs `rlp-jax train` as N CPU processes on this machine, joined by jax.distributed (gloo), each
# with K simulated devices: the multi-host code path without a cluster. The tests use it.
#
# usage: launch/local_cpu.sh [options] [--] TRAIN_ARGS...
#   TRAIN_ARGS      what `rlp-jax train` takes: --config FILE --workdir DIR [--config.a.b=value ...]
# options:
#   -n, --processes N            processes (default 2)
#   -d, --devices-per-process K  simulated CPU devices per process (default 4)
#   -t, --timeout S              stop every process after S seconds, exit 124 (default 3600)
#   -p, --port P                 coordinator port on localhost (default: a free port)
#   -l, --logs DIR               per-process logs DIR/process_<i>.log (default: ./local_cpu_logs)
#   -h, --help                   this text
# environment:
#   RLP_JAX_BIN   the command to run instead of `rlp-jax` (e.g. "python -m rlp_jax.cli")
#   GRACE_S       seconds between SIGTERM and SIGKILL when stopping processes (default 10)
#   XLA_FLAGS     passed on to every process, with the device count replaced by K
#
# Process 0's log is streamed to the console. When one process fails, the others would wait for it
# forever inside a collective: they are stopped at once (SIGTERM, then SIGKILL by pid) and the
# script exits with the failed process's status. Build the corpus beforehand (one single-process
# run, or a prepared corpus directory) so that the processes do not build it side by side.
#
# example: launch/local_cpu.sh -n 2 -d 4 -- --config configs/cpu_sim.py --workdir runs/cpu_sim
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "local_cpu.sh: $*" >&2; exit 2; }

processes=2
devices=4
timeout_s=3600
port=""
logs="./local_cpu_logs"
grace_s="${GRACE_S:-10}"

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value (see --help)."; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--processes) need_value "$@"; processes="$2"; shift 2 ;;
    -d|--devices-per-process) need_value "$@"; devices="$2"; shift 2 ;;
    -t|--timeout) need_value "$@"; timeout_s="$2"; shift 2 ;;
    -p|--port) need_value "$@"; port="$2"; shift 2 ;;
    -l|--logs) need_value "$@"; logs="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
train_args=("$@")

is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
is_count "$processes" || die "--processes must be a positive integer, got '$processes'."
is_count "$devices" || die "--devices-per-process must be a positive integer, got '$devices'."
is_count "$timeout_s" || die "--timeout must be a positive number of seconds, got '$timeout_s'."
is_count "$grace_s" || die "GRACE_S must be a positive number of seconds, got '$grace_s'."
[[ -z "$port" ]] || is_count "$port" || die "--port must be a port number, got '$port'."
[[ ${#train_args[@]} -gt 0 ]] || die "no training arguments; pass at least --config FILE --workdir DIR (see --help)."
printf '%s\n' "${train_args[@]}" | grep -qx -- '--workdir' \
  || printf '%s\n' "${train_args[@]}" | grep -q -- '^--workdir=' \
  || die "the training arguments have no --workdir DIR; every process must write to the same one."

read -r -a command <<< "${RLP_JAX_BIN:-rlp-jax}"
command -v "${command[0]}" > /dev/null || die "'${command[0]}' is not on PATH; pip install -e . or set RLP_JAX_BIN."
command -v python3 > /dev/null || die "python3 is not on PATH (it picks a free port)."
if [[ -z "$port" ]]; then
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
fi
mkdir -p "$logs"

pids=()
tail_pid=""
stop_all() {  # SIGTERM every live process, then SIGKILL those still there after GRACE_S.
  local pid waited=0
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2> /dev/null || true; done
  while [[ $waited -lt $grace_s ]]; do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2> /dev/null && alive=1; done
    [[ $alive -eq 1 ]] || break
    sleep 1
    waited=$((waited + 1))
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2> /dev/null || true; done
}
cleanup() {
  stop_all
  if [[ -n "$tail_pid" ]]; then kill "$tail_pid" 2> /dev/null || true; fi
}
trap cleanup EXIT
trap 'echo "local_cpu.sh: interrupted; stopping all processes" >&2; exit 130' INT TERM

# The caller's XLA flags reach every process; the device count is the launcher's.
xla_flags=""
for flag in ${XLA_FLAGS:-}; do
  if [[ "$flag" != --xla_force_host_platform_device_count=* ]]; then xla_flags+="$flag "; fi
done

for ((i = 0; i < processes; i++)); do
  : > "$logs/process_$i.log"
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${xla_flags}--xla_force_host_platform_device_count=$devices" \
  RLP_JAX_COORDINATOR="localhost:$port" \
  RLP_JAX_NUM_PROCESSES="$processes" \
  RLP_JAX_PROCESS_ID="$i" \
    "${command[@]}" train "${train_args[@]}" > "$logs/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "local_cpu.sh: $processes processes x $devices CPU devices, coordinator localhost:$port, logs in $logs" >&2
tail -n +1 -f "$logs/process_0.log" &
tail_pid=$!

deadline=$((SECONDS + timeout_s))
remaining=$processes
declare -A finished=()
while [[ $remaining -gt 0 ]]; do
  for i in "${!pids[@]}"; do
    [[ -z "${finished[$i]:-}" ]] || continue
    pid="${pids[$i]}"
    kill -0 "$pid" 2> /dev/null && continue
    status=0
    wait "$pid" || status=$?
    finished[$i]=$status
    remaining=$((remaining - 1))
    if [[ $status -ne 0 ]]; then
      sleep 1  # let the tail print process 0's last lines
      echo "local_cpu.sh: process $i exited with status $status; stopping the others. Its log ends:" >&2
      tail -n 20 "$logs/process_$i.log" >&2
      exit "$status"
    fi
  done
  if [[ $remaining -gt 0 && $SECONDS -ge $deadline ]]; then
    echo "local_cpu.sh: timeout after ${timeout_s}s; stopping all processes (logs in $logs)." >&2
    exit 124
  fi
  [[ $remaining -eq 0 ]] || sleep 0.5
done
sleep 0.5  # let the tail catch up
echo "local_cpu.sh: all $processes processes finished" >&2
