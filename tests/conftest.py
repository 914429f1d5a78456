"""Shared test set-up: where the data lives, and quiet logs."""

from __future__ import annotations

import os
import pathlib
import tempfile

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# CI sets PAPERZOO_DATA_DIR=../shared/data; a developer checkout finds the same place by default.
os.environ.setdefault("PAPERZOO_DATA_DIR", str(REPO_ROOT.parent / "shared" / "data"))

# A persistent XLA cache, one per pytest-xdist worker (JAX writes entries without a lock, so
# workers must not share one). Tests that start the same training in subprocesses (resume after
# SIGKILL/SIGTERM) then compile it once instead of once per process. Entries are keyed by the
# program, the flags and the jax version, so a stale entry is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "paperzoo_test_jax_cache",
    os.environ.get("PYTEST_XDIST_WORKER", "main")))


@pytest.fixture
def no_eager_sharding():
  """Weights carry logical axis names; without a mesh they can only be created non-eagerly, as
  the trainer does. Model test modules use it with
  `pytestmark = pytest.mark.usefixtures("no_eager_sharding")`."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  with nnx.use_eager_sharding(False):
    yield


@pytest.fixture(autouse=True)
def _quiet_absl_logging():
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  yield


def random_forecasting_batch(seed: int, *, batch: int, seq_len: int, num_time_features: int
                             ) -> dict:
  """Three variates with different offsets and scales (so instance normalization has work to
  do) and time features in [-0.5, 0.5], as jnp float32 arrays."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, seq_len, 3)) * [1.0, 2.0, 0.5] + [0.0, 3.0, -1.0]
  x_mark = rng.uniform(-0.5, 0.5, size=(batch, seq_len, num_time_features))
  return {"x": jnp.asarray(x, jnp.float32), "x_mark": jnp.asarray(x_mark, jnp.float32)}
