#!/usr/bin/env bash
# Run one config on every worker of a Cloud TPU VM pod slice (one process per host).
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh \
#       experiments/configs/itransformer.py:data=etth1 /mnt/shared/itransformer [--config.x=y]
# The workdir must be one directory that all hosts share (an NFS or a gcsfuse mount): every
# host reads and writes checkpoints there, and the first writes metrics and pictures. The
# trainer writes through the local file system, so a bare gs:// URL does not work.
set -euo pipefail
config=$1 workdir=$2
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
repo=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --recurse "$repo" "$TPU_NAME":~/paperzoo --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd ~/paperzoo && pip install -q -e '.[tpu]' &&
  python -m experiments.run --distributed --config='$config' --workdir='$workdir' $*"
