"""Autoformer (Wu et al., "Autoformer: Decomposition Transformers with Auto-Correlation for
Long-Term Series Forecasting", NeurIPS 2021).

Series decomposition block (Sec. 3.1, Eq. 1), per channel over time with a moving average of
kernel k = `moving_avg` and replicate padding (`paperzoo.models.dlinear.moving_average`):

    X_t = AvgPool(Padding(X)),   X_s = X - X_t,   SeriesDecomp(X) = (X_s, X_t)

Auto-Correlation (Sec. 3.2, Eqs. 5-7), per head, for Q, K, V in R^{L x d_head} projected from
the layer input (Linear maps with bias, as in the paper's code):

    R(tau)   = IFFT(FFT(Q) * conj(FFT(K)))(tau) = sum_t Q[t] K[t - tau]    (circular)
    R_bar    = R averaged over heads and head channels                     [B, L]
    tau_1..k = argTopk(R_bar),  k = floor(c * ln L),  c = `factor`
    w_i      = softmax(R_bar(tau_1), ..., R_bar(tau_k))_i
    AutoCorr = sum_i w_i * Roll(V, tau_i),  Roll(V, tau)[t] = V[(t + tau) mod L]

then Concat(heads) W_O. Time-delay aggregation variant: as in the paper's code, training picks
the k lags of the batch-averaged R_bar (shared by every sample, the cheaper "training" variant)
while evaluation picks each sample's own top-k lags (the "inference" variant); the weights w are
always each sample's own. There is no 1/sqrt(d) scaling and no dropout inside Auto-Correlation
(the reference code defines one but never applies it). For cross-correlation the encoder's keys
and values are zero-padded (L_dec > L_enc) or truncated (L_dec < L_enc) to the decoder length.

Encoder layer (Eq. 3), `encoder_layers` of them, then the seasonal LayerNorm below:

    x = SeriesDecomp(x + Dropout(AutoCorr(x, x)))_s
    y = Dropout(W_2 Dropout(act(W_1 x)))                         (kernel-1 convs == Linear)
    x = SeriesDecomp(x + y)_s

Decoder layer (Eq. 4), `decoder_layers` of them, seasonal stream s and accumulated trend T:

    s, T1 = SeriesDecomp(s + Dropout(AutoCorr(s, s)))
    s, T2 = SeriesDecomp(s + Dropout(AutoCorr(s, enc_out)))
    s, T3 = SeriesDecomp(s + FFN(s))
    T     = T + W_T * (T1 + T2 + T3)            (3-tap circular conv d_model -> C, no bias)

Output = T + Linear(LayerNorm_s(s)), last pred_len steps. Decoder inputs (Sec. 3.1, "Model
inputs"), from X_s, X_t = SeriesDecomp(x_enc), with label_len = dec_x length - pred_len:

    seasonal_init = [X_s[-label_len:], zeros(pred_len)]
    trend_init    = [X_t[-label_len:], mean(x_enc) repeated pred_len times]

Embedding (the code's `DataEmbedding_wo_pos`; no positional embedding): Dropout(TokenConv(x) +
Linear_nobias(x_mark)), TokenConv a 3-tap circular convolution C -> d_model without bias, written
as one Linear over the concatenated [x_{t-1}, x_t, x_{t+1}], Kaiming-normal (leaky_relu) init as
in the code when init = "torch". LayerNorm_s ("my_Layernorm" in the code) is a LayerNorm followed
by subtracting its mean over time, so the seasonal part stays zero-mean.

Departures from the reference code: none in the equations. The FFN's kernel-1 convs have no
bias, as in the paper's code. The moving average is applied as an [L, L] matrix (O(L^2) per
channel instead of O(L k)), a small matmul at these lengths, so that it has a gradient.

Config keys (`config.model`):
  d_model        (int, required)       model width.
  d_ff           (int, required)       feed-forward hidden width.
  num_heads      (int, required)       Auto-Correlation heads (head_dim = d_model // num_heads).
  encoder_layers (int, default 2)      encoder layers (TSLib's e_layers).
  decoder_layers (int, default 1)      decoder layers (d_layers).
  moving_avg     (int, default 25)     decomposition kernel, odd.
  factor         (float, default 1.0)  c in k = floor(c ln L) selected lags.
  dropout        (float, default 0.05) embedding, residual-branch and FFN dropout.
  activation     (str, default "gelu") "gelu" | "relu".
  init           (str, default "torch") "torch" (PyTorch defaults) | "lecun".

Names: q/k/v kernels ("embed", "heads"), output ("heads", "embed"); FFN ("embed", "mlp") and
("mlp", "embed"); token conv (None, "embed"); time-feature embedding (None, "embed"); trend
projection ("embed", None) over [3 * d_model, C] (three taps of d_model each); output projection
("embed", None); LayerNorm ("embed",).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from paperzoo.layers.attention import Dropout
from paperzoo.layers.embedding import CircularConv3, DataEmbedding
from paperzoo.layers.initializers import check_init_scheme, dense
from paperzoo.layers.transformer import activation_fn, layer_norm
from paperzoo.models.dlinear import moving_average
from paperzoo.registry import MODELS


def series_decomp(x: jax.Array, kernel_size: int) -> tuple[jax.Array, jax.Array]:
  """(seasonal, trend) of x [B, L, C], trend = DLinear's replicate-padded moving average."""
  trend = moving_average(x, kernel_size)
  return x - trend, trend


