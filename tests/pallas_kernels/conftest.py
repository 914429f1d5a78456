"""Shared set-up for the Pallas kernel tests (interpret mode on CPU)."""
from __future__ import annotations

import pathlib
import sys

import chex
import jax
import numpy as np
import pytest

# The kernels package lives at the repository root, next to `tests/`.
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(_REPO_ROOT))

from pallas_kernels import compat  # pylint: disable=g-import-not-at-top

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


# TPU interpret mode: the legacy CPU fusion emitter on top compiles the
# interpreted Mosaic kernels ~2.5x faster (float32 semantics unchanged).
_TPU_FAST_COMPILE = dict(_FAST_COMPILE, xla_cpu_use_fusion_emitters=False)


@pytest.fixture
def tpu_fast_jit():
  """fast_jit for TPU interpret mode; resets the interpreter's global state,
  which a failed kernel leaves behind, after the test."""
  def jit(fn):
    jitted = jax.jit(fn)

    def call(*args):
      try:
        compiled = jitted.lower(*args).compile(
            compiler_options=_TPU_FAST_COMPILE)
      except Exception as err:  # an XLA without the option: the defaults
        if "compile option" not in str(err):
          raise
        compiled = jitted.lower(*args).compile()
      return compiled(*args)

    return call

  yield jit
  compat.reset_tpu_interpret_state()


def assert_close(actual, expected, *, atol, rtol=0.0):
  """Leaf by leaf, |actual - expected| <= atol max|expected| + rtol |expected|.

  actual and expected are pytrees of arrays (one array is a tree too) of the
  same structure and shapes; actual must be finite. atol is relative to each
  leaf's largest magnitude, so gradients of very different sizes share one
  stated tolerance: both trees are divided by that magnitude and compared
  with `chex.assert_trees_all_close`, whose message then gives the
  differences in units of max|expected| and the path of the failing leaf.
  """
  chex.assert_trees_all_equal_shapes(actual, expected)
  chex.assert_tree_all_finite(actual)

  def scale(x):
    # The floor keeps an all-but-zero reference (e.g. dq when each query sees
    # a single key) from turning float32 rounding into a large relative error.
    return max(float(np.max(np.abs(np.asarray(x, np.float32)), initial=0.0)),
               1e-2)

  scales = jax.tree.map(scale, expected)

  def scaled(tree):
    return jax.tree.map(lambda x, s: np.asarray(x, np.float64) / s, tree,
                        scales)

  chex.assert_trees_all_close(scaled(actual), scaled(expected), atol=atol,
                              rtol=rtol)


@pytest.fixture
def close():
  return assert_close
