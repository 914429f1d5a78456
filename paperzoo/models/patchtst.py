"""PatchTST (Nie et al., "A Time Series is Worth 64 Words: Long-term Forecasting with
Transformers", ICLR 2023).

Channel independence (Sec. 3.1): the multivariate input X in R^{L x M} is split into M univariate
series x^(i) in R^L, each forecast by the same network with all weights shared; the variates are
folded into the batch, so no computation mixes them and changing one variate's input leaves the
other variates' forecasts unchanged.

Per series x in R^L (the forward pass, Sec. 3.1 "Forward Process", Eqs. in "Patching" and
"Transformer Encoder"):

  Instance normalization (RevIN, Kim et al. 2022), over time:
      x' = (x - mean) / sqrt(var + 1e-5)          (biased variance)
      x' = x' * gamma + beta                      only with `revin_affine` (per-variate gamma, beta)
  Patching: pad the end with S copies of the last value (S = stride), then cut
      x_p in R^{N x P},   x_p[n] = x'_pad[n S : n S + P],   N = floor((L - P) / S) + 2
  Embedding:
      x_d = Dropout(x_p W_p + b_p + W_pos),        W_p in R^{P x D}, learnable W_pos in R^{N x D}
  Encoder:
      z = Encoder(x_d)                             multi-head self-attention over the N patches
  Flatten head:
      y' = Dropout_head(Flatten(z) W_h + b_h),     Flatten(z) in R^{D N} (d_model-major, as the
                                                   authors' code flattens [D, N]), W_h in R^{DN x H}
  Undo the normalization:
      y' = (y' - beta) / (gamma + 1e-10)           only when `revin_affine`
      y  = y' * sqrt(var + 1e-5) + mean

Encoder choice: this uses the shared post-norm LayerNorm `paperzoo.layers.Encoder` (layers with
LayerNorm, then a final LayerNorm). The authors' code normalizes with BatchNorm1d over
(batch * patches) in every layer and adds each layer's pre-softmax attention scores to the next
layer's ("residual attention"); TSLib's PatchTST (the protocol's L=96 reference) uses LayerNorm
inside the layers and a BatchNorm after the last one, without residual attention. LayerNorm keeps
the model free of running statistics, so train and eval compute the same function of one
example and the forecaster stays a pure function of its parameters. Attention-probability dropout
uses `dropout`, as in TSLib (the authors' code sets it to 0).

The positional embedding W_pos starts as U(-0.02, 0.02), as in the authors' code (`pe="zeros"`,
`learn_pe=True`); the time features (`x_mark`) and decoder inputs are not used.

Config keys (`config.model`):
  patch_len     (int, required)        patch length P.
  stride        (int, required)        stride S between patch starts (also the end padding).
  d_model       (int, required)        patch token width D.
  d_ff          (int, required)        feed-forward hidden width.
  num_heads     (int, required)        attention heads (head_dim = d_model // num_heads).
  num_layers    (int, required)        encoder layers (e_layers).
  dropout       (float, default 0.1)   after the embedding, inside every encoder layer and on
                                       the attention probabilities.
  head_dropout  (float, default 0.0)   on the flatten head's output.
  activation    (str, default "gelu")  "gelu" (exact erf) | "relu".
  init          (str, default "torch") "torch" (PyTorch nn.Linear defaults) | "lecun".
  attention_impl (str, default "xla")  "xla" | "cudnn" | "reference" (paperzoo.layers.attention).
  revin_affine  (bool, default False)  learnable per-variate gamma, beta in the normalization.

Names: patch embedding kernel ("time", "embed"); positional embedding (None, "embed"); head kernel
("embed", "time") over the flattened [d_model * num_patches] axis; RevIN gamma and beta
("variates",); the encoder's in `paperzoo.layers.transformer`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from paperzoo.layers.attention import Dropout
from paperzoo.layers.initializers import dense
from paperzoo.layers.normalization import NORM_EPS, denormalize_series, normalize_series
from paperzoo.layers.transformer import Encoder
from paperzoo.registry import MODELS

POSITION_INIT_RANGE = 0.02


def num_patches(seq_len: int, patch_len: int, stride: int) -> int:
  """N = floor((L - P) / S) + 2: the patches of the series padded by S copies of its end."""
  if patch_len < 1 or stride < 1 or patch_len > seq_len + stride:
    raise ValueError(f"patch_len {patch_len} and stride {stride} do not fit seq_len {seq_len}")
  return (seq_len - patch_len) // stride + 2


def make_patches(series: jax.Array, patch_len: int, stride: int) -> jax.Array:
  """series [..., L] -> patches [..., N, P]: end padded with `stride` copies of the last value."""
  count = num_patches(series.shape[-1], patch_len, stride)
  padded = jnp.concatenate(
      [series, jnp.repeat(series[..., -1:], stride, axis=-1)], axis=-1)
  # Static gather indices: patch n covers padded[n S : n S + P].
  index = np.arange(count)[:, None] * stride + np.arange(patch_len)[None, :]
  return padded[..., index]


@MODELS.register("patchtst")
class PatchTST(nnx.Module):
  """Channel-independent patch Transformer (equations and config keys in the module docstring)."""

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
    del num_time_features  # PatchTST sees only the series values.
    d_model = int(config.d_model)
    dropout = float(config.get("dropout", 0.1))
    init = config.get("init", "torch")
    self.patch_len = int(config.patch_len)
    self.stride = int(config.stride)
    self.num_patches = num_patches(seq_len, self.patch_len, self.stride)
    self.revin_affine = bool(config.get("revin_affine", False))
    if self.revin_affine:
      self.revin_scale = nnx.Param(jnp.ones((num_variates,), jnp.float32),
                                   out_sharding=("variates",))
      self.revin_bias = nnx.Param(jnp.zeros((num_variates,), jnp.float32),
                                  out_sharding=("variates",))
    self.patch_embedding = dense(self.patch_len, d_model, names=("time", "embed"), init=init,
                                 rngs=rngs)
    self.position_embedding = nnx.Param(
        jax.random.uniform(rngs.params(), (self.num_patches, d_model), jnp.float32,
                           -POSITION_INIT_RANGE, POSITION_INIT_RANGE),
        out_sharding=(None, "embed"))
    self.embedding_dropout = Dropout(dropout)
    self.encoder = Encoder(
        int(config.num_layers), d_model, int(config.num_heads), int(config.d_ff),
        dropout_rate=dropout, activation=config.get("activation", "gelu"),
        attention_impl=config.get("attention_impl", "xla"), init=init, rngs=rngs)
    self.head = dense(d_model * self.num_patches, pred_len, names=("embed", "time"), init=init,
                      rngs=rngs)
    self.head_dropout = Dropout(float(config.get("head_dropout", 0.0)))

  def __call__(self, batch: dict, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = batch["x"]  # [B, L, C]
    batch_size, _, num_variates = x.shape
    x, stats = normalize_series(x)
    if self.revin_affine:
      x = x * self.revin_scale[...] + self.revin_bias[...]
    # Channel independence: every variate is its own example of a univariate forecaster.
    series = jnp.swapaxes(x, 1, 2).reshape(batch_size * num_variates, -1)  # [B C, L]
    patches = make_patches(series, self.patch_len, self.stride)  # [B C, N, P]
    tokens = self.patch_embedding(patches) + self.position_embedding[...]
    tokens = self.embedding_dropout(tokens, deterministic=not train, rngs=rngs)
    z = self.encoder(tokens, train=train, rngs=rngs)  # [B C, N, D]
    # d_model-major flattening, the layout of the authors' Flatten_Head ([D, N] -> D N).
    flat = jnp.swapaxes(z, 1, 2).reshape(batch_size * num_variates, -1)
    y = self.head_dropout(self.head(flat), deterministic=not train, rngs=rngs)  # [B C, H]
    y = jnp.swapaxes(y.reshape(batch_size, num_variates, -1), 1, 2)  # [B, H, C]
    if self.revin_affine:
      y = (y - self.revin_bias[...]) / (self.revin_scale[...] + NORM_EPS * NORM_EPS)
    return denormalize_series(y, stats)
