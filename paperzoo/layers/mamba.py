"""The Mamba block (selective state-space layer), shared by S-Mamba and the Mamba token mixer.

Mamba block (`MambaBlock`, Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces", Sec. 3 / Algorithm 2), over a token sequence x_1..x_S in R^{d_model}, with
d_inner = expand * d_model, R = dt_rank = ceil(d_model / 16), N = d_state:

    [u, z]      = in_proj(x)                       Linear(d_model -> 2 d_inner), no bias
    u           = silu(CausalDepthwiseConv1d_k(u)) kernel k = d_conv over tokens, left-padded k-1
    [d, B, C]   = x_proj(u)                        Linear(d_inner -> R + 2N), no bias
    delta       = softplus(W_dt d + b_dt)          dt_proj Linear(R -> d_inner); b_dt is passed
                                                   to the scan as delta_bias
    A           = -exp(A_log)                      [d_inner, N], A_log = log(1..N) (S4D-real)
    h_t         = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   h_0 = 0   (ZOH A, Euler B)
    y_t         = (C_t . h_t + D u_t) * silu(z_t)  D initialised to ones
    out         = out_proj(y)                      Linear(d_inner -> d_model), no bias

The scan runs through `pallas_kernels.selective_scan` (`scan_impl`: "auto" = the fused Pallas
kernel on GPU; on CPU the fused `lax.scan` for long scans and the associative scan for short
ones; the associative scan on TPU). dt_proj starts as in mamba_ssm:
kernel U(+-R^-1/2), bias = softplus^-1(dt) with dt log-uniform in [1e-3, 0.1] (floored at 1e-4),
so the initial step sizes span two decades; this is part of the Mamba method and is used under
either `init` scheme. The conv kernel and bias follow `init` with fan-in d_conv (PyTorch's
depthwise Conv1d).

Decoding: `prefill(x)` returns the block's output and the state after the last token, the
conv's last d_conv - 1 inputs [B, d_conv - 1, d_inner] and h [B, d_inner, N] (float32); `step`
advances that state by one token with the recurrence above (`init_state` is the empty state).
Linear maps run on the flattened [batch * tokens, features] arrays (a faster backward on CPU).

Parameter names: d_inner is "mlp": in_proj ("embed", "mlp"), conv kernel (None, "mlp") and bias
("mlp",), x_proj ("mlp", None), dt_proj (None, "mlp") / ("mlp",), A_log ("mlp", None), D
("mlp",), out_proj ("mlp", "embed").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from paperzoo.layers.initializers import dense, flat_dense, kernel_and_bias_init
from pallas_kernels.selective_scan import IMPLS as SCAN_IMPLS

# mamba_ssm's dt initialisation range and floor.
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4


def _inverse_softplus(y: jax.Array) -> jax.Array:
  # softplus(x) = y  <=>  x = y + log(1 - exp(-y)); expm1 keeps it accurate for small y.
  return y + jnp.log(-jnp.expm1(-y))


class MambaBlock(nnx.Module):
  """One Mamba block over a token axis: [B, S, d_model] -> [B, S, d_model], causal in S.

  Equations, initialisation and parameter names are in the module docstring.
  """

  def __init__(
      self,
      d_model: int,
      *,
      d_state: int = 16,
      d_conv: int = 4,
      expand: int = 2,
      dt_rank: int | None = None,
      init: str = "torch",
      scan_impl: str = "auto",
      matmul: str = "float32",
      rngs: nnx.Rngs,
  ):
    if d_conv < 1 or d_state < 1 or expand < 1:
      raise ValueError(f"d_conv, d_state and expand must be >= 1, got {d_conv}, {d_state}, "
                       f"{expand}")
    if scan_impl not in SCAN_IMPLS:
      raise ValueError(f"unknown scan_impl {scan_impl!r}; valid: {', '.join(SCAN_IMPLS)}")
    self.d_inner = d_inner = expand * d_model
    self.d_state = d_state
    self.d_conv = d_conv
    self.dt_rank = dt_rank = dt_rank or math.ceil(d_model / 16)
    self.scan_impl = scan_impl
    self.in_proj = dense(d_model, 2 * d_inner, names=("embed", "mlp"), init=init, rngs=rngs,
                         use_bias=False, matmul=matmul)
    # Depthwise Conv1d: one length-d_conv filter per channel, fan-in d_conv as in PyTorch.
    conv_kernel_init, conv_bias_init = kernel_and_bias_init(d_conv, init)
    self.conv_kernel = nnx.Param(conv_kernel_init(rngs.params(), (d_conv, d_inner), jnp.float32),
                                 out_sharding=(None, "mlp"))
    self.conv_bias = nnx.Param(conv_bias_init(rngs.params(), (d_inner,), jnp.float32),
                               out_sharding=("mlp",))
    self.x_proj = dense(d_inner, dt_rank + 2 * d_state, names=("mlp", None), init=init,
                        rngs=rngs, use_bias=False, matmul=matmul)
    dt_std = dt_rank ** -0.5
    self.dt_proj = dense(
        dt_rank, d_inner, names=(None, "mlp"), init=init, rngs=rngs,
        kernel_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
            key, shape, dtype, -dt_std, dt_std))
    log_dt = jax.random.uniform(rngs.params(), (d_inner,), jnp.float32,
                                math.log(DT_MIN), math.log(DT_MAX))
    self.dt_proj.bias[...] = _inverse_softplus(jnp.maximum(jnp.exp(log_dt), DT_FLOOR))
    # S4D-real: A[d, n] = -(n + 1) for every channel d.
    self.A_log = nnx.Param(
        jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32),
                                 (d_inner, d_state))),
        out_sharding=("mlp", None))
    self.D = nnx.Param(jnp.ones((d_inner,), jnp.float32), out_sharding=("mlp",))
    self.out_proj = dense(d_inner, d_model, names=("mlp", "embed"), init=init, rngs=rngs,
                          use_bias=False, matmul=matmul)

  def causal_conv(self, u: jax.Array) -> jax.Array:
    """out_t = bias + sum_k kernel[k] * u_{t - (d_conv - 1) + k}, zeros before the start."""
    length = u.shape[1]
    padded = jnp.pad(u, ((0, 0), (self.d_conv - 1, 0), (0, 0)))
    kernel = self.conv_kernel[...]
    out = self.conv_bias[...]
    for k in range(self.d_conv):  # d_conv is tiny (2-4): shifted sums beat a general conv.
      out = out + kernel[k] * padded[:, k:k + length]
    return out

  def _ssm_inputs(self, u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """delta (before dt_proj's bias, which the scan adds), A, B, C from the convolved u."""
    delta_low, B, C = jnp.split(flat_dense(self.x_proj, u),
                                [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
    delta = _flat_matmul(delta_low, self.dt_proj.kernel[...])
    return delta, -jnp.exp(self.A_log[...]), B, C

  def _scan(self, x: jax.Array, *, return_last_state: bool):
    """(the conv's input u, the scan's result) for x [B, S, d_model]."""
    u, z = jnp.split(flat_dense(self.in_proj, x), 2, axis=-1)
    u_conv = jax.nn.silu(self.causal_conv(u))
    delta, A, B, C = self._ssm_inputs(u_conv)
    result = pallas_kernels.selective_scan(
        u_conv, delta, A, B, C, D=self.D[...], z=z, delta_bias=self.dt_proj.bias[...],
        delta_softplus=True, return_last_state=return_last_state, impl=self.scan_impl)
    return u, result

  def __call__(self, x: jax.Array) -> jax.Array:
    _, y = self._scan(x, return_last_state=False)
    return flat_dense(self.out_proj, y)

  # Decoding: the state after a prefix is the conv's last d_conv - 1 inputs and the SSM state h.

  def init_state(self, batch_size: int) -> dict[str, jax.Array]:
    """The state before the first token: {"conv": [B, d_conv - 1, d_inner] (the conv inputs
    seen so far, zeros before the start), "ssm": h [B, d_inner, d_state]}, float32 zeros."""
    return {"conv": jnp.zeros((batch_size, self.d_conv - 1, self.d_inner), jnp.float32),
            "ssm": jnp.zeros((batch_size, self.d_inner, self.d_state), jnp.float32)}

  def prefill(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(__call__(x), the state after the last of x's S tokens), x [B, S, d_model]."""
    u, (y, h) = self._scan(x, return_last_state=True)
    # The last d_conv - 1 conv inputs, zeros standing for the positions before the start.
    window = jnp.pad(u, ((0, 0), (self.d_conv - 1, 0), (0, 0)))[:, u.shape[1]:]
    return flat_dense(self.out_proj, y), {"conv": window.astype(jnp.float32), "ssm": h}

  def step(self, x: jax.Array, state: dict[str, jax.Array]
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One token x [B, d_model] -> (out [B, d_model], the state after it), the recurrence
    h = exp(delta A) h + delta B u, y = (C . h + D u) silu(z) of the module docstring."""
    f32 = jnp.float32
    u, z = jnp.split(self.in_proj(x), 2, axis=-1)
    window = jnp.concatenate([state["conv"], u[:, None].astype(f32)], axis=1)  # [B, d_conv, D]
    u_conv = jax.nn.silu(self.conv_bias[...] + jnp.einsum("bkd,kd->bd", window,
                                                           self.conv_kernel[...]))
    delta, A, B, C = self._ssm_inputs(u_conv)
    dt = jax.nn.softplus(delta.astype(f32) + self.dt_proj.bias[...])
    h = (jnp.exp(dt[..., None] * A) * state["ssm"]
         + (dt * u_conv)[..., None] * B.astype(f32)[:, None, :])
    y = jnp.einsum("bdn,bn->bd", h, C.astype(f32)) + self.D[...] * u_conv
    y = y * jax.nn.silu(z.astype(f32))
    return self.out_proj(y.astype(x.dtype)), {"conv": window[:, 1:], "ssm": h}


def _flat_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(x.shape[:-1] + (-1,))
