"""Tests for Gateformer: the whole forward pass against a numpy transcription of its equations on
the module's own weights (pre-norm encoders included), both gates at their limits (gate logits
forced large or small reduce the model to the branch the gate selects), stage 1 keeping the
variates apart, variate-permutation and per-variate affine equivariance, output shape, a jitted
gradient step, and logical names on every weight."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from paperzoo.layers.transformer import Encoder, EncoderLayer, sinusoidal_positions
from paperzoo.models.gateformer import Gateformer
from paperzoo.registry import MODELS
from tests.conftest import random_forecasting_batch
from tests.test_layers import _randomize_layer_norms, np_layer_norm, np_linear, np_mha

SEQ_LEN, PRED_LEN, NUM_VARIATES, NUM_TIME_FEATURES, BATCH = 16, 6, 3, 2, 2
PATCH_LEN = STRIDE = 4  # M = (16 - 4) / 4 + 2 = 5 patches
D_MODEL = 8
LARGE_LOGIT = 50.0  # sigmoid(+-50) is 1 or 0 in float32 whatever the rest of the logit


pytestmark = pytest.mark.usefixtures("no_eager_sharding")


def _config(**overrides) -> ml_collections.ConfigDict:
  base = dict(name="gateformer", d_model=D_MODEL, d_ff=16, num_heads=2, num_layers=1,
              patch_len=PATCH_LEN, stride=STRIDE, dropout=0.1, activation="relu",
              norm_first=True, use_norm=True, init="torch", attention_impl="xla")
  return ml_collections.ConfigDict({**base, **overrides})


def _build(seed: int = 0, **overrides) -> Gateformer:
  return MODELS.get("gateformer")(_config(**overrides), seq_len=SEQ_LEN, pred_len=PRED_LEN,
                                  num_variates=NUM_VARIATES,
                                  num_time_features=NUM_TIME_FEATURES,
                                  rngs=nnx.Rngs(params=seed))


def _batch(seed: int = 0) -> dict[str, jax.Array]:
  assert NUM_VARIATES == 3  # the shared builder makes three variates
  return random_forecasting_batch(seed, batch=BATCH, seq_len=SEQ_LEN,
                                  num_time_features=NUM_TIME_FEATURES)


# ---------------------------------------------------------------------------------------------
# numpy transcription


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_pre_norm_layer(x, layer: EncoderLayer):
  """x + MHA(LN_1 x), then + W_2 relu(W_1 LN_2 x) (no dropout at eval)."""
  assert layer.norm_first and layer.activation == "relu"
  x = x + np_mha(np_layer_norm(x, layer.norm1), layer.attention)
  h = np_layer_norm(x, layer.norm2)
  return x + np_linear(np.maximum(np_linear(h, layer.ff_in), 0.0), layer.ff_out)


def np_encoder(x, encoder: Encoder):
  for layer in encoder.layers:
    x = np_pre_norm_layer(x, layer)
  return x if encoder.norm is None else np_layer_norm(x, encoder.norm)


def np_gate(gate, a, b, forced):
  """G a + (1 - G) b with G = sigmoid(a W_a + b W_b), or G = `forced` (0 or 1) if given."""
  g = (_sigmoid(np_linear(a, gate.first) + np_linear(b, gate.second)) if forced is None
       else forced)
  return g * a + (1.0 - g) * b


def np_gateformer(model: Gateformer, x, *, gate1=None, gate2=None):
  """The module docstring's equations in float64 numpy; gate1/gate2 fix G_1/G_2 to a value."""
  x = np.asarray(x, np.float64)  # [B, L, N]
  mean = x.mean(1, keepdims=True)
  std = np.sqrt(((x - mean) ** 2).mean(1, keepdims=True) + 1e-5)
  series = ((x - mean) / std).transpose(0, 2, 1)  # [B, N, L]
  b, n, length = series.shape
  g = np_linear(series, model.global_embedding)
  padded = np.concatenate([series, np.repeat(series[..., -1:], STRIDE, axis=-1)], axis=-1)
  num_patches = (length - PATCH_LEN) // STRIDE + 2
  patches = np.stack([padded[..., m * STRIDE:m * STRIDE + PATCH_LEN]
                      for m in range(num_patches)], axis=2)  # [B, N, M, P]
  tokens = patches @ np.asarray(model.patch_embedding.kernel[...], np.float64)
  tokens = tokens + sinusoidal_positions(num_patches, D_MODEL)
  z = np_encoder(tokens.reshape(b * n, num_patches, D_MODEL), model.temporal_encoder)
  flat = z.reshape(b, n, num_patches, D_MODEL).transpose(0, 1, 3, 2).reshape(b, n, -1)
  t = np_linear(flat, model.head)
  v = np_gate(model.embedding_gate, g, t, gate1)
  c = np_encoder(v, model.variate_encoder)
  h = np_gate(model.variate_gate, v, c, gate2)
  y = np_linear(h, model.projection).transpose(0, 2, 1)  # [B, H, N]
  return y * std + mean


# ---------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def gateformer_eval():
  """(graphdef, state, jitted eval forward(state, batch)) of one model with random LayerNorm
  parameters; compiled once, reused for every weight edit below (same shapes)."""
  with nnx.use_eager_sharding(False):
    model = _build()
    _randomize_layer_norms(model, seed=3)
    graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch, train=False))
  return graphdef, state, forward


def test_registry_name():
  assert MODELS.get("gateformer") is Gateformer


