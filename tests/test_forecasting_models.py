"""Tests for the forecasting models: DLinear against a numpy transcription, the moving average on
a hand-checked series, iTransformer's design properties (shape, affine equivariance from the
instance normalization, variate-permutation equivariance), compilation with plain `jax.jit`,
finite gradients, and a one-batch overfit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from paperzoo.models.dlinear import DLinear, moving_average
from paperzoo.models.itransformer import ITransformer
from paperzoo.registry import MODELS
from tests.conftest import random_forecasting_batch

SEQ_LEN, PRED_LEN, NUM_VARIATES, NUM_TIME_FEATURES, BATCH = 24, 8, 3, 2, 4


pytestmark = pytest.mark.usefixtures("no_eager_sharding")


def _config(name: str, **overrides) -> ml_collections.ConfigDict:
  base = {
      "dlinear": dict(name="dlinear", moving_avg=5, individual=False, init="torch"),
      "itransformer": dict(name="itransformer", d_model=16, d_ff=16, num_heads=2, num_layers=2,
                           dropout=0.1, activation="gelu", use_norm=True, init="torch",
                           attention_impl="xla"),
  }[name]
  return ml_collections.ConfigDict({**base, **overrides})


def _build(name: str, seed: int = 0, **overrides) -> nnx.Module:
  return MODELS.get(name)(_config(name, **overrides), seq_len=SEQ_LEN, pred_len=PRED_LEN,
                          num_variates=NUM_VARIATES, num_time_features=NUM_TIME_FEATURES,
                          rngs=nnx.Rngs(params=seed))


def _batch(seed: int = 0) -> dict[str, jax.Array]:
  assert NUM_VARIATES == 3  # the shared builder makes three variates
  return random_forecasting_batch(seed, batch=BATCH, seq_len=SEQ_LEN,
                                  num_time_features=NUM_TIME_FEATURES)


def test_registry_names():
  assert MODELS.get("dlinear") is DLinear
  assert MODELS.get("itransformer") is ITransformer


# ---------------------------------------------------------------------------------------------
# DLinear


def test_moving_average_replicate_padding_by_hand():
  x = jnp.asarray([1.0, 2.0, 3.0, 4.0, 10.0]).reshape(1, 5, 1)
  # k = 3 pads one copy per side: [1, 1, 2, 3, 4, 10, 10].
  expected = [4 / 3, 2.0, 3.0, 17 / 3, 8.0]
  np.testing.assert_allclose(np.asarray(moving_average(x, 3))[0, :, 0], expected, rtol=1e-6)
  # k = 5 pads two copies per side: [1, 1, 1, 2, 3, 4, 10, 10, 10].
  expected = [8 / 5, 11 / 5, 4.0, 29 / 5, 37 / 5]
  np.testing.assert_allclose(np.asarray(moving_average(x, 5))[0, :, 0], expected, rtol=1e-6)
  with pytest.raises(ValueError, match="odd"):
    moving_average(x, 4)


def _np_moving_average(x: np.ndarray, k: int) -> np.ndarray:
  pad = (k - 1) // 2
  padded = np.concatenate([np.repeat(x[:, :1], pad, 1), x, np.repeat(x[:, -1:], pad, 1)], 1)
  return np.stack([padded[:, t:t + k].mean(1) for t in range(x.shape[1])], axis=1)


@pytest.mark.parametrize("individual", [False, True])
def test_dlinear_matches_numpy(individual):
  model = _build("dlinear", individual=individual)
  rng = np.random.default_rng(1)
  # The kernels start at 1/seq_len everywhere; random values make the test see every entry.
  for linear in (model.seasonal_linear, model.trend_linear):
    assert np.allclose(np.asarray(linear.kernel[...]), 1.0 / SEQ_LEN)
    linear.kernel[...] = jnp.asarray(rng.normal(size=linear.kernel.shape), jnp.float32)
  batch = _batch(1)
  x = np.asarray(batch["x"], np.float64)
  trend = _np_moving_average(x, 5)
  seasonal = x - trend

  def time_linear(series, linear):  # series [B, L, C] -> [B, P, C]
    kernel, bias = np.asarray(linear.kernel[...], np.float64), np.asarray(linear.bias[...])
    if individual:  # kernel [C, L, P], bias [C, P]
      return np.einsum("blc,clp->bpc", series, kernel) + bias.T[None]
    return np.einsum("blc,lp->bpc", series, kernel) + bias[None, :, None]

  expected = time_linear(seasonal, model.seasonal_linear) + time_linear(trend, model.trend_linear)
  out = model(batch, train=True)
  assert out.shape == (BATCH, PRED_LEN, NUM_VARIATES)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_dlinear_bias_uses_torch_init_and_default_weight_init_is_random():
  model = _build("dlinear", weight_init="default")
  bound = 1.0 / np.sqrt(SEQ_LEN)
  for linear in (model.seasonal_linear, model.trend_linear):
    for values in (np.asarray(linear.kernel[...]), np.asarray(linear.bias[...])):
      assert np.all(np.abs(values) <= bound) and values.std() > 0.2 * bound


# ---------------------------------------------------------------------------------------------
# iTransformer


@pytest.fixture(scope="module")
def itransformer_eval():
  """(model, jitted eval forward) for the property tests; compiled once."""
  with nnx.use_eager_sharding(False):
    model = _build("itransformer")
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch, train=False))
  return model, lambda batch: np.asarray(forward(state, batch), np.float64)


def test_itransformer_output_shape(itransformer_eval):
  _, forward = itransformer_eval
  out = forward(_batch())
  assert out.shape == (BATCH, PRED_LEN, NUM_VARIATES)
  assert np.all(np.isfinite(out))


def test_itransformer_is_equivariant_to_per_variate_affine_maps(itransformer_eval):
  # Instance normalization removes each series' mean and scale and restores them on the output:
  # f(a x + b) = a f(x) + b per variate (a > 0), up to the 1e-5 inside the square root.
  _, forward = itransformer_eval
  batch = _batch(2)
  scale = jnp.asarray([0.5, 3.0, 1.7], jnp.float32)
  shift = jnp.asarray([2.0, -5.0, 0.3], jnp.float32)
  moved = forward({**batch, "x": batch["x"] * scale + shift})
  np.testing.assert_allclose(moved, forward(batch) * np.asarray(scale) + np.asarray(shift),
                             rtol=1e-4, atol=1e-4)


def test_itransformer_tokens_are_variates(itransformer_eval):
  # No positional encoding across tokens: permuting the variates permutes the forecasts.
  _, forward = itransformer_eval
  batch = _batch(3)
  permutation = np.asarray([2, 0, 1])
  permuted = forward({**batch, "x": batch["x"][..., permutation]})
  np.testing.assert_allclose(permuted, forward(batch)[..., permutation], rtol=1e-5, atol=1e-5)


def test_itransformer_without_norm_and_time_features():
  model = ITransformer(_config("itransformer", use_norm=False, num_layers=1), seq_len=SEQ_LEN,
                       pred_len=PRED_LEN, num_variates=NUM_VARIATES, num_time_features=0,
                       rngs=nnx.Rngs(params=0))
  out = model({"x": _batch()["x"]}, train=False)
  assert out.shape == (BATCH, PRED_LEN, NUM_VARIATES)


# ---------------------------------------------------------------------------------------------
# Training: plain jax.jit over split/merge, gradients, overfitting one batch


def _train_step_fn(model: nnx.Module, learning_rate: float):
  graphdef, params = nnx.split(model)
  optimizer = optax.adam(learning_rate)

  @jax.jit
  def step(params, opt_state, batch, target, key):
    def loss_fn(params):
      prediction = nnx.merge(graphdef, params)(batch, train=True, rngs=nnx.Rngs(dropout=key))
      return jnp.mean(jnp.square(prediction - target))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  @jax.jit
  def eval_mse(params, batch, target):
    prediction = nnx.merge(graphdef, params)(batch, train=False)
    return jnp.mean(jnp.square(prediction - target))

  return params, optimizer.init(params), step, eval_mse


@pytest.fixture(scope="module", params=["dlinear", "itransformer"])
def trainer(request):
  with nnx.use_eager_sharding(False):
    model = _build(request.param)
  learning_rate = {"dlinear": 1e-2, "itransformer": 3e-3}[request.param]
  return (request.param,) + _train_step_fn(model, learning_rate)


def _target(seed: int = 4) -> jax.Array:
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(BATCH, PRED_LEN, NUM_VARIATES)), jnp.float32)


def test_jit_step_gives_finite_gradients(trainer):
  _, params, opt_state, step, _ = trainer
  _, _, loss, grads = step(params, opt_state, _batch(), _target(), jax.random.key(0))
  assert np.isfinite(float(loss))
  leaves = jax.tree_util.tree_leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)


def test_overfits_one_batch(trainer):
  name, params, opt_state, step, eval_mse = trainer
  batch, target = _batch(), _target()
  initial = float(eval_mse(params, batch, target))
  for i in range(300):
    params, opt_state, _, _ = step(params, opt_state, batch, target, jax.random.key(i))
  final = float(eval_mse(params, batch, target))
  assert final < initial / 10, (name, initial, final)
