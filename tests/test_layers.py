"""Tests for paperzoo.layers: attention against its definition, the post-norm encoder layer
against a numpy transcription of its equations, PyTorch-style init, and sharding names."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from paperzoo import sharding
from paperzoo.layers import (Dropout, Encoder, EncoderLayer,
                             MultiHeadAttention, dense, dot_product_attention,
                             torch_linear_bias_init, torch_linear_kernel_init)
from paperzoo.registry import MODELS


pytestmark = pytest.mark.usefixtures("no_eager_sharding")


def _np(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# numpy transcriptions of the definitions


def np_attention(q, k, v, mask=None):
  """softmax(q k^T / sqrt(d)) v per head; q [B, Sq, H, D], k, v [B, Skv, H, D]."""
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  logits = logits - logits.max(-1, keepdims=True)
  weights = np.exp(logits)
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def np_linear(x, linear: nnx.Linear):
  return x @ _np(linear.kernel[...]) + _np(linear.bias[...])


def np_layer_norm(x, norm: nnx.LayerNorm, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * _np(norm.scale[...]) + _np(norm.bias[...])


def np_mha(x, attn: MultiHeadAttention):
  b, s, d = x.shape
  h = attn.num_heads
  split = lambda t: t.reshape(b, s, h, d // h)
  q, k, v = (split(np_linear(x, p)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
  return np_linear(np_attention(q, k, v).reshape(b, s, d), attn.out_proj)


def np_encoder_layer(x, layer: EncoderLayer):
  act = {"gelu": lambda t: 0.5 * t * (1.0 + erf(t / math.sqrt(2.0))),
         "relu": lambda t: np.maximum(t, 0.0)}[layer.activation]
  x = np_layer_norm(x + np_mha(x, layer.attention), layer.norm1)
  y = np_linear(act(np_linear(x, layer.ff_in)), layer.ff_out)
  return np_layer_norm(x + y, layer.norm2)


def _randomize_layer_norms(module: nnx.Module, seed: int) -> None:
  """LayerNorms start at scale 1, bias 0; random values make the comparison see them."""
  rng = np.random.default_rng(seed)
  for _, norm in nnx.iter_graph(module):
    if isinstance(norm, nnx.LayerNorm):
      norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, norm.scale.shape), jnp.float32)
      norm.bias[...] = jnp.asarray(rng.normal(0.0, 0.3, norm.bias.shape), jnp.float32)


# ---------------------------------------------------------------------------------------------
# dot_product_attention


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_dot_product_attention_matches_definition(impl, use_mask):
  b, sq, skv, h, d = 3, 5, 7, 3, 5
  rng = np.random.default_rng(0)
  q = rng.normal(size=(b, sq, h, d)).astype(np.float32)
  k = rng.normal(size=(b, skv, h, d)).astype(np.float32)
  v = rng.normal(size=(b, skv, h, d)).astype(np.float32)
  mask = None
  if use_mask:
    mask = rng.random((b, 1, sq, skv)) < 0.6
    mask[..., 0] = True  # every query attends to something
  out = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                              mask=None if mask is None else jnp.asarray(mask), impl=impl)
  np.testing.assert_allclose(np.asarray(out), np_attention(_np(q), _np(k), _np(v), mask),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["flash", "flash_interpret"])
def test_flash_impls_match_the_definition_inside_a_model(impl):
  """The attention layer reaches pallas_kernels.flash_attention through `impl` alone."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 11, 16)), jnp.float32)
  layers = {name: MultiHeadAttention(16, 2, dropout_rate=0.1, impl=name, rngs=nnx.Rngs(params=0))
            for name in ("reference", impl)}
  outputs = {name: layer(x, x, train=False) for name, layer in layers.items()}
  np.testing.assert_allclose(np.asarray(outputs[impl]), np.asarray(outputs["reference"]),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="takes no attention mask"):
    dot_product_attention(x.reshape(2, 11, 2, 8), x.reshape(2, 11, 2, 8),
                          x.reshape(2, 11, 2, 8), mask=jnp.ones((11, 11), bool), impl=impl)


def test_dot_product_attention_accepts_2d_mask():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 4, 2, 3)), jnp.float32) for _ in range(3))
  causal = np.tril(np.ones((4, 4), bool))
  for impl in ("xla", "reference"):
    out = dot_product_attention(q, k, v, mask=jnp.asarray(causal), impl=impl)
    np.testing.assert_allclose(np.asarray(out), np_attention(_np(q), _np(k), _np(v), causal),
                               rtol=1e-5, atol=1e-5)


def test_dot_product_attention_rejects_unknown_impl_and_fused_dropout():
  q = jnp.zeros((1, 2, 1, 4))
  with pytest.raises(ValueError, match="xla.*cudnn.*reference"):
    dot_product_attention(q, q, q, impl="flash-typo")
  with pytest.raises(ValueError, match="reference"):
    dot_product_attention(q, q, q, impl="xla", probs_dropout=lambda p: p)
  with pytest.raises(ValueError, match="valid"):
    MultiHeadAttention(8, 2, dropout_rate=0.0, impl="nope", rngs=nnx.Rngs(params=0))


