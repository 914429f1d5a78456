#!/usr/bin/env bash
# Run one config on a GPU host (install with: pip install -e ".[gpu]").
#   launch/gpu.sh experiments/configs/itransformer.py:data=etth1 /tmp/itransformer [--config.x=y]
set -euo pipefail
config=$1 workdir=$2
shift 2
# JAX takes 75% of GPU memory at start by default; allocate on demand instead so that several
# runs (or a notebook beside a run) can share a GPU. Set XLA_PYTHON_CLIENT_PREALLOCATE=true to
# get the preallocation back for the last few percent of speed.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
exec python -m experiments.run --config="$config" --workdir="$workdir" "$@"
