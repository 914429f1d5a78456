"""The mixed-precision dense product: bfloat16 operands, float32 accumulation, its own backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from paperzoo.layers import matmul
from paperzoo.layers.initializers import dense


def _round_to_bf16(x):
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))


def test_bf16_matmul_forward_and_gradients_are_the_bf16_rounded_float32_ones():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 7)).astype(np.float32)
  w = rng.normal(size=(7, 11)).astype(np.float32)
  dy = rng.normal(size=(3, 5, 11)).astype(np.float32)
  y, vjp = jax.vjp(matmul.bf16_matmul, jnp.asarray(x), jnp.asarray(w))
  dx, dw = vjp(jnp.asarray(dy))
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  xb, wb, dyb = _round_to_bf16(x), _round_to_bf16(w), _round_to_bf16(dy)
  # Products of bf16-rounded operands, accumulated in float32: exact up to float32 sums.
  np.testing.assert_allclose(y, xb @ wb, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dyb @ wb.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, xb.reshape(-1, 7).T @ dyb.reshape(-1, 11), rtol=1e-5,
                             atol=1e-5)
  # ... and within bfloat16's precision of the float32 product.
  np.testing.assert_allclose(y, x @ w, rtol=0.05, atol=0.05)


def test_a_bf16_dense_layer_matches_the_float32_layer_to_bf16_precision():
  layers = {name: dense(6, 4, names=("embed", "mlp"), init="lecun",
                        rngs=nnx.Rngs(params=0), matmul=name)
            for name in matmul.MATMUL_DTYPES}
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 6)), jnp.float32)

  def loss(layer, x):
    return jnp.sum(jnp.tanh(layer(x)))

  outputs = {name: nnx.value_and_grad(loss)(layer, x) for name, layer in layers.items()}
  (low, low_grads), (high, high_grads) = outputs["bfloat16"], outputs["float32"]
  np.testing.assert_allclose(low, high, rtol=2e-2)
  np.testing.assert_allclose(low_grads.kernel[...], high_grads.kernel[...], rtol=5e-2, atol=5e-2)
  assert layers["bfloat16"].kernel[...].dtype == jnp.float32  # parameters stay float32


def test_unknown_matmul_dtype_is_refused_naming_the_valid_ones():
  with pytest.raises(ValueError, match="unknown matmul dtype 'float16'; valid: float32, "
                                       "bfloat16"):
    matmul.dense_dot_general("float16")
