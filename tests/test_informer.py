"""Tests for Informer: ProbSparse attention with every query active against full softmax attention
in numpy on the module's own weights, the top-u choice by the max-mean measurement M (a
constructed case and a random one against numpy), lazy queries getting mean(V) (encoder) or
cumsum(V) (masked decoder), causal key sampling, the distilling layer against numpy (length
ceil(L/2) for odd and even L, BatchNorm's running statistics), output shape, causality of the
generative decoder, the sampling key contract (train: from rngs; eval: fixed), a jitted gradient
step, and logical names on every weight."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from paperzoo.layers.transformer import sinusoidal_positions
from paperzoo.models.informer import (DistillingLayer, Informer, ProbSparseAttention,
                                      max_pool_halve, num_selected, prob_sparse_attention,
                                      sample_keys)
from paperzoo.registry import MODELS

SEQ_LEN, LABEL_LEN, PRED_LEN, NUM_VARIATES, NUM_TIME_FEATURES, BATCH = 16, 8, 8, 3, 2, 4


pytestmark = pytest.mark.usefixtures("no_eager_sharding")


def _config(**overrides) -> ml_collections.ConfigDict:
  base = dict(name="informer", d_model=8, d_ff=16, num_heads=2, encoder_layers=2,
              decoder_layers=1, factor=1, distil=True, cross_attention="full", dropout=0.05,
              activation="gelu", init="torch")
  return ml_collections.ConfigDict({**base, **overrides})


def _build(seed: int = 0, **overrides) -> Informer:
  return MODELS.get("informer")(_config(**overrides), seq_len=SEQ_LEN, pred_len=PRED_LEN,
                                num_variates=NUM_VARIATES, num_time_features=NUM_TIME_FEATURES,
                                rngs=nnx.Rngs(params=seed))


def _batch(seed: int = 0) -> dict[str, jax.Array]:
  """The task's inputs: dec_x is the last LABEL_LEN inputs followed by PRED_LEN zeros."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(BATCH, SEQ_LEN, NUM_VARIATES))
  marks = rng.uniform(-0.5, 0.5, size=(BATCH, SEQ_LEN + PRED_LEN, NUM_TIME_FEATURES))
  dec_x = np.concatenate([x[:, -LABEL_LEN:], np.zeros((BATCH, PRED_LEN, NUM_VARIATES))], 1)
  as_f32 = lambda a: jnp.asarray(a, jnp.float32)
  return {"x": as_f32(x), "x_mark": as_f32(marks[:, :SEQ_LEN]), "dec_x": as_f32(dec_x),
          "dec_mark": as_f32(marks[:, SEQ_LEN - LABEL_LEN:])}


def _np(a) -> np.ndarray:
  return np.asarray(a, np.float64)


def _softmax(logits: np.ndarray) -> np.ndarray:
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _np_attention(q, k, v, causal: bool) -> np.ndarray:
  """softmax(q k^T / sqrt d [causal]) v per head, [B, L, H, D] numpy arrays."""
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  if causal:
    logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
  return np.einsum("bhqk,bkhd->bqhd", _softmax(logits), v)


def _np_measure(q, k, samples) -> np.ndarray:
  """M(q_i) = max_u s_i,S_iu - mean_u s_i,S_iu, [B, H, Lq]."""
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  sampled = np.take_along_axis(scores, np.broadcast_to(samples, scores.shape[:2] +
                                                       samples.shape), axis=-1)
  return sampled.max(-1) - sampled.mean(-1)


def test_registry_name():
  assert MODELS.get("informer") is Informer


def test_num_selected_is_c_ceil_log_length_clipped():
  assert num_selected(96, 3) == 3 * math.ceil(math.log(96)) == 15
  assert num_selected(48, 3) == 12      # the second encoder layer, after distilling
  assert num_selected(144, 5) == 25     # the decoder at label 48 + horizon 96, paper's c = 5
  assert num_selected(4, 5) == 4        # at most L
  assert num_selected(1, 5) == 1        # ln 1 = 0, still one query


