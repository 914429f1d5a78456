"""Tests for PatchTST: the patching against a numpy unfold, the whole forward pass against a numpy
transcription on the module's own weights, channel independence, the instance normalization's
affine equivariance, output shape, a jitted gradient step, and the weights' logical names."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from paperzoo import sharding
from paperzoo.models.patchtst import PatchTST, make_patches, num_patches
from paperzoo.registry import MODELS
from tests.conftest import random_forecasting_batch

SEQ_LEN, PRED_LEN, NUM_VARIATES, NUM_TIME_FEATURES, BATCH = 24, 8, 3, 2, 4
PATCH_LEN, STRIDE, D_MODEL, D_FF, NUM_HEADS = 6, 4, 8, 16, 2


pytestmark = pytest.mark.usefixtures("no_eager_sharding")


def _config(**overrides) -> ml_collections.ConfigDict:
  base = dict(name="patchtst", patch_len=PATCH_LEN, stride=STRIDE, d_model=D_MODEL, d_ff=D_FF,
              num_heads=NUM_HEADS, num_layers=2, dropout=0.1, head_dropout=0.1,
              activation="gelu", init="torch", attention_impl="xla", revin_affine=False)
  return ml_collections.ConfigDict({**base, **overrides})


def _build(seed: int = 0, **overrides) -> PatchTST:
  return MODELS.get("patchtst")(_config(**overrides), seq_len=SEQ_LEN, pred_len=PRED_LEN,
                                num_variates=NUM_VARIATES, num_time_features=NUM_TIME_FEATURES,
                                rngs=nnx.Rngs(params=seed))


def _batch(seed: int = 0) -> dict[str, jax.Array]:
  assert NUM_VARIATES == 3  # the shared builder makes three variates
  return random_forecasting_batch(seed, batch=BATCH, seq_len=SEQ_LEN,
                                  num_time_features=NUM_TIME_FEATURES)


def test_registry_name():
  assert MODELS.get("patchtst") is PatchTST


@pytest.mark.parametrize("seq_len,patch_len,stride", [(24, 6, 4), (96, 16, 8), (336, 16, 8),
                                                      (10, 3, 3)])
def test_patching_matches_numpy_unfold(seq_len, patch_len, stride):
  series = np.random.default_rng(0).normal(size=(2, seq_len)).astype(np.float32)
  padded = np.concatenate([series, np.repeat(series[:, -1:], stride, axis=1)], axis=1)
  windows = np.lib.stride_tricks.sliding_window_view(padded, patch_len, axis=1)[:, ::stride]
  assert windows.shape[1] == (seq_len - patch_len) // stride + 2
  assert num_patches(seq_len, patch_len, stride) == windows.shape[1]
  np.testing.assert_array_equal(np.asarray(make_patches(jnp.asarray(series), patch_len, stride)),
                                windows)
  if (seq_len, patch_len, stride) == (336, 16, 8):
    assert windows.shape[1] == 42  # PatchTST/42


# ---------------------------------------------------------------------------------------------
# numpy transcription of the forward pass (eval mode)


def _np_linear(x, linear):
  return x @ np.asarray(linear.kernel[...], np.float64) + np.asarray(linear.bias[...], np.float64)


def _np_layer_norm(x, norm):
  mean = x.mean(-1, keepdims=True)
  var = np.square(x - mean).mean(-1, keepdims=True)
  return ((x - mean) / np.sqrt(var + 1e-5) * np.asarray(norm.scale[...], np.float64)
          + np.asarray(norm.bias[...], np.float64))


def _np_gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _np_attention(x, attention):
  # Fused projections over [num_heads * head_dim], heads as contiguous blocks.
  q = _np_linear(x, attention.q_proj)
  k = _np_linear(x, attention.k_proj)
  v = _np_linear(x, attention.v_proj)
  n, s, _ = q.shape
  head_dim = D_MODEL // NUM_HEADS
  split = lambda t: t.reshape(n, s, NUM_HEADS, head_dim).transpose(0, 2, 1, 3)
  q, k, v = split(q), split(k), split(v)
  scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = (probs @ v).transpose(0, 2, 1, 3).reshape(n, s, D_MODEL)
  return _np_linear(out, attention.out_proj)


def _np_forward(model: PatchTST, x: np.ndarray) -> np.ndarray:
  b, l, c = x.shape
  mean = x.mean(1, keepdims=True)
  std = np.sqrt(np.square(x - mean).mean(1, keepdims=True) + 1e-5)
  normed = (x - mean) / std
  if model.revin_affine:
    gamma = np.asarray(model.revin_scale[...], np.float64)
    beta = np.asarray(model.revin_bias[...], np.float64)
    normed = normed * gamma + beta
  series = normed.transpose(0, 2, 1).reshape(b * c, l)
  padded = np.concatenate([series, np.repeat(series[:, -1:], STRIDE, axis=1)], axis=1)
  count = (l - PATCH_LEN) // STRIDE + 2
  patches = np.stack([padded[:, n * STRIDE:n * STRIDE + PATCH_LEN] for n in range(count)], 1)
  h = _np_linear(patches, model.patch_embedding) + np.asarray(model.position_embedding[...])
  for layer in model.encoder.layers:
    h = _np_layer_norm(h + _np_attention(h, layer.attention), layer.norm1)
    y = _np_linear(_np_gelu(_np_linear(h, layer.ff_in)), layer.ff_out)
    h = _np_layer_norm(h + y, layer.norm2)
  h = _np_layer_norm(h, model.encoder.norm)  # [B C, N, D]
  flat = h.transpose(0, 2, 1).reshape(b * c, -1)  # d_model-major, as the authors' Flatten_Head
  out = _np_linear(flat, model.head).reshape(b, c, -1).transpose(0, 2, 1)
  if model.revin_affine:
    out = (out - beta) / (gamma + 1e-10)
  return out * std + mean


@pytest.mark.parametrize("revin_affine", [False, True])
def test_forward_matches_numpy(revin_affine):
  model = _build(revin_affine=revin_affine)
  if revin_affine:  # away from the identity so the test sees gamma and beta
    model.revin_scale[...] = jnp.asarray([0.5, 1.5, 2.0], jnp.float32)
    model.revin_bias[...] = jnp.asarray([0.1, -0.3, 0.7], jnp.float32)
  batch = _batch(1)
  graphdef, state = nnx.split(model)
  out = np.asarray(jax.jit(lambda state: nnx.merge(graphdef, state)(batch, train=False))(state))
  assert out.shape == (BATCH, PRED_LEN, NUM_VARIATES)
  expected = _np_forward(model, np.asarray(batch["x"], np.float64))
  np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)


# ---------------------------------------------------------------------------------------------
# Properties


@pytest.fixture(scope="module")
def patchtst_eval():
  with nnx.use_eager_sharding(False):
    model = _build()
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch, train=False))
  return lambda batch: np.asarray(forward(state, batch), np.float64)


def test_output_shape(patchtst_eval):
  out = patchtst_eval(_batch())
  assert out.shape == (BATCH, PRED_LEN, NUM_VARIATES)
  assert np.all(np.isfinite(out))


def test_channel_independence(patchtst_eval):
  # Each variate is forecast from its own history only: rewriting variate 1's input changes its
  # forecast and leaves variates 0 and 2 exactly as they were.
  batch = _batch(2)
  changed = batch["x"].at[..., 1].set(
      jnp.asarray(np.random.default_rng(5).normal(size=(BATCH, SEQ_LEN)) * 4.0, jnp.float32))
  base, moved = patchtst_eval(batch), patchtst_eval({**batch, "x": changed})
  np.testing.assert_allclose(moved[..., [0, 2]], base[..., [0, 2]], rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(moved[..., 1] - base[..., 1])) > 1e-2
  # Shared weights: the same series gives the same forecast whichever variate slot it sits in.
  swapped = patchtst_eval({**batch, "x": batch["x"][..., [2, 0, 1]]})
  np.testing.assert_allclose(swapped, base[..., [2, 0, 1]], rtol=1e-5, atol=1e-5)


def test_instance_norm_gives_affine_equivariance(patchtst_eval):
  # f(a x + b) = a f(x) + b per variate (a > 0), up to the 1e-5 inside the square root.
  batch = _batch(3)
  scale = np.asarray([0.5, 3.0, 1.7], np.float32)
  shift = np.asarray([2.0, -5.0, 0.3], np.float32)
  moved = patchtst_eval({**batch, "x": batch["x"] * scale + shift})
  np.testing.assert_allclose(moved, patchtst_eval(batch) * scale + shift, rtol=1e-4, atol=1e-4)


def test_rejects_patch_longer_than_padded_series():
  with pytest.raises(ValueError, match="do not fit"):
    _build(patch_len=SEQ_LEN + STRIDE + 1)


# ---------------------------------------------------------------------------------------------
# Training and names


def test_jit_step_gives_finite_gradients_and_learns():
  model = _build(revin_affine=True, num_layers=1)
  graphdef, params = nnx.split(model)
  optimizer = optax.adam(3e-3)
  batch = _batch()
  target = jnp.asarray(np.random.default_rng(4).normal(size=(BATCH, PRED_LEN, NUM_VARIATES)),
                       jnp.float32)

  @jax.jit
  def step(params, opt_state, key):
    def loss_fn(params):
      prediction = nnx.merge(graphdef, params)(batch, train=True, rngs=nnx.Rngs(dropout=key))
      return jnp.mean(jnp.square(prediction - target))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  opt_state = optimizer.init(params)
  params, opt_state, first_loss, grads = step(params, opt_state, jax.random.key(0))
  leaves = jax.tree_util.tree_leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)  # every weight is used
  for i in range(1, 20):
    params, opt_state, loss, _ = step(params, opt_state, jax.random.key(i))
  assert float(loss) < float(first_loss)


def test_revin_affine_params_name_their_axes():
  # The trainer checks each config's model; the configs keep RevIN without its affine map.
  model = nnx.eval_shape(lambda: _build(revin_affine=True))
  sharding.check_logical_names(nnx.state(model, nnx.Param))
