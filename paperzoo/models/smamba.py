"""S-Mamba (Wang et al., "Is Mamba Effective for Time Series Forecasting?", Neurocomputing 2025,
arXiv:2403.11144).

iTransformer's inverted layout (`paperzoo.models.itransformer`) with the attention replaced by a
bidirectional Mamba over the variate tokens (Sec. 3 of the paper, "Mamba VC Encoding Layer"):

    h_n^0   = Embedding(X_{:,n})                  Linear(seq_len -> d_model), then dropout;
                                                  one token per variate and per time feature
    per encoder layer l (post-norm):
      x = LayerNorm(x + Mamba_fwd(x) + flip(Mamba_bwd(flip(x))))       flip = reverse the tokens
      x = LayerNorm(x + Dropout(W_2 Dropout(act(W_1 x))))             the FFN over d_model
    H   = LayerNorm(x)                                                final norm
    Y_{:,n} = Projection(h_n)                     Linear(d_model -> pred_len), variate tokens only

Instance normalization (`use_norm`) is iTransformer's: per series over time,
X' = (X - mean) / sqrt(var + 1e-5), Y = Y' sqrt(var + 1e-5) + mean. As in the released code there
is no dropout on the Mamba outputs.

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
kernel on GPU, the associative-scan jnp reference elsewhere). dt_proj starts as in mamba_ssm:
kernel U(+-R^-1/2), bias = softplus^-1(dt) with dt log-uniform in [1e-3, 0.1] (floored at 1e-4),
so the initial step sizes span two decades; this is part of the Mamba method and is used under
either `init` scheme. The conv kernel and bias follow `init` with fan-in d_conv (PyTorch's
depthwise Conv1d).

`MambaBlock` depends only on `paperzoo.layers` and `pallas_kernels`, so it can move to
`paperzoo.layers` unchanged when that folder is free.

Config keys (`config.model`):
  d_model    (int, required)       token width.
  d_ff       (int, required)       feed-forward hidden width.
  num_layers (int, required)       encoder layers (e_layers).
  d_state    (int, default 16)     SSM state size N per channel (the paper uses 2 on ETTh1).
  d_conv     (int, default 4)      causal depthwise conv width (Mamba's default; the released
                                   S-Mamba code uses 2).
  expand     (int, default 2)      d_inner = expand * d_model (released S-Mamba code: 1).
  dropout    (float, default 0.1)  after the embedding and in the feed-forward network.
  activation (str, default "gelu") feed-forward activation, "gelu" (exact erf) | "relu".
  use_norm   (bool, default True)  instance normalization above.
  init       (str, default "torch") "torch" (PyTorch defaults) | "lecun" for the linear maps.
  scan_impl  (str, default "auto") `pallas_kernels.selective_scan` impl: "auto" | "pallas" |
                                   "interpret" | "reference".

Names: embedding ("time", "embed"), projection ("embed", "time"); in the Mamba block d_inner is
"mlp": in_proj ("embed", "mlp"), conv kernel (None, "mlp") and bias ("mlp",), x_proj
("mlp", None), dt_proj (None, "mlp") / ("mlp",), A_log ("mlp", None), D ("mlp",), out_proj
("mlp", "embed"); LayerNorms ("embed",); feed-forward ("embed", "mlp") and ("mlp", "embed").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

import pallas_kernels
from paperzoo.layers.attention import Dropout
from paperzoo.layers.initializers import dense, kernel_and_bias_init
from paperzoo.layers.normalization import denormalize_series, normalize_series
from paperzoo.layers.transformer import activation_fn, layer_norm
from paperzoo.models.itransformer import variate_tokens
from paperzoo.registry import MODELS
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
                         use_bias=False)
    # Depthwise Conv1d: one length-d_conv filter per channel, fan-in d_conv as in PyTorch.
    conv_kernel_init, conv_bias_init = kernel_and_bias_init(d_conv, init)
    self.conv_kernel = nnx.Param(conv_kernel_init(rngs.params(), (d_conv, d_inner), jnp.float32),
                                 out_sharding=(None, "mlp"))
    self.conv_bias = nnx.Param(conv_bias_init(rngs.params(), (d_inner,), jnp.float32),
                               out_sharding=("mlp",))
    self.x_proj = dense(d_inner, dt_rank + 2 * d_state, names=("mlp", None), init=init,
                        rngs=rngs, use_bias=False)
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
                          use_bias=False)

  def causal_conv(self, u: jax.Array) -> jax.Array:
    """out_t = bias + sum_k kernel[k] * u_{t - (d_conv - 1) + k}, zeros before the start."""
    length = u.shape[1]
    padded = jnp.pad(u, ((0, 0), (self.d_conv - 1, 0), (0, 0)))
    kernel = self.conv_kernel[...]
    out = self.conv_bias[...]
    for k in range(self.d_conv):  # d_conv is tiny (2-4): shifted sums beat a general conv.
      out = out + kernel[k] * padded[:, k:k + length]
    return out

  def __call__(self, x: jax.Array) -> jax.Array:
    u, z = jnp.split(self.in_proj(x), 2, axis=-1)
    u = jax.nn.silu(self.causal_conv(u))
    delta_low, B, C = jnp.split(self.x_proj(u), [self.dt_rank, self.dt_rank + self.d_state],
                                axis=-1)
    # dt_proj's bias is added inside the scan (delta_bias), before the softplus.
    delta = delta_low @ self.dt_proj.kernel[...]
    A = -jnp.exp(self.A_log[...])
    y = pallas_kernels.selective_scan(
        u, delta, A, B, C, D=self.D[...], z=z, delta_bias=self.dt_proj.bias[...],
        delta_softplus=True, impl=self.scan_impl)
    return self.out_proj(y)


class SMambaEncoderLayer(nnx.Module):
  """Bidirectional Mamba over tokens, then the post-norm feed-forward (module docstring)."""

  def __init__(self, d_model: int, d_ff: int, *, dropout_rate: float, activation: str,
               mamba_kwargs: dict, init: str, rngs: nnx.Rngs):
    activation_fn(activation)  # fail at construction on an unknown name
    self.activation = activation
    self.mamba_forward = MambaBlock(d_model, init=init, rngs=rngs, **mamba_kwargs)
    self.mamba_backward = MambaBlock(d_model, init=init, rngs=rngs, **mamba_kwargs)
    self.norm1 = layer_norm(d_model, rngs=rngs)
    self.ff_in = dense(d_model, d_ff, names=("embed", "mlp"), init=init, rngs=rngs)
    self.ff_out = dense(d_ff, d_model, names=("mlp", "embed"), init=init, rngs=rngs)
    self.norm2 = layer_norm(d_model, rngs=rngs)
    self.dropout = Dropout(dropout_rate)

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    """x [B, S, d_model] -> [B, S, d_model]."""
    backward = jnp.flip(self.mamba_backward(jnp.flip(x, axis=1)), axis=1)
    x = self.norm1(x + self.mamba_forward(x) + backward)
    act = activation_fn(self.activation)
    y = self.dropout(act(self.ff_in(x)), deterministic=not train, rngs=rngs)
    y = self.dropout(self.ff_out(y), deterministic=not train, rngs=rngs)
    return self.norm2(x + y)


@MODELS.register("smamba")
class SMamba(nnx.Module):
  """S-Mamba forecaster (equations and config keys in the module docstring)."""

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      *,
      seq_len: int,
      pred_len: int,
      num_variates: int,
      num_time_features: int,
      rngs: nnx.Rngs,
  ):
    d_model = int(config.d_model)
    dropout = float(config.get("dropout", 0.1))
    init = config.get("init", "torch")
    mamba_kwargs = dict(d_state=int(config.get("d_state", 16)),
                        d_conv=int(config.get("d_conv", 4)),
                        expand=int(config.get("expand", 2)),
                        scan_impl=config.get("scan_impl", "auto"))
    self.num_variates = num_variates
    self.num_time_features = num_time_features
    self.use_norm = bool(config.get("use_norm", True))
    self.embedding = dense(seq_len, d_model, names=("time", "embed"), init=init, rngs=rngs)
    self.embedding_dropout = Dropout(dropout)
    self.layers = nnx.List([
        SMambaEncoderLayer(d_model, int(config.d_ff), dropout_rate=dropout,
                           activation=config.get("activation", "gelu"),
                           mamba_kwargs=mamba_kwargs, init=init, rngs=rngs)
        for _ in range(int(config.num_layers))
    ])
    self.norm = layer_norm(d_model, rngs=rngs)
    self.projection = dense(d_model, pred_len, names=("embed", "time"), init=init, rngs=rngs)

  def __call__(self, batch: dict, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = batch["x"]  # [B, L, N]
    if self.use_norm:
      x, stats = normalize_series(x)
    # Invert: one token per series (variates first, then time features, as the released code).
    tokens = variate_tokens(x, batch["x_mark"] if self.num_time_features else None)
    h = self.embedding_dropout(self.embedding(tokens), deterministic=not train, rngs=rngs)
    for layer in self.layers:
      h = layer(h, train=train, rngs=rngs)
    h = self.norm(h)  # [B, N + F, d_model]
    y = jnp.swapaxes(self.projection(h[:, :self.num_variates]), 1, 2)  # [B, P, N]
    if self.use_norm:
      y = denormalize_series(y, stats)
    return y