@pytest.mark.parametrize("causal,key_len", [(False, 6), (False, 9), (True, 6)])
def test_all_queries_active_is_full_attention_on_the_module_weights(causal, key_len):
  # factor 10: u = 10 ceil(ln 6) >= 6 = L_Q, every query active; U_part >= L_K as well.
  module = ProbSparseAttention(8, 2, factor=10, causal=causal, layer_id=0, init="torch",
                               rngs=nnx.Rngs(params=1))
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, 8))
  context = x if causal else rng.normal(size=(2, key_len, 8))
  got = module(jnp.asarray(x, jnp.float32), jnp.asarray(context, jnp.float32), train=False)

  def linear(layer, inputs):
    return inputs @ _np(layer.kernel[...]) + _np(layer.bias[...])
  split = lambda h: h.reshape(h.shape[:2] + (2, 4))
  q, k, v = (split(linear(layer, inputs)) for layer, inputs in
             ((module.query, x), (module.key, context), (module.value, context)))
  expected = linear(module.out, _np_attention(q, k, v, causal).reshape(2, 6, 8))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_top_u_picks_the_queries_with_the_largest_measurement_constructed():
  # One head, L = 8. Queries 1, 4 and 6 point strongly at one key each (peaked attention,
  # large max - mean); the others are almost zero (near-uniform attention, M ~ 0).
  rng = np.random.default_rng(2)
  length, dim = 8, 4
  k = rng.normal(size=(1, length, 1, dim))
  v = rng.normal(size=(1, length, 1, dim))
  q = 1e-3 * rng.normal(size=(1, length, 1, dim))
  for i, j in ((1, 5), (4, 2), (6, 0)):
    q[0, i, 0] = 6.0 * k[0, j, 0]
  samples = np.tile(np.arange(length), (length, 1))  # every key sampled: M is exact
  assert set(np.argsort(-_np_measure(q, k, samples)[0, 0])[:3]) == {1, 4, 6}
  got = np.asarray(prob_sparse_attention(
      *(jnp.asarray(a, jnp.float32) for a in (q, k, v)), samples=jnp.asarray(samples),
      num_active=3, causal=False))
  full = _np_attention(q, k, v, causal=False)
  for i in range(length):
    expected = full[0, i] if i in (1, 4, 6) else v[0].mean(axis=0)  # lazy: mean(V)
    np.testing.assert_allclose(got[0, i], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_active_and_lazy_queries_match_numpy(causal):
  # Random q, k, v, two heads with their own top-u, a random key sample: active queries (numpy's
  # top-u of M on the same sample) get softmax attention, lazy ones mean(V) or cumsum(V).
  rng = np.random.default_rng(3)
  batch, length, heads, dim, active = 2, 12, 2, 4, 4
  q, k, v = (rng.normal(size=(batch, length, heads, dim)) for _ in range(3))
  samples = np.asarray(sample_keys(jax.random.key(3), length, length, 5, causal=causal))
  got = np.asarray(prob_sparse_attention(
      *(jnp.asarray(a, jnp.float32) for a in (q, k, v)), samples=jnp.asarray(samples),
      num_active=active, causal=causal))
  measure = _np_measure(q, k, samples)  # [B, H, L]
  full = _np_attention(q, k, v, causal)
  lazy = np.cumsum(v, axis=1) if causal else np.broadcast_to(v.mean(1, keepdims=True), v.shape)
  for b in range(batch):
    for h in range(heads):
      top = set(np.argsort(-measure[b, h])[:active])
      for i in range(length):
        expected = full[b, i, h] if i in top else lazy[b, i, h]
        np.testing.assert_allclose(got[b, i, h], expected, rtol=1e-4, atol=1e-5,
                                   err_msg=f"b={b} h={h} i={i} active={i in top}")


def test_lazy_queries_of_masked_attention_get_the_cumulative_sum_of_values():
  # Zero queries: M = 0 everywhere, and with u = 1 all but one query are lazy; the lazy outputs
  # are cumsum(V), the one active query attends causally, and nothing looks ahead.
  rng = np.random.default_rng(4)
  length = 7
  q = np.zeros((1, length, 1, 3))
  k, v = rng.normal(size=(2, 1, length, 1, 3))
  q[0, 5, 0] = 4.0 * k[0, 2, 0]  # the only query with a peaked (large M) distribution
  samples = np.minimum(np.tile(np.arange(length), (length, 1)), np.arange(length)[:, None])
  got = np.asarray(prob_sparse_attention(
      *(jnp.asarray(a, jnp.float32) for a in (q, k, v)), samples=jnp.asarray(samples),
      num_active=1, causal=True))
  cumsum = np.cumsum(v[0, :, 0], axis=0)
  for i in range(length):
    expected = _np_attention(q, k, v, causal=True)[0, i, 0] if i == 5 else cumsum[i]
    np.testing.assert_allclose(got[0, i, 0], expected, rtol=1e-5, atol=1e-5)


def test_causal_key_sample_stays_in_each_querys_past():
  samples = np.asarray(sample_keys(jax.random.key(5), 30, 30, 200, causal=True))
  assert samples.shape == (30, 200)
  assert np.all(samples >= 0) and np.all(samples <= np.arange(30)[:, None])
  assert all(set(samples[i]) == set(range(i + 1)) for i in range(8))  # uniform over {0..i}
  samples = np.asarray(sample_keys(jax.random.key(5), 6, 40, 500, causal=False))
  assert samples.min() == 0 and samples.max() == 39  # any key of the context


def _np_distilling(layer: DistillingLayer, x: np.ndarray) -> np.ndarray:
  """Conv1d(k3, circular) -> BatchNorm(batch statistics) -> ELU -> MaxPool(3, 2, pad 1)."""
  taps = np.concatenate([np.roll(x, 1, axis=1), x, np.roll(x, -1, axis=1)], axis=-1)
  y = taps @ _np(layer.conv.kernel[...]) + _np(layer.conv.bias[...])
  mean, var = y.mean(axis=(0, 1)), y.var(axis=(0, 1))
  y = (y - mean) / np.sqrt(var + 1e-5) * _np(layer.norm.scale[...]) + _np(layer.norm.bias[...])
  y = np.where(y > 0, y, np.expm1(y))
  length = x.shape[1]
  out_len = (length + 2 - 3) // 2 + 1
  padded = np.pad(y, ((0, 0), (1, 1), (0, 0)), constant_values=-np.inf)
  return np.stack([padded[:, 2 * s:2 * s + 3].max(axis=1) for s in range(out_len)], axis=1)


@pytest.mark.parametrize("length", [8, 9])
def test_distilling_layer_matches_numpy_and_halves_the_length(length):
  # MaxPool(kernel 3, stride 2, padding 1): L_out = floor((L + 2 - 3) / 2) + 1 = ceil(L / 2).
  layer = DistillingLayer(6, init="torch", rngs=nnx.Rngs(params=6))
  x = np.random.default_rng(6).normal(size=(3, length, 6))
  got = np.asarray(layer(jnp.asarray(x, jnp.float32), train=True))
  assert got.shape == (3, math.ceil(length / 2), 6)
  np.testing.assert_allclose(got, _np_distilling(layer, x), rtol=1e-4, atol=1e-5)
  # The training pass moved the running statistics (r <- 0.9 r + 0.1 batch); evaluation
  # normalizes with them, so it differs from the batch-statistics output.
  taps = np.concatenate([np.roll(x, 1, axis=1), x, np.roll(x, -1, axis=1)], axis=-1)
  y = taps @ _np(layer.conv.kernel[...]) + _np(layer.conv.bias[...])
  np.testing.assert_allclose(_np(layer.norm.mean[...]), 0.1 * y.mean(axis=(0, 1)), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(_np(layer.norm.var[...]), 0.9 + 0.1 * y.var(axis=(0, 1)),
                             rtol=1e-4)
  assert layer(jnp.asarray(x, jnp.float32), train=False).shape == got.shape


@pytest.mark.parametrize("length", [1, 2, 5, 96, 97])
def test_max_pool_length_is_ceil_half(length):
  x = jnp.arange(length, dtype=jnp.float32)[None, :, None]
  out = np.asarray(max_pool_halve(x))[0, :, 0]
  assert out.shape == (math.ceil(length / 2),)
  # An increasing series: each window's max is its last valid element, min(2s + 1, L - 1).
  np.testing.assert_array_equal(out, np.minimum(2 * np.arange(len(out)) + 1, length - 1))


def test_sinusoidal_positions():
  table = sinusoidal_positions(5, 6)
  t, i = 3, 1
  assert table.shape == (5, 6)
  np.testing.assert_allclose(table[t, 2 * i], math.sin(t / 10000 ** (2 * i / 6)), rtol=1e-6)
  np.testing.assert_allclose(table[t, 2 * i + 1], math.cos(t / 10000 ** (2 * i / 6)), rtol=1e-6)


@pytest.fixture(scope="module")
def informer_eval():
  """(graphdef, state, jitted eval forward(state, batch)) of one model with every decoder
  query active (factor 10: u = 10 ceil(ln 16) >= 16), compiled once."""
  with nnx.use_eager_sharding(False):
    graphdef, state = nnx.split(_build(factor=10))
  forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch, train=False))
  return graphdef, state, forward