def num_lags(length: int, factor: float) -> int:
  """k = floor(c ln L), clipped to [1, L] so short sequences still aggregate one lag."""
  return max(1, min(length, int(factor * math.log(length))))


def auto_correlation_scores(q: jax.Array, k: jax.Array) -> jax.Array:
  """R(tau) = sum_t q[t] k[t - tau] (circular), per head and channel: [B, L, H, E] -> same."""
  length = q.shape[1]
  spectrum = jnp.fft.rfft(q, axis=1) * jnp.conj(jnp.fft.rfft(k, axis=1))
  return jnp.fft.irfft(spectrum, n=length, axis=1)


def time_delay_aggregation(values: jax.Array, mean_corr: jax.Array, top_k: int, *,
                           shared_lags: bool) -> jax.Array:
  """sum_i softmax(R_bar(tau_i)) Roll(V, tau_i) for V [B, L, H, D] and R_bar [B, L].

  shared_lags: the lags are the top-k of R_bar averaged over the batch (the paper's training
  variant); otherwise each sample's own top-k (its inference variant).
  """
  length = values.shape[1]
  if shared_lags:
    _, lags = jax.lax.top_k(jnp.mean(mean_corr, axis=0), top_k)  # [k]
    lags = jnp.broadcast_to(lags, (mean_corr.shape[0], top_k))
  else:
    _, lags = jax.lax.top_k(mean_corr, top_k)  # [B, k]
  lags = jax.lax.stop_gradient(lags)
  weights = jax.nn.softmax(jnp.take_along_axis(mean_corr, lags, axis=1), axis=-1)  # [B, k]
  # Roll(V, tau)[t] = V[(t + tau) mod L]: one gather per sample and lag.
  positions = (jnp.arange(length)[None, None, :] + lags[:, :, None]) % length  # [B, k, L]
  rolled = jax.vmap(lambda v, index: v[index])(values, positions)  # [B, k, L, H, D]
  return jnp.einsum("bk,bklhd->blhd", weights, rolled)


