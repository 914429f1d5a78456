"""Tests for S-Mamba: the Mamba block against a numpy step-by-step transcription (conv, selective
recurrence, gate) on its own weights, causality of one direction, the bidirectional layer seeing
both sides, output shape and instance-norm equivariance, jitted finite gradients, and logical
names on every weight."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from paperzoo.layers.mamba import MambaBlock
from paperzoo.models.smamba import SMamba, SMambaEncoderLayer
from paperzoo.registry import MODELS
from tests.conftest import random_forecasting_batch

SEQ_LEN, PRED_LEN, NUM_VARIATES, NUM_TIME_FEATURES, BATCH = 24, 8, 3, 2, 4
D_MODEL = 8


pytestmark = pytest.mark.usefixtures("no_eager_sharding")


def _config(**overrides) -> ml_collections.ConfigDict:
  base = dict(name="smamba", d_model=D_MODEL, d_ff=12, num_layers=2, d_state=2, d_conv=4,
              expand=2, dropout=0.1, activation="gelu", use_norm=True, init="torch",
              scan_impl="auto")
  return ml_collections.ConfigDict({**base, **overrides})


def _build(seed: int = 0, **overrides) -> SMamba:
  return MODELS.get("smamba")(_config(**overrides), seq_len=SEQ_LEN, pred_len=PRED_LEN,
                              num_variates=NUM_VARIATES, num_time_features=NUM_TIME_FEATURES,
                              rngs=nnx.Rngs(params=seed))


def _batch(seed: int = 0) -> dict[str, jax.Array]:
  assert NUM_VARIATES == 3  # the shared builder makes three variates
  return random_forecasting_batch(seed, batch=BATCH, seq_len=SEQ_LEN,
                                  num_time_features=NUM_TIME_FEATURES)


def _tokens(seed: int, length: int = 6, batch: int = 2) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, length, D_MODEL)),
                     jnp.float32)


def _jitted(module: nnx.Module, **kwargs):
  """module(x, **kwargs) compiled once (eager op-by-op dispatch of the scan is slow on CPU)."""
  graphdef, state = nnx.split(module)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, **kwargs))
  return lambda x: np.asarray(forward(state, x))


def _silu(v):
  return v / (1.0 + np.exp(-v))


def _numpy_mamba(block: MambaBlock, x: np.ndarray) -> np.ndarray:
  """The Mamba block one token at a time (Gu & Dao 2023, Algorithm 2), float64."""
  w = lambda p: np.asarray(p[...], np.float64)
  d_inner, n, r, k = block.d_inner, block.d_state, block.dt_rank, block.d_conv
  A = -np.exp(w(block.A_log))                                     # [d_inner, N]
  batch, length, _ = x.shape
  out = np.zeros((batch, length, w(block.out_proj.kernel).shape[1]))
  for b in range(batch):
    projected = x[b] @ w(block.in_proj.kernel)
    u_raw, z = projected[:, :d_inner], projected[:, d_inner:]
    h = np.zeros((d_inner, n))
    for t in range(length):
      # Causal depthwise conv: the current token and the k - 1 before it (zeros before 0).
      conv = w(block.conv_bias).copy()
      for j in range(k):
        s = t - (k - 1) + j
        if s >= 0:
          conv += w(block.conv_kernel)[j] * u_raw[s]
      u = _silu(conv)
      xdbl = u @ w(block.x_proj.kernel)
      delta = np.log1p(np.exp(xdbl[:r] @ w(block.dt_proj.kernel) + w(block.dt_proj.bias)))
      B_t, C_t = xdbl[r:r + n], xdbl[r + n:]
      h = np.exp(delta[:, None] * A) * h + (delta * u)[:, None] * B_t[None, :]
      y = (h @ C_t + w(block.D) * u) * _silu(z[t])
      out[b, t] = y @ w(block.out_proj.kernel)
  return out


def test_mamba_block_matches_numpy_recurrence():
  block = MambaBlock(D_MODEL, d_state=3, d_conv=3, expand=2, scan_impl="reference",
                     rngs=nnx.Rngs(params=1))
  assert block.dt_rank == math.ceil(D_MODEL / 16)
  np.testing.assert_allclose(np.asarray(block.A_log[...])[0], np.log([1.0, 2.0, 3.0]))
  np.testing.assert_array_equal(np.asarray(block.D[...]), 1.0)
  # softplus(dt bias) lies in mamba_ssm's initial step range [1e-3, 0.1].
  dt = np.log1p(np.exp(np.asarray(block.dt_proj.bias[...], np.float64)))
  assert np.all(dt > 0.99e-3) and np.all(dt < 0.101)
  # Larger D and A spread make every term of the recurrence visible in the output.
  block.D[...] = jnp.linspace(-1.0, 2.0, block.d_inner)
  block.dt_proj.bias[...] = jnp.linspace(-2.0, 1.0, block.d_inner)
  x = _tokens(0)
  np.testing.assert_allclose(_jitted(block)(x), _numpy_mamba(block, np.asarray(x, np.float64)),
                             rtol=1e-4, atol=1e-5)


def test_mamba_block_pallas_interpret_matches_reference():
  block = MambaBlock(D_MODEL, d_state=2, scan_impl="reference", rngs=nnx.Rngs(params=2))
  x = _tokens(1, length=5, batch=1)
  expected = np.asarray(block(x))
  block.scan_impl = "interpret"
  np.testing.assert_allclose(np.asarray(block(x)), expected, rtol=1e-5, atol=1e-6)


def test_mamba_block_is_causal():
  block = MambaBlock(D_MODEL, d_state=2, rngs=nnx.Rngs(params=3))
  forward = _jitted(block)
  x = _tokens(2, length=7)
  t = 3
  changed = x.at[:, t + 1:].set(_tokens(5, length=7)[:, t + 1:])
  before, after = forward(x), forward(changed)
  np.testing.assert_allclose(after[:, :t + 1], before[:, :t + 1], rtol=1e-6, atol=1e-6)
  assert np.abs(after[:, t + 1:] - before[:, t + 1:]).max() > 1e-3


def test_bidirectional_layer_sees_both_sides():
  layer = SMambaEncoderLayer(D_MODEL, 12, dropout_rate=0.0, activation="gelu",
                             mamba_kwargs=dict(d_state=2), init="torch", rngs=nnx.Rngs(params=4))
  # Initial steps (softplus(bias) <= 0.1) pass little across tokens; larger ones make it plain.
  for block in (layer.mamba_forward, layer.mamba_backward):
    block.dt_proj.bias[...] = jnp.zeros((block.d_inner,))
  forward = _jitted(layer, train=False)
  x = _tokens(3, length=4)
  base = forward(x)
  # The last token reaches the first through the backward Mamba, the first reaches the last
  # through the forward one.
  last_changed = forward(x.at[:, -1].add(1.0))
  first_changed = forward(x.at[:, 0].add(1.0))
  assert np.abs(last_changed[:, 0] - base[:, 0]).max() > 1e-3
  assert np.abs(first_changed[:, -1] - base[:, -1]).max() > 1e-3
  # And each direction alone is one-sided: the forward block ignores later tokens.
  fwd = _jitted(layer.mamba_forward)
  np.testing.assert_allclose(fwd(x.at[:, -1].add(1.0))[:, 0], fwd(x)[:, 0], atol=1e-6)


def test_output_shape_and_instance_norm_equivariance():
  model = _build()
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch, train=False))
  batch = _batch(1)
  out = np.asarray(forward(state, batch), np.float64)
  assert out.shape == (BATCH, PRED_LEN, NUM_VARIATES) and np.all(np.isfinite(out))
  scale = jnp.asarray([0.5, 3.0, 1.7], jnp.float32)
  shift = jnp.asarray([2.0, -5.0, 0.3], jnp.float32)
  moved = np.asarray(forward(state, {**batch, "x": batch["x"] * scale + shift}))
  np.testing.assert_allclose(moved, out * np.asarray(scale) + np.asarray(shift),
                             rtol=1e-4, atol=1e-4)


def test_without_norm_and_time_features():
  model = SMamba(_config(use_norm=False, num_layers=1), seq_len=SEQ_LEN, pred_len=PRED_LEN,
                 num_variates=NUM_VARIATES, num_time_features=0, rngs=nnx.Rngs(params=0))
  out = _jitted(model, train=False)({"x": _batch()["x"]})
  assert out.shape == (BATCH, PRED_LEN, NUM_VARIATES) and np.all(np.isfinite(out))


def test_jitted_gradients_are_finite_and_reach_every_weight():
  model = _build(seed=5, num_layers=1)  # one layer holds every kind of weight
  graphdef, params = nnx.split(model, nnx.Param)
  target = jnp.asarray(np.random.default_rng(6).normal(size=(BATCH, PRED_LEN, NUM_VARIATES)),
                       jnp.float32)

  @jax.jit
  def grad_fn(params, batch, key):
    def loss_fn(params):
      prediction = nnx.merge(graphdef, params)(batch, train=True, rngs=nnx.Rngs(dropout=key))
      return jnp.mean(jnp.square(prediction - target))
    return jax.value_and_grad(loss_fn)(params)

  loss, grads = grad_fn(params, _batch(2), jax.random.key(0))
  assert np.isfinite(float(loss))
  for path, grad in jax.tree_util.tree_leaves_with_path(grads):
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad)), path
    assert np.abs(grad).max() > 0, path


def test_unknown_scan_impl_fails_at_construction():
  with pytest.raises(ValueError, match="scan_impl"):
    _build(scan_impl="fast")
