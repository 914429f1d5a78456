"""Tests for the vanilla Transformer baseline and the shared decoder: the sinusoidal encoding and
the causal mask against their definitions, the decoder layer against a numpy transcription on its
own weights, the decoder's causality (its output before step t ignores its inputs from t on), the
model's one-shot forecast (shape, which decoder steps an input step can reach, the embedding
against its equation), a jitted gradient step, and logical names on every weight."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from paperzoo.layers.transformer import (Decoder, DecoderLayer, causal_mask,
                                         sinusoidal_positions)
from paperzoo.models.transformer_baseline import Transformer
from paperzoo.registry import MODELS
from tests.test_layers import _randomize_layer_norms, np_attention, np_layer_norm, np_linear

SEQ_LEN, LABEL_LEN, PRED_LEN, NUM_VARIATES, NUM_TIME_FEATURES, BATCH = 16, 8, 6, 3, 2, 2


pytestmark = pytest.mark.usefixtures("no_eager_sharding")


def _config(**overrides) -> ml_collections.ConfigDict:
  base = dict(name="transformer", d_model=8, d_ff=16, num_heads=2, encoder_layers=1,
              decoder_layers=1, dropout=0.1, activation="gelu", init="torch",
              attention_impl="xla")
  return ml_collections.ConfigDict({**base, **overrides})


def _build(seed: int = 0, **overrides) -> Transformer:
  return MODELS.get("transformer")(_config(**overrides), seq_len=SEQ_LEN, pred_len=PRED_LEN,
                                   num_variates=NUM_VARIATES,
                                   num_time_features=NUM_TIME_FEATURES,
                                   rngs=nnx.Rngs(params=seed))


def _batch(seed: int = 0) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(BATCH, SEQ_LEN, NUM_VARIATES))
  marks = rng.uniform(-0.5, 0.5, size=(BATCH, SEQ_LEN + PRED_LEN, NUM_TIME_FEATURES))
  dec_x = np.concatenate([x[:, -LABEL_LEN:], np.zeros((BATCH, PRED_LEN, NUM_VARIATES))], 1)
  as_f32 = lambda a: jnp.asarray(a, jnp.float32)
  return {"x": as_f32(x), "x_mark": as_f32(marks[:, :SEQ_LEN]), "dec_x": as_f32(dec_x),
          "dec_mark": as_f32(marks[:, SEQ_LEN - LABEL_LEN:])}


def test_registry_name():
  assert MODELS.get("transformer") is Transformer


def test_sinusoidal_positions_match_the_definition():
  table = sinusoidal_positions(7, 6)
  for t in range(7):
    for i in range(3):
      angle = t / 10000 ** (2 * i / 6)
      np.testing.assert_allclose(table[t, 2 * i], math.sin(angle), rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(table[t, 2 * i + 1], math.cos(angle), rtol=1e-6, atol=1e-7)
  assert sinusoidal_positions(4, 5).shape == (4, 5)  # odd widths end with a sine column


def test_causal_mask_lets_each_step_see_itself_and_the_past():
  mask = np.asarray(causal_mask(4))
  np.testing.assert_array_equal(mask, np.arange(4)[:, None] >= np.arange(4)[None, :])


# ---------------------------------------------------------------------------------------------
# DecoderLayer / Decoder (paperzoo.layers.transformer)


def _np_mha(q_in, kv_in, attn, mask=None):
  b, sq, d = q_in.shape
  h = attn.num_heads
  split = lambda t: t.reshape(t.shape[0], t.shape[1], h, d // h)
  q = split(np_linear(q_in, attn.q_proj))
  k, v = split(np_linear(kv_in, attn.k_proj)), split(np_linear(kv_in, attn.v_proj))
  return np_linear(np_attention(q, k, v, mask).reshape(b, sq, d), attn.out_proj)


def _np_decoder_layer(x, memory, layer: DecoderLayer, mask):
  act = {"gelu": lambda t: 0.5 * t * (1.0 + erf(t / math.sqrt(2.0))),
         "relu": lambda t: np.maximum(t, 0.0)}[layer.activation]
  x = np_layer_norm(x + _np_mha(x, x, layer.self_attention, mask), layer.norm1)
  x = np_layer_norm(x + _np_mha(x, memory, layer.cross_attention), layer.norm2)
  y = np_linear(act(np_linear(x, layer.ff_in)), layer.ff_out)
  return np_layer_norm(x + y, layer.norm3)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_decoder_layer_matches_numpy(activation):
  layer = DecoderLayer(12, 3, 20, dropout_rate=0.1, activation=activation,
                       rngs=nnx.Rngs(params=1))
  _randomize_layer_norms(layer, seed=1)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 7, 12)).astype(np.float32)
  memory = rng.normal(size=(2, 5, 12)).astype(np.float32)
  mask = np.asarray(causal_mask(7))
  # Jitted: one compilation is much cheaper than the eager op-by-op ones.
  got = nnx.jit(lambda layer, x, memory: layer(x, memory, self_mask=causal_mask(7),
                                               train=False))(layer, jnp.asarray(x),
                                                             jnp.asarray(memory))
  expected = _np_decoder_layer(x.astype(np.float64), memory.astype(np.float64), layer, mask)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_decoder_is_causal_in_its_inputs():
  decoder = Decoder(2, 8, 2, 16, dropout_rate=0.0, rngs=nnx.Rngs(params=2))
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 9, 8)), jnp.float32)
  memory = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  forward = nnx.jit(lambda decoder, x, causal: decoder(
      x, memory, self_mask=causal_mask(9) if causal else None, train=False),
                    static_argnums=2)
  run = lambda x, causal=True: np.asarray(forward(decoder, x, causal))
  base = run(x)
  for t in (0, 4, 8):
    changed = run(x.at[:, t].add(3.0))
    np.testing.assert_allclose(changed[:, :t], base[:, :t], rtol=0, atol=1e-6)
    assert np.all(np.abs(changed[:, t:] - base[:, t:]).max(axis=-1) > 1e-4)
  # Without the mask every step sees every input.
  changed = run(x.at[:, 8].add(3.0), causal=False)
  assert np.abs(changed[:, 0] - run(x, causal=False)[:, 0]).max() > 1e-4


# ---------------------------------------------------------------------------------------------
# Transformer


@pytest.fixture(scope="module")
def transformer_eval():
  """(model, state, jitted eval forward(state, batch)) of one model; compiled once."""
  with nnx.use_eager_sharding(False):
    model = _build()
    graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch, train=False))
  return model, state, forward


def test_output_shape(transformer_eval):
  _, state, forward = transformer_eval
  out = np.asarray(forward(state, _batch()))
  assert out.shape == (BATCH, PRED_LEN, NUM_VARIATES)
  assert np.all(np.isfinite(out))


def test_decoder_input_reaches_only_its_own_and_later_steps_but_one(transformer_eval):
  # Causal decoder + kernel-3 TokenConv: the decoder input at step t reaches the forecast from
  # step t - 1 on (the conv's look-ahead of one step), never earlier.
  _, state, forward = transformer_eval
  batch = _batch(1)
  base = np.asarray(forward(state, batch))
  for k in (2, 4):  # forecast step k is decoder step LABEL_LEN + k
    dec_x = batch["dec_x"].at[:, LABEL_LEN + k].set(5.0)
    changed = np.asarray(forward(state, {**batch, "dec_x": dec_x}))
    np.testing.assert_allclose(changed[:, :k - 1], base[:, :k - 1], rtol=0, atol=1e-5)
    assert np.abs(changed[:, k - 1:] - base[:, k - 1:]).max() > 1e-4
  # The lookback reaches every forecast step (through cross-attention).
  changed = np.asarray(forward(state, {**batch, "x": batch["x"].at[:, 0].add(3.0)}))
  assert np.all(np.abs(changed - base).max(axis=-1) > 1e-6)


def test_embedding_matches_its_equation(transformer_eval):
  model, _, _ = transformer_eval
  embedding = model.decoder_embedding
  batch = _batch(2)
  x, marks = np.asarray(batch["dec_x"], np.float64), np.asarray(batch["dec_mark"], np.float64)
  # Circular kernel-3 conv as one linear map of [x_{t-1}, x_t, x_{t+1}], plus PE and timeF.
  taps = np.concatenate([np.roll(x, 1, axis=1), x, np.roll(x, -1, axis=1)], axis=-1)
  expected = (taps @ np.asarray(embedding.value_embedding.linear.kernel[...], np.float64)
              + sinusoidal_positions(x.shape[1], 8)
              + marks @ np.asarray(embedding.time_embedding.kernel[...], np.float64))
  got = nnx.jit(lambda embedding, x, marks: embedding(x, marks, train=False, rngs=None))(
      embedding, batch["dec_x"], batch["dec_mark"])
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_no_time_features():
  model = nnx.eval_shape(lambda: Transformer(
      _config(), seq_len=SEQ_LEN, pred_len=PRED_LEN, num_variates=NUM_VARIATES,
      num_time_features=0, rngs=nnx.Rngs(params=0)))
  graphdef, state = nnx.split(model)
  batch = _batch()
  out = jax.eval_shape(lambda state: nnx.merge(graphdef, state)(
      {"x": batch["x"], "dec_x": batch["dec_x"]}, train=False), state)
  assert out.shape == (BATCH, PRED_LEN, NUM_VARIATES)


def test_jit_step_gives_finite_gradients():
  graphdef, params = nnx.split(_build())
  target = jnp.asarray(np.random.default_rng(5).normal(size=(BATCH, PRED_LEN, NUM_VARIATES)),
                       jnp.float32)

  @jax.jit
  def step(params, batch, key):  # one SGD step in train mode (dropout on)
    def loss_fn(params):
      prediction = nnx.merge(graphdef, params)(batch, train=True, rngs=nnx.Rngs(dropout=key))
      return jnp.mean(jnp.square(prediction - target))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree_util.tree_map(lambda p, g: p - 1e-2 * g, params, grads), loss, grads

  # An "rbg" key: its dropout masks compile much faster than threefry's at a dozen sites.
  key = jax.random.key(0, impl="rbg")
  new_params, loss, grads = step(params, _batch(), key)
  assert np.isfinite(float(loss))
  leaves = jax.tree_util.tree_leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)  # every weight is used
  _, new_loss, _ = step(new_params, _batch(), key)
  assert float(new_loss) < float(loss)

