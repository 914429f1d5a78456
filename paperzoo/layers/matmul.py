"""Mixed-precision matrix products for dense layers: bfloat16 inputs, float32 accumulation and
output, and a backward pass whose two products take the same fast form.

    y  = x W                      x [..., K], W [K, N]: bfloat16 operands, float32 result
    dx = dy W^T                   computed as dy @ (W^T materialized)      [M, N] x [N, K]
    dW = x^T dy                   computed as (x^T materialized) @ dy      [K, M] x [M, N]

Why a backward of its own: on CPUs with AMX (and oneDNN-style kernels generally) a bfloat16
product runs several times faster than float32 only in one form, row-major operands contracting
the left's last axis with the right's first, with float32 output. Autodiff of `x @ W` gives
the two backward products with a transposed operand, which XLA folds into the dot and then runs
2-5x slower than the forward (measured on this project's 2-core CPU at [768, 128] x [128, 512]:
about 0.2 ms for the fast form against 0.9-1.4 ms for the transposed ones). Materializing the
transposes (behind `optimization_barrier`, so XLA cannot fold them back into the dot) costs a
copy of W and of x, much less than the product.

Parameters, their gradients and everything outside the products stay float32 (what a user of
mixed precision expects: optimizer state, norms, softmax statistics and losses in float32).
`dense_dot_general(dtype)` returns the function `nnx.Linear(dot_general=...)` takes; float32
gives None (nnx's own product).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

MATMUL_DTYPES = ("float32", "bfloat16")


def _product(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [M, K] @ b [K, N] in the fast form, float32 out."""
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, N] with bfloat16 operands and float32 accumulation (module docstring)."""
  lead = x.shape[:-1]
  y = _product(x.reshape(-1, x.shape[-1]).astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  return y.reshape(lead + (w.shape[1],))


def _bf16_matmul_fwd(x, w):
  x_low = x.reshape(-1, x.shape[-1]).astype(jnp.bfloat16)
  w_low = w.astype(jnp.bfloat16)
  y = _product(x_low, w_low).reshape(x.shape[:-1] + (w.shape[1],))
  # Residuals are arrays only: the primals' dtypes travel as empty arrays.
  return y, (x_low, w_low, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _bf16_matmul_bwd(residuals, dy):
  x_low, w_low, x_dtype, w_dtype = residuals
  dy_low = dy.reshape(-1, dy.shape[-1]).astype(jnp.bfloat16)
  w_t, x_t = jax.lax.optimization_barrier((w_low.T, x_low.T))
  dx = _product(dy_low, w_t).reshape(dy.shape[:-1] + (w_low.shape[0],)).astype(x_dtype.dtype)
  dw = _product(x_t, dy_low).astype(w_dtype.dtype)
  return dx, dw


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def _bf16_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None, **unused):
  """`lax.dot_general` for nnx.Linear's one contraction (lhs's last axis with rhs's first)."""
  del precision, preferred_element_type, unused
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or lhs_batch
      or rhs_batch or rhs.ndim != 2):
    raise ValueError(f"the bfloat16 dense product takes x [..., K] @ W [K, N], got "
                     f"dimension numbers {dimension_numbers} for {lhs.shape} @ {rhs.shape}")
  return bf16_matmul(lhs, rhs)


def check_matmul_dtype(dtype: str) -> None:
  if dtype not in MATMUL_DTYPES:
    raise ValueError(f"unknown matmul dtype {dtype!r}; valid: {', '.join(MATMUL_DTYPES)}")


def dense_dot_general(dtype: str) -> Callable[..., Any] | None:
  """The `dot_general` of a dense layer whose products run in `dtype` (one of MATMUL_DTYPES):
  None for float32 (nnx's default), the bfloat16 product above otherwise."""
  check_matmul_dtype(dtype)
  return None if dtype == "float32" else _bf16_dot_general
