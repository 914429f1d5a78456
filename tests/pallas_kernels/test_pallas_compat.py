"""compat: the version-sensitive Pallas symbols resolve on this jax."""
from __future__ import annotations

import jax

from pallas_kernels import compat


def test_modules_and_params_resolve():
  assert compat.JAX_VERSION[:2] >= (0, 10)
  assert compat.pl.pallas_call is jax.experimental.pallas.pallas_call
  assert compat.HAS_TRITON and compat.HAS_TPU
  params = compat.triton_compiler_params(num_warps=8, num_stages=3)
  assert (params.num_warps, params.num_stages) == (8, 3)
  assert compat.tpu_compiler_params(
      dimension_semantics=("parallel",)).dimension_semantics == ("parallel",)
  if compat.HAS_MOSAIC_GPU:
    compat.mosaic_gpu_compiler_params()
  # A squeezed BlockSpec dimension is accepted by this jax.
  compat.pl.BlockSpec((compat.SQUEEZED, 8), lambda i: (i, 0))


def test_default_backend_names_the_platform():
  assert compat.default_backend() in ("cpu", "gpu", "tpu")