def test_output_shape(informer_eval):
  _, state, forward = informer_eval
  out = np.asarray(forward(state, _batch()))
  assert out.shape == (BATCH, PRED_LEN, NUM_VARIATES)
  assert np.all(np.isfinite(out))


def test_decoder_is_causal_over_the_placeholders(informer_eval):
  # Decoder step t sees steps <= t (masked self-attention) plus t + 1 through the embedding's
  # 3-tap circular conv. Changing the placeholders from step p to the second-to-last (the last
  # one wraps around to step 0 through the circular conv) leaves steps < p - 1 unchanged. With
  # every query active (u >= L) this is exact; with u < L the global top-u ranking lets a later
  # step demote an earlier query to lazy, so it holds only up to that choice.
  _, state, forward = informer_eval
  batch = _batch(7)
  first_changed = 4  # forecast step 4 = decoder step LABEL_LEN + 4
  changed = np.asarray(batch["dec_x"]).copy()
  changed[:, LABEL_LEN + first_changed:-1] = 5.0
  out = np.asarray(forward(state, batch))
  out_changed = np.asarray(forward(state, dict(batch, dec_x=jnp.asarray(changed))))
  np.testing.assert_allclose(out_changed[:, :first_changed - 1], out[:, :first_changed - 1],
                             rtol=1e-5, atol=1e-6)
  # ... and the later steps do see the change (the test is not vacuous).
  moved = np.abs(out_changed - out).max(axis=(0, 2))
  assert np.all(moved[first_changed - 1:] > 1e-4), moved


