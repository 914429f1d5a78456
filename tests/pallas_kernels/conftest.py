"""Shared set-up for the Pallas kernel tests (interpret mode on CPU)."""
from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import pytest

# The kernels package lives at the repository root, next to `tests/`.
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(_REPO_ROOT))

# Interpret-mode kernels become large HLO loops whose XLA:CPU compile (not
# run) dominates the test time; these options cut it about 4x and do not
# change float32 semantics.
_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}


def _fast_jit(fn):
  """jax.jit(fn), compiled with cheap XLA options; call it like fn."""
  jitted = jax.jit(fn)

  def call(*args):
    compiled = jitted.lower(*args).compile(compiler_options=_FAST_COMPILE)
    return compiled(*args)

  return call


@pytest.fixture
def fast_jit():
  return _fast_jit


def assert_close(actual, expected, *, atol, rtol=0.0, name=""):
  """|actual - expected| <= atol * max|expected| + rtol |expected|.

  atol is relative to the array's largest magnitude, so gradients of very
  different sizes share one stated tolerance.
  """
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
  assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
  # The floor keeps an all-but-zero reference (e.g. dq when each query sees a
  # single key) from turning float32 rounding into a large relative error.
  scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-2)
  err = np.abs(actual - expected) - rtol * np.abs(expected)
  worst = float(np.max(err, initial=0.0)) / scale
  assert worst <= atol, f"{name}: max error {worst:.3g} (x max|ref|) > {atol}"


@pytest.fixture
def close():
  return assert_close
