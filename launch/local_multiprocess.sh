#!/usr/bin/env bash
# N maxlm processes on this machine, each with its own fake CPU devices, joined over 127.0.0.1: the multi-host
# code path (per-process data rows, global arrays, collectives across processes) without a cluster. A thin
# wrapper over `maxlm launch local`, which supervises the processes (one failing stops the others, exit != 0).
#
#   launch/local_multiprocess.sh N DEVICES_PER_PROCESS SUBCOMMAND CONFIG [key=value ...]
#   e.g. launch/local_multiprocess.sh 2 4 train tiny run_dir=runs/mp
#   DRY_RUN=1 launch/local_multiprocess.sh 2 4 train tiny     # print the process commands, run nothing
#
# Before a real cluster run, compile for it from this machine first: `maxlm compile CONFIG --target TARGET`.
set -euo pipefail
if [ $# -lt 4 ]; then echo "usage: $0 N DEVICES_PER_PROCESS SUBCOMMAND CONFIG [key=value ...]" >&2; exit 2; fi
n=$1 per=$2 sub=$3; shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
python=${MAXLM_PYTHON:-$here/.venv/bin/python}
dry=()
if [ "${DRY_RUN:-0}" = 1 ]; then dry=(--dry-run); fi
exec "$python" -m maxlm launch local --processes "$n" --devices-per-process "$per" --subcommand "$sub" "${dry[@]}" "$@"
