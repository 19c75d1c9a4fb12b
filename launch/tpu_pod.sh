#!/usr/bin/env bash
# Run `maxlm train` on every worker of a Cloud TPU VM pod slice (one process per host; JAX finds its peers
# from the TPU metadata, so MAXLM_DISTRIBUTED=1 is all maxlm needs).
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG [key=value ...]
#
# The repository must already be installed on every worker (e.g. `pip install -e .` in ~/maxlm); checkpoints
# and data should live in a bucket (checkpoint.dir=gs://..., run_dir on a shared path) so any host can resume.
set -euo pipefail
if [ $# -lt 3 ]; then echo "usage: $0 TPU_NAME ZONE CONFIG [key=value ...]" >&2; exit 2; fi
tpu=$1 zone=$2; shift 2
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
  --command "cd ~/maxlm && MAXLM_DISTRIBUTED=1 .venv/bin/maxlm train$args"
