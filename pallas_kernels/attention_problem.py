"""The attention problem both flash attention kernel sets solve, and its VJP.

`flash_attention.py` (Triton-style kernels, GPU and interpret mode) and
`flash_attention_tpu.py` (Mosaic TPU kernels) compute the same thing with
different tiles and layouts. Both describe one padded problem with
`AttentionProblem`, pad with `pad_axis` / `round_up`, mask logits with the
finite `MASK_VALUE`, and wire their forward, dq and dk/dv kernels into a
`custom_vjp` with `flash_custom_vjp`. `check_attention_operands` is the
operand check of every attention entry point (block-sparse attention too).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# A finite "minus infinity": masked logits and the initial running max. Finite
# so that differences of two masked values are 0, never inf - inf = NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class AttentionProblem:
  """Static description of one padded problem (hashable: a custom_vjp arg).

  The tiles are those of one kernel set, already fitted to the lengths: the
  forward kernel's (block_q, block_kv), the dq kernel's and the dk/dv
  kernel's. num_warps / num_stages are Triton launch settings (GPU only;
  None: Triton's choice, see `flash_attention._compiler_params`).
  """
  causal: bool
  sm_scale: float
  q_len: int            # true lengths; the arrays are padded beyond them
  kv_len: int
  block_q: int
  block_kv: int
  block_q_dq: int
  block_kv_dq: int
  block_q_dkv: int
  block_kv_dkv: int
  interpret: Any        # False, True, or the `interpret=` value of pallas_call
  num_warps: int | None = None
  num_stages: int | None = None

  @property
  def offset(self) -> int:
    """Query i sees key j iff j <= i + offset (causal, ends aligned)."""
    return self.kv_len - self.q_len


SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def check_attention_operands(q, k, v) -> None:
  """Raises ValueError unless q [batch, q_len, heads, head_dim] and k, v
  [batch, kv_len, kv_heads, head_dim] fit one attention problem (heads a
  multiple of kv_heads, one supported dtype)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if jnp.ndim(x) != 4:
      raise ValueError(f"{name} must have rank 4 [batch, length, heads, "
                       f"head_dim], got shape {jnp.shape(x)}.")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape} and "
                     f"{v.shape}.")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"batch mismatch: q {q.shape}, k {k.shape}.")
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(f"head_dim mismatch: q has {q.shape[-1]}, k and v have "
                     f"{k.shape[-1]}.")
  if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
    raise ValueError(f"heads ({q.shape[2]}) must be a multiple of kv_heads "
                     f"({k.shape[2]}).")
  if min(q.shape[1], k.shape[1], q.shape[-1]) < 1:
    raise ValueError(f"empty q_len, kv_len or head_dim: q {q.shape}, "
                     f"k {k.shape}.")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                     f"{v.dtype}.")
  if q.dtype not in [jnp.dtype(d) for d in SUPPORTED_DTYPES]:
    raise ValueError(f"dtype {q.dtype} unsupported; use float32, bfloat16 or "
                     "float16.")


def check_integer_arrays(named: dict[str, Any]) -> None:
  """Raises ValueError naming the first of `named` ({name: array}) that does
  not hold integers (segment ids, block lists)."""
  for name, x in named.items():
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
      raise ValueError(f"{name} must be integers, got {jnp.result_type(x)}.")


def round_up(x: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= x."""
  return -(-x // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
  """Pads `axis` of x at the end to length `size` with `value`."""
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def flash_custom_vjp(forward: Callable, dq: Callable, dkv: Callable,
                     row_dot: Callable) -> Callable:
  """flash(q, k, v, segments, problem) -> out, differentiable in q, k, v.

  forward(q, k, v, segments, problem) -> (out, lse) runs the forward kernel;
  the backward computes delta = row_dot(out, d_out) (<o_i, do_i> per query
  row, in float32, in the layout of lse) in XLA, then
  dq(q, k, v, segments, d_out, lse, delta, problem) -> dq and
  dkv(...same...) -> (dk, dv) from the saved logsumexp. segments (integer
  ids or None) and the problem get no gradient.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
  def flash(q, k, v, segments, problem):
    return forward(q, k, v, segments, problem)[0]

  def fwd_rule(q, k, v, segments, problem):
    out, lse = forward(q, k, v, segments, problem)
    return out, (q, k, v, segments, out, lse)

  def bwd_rule(problem, residuals, d_out):
    q, k, v, segments, out, lse = residuals
    # One elementwise pass, cheap next to the kernels, so it stays in XLA.
    delta = row_dot(out.astype(jnp.float32), d_out.astype(jnp.float32))
    d_q = dq(q, k, v, segments, d_out, lse, delta, problem)
    d_k, d_v = dkv(q, k, v, segments, d_out, lse, delta, problem)
    return d_q, d_k, d_v, None

  flash.defvjp(fwd_rule, bwd_rule)
  return flash