class AutoCorrelation(nnx.Module):
  """Multi-head Auto-Correlation with time-delay aggregation (Eqs. 5-7)."""

  def __init__(self, d_model: int, num_heads: int, *, factor: float, init: str,
               rngs: nnx.Rngs):
    if d_model % num_heads:
      raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.factor = factor
    self.query = dense(d_model, d_model, names=("embed", "heads"), init=init, rngs=rngs)
    self.key = dense(d_model, d_model, names=("embed", "heads"), init=init, rngs=rngs)
    self.value = dense(d_model, d_model, names=("embed", "heads"), init=init, rngs=rngs)
    self.out = dense(d_model, d_model, names=("heads", "embed"), init=init, rngs=rngs)

  def _split(self, x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[:2] + (self.num_heads, -1))

  def __call__(self, x: jax.Array, context: jax.Array, *, train: bool) -> jax.Array:
    """x [B, L, d] attends to context [B, S, d] -> [B, L, d]."""
    batch, length, _ = x.shape
    q = self._split(self.query(x))
    k = self._split(self.key(context))
    v = self._split(self.value(context))
    # R(tau) needs equal lengths: zero-pad or truncate keys/values to the query length.
    source_length = k.shape[1]
    if source_length < length:
      pad = ((0, 0), (0, length - source_length), (0, 0), (0, 0))
      k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    else:
      k, v = k[:, :length], v[:, :length]
    corr = auto_correlation_scores(q, k)  # [B, L, H, E]
    mean_corr = jnp.mean(corr, axis=(2, 3))  # [B, L]
    aggregated = time_delay_aggregation(v, mean_corr, num_lags(length, self.factor),
                                        shared_lags=train)
    return self.out(aggregated.reshape(batch, length, -1))