# ---------------------------------------------------------------------------------------------
# Dropout


def test_dropout_rate_scale_and_determinism():
  dropout = Dropout(0.1)
  assert isinstance(dropout, nnx.Dropout)
  x = jnp.ones((64, 1001), jnp.float32)  # odd size: the last 32-bit word is half used
  np.testing.assert_array_equal(np.asarray(dropout(x, deterministic=True, rngs=None)), 1.0)
  out = np.asarray(dropout(x, deterministic=False, rngs=nnx.Rngs(dropout=0)))
  kept = out != 0
  assert kept.mean() == pytest.approx(0.9, abs=0.005)  # 64k draws: std of the mean ~0.0012
  np.testing.assert_allclose(out[kept], 65536 / (65536 - round(0.1 * 65536)), rtol=1e-6)
  # Each key gives its own mask; the same key the same mask; a raw key works as in nnx.
  other = np.asarray(dropout(x, deterministic=False, rngs=nnx.Rngs(dropout=1)))
  assert (other != 0).mean() == pytest.approx(0.9, abs=0.005)
  assert np.mean((other != 0) != kept) > 0.1
  again = np.asarray(dropout(x, deterministic=False, rngs=jax.random.key(0)))
  assert again.shape == out.shape
  # Masks of neighbouring elements (the two halves of one random word) are independent.
  pair_both_kept = np.mean(kept[:, 0:1000:2] & kept[:, 1:1001:2])
  assert pair_both_kept == pytest.approx(0.81, abs=0.01)
  assert Dropout(0.0)(x, deterministic=False) is x