@pytest.mark.parametrize("causal", [False, True])
def test_sampling_key_comes_from_rngs_in_training_and_is_fixed_in_evaluation(causal):
  # u = ceil(ln 12) = 3 of 12 queries active, U_part = 3 sampled keys: the sample decides.
  module = ProbSparseAttention(8, 2, factor=1, causal=causal, layer_id=0, init="torch",
                               rngs=nnx.Rngs(params=8))
  x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 12, 8)), jnp.float32)
  train = lambda seed: np.asarray(module(x, x, train=True, rngs=nnx.Rngs(dropout=seed)))
  np.testing.assert_array_equal(train(1), train(1))  # a pure function of the step's key
  assert not np.allclose(train(1), train(2))
  evaluate = np.asarray(module(x, x, train=False))  # the fixed key, with or without rngs
  np.testing.assert_array_equal(evaluate, module(x, x, train=False, rngs=nnx.Rngs(dropout=3)))
  other_layer = ProbSparseAttention(8, 2, factor=1, causal=causal, layer_id=1, init="torch",
                                    rngs=nnx.Rngs(params=8))
  assert not np.allclose(evaluate, other_layer(x, x, train=False))  # salted per layer


def test_no_time_features_and_no_distilling():
  model = nnx.eval_shape(lambda: Informer(
      _config(distil=False, cross_attention="probsparse"), seq_len=SEQ_LEN, pred_len=PRED_LEN,
      num_variates=NUM_VARIATES, num_time_features=0, rngs=nnx.Rngs(params=0)))
  assert len(model.distilling_layers) == 0
  graphdef, state = nnx.split(model)
  batch = _batch()
  out = jax.eval_shape(lambda state: nnx.merge(graphdef, state)(
      {"x": batch["x"], "dec_x": batch["dec_x"]}, train=False), state)
  assert out.shape == (BATCH, PRED_LEN, NUM_VARIATES)


def test_jit_step_gives_finite_gradients_and_updates_batch_statistics():
  # dropout 0: XLA compiles each dropout site's random bits slowly on CPU (the configs' smoke
  # test trains with dropout); the key still drives the ProbSparse key samples.
  graphdef, params, extra = nnx.split(_build(dropout=0.0), nnx.Param, ...)
  params, extra = nnx.to_pure_dict(params), nnx.to_pure_dict(extra)  # as the trainer's state
  target = jnp.asarray(np.random.default_rng(9).normal(size=(BATCH, PRED_LEN, NUM_VARIATES)),
                       jnp.float32)

  @jax.jit
  def step(params, extra, batch, key):  # one SGD step in train mode, as the trainer's
    def loss_fn(params):
      model = nnx.merge(graphdef, params, extra)
      prediction = model(batch, train=True, rngs=nnx.Rngs(dropout=key))
      new_extra = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
      return jnp.mean(jnp.square(prediction - target)), new_extra
    (loss, new_extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return (jax.tree_util.tree_map(lambda p, g: p - 1e-2 * g, params, grads), new_extra, loss,
            grads)

  new_params, new_extra, loss, grads = step(params, extra, _batch(), jax.random.key(0))
  assert np.isfinite(float(loss))
  leaves = jax.tree_util.tree_leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  # The attention, FFN, embedding and output weights all receive gradient. (The distilling
  # conv's bias does not, up to rounding: BatchNorm subtracts it again.)
  assert sum(float(jnp.max(jnp.abs(g))) > 0 for g in leaves) >= len(leaves) - 1
  # BatchNorm's running mean moved from zero: the trainer's `extra` carries it.
  running_mean = new_extra["distilling_layers"][0]["norm"]["mean"]
  assert float(jnp.max(jnp.abs(running_mean))) > 0
  _, _, new_loss, _ = step(new_params, new_extra, _batch(), jax.random.key(0))
  assert float(new_loss) < float(loss)