def test_output_shape_and_numpy_transcription(gateformer_eval):
  graphdef, state, forward = gateformer_eval
  batch = _batch()
  out = np.asarray(forward(state, batch))
  assert out.shape == (BATCH, PRED_LEN, NUM_VARIATES)
  expected = np_gateformer(nnx.merge(graphdef, state), batch["x"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def _forced(graphdef, state, gate_name: str, logit: float):
  """A copy of the model whose gate `gate_name` has bias `logit` in its first linear map, so
  its logits are about `logit` everywhere (kernels and the other bias are O(1))."""
  model = nnx.clone(nnx.merge(graphdef, state))  # merge shares the Variables with `state`
  gate = getattr(model, gate_name)
  gate.first.bias[...] = jnp.full(gate.first.bias.shape, logit, jnp.float32)
  return model


@pytest.mark.parametrize("gate_name", ["embedding_gate", "variate_gate"])
@pytest.mark.parametrize("logit, limit", [(LARGE_LOGIT, 1.0), (-LARGE_LOGIT, 0.0)])
def test_gate_at_its_limit_selects_one_branch(gateformer_eval, gate_name, logit, limit):
  # embedding_gate -> 1: only the global (linear) embedding, -> 0: only the patch/attention one;
  # variate_gate -> 1: the variate attention is bypassed, -> 0: only its output is kept.
  graphdef, state, forward = gateformer_eval
  model = _forced(graphdef, state, gate_name, logit)
  batch = _batch(1)
  got = np.asarray(forward(nnx.split(model)[1], batch))
  fixed = {"gate1": limit} if gate_name == "embedding_gate" else {"gate2": limit}
  expected = np_gateformer(model, batch["x"], **fixed)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  # ... and differs from the model with its initial (non-saturated) gates.
  assert np.abs(got - np.asarray(forward(state, batch))).max() > 1e-3


def test_both_gates_open_to_the_linear_path_is_a_linear_forecaster(gateformer_eval):
  # G_1 = G_2 = 1: y = ((x' W_g + b_g) W_o + b_o) de-normalized, an iTransformer without attention.
  graphdef, state, forward = gateformer_eval
  model = _forced(graphdef, state, "embedding_gate", LARGE_LOGIT)
  model.variate_gate.first.bias[...] = jnp.full((D_MODEL,), LARGE_LOGIT)
  batch = _batch(2)
  got = np.asarray(forward(nnx.split(model)[1], batch))
  x = np.asarray(batch["x"], np.float64)
  mean = x.mean(1, keepdims=True)
  std = np.sqrt(x.var(1, keepdims=True) + 1e-5)
  series = ((x - mean) / std).transpose(0, 2, 1)
  y = np_linear(np_linear(series, model.global_embedding), model.projection)
  np.testing.assert_allclose(got, y.transpose(0, 2, 1) * std + mean, rtol=1e-4, atol=1e-4)


def test_only_the_variate_attention_mixes_variates(gateformer_eval):
  graphdef, state, forward = gateformer_eval
  batch = _batch(4)
  changed = {**batch, "x": batch["x"].at[:, :, 0].multiply(-1.0)}
  # Stage 2 bypassed (G_2 = 1): the other variates' forecasts ignore variate 0.
  bypassed = nnx.split(_forced(graphdef, state, "variate_gate", LARGE_LOGIT))[1]
  np.testing.assert_allclose(np.asarray(forward(bypassed, changed))[:, :, 1:],
                             np.asarray(forward(bypassed, batch))[:, :, 1:], rtol=0, atol=1e-5)
  # With the learned gate they depend on it.
  diff = np.asarray(forward(state, changed))[:, :, 1:] - np.asarray(forward(state, batch))[:, :, 1:]
  assert np.abs(diff).max() > 1e-4


def test_variate_permutation_and_affine_equivariance(gateformer_eval):
  _, state, forward = gateformer_eval
  batch = _batch(5)
  base = np.asarray(forward(state, batch))
  perm = np.array([2, 0, 1])
  permuted = np.asarray(forward(state, {**batch, "x": batch["x"][:, :, perm]}))
  np.testing.assert_allclose(permuted, base[:, :, perm], rtol=1e-4, atol=1e-5)
  # Instance normalization: x -> a x + b per variate (a > 0) gives y -> a y + b.
  scale, shift = np.array([2.0, 0.5, 3.0]), np.array([1.0, -4.0, 0.25])
  moved = np.asarray(forward(state, {**batch, "x": batch["x"] * scale + shift}))
  np.testing.assert_allclose(moved, base * scale + shift, rtol=1e-3, atol=1e-3)


def test_jit_step_gives_finite_gradients():
  graphdef, params = nnx.split(_build())
  target = jnp.asarray(np.random.default_rng(6).normal(size=(BATCH, PRED_LEN, NUM_VARIATES)),
                       jnp.float32)

  @jax.jit
  def step(params, batch, key):  # one SGD step in train mode (dropout on)
    def loss_fn(params):
      prediction = nnx.merge(graphdef, params)(batch, train=True, rngs=nnx.Rngs(dropout=key))
      return jnp.mean(jnp.square(prediction - target))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree_util.tree_map(lambda p, g: p - 1e-2 * g, params, grads), loss, grads

  new_params, loss, grads = step(params, _batch(), jax.random.key(0))
  assert np.isfinite(float(loss))
  leaves = jax.tree_util.tree_leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)  # every weight is used
  _, new_loss, _ = step(new_params, _batch(), jax.random.key(0))
  assert float(new_loss) < float(loss)


def test_bad_patching_is_refused():
  with pytest.raises(ValueError, match="do not fit"):
    _build(patch_len=SEQ_LEN + STRIDE + 1)
  assert math.isclose(_sigmoid(LARGE_LOGIT - 10.0), 1.0)  # the forced gates really saturate