class SeasonalLayerNorm(nnx.Module):
  """LayerNorm, then minus its mean over time (the code's `my_Layernorm`)."""

  def __init__(self, d_model: int, *, rngs: nnx.Rngs):
    self.norm = layer_norm(d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.norm(x)
    return x - jnp.mean(x, axis=1, keepdims=True)


class FeedForward(nnx.Module):
  """Dropout(W_2 Dropout(act(W_1 x))), W bias-free like the code's kernel-1 Conv1d(bias=False)."""

  def __init__(self, d_model: int, d_ff: int, *, activation: str, init: str, rngs: nnx.Rngs):
    activation_fn(activation)  # fail at construction on an unknown name
    self.activation = activation
    self.ff_in = dense(d_model, d_ff, names=("embed", "mlp"), init=init, use_bias=False,
                       rngs=rngs)
    self.ff_out = dense(d_ff, d_model, names=("mlp", "embed"), init=init, use_bias=False,
                        rngs=rngs)

  def __call__(self, x: jax.Array, dropout: Dropout, *, train: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    y = dropout(activation_fn(self.activation)(self.ff_in(x)), deterministic=not train,
                rngs=rngs)
    return dropout(self.ff_out(y), deterministic=not train, rngs=rngs)


class EncoderLayer(nnx.Module):
  """Eq. 3: Auto-Correlation and FFN, each followed by a decomposition keeping the seasonal part."""

  def __init__(self, d_model: int, d_ff: int, num_heads: int, *, moving_avg: int, factor: float,
               dropout: float, activation: str, init: str, rngs: nnx.Rngs):
    self.moving_avg = moving_avg
    self.attention = AutoCorrelation(d_model, num_heads, factor=factor, init=init, rngs=rngs)
    self.feed_forward = FeedForward(d_model, d_ff, activation=activation, init=init, rngs=rngs)
    self.dropout = Dropout(dropout)

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    attended = self.attention(x, x, train=train)
    x, _ = series_decomp(x + self.dropout(attended, deterministic=not train, rngs=rngs),
                                self.moving_avg)
    y = self.feed_forward(x, self.dropout, train=train, rngs=rngs)
    x, _ = series_decomp(x + y, self.moving_avg)
    return x


class DecoderLayer(nnx.Module):
  """Eq. 4: self and cross Auto-Correlation and FFN, each followed by a decomposition; returns
  the seasonal part and the projected sum of the three trend parts."""

  def __init__(self, d_model: int, d_ff: int, num_heads: int, num_variates: int, *,
               moving_avg: int, factor: float, dropout: float, activation: str, init: str,
               rngs: nnx.Rngs):
    self.moving_avg = moving_avg
    self.self_attention = AutoCorrelation(d_model, num_heads, factor=factor, init=init,
                                          rngs=rngs)
    self.cross_attention = AutoCorrelation(d_model, num_heads, factor=factor, init=init,
                                           rngs=rngs)
    self.feed_forward = FeedForward(d_model, d_ff, activation=activation, init=init, rngs=rngs)
    self.trend_projection = CircularConv3(d_model, num_variates, names=("embed", None),
                                          init=init, kaiming_leaky_relu=False, rngs=rngs)
    self.dropout = Dropout(dropout)

  def __call__(self, x: jax.Array, encoded: jax.Array, *, train: bool,
               rngs: nnx.Rngs | None) -> tuple[jax.Array, jax.Array]:
    deterministic = not train
    attended = self.self_attention(x, x, train=train)
    x, trend1 = series_decomp(
        x + self.dropout(attended, deterministic=deterministic, rngs=rngs), self.moving_avg)
    attended = self.cross_attention(x, encoded, train=train)
    x, trend2 = series_decomp(
        x + self.dropout(attended, deterministic=deterministic, rngs=rngs), self.moving_avg)
    y = self.feed_forward(x, self.dropout, train=train, rngs=rngs)
    x, trend3 = series_decomp(x + y, self.moving_avg)
    return x, self.trend_projection(trend1 + trend2 + trend3)


@MODELS.register("autoformer")
class Autoformer(nnx.Module):
  """Decomposition Transformer with Auto-Correlation (equations, config keys in the docstring)."""

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
    del seq_len  # every layer works at whatever length it is given
    d_model, d_ff = int(config.d_model), int(config.d_ff)
    num_heads = int(config.num_heads)
    dropout = float(config.get("dropout", 0.05))
    activation = config.get("activation", "gelu")
    init = config.get("init", "torch")
    check_init_scheme(init)
    self.moving_avg = int(config.get("moving_avg", 25))
    moving_average(jnp.zeros((1, 1, 1)), self.moving_avg)  # validate the kernel before compute
    factor = float(config.get("factor", 1.0))
    self.pred_len = pred_len
    layer_kwargs = dict(moving_avg=self.moving_avg, factor=factor, dropout=dropout,
                        activation=activation, init=init, rngs=rngs)
    self.encoder_embedding = DataEmbedding(num_variates, num_time_features, d_model,
                                           positional=False, dropout=dropout, init=init, rngs=rngs)
    self.decoder_embedding = DataEmbedding(num_variates, num_time_features, d_model,
                                           positional=False, dropout=dropout, init=init, rngs=rngs)
    self.encoder_layers = nnx.List([
        EncoderLayer(d_model, d_ff, num_heads, **layer_kwargs)
        for _ in range(int(config.get("encoder_layers", 2)))])
    self.encoder_norm = SeasonalLayerNorm(d_model, rngs=rngs)
    self.decoder_layers = nnx.List([
        DecoderLayer(d_model, d_ff, num_heads, num_variates, **layer_kwargs)
        for _ in range(int(config.get("decoder_layers", 1)))])
    self.decoder_norm = SeasonalLayerNorm(d_model, rngs=rngs)
    self.projection = dense(d_model, num_variates, names=("embed", None), init=init, rngs=rngs)

  def __call__(self, batch: dict, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = batch["x"]  # [B, L, C]
    label_len = batch["dec_x"].shape[1] - self.pred_len
    # Decoder inputs: the input's last label_len steps decomposed; the future starts at zero
    # seasonality and at the input's mean level.
    seasonal, trend = series_decomp(x, self.moving_avg)
    future_mean = jnp.broadcast_to(jnp.mean(x, axis=1, keepdims=True),
                                   (x.shape[0], self.pred_len, x.shape[2]))
    trend_init = jnp.concatenate([trend[:, x.shape[1] - label_len:], future_mean], axis=1)
    seasonal_init = jnp.concatenate(
        [seasonal[:, x.shape[1] - label_len:], jnp.zeros_like(future_mean)], axis=1)

    encoded = self.encoder_embedding(x, batch.get("x_mark"), train=train, rngs=rngs)
    for layer in self.encoder_layers:
      encoded = layer(encoded, train=train, rngs=rngs)
    encoded = self.encoder_norm(encoded)

    s = self.decoder_embedding(seasonal_init, batch.get("dec_mark"), train=train, rngs=rngs)
    trend = trend_init
    for layer in self.decoder_layers:
      s, residual_trend = layer(s, encoded, train=train, rngs=rngs)
      trend = trend + residual_trend
    output = trend + self.projection(self.decoder_norm(s))
    return output[:, -self.pred_len:]
