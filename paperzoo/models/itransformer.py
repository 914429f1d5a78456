"""iTransformer (Liu et al., "iTransformer: Inverted Transformers Are Effective for Time Series
Forecasting", ICLR 2024).

Inverted tokens (Sec. 3.1, Eq. 1): each variate's whole lookback series X_{:,n} in R^L is one
token, and the unchanged Transformer encoder works across tokens:

    h_n^0   = Embedding(X_{:,n})           Linear(seq_len -> d_model), then dropout
    H^{l+1} = TrmBlock(H^l),  l = 0..L-1   post-norm encoder layers + final LayerNorm
                                           (`paperzoo.layers.transformer`)
    Y_{:,n} = Projection(h_n^L)            Linear(d_model -> pred_len)

Attention across tokens models multivariate correlations; the feed-forward network acts on each
variate token (Sec. 3.2). There is no positional encoding, so permuting the variates permutes the
output. As in the authors' code, each time-feature series of `x_mark` (F of them) is embedded
as an extra token, giving N + F tokens; only the N variate tokens are projected and returned.

Instance normalization (`use_norm`, Sec. 3.2 "Layer normalization" / the released code's
non-stationary normalization): per series, over time,
    X' = (X - mean) / sqrt(var + 1e-5)   (biased variance),  Y = Y' * sqrt(var + 1e-5) + mean,
which makes the forecast (almost exactly) equivariant to per-variate affine maps x -> a x + b
(a > 0). Time features are not normalized.

Config keys (`config.model`):
  d_model       (int, required)      token width.
  d_ff          (int, required)      feed-forward hidden width.
  num_heads     (int, required)      attention heads (head_dim = d_model // num_heads).
  num_layers    (int, required)      encoder layers (TSLib's e_layers).
  dropout       (float, default 0.1) rate after the embedding, in every encoder layer, and on
                                     the attention probabilities.
  activation    (str, default "gelu") "gelu" (exact erf) | "relu".
  use_norm      (bool, default True) instance normalization above.
  init          (str, default "torch") "torch" (PyTorch nn.Linear defaults) | "lecun".
  attention_impl (str, default "xla") "xla" | "cudnn" | "reference"; training with dropout > 0
                                     uses "reference" (dropout on attention probabilities).

Names: embedding kernel ("time", "embed"), projection kernel ("embed", "time"); the encoder's in
`paperzoo.layers.transformer`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from paperzoo.layers.attention import Dropout
from paperzoo.layers.initializers import dense
from paperzoo.layers.normalization import denormalize_series, normalize_series
from paperzoo.layers.transformer import Encoder
from paperzoo.registry import MODELS



def variate_tokens(x: jax.Array, x_mark: jax.Array | None) -> jax.Array:
  """The inverted layout: x [B, L, N] (and x_mark [B, L, F]) -> tokens [B, N (+ F), L].

  Each variate's whole lookback series is one token; the time-feature series follow as extra
  tokens, so the first N tokens are always the variates.
  """
  tokens = jnp.swapaxes(x, 1, 2)
  if x_mark is not None:
    tokens = jnp.concatenate([tokens, jnp.swapaxes(x_mark, 1, 2)], axis=1)
  return tokens


@MODELS.register("itransformer")
class ITransformer(nnx.Module):
  """Inverted Transformer forecaster (equations and config keys in the module docstring)."""

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
    self.num_variates = num_variates
    self.num_time_features = num_time_features
    self.use_norm = bool(config.get("use_norm", True))
    self.embedding = dense(seq_len, d_model, names=("time", "embed"), init=init, rngs=rngs)
    self.embedding_dropout = Dropout(dropout)
    self.encoder = Encoder(
        int(config.num_layers), d_model, int(config.num_heads), int(config.d_ff),
        dropout_rate=dropout, activation=config.get("activation", "gelu"),
        attention_impl=config.get("attention_impl", "xla"), init=init, rngs=rngs)
    self.projection = dense(d_model, pred_len, names=("embed", "time"), init=init, rngs=rngs)

  def __call__(self, batch: dict, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = batch["x"]  # [B, L, N]
    if self.use_norm:
      x, stats = normalize_series(x)
    # Invert: one token per series, its lookback window as the token's features.
    tokens = variate_tokens(x, batch["x_mark"] if self.num_time_features else None)
    h = self.embedding_dropout(self.embedding(tokens), deterministic=not train, rngs=rngs)
    # Only the variate tokens are forecast, so the last layer computes only their outputs (the
    # time-feature tokens still serve as keys and values): the same result as slicing after it.
    h = self.encoder(h, train=train, rngs=rngs, num_outputs=self.num_variates)  # [B, N, d_model]
    y = jnp.swapaxes(self.projection(h), 1, 2)  # [B, P, N]
    if self.use_norm:
      y = denormalize_series(y, stats)
    return y
