#!/usr/bin/env bash
# Run `maxlm train` on every worker of a Cloud TPU VM pod slice (one process per host; JAX finds its peers
# from the TPU metadata, so MAXLM_DISTRIBUTED=1 is all maxlm needs).
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG [key=value ...]
#   DRY_RUN=1 launch/tpu_pod.sh my-v5p-128 us-east5-a llama3-8b     # print the command, run nothing
#
# Check first, from any machine (no TPU needed): the step compiles for the slice and fits in HBM:
#   maxlm compile CONFIG [key=value ...] --target tpu-v5p:4x4x4      (pip install 'maxlm[tpu-compile]')
#
# The repository must already be installed on every worker (e.g. `pip install -e .` in ~/maxlm); checkpoints
# and data should live in a bucket (checkpoint.dir=gs://..., run_dir on a shared path) so any host can resume.
set -euo pipefail
if [ $# -lt 3 ]; then echo "usage: $0 TPU_NAME ZONE CONFIG [key=value ...]" >&2; exit 2; fi
tpu=$1 zone=$2; shift 2
args=$(printf ' %q' "$@")
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all
     --command "cd ~/maxlm && MAXLM_DISTRIBUTED=1 .venv/bin/maxlm train$args")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
"${cmd[@]}"
