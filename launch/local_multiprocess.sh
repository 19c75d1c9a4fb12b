#!/usr/bin/env bash
# N maxlm processes on this machine, each with its own fake CPU devices, joined over 127.0.0.1: the multi-host
# code path (per-host data, global arrays, collectives across processes) without a cluster.
#
#   launch/local_multiprocess.sh N DEVICES_PER_PROCESS maxlm-subcommand CONFIG [key=value ...]
#   e.g. launch/local_multiprocess.sh 2 4 train tiny run_dir=runs/mp
set -euo pipefail
if [ $# -lt 4 ]; then echo "usage: $0 N DEVICES_PER_PROCESS SUBCOMMAND CONFIG [key=value ...]" >&2; exit 2; fi
n=$1 per=$2; shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
maxlm=${MAXLM:-$here/.venv/bin/maxlm}
port=${MAXLM_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  MAXLM_COORDINATOR=127.0.0.1:$port MAXLM_NUM_PROCESSES=$n MAXLM_PROCESS_ID=$i JAX_PLATFORMS=cpu \
    XLA_FLAGS="--xla_force_host_platform_device_count=$per" "$maxlm" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
