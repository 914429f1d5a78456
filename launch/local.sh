#!/usr/bin/env bash
# Run one config on this machine.
#   launch/local.sh experiments/configs/itransformer.py:data=etth1 /tmp/itransformer [--config.x=y]
# FAKE_DEVICES=8 splits the CPU into 8 XLA devices, to try a sharded mesh without accelerators.
set -euo pipefail
config=$1 workdir=$2
shift 2
if [[ -n "${FAKE_DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${FAKE_DEVICES}"
  export JAX_PLATFORMS=cpu
fi
export PAPERZOO_DATA_DIR="${PAPERZOO_DATA_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}"
exec python -m experiments.run --config="$config" --workdir="$workdir" "$@"
