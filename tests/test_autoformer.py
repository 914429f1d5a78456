"""Tests for Autoformer: the FFT auto-correlation against the direct circular sum, time-delay
aggregation with one dominant lag, the decomposition identity, the Auto-Correlation module against
a numpy transcription on its own weights, its equivariance to circular time shifts (it sees lags,
not positions), output shape, a jitted gradient step, and logical names on every weight."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from paperzoo.models.autoformer import (AutoCorrelation, Autoformer, auto_correlation_scores,
                                        num_lags, series_decomp, time_delay_aggregation)
from paperzoo.models.dlinear import series_decomposition
from paperzoo.registry import MODELS

SEQ_LEN, LABEL_LEN, PRED_LEN, NUM_VARIATES, NUM_TIME_FEATURES, BATCH = 24, 12, 8, 3, 2, 4


pytestmark = pytest.mark.usefixtures("no_eager_sharding")


def _config(**overrides) -> ml_collections.ConfigDict:
  # One encoder layer keeps compilation short; the layers are identical.
  base = dict(name="autoformer", d_model=8, d_ff=16, num_heads=2, encoder_layers=1,
              decoder_layers=1, moving_avg=5, factor=1, dropout=0.05, activation="gelu",
              init="torch")
  return ml_collections.ConfigDict({**base, **overrides})


def _build(seed: int = 0, **overrides) -> Autoformer:
  return MODELS.get("autoformer")(_config(**overrides), seq_len=SEQ_LEN, pred_len=PRED_LEN,
                                  num_variates=NUM_VARIATES,
                                  num_time_features=NUM_TIME_FEATURES,
                                  rngs=nnx.Rngs(params=seed))


def _batch(seed: int = 0) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  t = np.arange(SEQ_LEN + PRED_LEN)
  series = (np.sin(2 * np.pi * t / 6)[None, :, None] + 0.05 * t[None, :, None]
            + 0.3 * rng.normal(size=(BATCH, SEQ_LEN + PRED_LEN, NUM_VARIATES)))
  marks = rng.uniform(-0.5, 0.5, size=(BATCH, SEQ_LEN + PRED_LEN, NUM_TIME_FEATURES))
  x = series[:, :SEQ_LEN]
  dec_x = np.concatenate([x[:, -LABEL_LEN:], np.zeros((BATCH, PRED_LEN, NUM_VARIATES))], 1)
  as_f32 = lambda a: jnp.asarray(a, jnp.float32)
  return {"x": as_f32(x), "x_mark": as_f32(marks[:, :SEQ_LEN]), "dec_x": as_f32(dec_x),
          "dec_mark": as_f32(marks[:, SEQ_LEN - LABEL_LEN:])}


def test_registry_name():
  assert MODELS.get("autoformer") is Autoformer


def test_fft_auto_correlation_matches_direct_circular_sum():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(2, 2, 10, 3, 4))  # [B, L, H, E] each
  length = q.shape[1]
  expected = np.zeros_like(q)
  for tau in range(length):
    for t in range(length):
      expected[:, tau] += q[:, t] * k[:, (t - tau) % length]
  got = auto_correlation_scores(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shared_lags", [True, False])
def test_single_dominant_lag_rolls_values(shared_lags):
  rng = np.random.default_rng(1)
  values = rng.normal(size=(2, 12, 2, 3))  # [B, L, H, D]
  lags = [5, 5] if shared_lags else [3, 7]
  mean_corr = 0.01 * rng.normal(size=(2, 12))
  for b, lag in enumerate(lags):
    mean_corr[b, lag] = 50.0  # softmax weight ~1 on this lag, e^-50 on the others
  got = time_delay_aggregation(jnp.asarray(values, jnp.float32),
                               jnp.asarray(mean_corr, jnp.float32), 3, shared_lags=shared_lags)
  # Roll(V, tau)[t] = V[t + tau]: np.roll by -tau.
  expected = np.stack([np.roll(values[b], -lag, axis=0) for b, lag in enumerate(lags)])
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_shared_lags_come_from_the_batch_mean():
  mean_corr = np.zeros((2, 8), np.float32)
  mean_corr[0, 2], mean_corr[1, 2] = 1.0, 1.0  # the batch mean peaks at lag 2 ...
  mean_corr[1, 6] = 1.5                         # ... though sample 1 alone peaks at lag 6
  values = np.arange(2 * 8, dtype=np.float32).reshape(2, 8, 1, 1)
  got = np.asarray(time_delay_aggregation(jnp.asarray(values), jnp.asarray(mean_corr), 1,
                                          shared_lags=True))
  np.testing.assert_allclose(got[1], np.roll(values[1], -2, axis=0))
  got = np.asarray(time_delay_aggregation(jnp.asarray(values), jnp.asarray(mean_corr), 1,
                                          shared_lags=False))
  np.testing.assert_allclose(got[1], np.roll(values[1], -6, axis=0))


def test_decomposition_parts_sum_to_the_input_and_match_dlinear():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 30, 3)), jnp.float32)
  seasonal, trend = series_decomp(x, 25)
  np.testing.assert_allclose(np.asarray(seasonal + trend), np.asarray(x), rtol=1e-6, atol=1e-6)
  # The matrix form is DLinear's replicate-padded moving average, and it has a gradient.
  dlinear_seasonal, dlinear_trend = series_decomposition(x, 25)
  np.testing.assert_allclose(np.asarray(trend), np.asarray(dlinear_trend), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(seasonal), np.asarray(dlinear_seasonal), atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(series_decomp(x, 25)[1][:, 0]))(x)
  # d trend[0] / d x[j]: the first window holds 13 copies of x[0] and x[1..12] once, over 25.
  np.testing.assert_allclose(np.asarray(grad[0, :14, 0]), [13 / 25] + [1 / 25] * 12 + [0],
                             rtol=1e-6, atol=1e-7)


def test_num_lags_is_floor_c_log_length():
  assert num_lags(96, 3) == math.floor(3 * math.log(96)) == 13
  assert num_lags(144, 1) == 4
  assert num_lags(2, 1) == 1  # never zero lags


def _np_auto_correlation(module: AutoCorrelation, x: np.ndarray, context: np.ndarray,
                         per_sample: bool) -> np.ndarray:
  """The Auto-Correlation layer written out in numpy (direct sums, no FFT)."""
  def linear(layer, inputs):
    return inputs @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...])
  batch, length, d_model = x.shape
  heads = module.num_heads
  q = linear(module.query, x).reshape(batch, length, heads, -1)
  k = linear(module.key, context).reshape(batch, context.shape[1], heads, -1)
  v = linear(module.value, context).reshape(batch, context.shape[1], heads, -1)
  if context.shape[1] < length:
    pad = np.zeros((batch, length - context.shape[1]) + k.shape[2:])
    k, v = np.concatenate([k, pad], 1), np.concatenate([v, pad], 1)
  k, v = k[:, :length], v[:, :length]
  corr = np.stack([sum(q[:, t] * k[:, (t - tau) % length] for t in range(length))
                   for tau in range(length)], axis=1)
  mean_corr = corr.mean(axis=(2, 3))  # [B, L]
  top_k = int(module.factor * math.log(length))
  out = np.zeros_like(v)
  for b in range(batch):
    scores = mean_corr[b] if per_sample else mean_corr.mean(0)
    lags = np.argsort(-scores)[:top_k]
    weights = np.exp(mean_corr[b, lags] - mean_corr[b, lags].max())
    weights /= weights.sum()
    for weight, lag in zip(weights, lags):
      out[b] += weight * np.roll(v[b], -lag, axis=0)
  return linear(module.out, out.reshape(batch, length, d_model))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("context_len", [10, 16, 24])  # padded, equal, truncated
def test_auto_correlation_layer_matches_numpy(train, context_len):
  module = AutoCorrelation(8, 2, factor=2.0, init="torch", rngs=nnx.Rngs(params=3))
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 16, 8))
  context = rng.normal(size=(2, context_len, 8))
  got = module(jnp.asarray(x, jnp.float32), jnp.asarray(context, jnp.float32), train=train)
  expected = _np_auto_correlation(module, x, context, per_sample=not train)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_auto_correlation_is_equivariant_to_circular_shifts():
  # R(tau) depends on lags only: shifting the series circularly shifts the output the same way.
  module = AutoCorrelation(8, 2, factor=2.0, init="torch", rngs=nnx.Rngs(params=4))
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, 8)), jnp.float32)
  shifted = jnp.roll(x, 5, axis=1)
  for train in (True, False):
    np.testing.assert_allclose(np.asarray(module(shifted, shifted, train=train)),
                               np.asarray(jnp.roll(module(x, x, train=train), 5, axis=1)),
                               rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def autoformer_eval():
  """(state, jitted eval forward(state, batch)) of one model; compiled once."""
  with nnx.use_eager_sharding(False):
    graphdef, state = nnx.split(_build())
  forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch, train=False))
  return state, forward


def test_output_shape(autoformer_eval):
  state, forward = autoformer_eval
  out = np.asarray(forward(state, _batch()))
  assert out.shape == (BATCH, PRED_LEN, NUM_VARIATES)
  assert np.all(np.isfinite(out))


def test_trend_init_starts_the_future_at_the_input_mean(autoformer_eval):
  # Trend-cyclical init (Sec. 3.1): the future's trend starts at the input mean. With every
  # weight zeroed, the decoder adds nothing to it, so the forecast is exactly that mean.
  state, forward = autoformer_eval
  batch = _batch(1)
  forecast = np.asarray(forward(jax.tree_util.tree_map(jnp.zeros_like, state), batch))
  level = np.asarray(batch["x"]).mean(axis=1, keepdims=True)
  np.testing.assert_allclose(forecast, np.broadcast_to(level, forecast.shape), rtol=1e-5,
                             atol=1e-5)


def test_no_time_features():
  model = nnx.eval_shape(lambda: Autoformer(
      _config(), seq_len=SEQ_LEN, pred_len=PRED_LEN, num_variates=NUM_VARIATES,
      num_time_features=0, rngs=nnx.Rngs(params=0)))
  graphdef, state = nnx.split(model)
  batch = _batch()
  out = jax.eval_shape(lambda state: nnx.merge(graphdef, state)(
      {"x": batch["x"], "dec_x": batch["dec_x"]}, train=False), state)
  assert out.shape == (BATCH, PRED_LEN, NUM_VARIATES)


def test_jit_step_gives_finite_gradients():
  model = _build()
  graphdef, params = nnx.split(model)
  target = jnp.asarray(np.random.default_rng(5).normal(size=(BATCH, PRED_LEN, NUM_VARIATES)),
                       jnp.float32)

  @jax.jit
  def step(params, batch, key):  # one SGD step, train mode (dropout, batch-shared lags)
    def loss_fn(params):
      prediction = nnx.merge(graphdef, params)(batch, train=True, rngs=nnx.Rngs(dropout=key))
      return jnp.mean(jnp.square(prediction - target))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree_util.tree_map(lambda p, g: p - 1e-2 * g, params, grads), loss, grads

  new_params, loss, grads = step(params, _batch(), jax.random.key(0))
  assert np.isfinite(float(loss))
  leaves = jax.tree_util.tree_leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  # Every weight receives gradient (the top-k lag choice is the only non-differentiable step).
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
  _, new_loss, _ = step(new_params, _batch(), jax.random.key(0))
  assert float(new_loss) < float(loss)

