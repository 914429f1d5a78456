"""The attention problem both flash attention kernel sets solve, and its VJP.

`flash_attention.py` (Triton-style kernels, GPU and interpret mode) and
`flash_attention_tpu.py` (Mosaic TPU kernels) compute the same thing with
different tiles and layouts. Both describe one padded problem with
`AttentionProblem`, pad with `pad_axis` / `round_up`, mask logits with the
finite `MASK_VALUE`, and wire their forward, dq and dk/dv kernels into a
`custom_vjp` with `flash_custom_vjp`.
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