def test_dropout_mask_comes_from_two_16_bit_halves_of_each_random_word():
  # Dropout's mask is the documented function of jax.random.bits(key), and a non-threefry key
  # (rbg) gets a valid mask too.
  x = jnp.ones((3, 333), jnp.float32)
  key = jax.random.key(7)
  out = np.asarray(Dropout(0.3)(x, deterministic=False, rngs=key))
  words = jax.random.bits(key, (-(-x.size // 2),), jnp.uint32)
  uniforms = np.asarray(jax.lax.bitcast_convert_type(words, jnp.uint16)).reshape(-1)[:x.size]
  np.testing.assert_array_equal(out != 0, (uniforms >= round(0.3 * 65536)).reshape(x.shape))
  rbg = np.asarray(Dropout(0.3)(x, deterministic=False, rngs=jax.random.key(7, impl="rbg")))
  assert 0.6 < (rbg != 0).mean() < 0.8


# ---------------------------------------------------------------------------------------------
# MultiHeadAttention


def test_multi_head_attention_shapes_and_eval_is_deterministic():
  attn = MultiHeadAttention(12, 3, dropout_rate=0.5, rngs=nnx.Rngs(params=0))
  rng = np.random.default_rng(2)
  q_in = jnp.asarray(rng.normal(size=(2, 5, 12)), jnp.float32)
  kv_in = jnp.asarray(rng.normal(size=(2, 9, 12)), jnp.float32)
  out = attn(q_in, kv_in, train=False)
  assert out.shape == (2, 5, 12)
  # Eval: dropout off, whatever rngs are passed, and the same as the reference path.
  for rngs in (nnx.Rngs(dropout=0), nnx.Rngs(dropout=1)):
    np.testing.assert_array_equal(np.asarray(attn(q_in, kv_in, train=False, rngs=rngs)),
                                  np.asarray(out))
  attn.impl = "reference"
  np.testing.assert_allclose(np.asarray(attn(q_in, kv_in, train=False)), np.asarray(out),
                             rtol=1e-5, atol=1e-6)
  # Train: dropout on the probabilities is active and depends on the key.
  train_a = attn(q_in, kv_in, train=True, rngs=nnx.Rngs(dropout=0))
  train_b = attn(q_in, kv_in, train=True, rngs=nnx.Rngs(dropout=1))
  assert not np.allclose(np.asarray(train_a), np.asarray(out))
  assert not np.allclose(np.asarray(train_a), np.asarray(train_b))


def test_multi_head_self_attention_matches_numpy():
  attn = MultiHeadAttention(8, 2, dropout_rate=0.1, rngs=nnx.Rngs(params=3))
  x = np.random.default_rng(3).normal(size=(2, 6, 8)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(attn(jnp.asarray(x), jnp.asarray(x), train=False)),
                             np_mha(_np(x), attn), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Encoder


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_encoder_layer_matches_numpy_equations(activation):
  layer = EncoderLayer(12, 3, 20, dropout_rate=0.1, activation=activation,
                       rngs=nnx.Rngs(params=4))
  _randomize_layer_norms(layer, seed=4)
  x = np.random.default_rng(5).normal(size=(2, 7, 12)).astype(np.float32)
  out = layer(jnp.asarray(x), train=False)
  np.testing.assert_allclose(np.asarray(out), np_encoder_layer(_np(x), layer),
                             rtol=1e-4, atol=1e-4)


def test_encoder_is_layers_then_final_norm():
  encoder = Encoder(2, 8, 2, 16, dropout_rate=0.1, rngs=nnx.Rngs(params=6))
  _randomize_layer_norms(encoder, seed=6)
  x = np.random.default_rng(6).normal(size=(3, 5, 8)).astype(np.float32)
  expected = _np(x)
  for layer in encoder.layers:
    expected = np_encoder_layer(expected, layer)
  expected = np_layer_norm(expected, encoder.norm)
  np.testing.assert_allclose(np.asarray(encoder(jnp.asarray(x), train=False)), expected,
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm_first,use_mask", [(False, False), (True, False), (False, True)])
def test_encoder_num_outputs_equals_slicing_the_full_output(norm_first, use_mask):
  # Computing only the first tokens' outputs in the last layer is an exact shortcut.
  encoder = Encoder(2, 8, 2, 16, dropout_rate=0.1, norm_first=norm_first,
                    rngs=nnx.Rngs(params=7))
  _randomize_layer_norms(encoder, seed=7)
  x = jnp.asarray(np.random.default_rng(7).normal(size=(3, 11, 8)), jnp.float32)
  mask = jnp.asarray(np.random.default_rng(8).random((3, 1, 11, 11)) < 0.7) if use_mask else None
  mask = None if mask is None else mask.at[..., 0].set(True)  # no fully masked row
  full = encoder(x, mask=mask, train=False)
  part = encoder(x, mask=mask, train=False, num_outputs=4)
  assert part.shape == (3, 4, 8)
  np.testing.assert_allclose(np.asarray(part), np.asarray(full[:, :4]), rtol=1e-5, atol=1e-6)


def test_encoder_layer_rejects_unknown_activation():
  with pytest.raises(ValueError, match="gelu"):
    EncoderLayer(8, 2, 8, dropout_rate=0.0, activation="swish", rngs=nnx.Rngs(params=0))


# ---------------------------------------------------------------------------------------------
# Initialization


def test_torch_init_bounds_and_uniformity():
  fan_in, fan_out = 64, 1024
  bound = 1.0 / math.sqrt(fan_in)
  linear = dense(fan_in, fan_out, names=("embed", "mlp"), init="torch", rngs=nnx.Rngs(params=7))
  kernel, bias = np.asarray(linear.kernel[...]), np.asarray(linear.bias[...])
  assert kernel.shape == (fan_in, fan_out) and bias.shape == (fan_out,)
  for values in (kernel, bias):
    assert np.all(np.abs(values) <= bound)
    assert np.abs(values).max() > 0.95 * bound  # fills the interval, not a narrower one
  # U(-b, b): mean 0, variance b^2 / 3, half the mass within b / 2.
  assert abs(kernel.mean()) < 0.02 * bound
  assert kernel.var() == pytest.approx(bound**2 / 3.0, rel=0.03)
  assert np.mean(np.abs(kernel) < bound / 2) == pytest.approx(0.5, abs=0.01)
  # The standalone initializers agree on the bound.
  key = jax.random.key(0)
  assert np.abs(np.asarray(torch_linear_kernel_init()(key, (fan_in, 8)))).max() <= bound
  assert np.abs(np.asarray(torch_linear_bias_init(fan_in)(key, (4096,)))).max() <= bound


def test_lecun_init_has_zero_bias_and_unknown_scheme_fails():
  linear = dense(16, 8, names=("embed", "mlp"), init="lecun", rngs=nnx.Rngs(params=0))
  assert np.all(np.asarray(linear.bias[...]) == 0.0)
  with pytest.raises(ValueError, match="torch"):
    dense(16, 8, names=("embed", "mlp"), init="xavier", rngs=nnx.Rngs(params=0))


# ---------------------------------------------------------------------------------------------
# Sharding names


def _build(name: str, **overrides):
  config = ml_collections.ConfigDict(dict(
      name=name, d_model=16, d_ff=24, num_heads=2, num_layers=2, dropout=0.1, activation="gelu",
      use_norm=True, init="torch", attention_impl="xla", moving_avg=5, individual=False))
  config.update(overrides)
  return MODELS.get(name)(config, seq_len=12, pred_len=6, num_variates=3, num_time_features=2,
                          rngs=nnx.Rngs(params=0))


def test_dlinear_individual_heads_name_every_param_axis():
  # The trainer checks the models of every config (test_configs); no config uses this variant.
  model = nnx.eval_shape(lambda: _build("dlinear", individual=True))
  sharding.check_logical_names(nnx.state(model, nnx.Param))


class _Named(nnx.Module):
  def __init__(self, names):
    self.kernel = nnx.Param(jnp.zeros((2, 3)), out_sharding=names)


@pytest.mark.parametrize("names,message", [
    (None, r"\['kernel'\] \(2, 3\) has no logical axis names"),
    (("embed",), "names 1 axes"),
    (("embed", "mpl"), r"unknown names \['mpl'\]"),
])
def test_param_axes_without_known_names_fail_before_compute(names, message):
  with pytest.raises(ValueError, match=message):
    sharding.check_logical_names(nnx.state(_Named(names), nnx.Param))
  sharding.check_logical_names(nnx.state(_Named(("embed", "mlp")), nnx.Param))
