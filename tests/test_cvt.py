"""CvT: the convolutional projection against its equations in numpy, the stages' maps, and the
paper's promise that without positional encodings the same weights take any image size."""

from __future__ import annotations

import chex
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from experiments.configs import common
from paperzoo.config import ConfigDict
from paperzoo.models import cvt
from paperzoo.registry import MODELS


def _np(x):
  return np.asarray(x, np.float64)


def _np_depthwise(image, kernel, stride):
  """Zero-padded (k // 2) depthwise convolution as a loop: [B, H, W, C] -> [B, H', W', C]."""
  k = kernel.shape[0]
  pad = k // 2
  padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (image.shape[1] + 2 * pad - k) // stride + 1
  out_w = (image.shape[2] + 2 * pad - k) // stride + 1
  out = np.zeros((image.shape[0], out_h, out_w, image.shape[3]))
  for y in range(out_h):
    for x in range(out_w):
      window = padded[:, y * stride:y * stride + k, x * stride:x * stride + k]  # [B, k, k, C]
      out[:, y, x] = np.einsum("bijc,ijc->bc", window, kernel)
  return out


def _np_norm(h, norm, *, batch_stats):
  """LayerNorm over channels, or BatchNorm with the batch's statistics over (B, tokens)."""
  scale, bias = _np(norm.scale[...]), _np(norm.bias[...])
  axes = (0, 1) if batch_stats else (-1,)
  mean = h.mean(axis=axes, keepdims=True)
  var = h.var(axis=axes, keepdims=True)
  return (h - mean) / np.sqrt(var + 1e-5) * scale + bias


def _np_linear(h, linear):
  return h @ _np(linear.kernel[...]) + _np(linear.bias[...])


def _np_conv_attention(mixer, x, grid, *, batch_stats):
  """Eq. 2: q/k/v = Linear(Flatten(Norm(DWConv_stride(map)))), the class token passed by."""
  batch, _, channels = x.shape
  cls, image = x[:, :1], x[:, 1:].reshape(batch, *grid, channels)

  def project(conv, linear, stride):
    h = _np_depthwise(image, _np(conv.kernel[...]), stride).reshape(batch, -1, channels)
    h = np.concatenate([cls, _np_norm(h, conv.norm, batch_stats=batch_stats)], axis=1)
    return _np_linear(h, linear).reshape(batch, h.shape[1], mixer.num_heads, mixer.head_dim)

  q = project(mixer.q_conv, mixer.q_proj, 1)
  k = project(mixer.k_conv, mixer.k_proj, mixer.kv_stride)
  v = project(mixer.v_conv, mixer.v_proj, mixer.kv_stride)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(mixer.head_dim)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, -1, channels)
  return _np_linear(out, mixer.out_proj), k.shape[1]


@pytest.mark.parametrize("norm,train", [("layer", False), ("batch", True)])
def test_conv_projection_attention_matches_the_equations(norm, train):
  rng = np.random.default_rng(0)
  mixer = cvt.ConvProjectionAttention(8, num_heads=2, kernel=3, kv_stride=2, norm=norm,
                                      class_token=True, dropout_rate=0.0, impl="xla",
                                      init="lecun", rngs=nnx.Rngs(0))
  for conv in (mixer.q_conv, mixer.k_conv, mixer.v_conv):  # non-trivial norm parameters
    conv.norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, 8), jnp.float32)
    conv.norm.bias[...] = jnp.asarray(rng.normal(size=8), jnp.float32)
  grid = (5, 3)  # odd sides: keys and values on ceil(5/2) x ceil(3/2) = 3 x 2
  x = rng.standard_normal((2, 1 + 15, 8)).astype(np.float32)
  # nnx.jit: one compile instead of one per op, and BatchNorm's statistics update in place.
  y = nnx.jit(lambda m, tokens: m(tokens, grid=grid, train=train))(mixer, jnp.asarray(x))
  expected, kv_length = _np_conv_attention(mixer, _np(x), grid, batch_stats=train)
  assert mixer.kv_grid(grid) == (3, 2) and kv_length == 1 + 3 * 2
  np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-4)
  if norm == "batch":  # a training pass moved the running mean 10% of the way to the batch's
    h = _np_depthwise(_np(x[:, 1:]).reshape(2, 5, 3, 8), _np(mixer.k_conv.kernel[...]), 2)
    np.testing.assert_allclose(mixer.k_conv.norm.mean[...], 0.1 * h.mean(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-5)


def _config(**overrides):
  return ConfigDict({**common.MIXER_DEFAULTS, "depths": (1, 1), "dims": (8, 16),
                     "embed_kernels": (5, 3), "embed_strides": (2, 2), "embed_paddings": (2, 1),
                     "head_dim": 4, "qkv_kernel": 3, "kv_stride": 2, "projection_norm": "batch",
                     "mixer": "conv_attention", "pool": "cls", "mlp_ratio": 2.0,
                     "dropout": 0.0, "drop_path": 0.0, "layer_scale_init": 0.0,
                     "init": "lecun", **overrides})


def _abstract(config, input_shape):
  """The model built with shapes only: checks of its structure and of construction errors need
  no values (eager initialization compiles one program per parameter shape, seconds here)."""
  return nnx.eval_shape(lambda: MODELS.get("cvt")(config, num_classes=3,
                                                  input_shape=input_shape, rngs=nnx.Rngs(0)))


# The single-stage model the gradient and image-size tests share (shared parameter shapes
# initialize once per process).
_ONE_STAGE = dict(depths=(1,), dims=(8,), embed_kernels=(5,), embed_strides=(2,),
                  embed_paddings=(2,))


def test_stages_shrink_odd_maps_with_heads_from_the_head_width():
  model = _abstract(_config(), (28, 28, 1))
  assert model.grids == ((14, 14), (7, 7))
  first, last = model.stages[0][0].mixer, model.stages[1][0].mixer
  assert (first.num_heads, last.num_heads) == (2, 4)  # widths 8 and 16, head width 4
  assert not first.class_token and last.class_token  # the class token joins in the last stage
  assert (first.kv_grid((14, 14)), last.kv_grid((7, 7))) == ((7, 7), (4, 4))


def test_gradients_are_finite_and_reach_the_class_token():
  # One stage (compiling a gradient costs seconds per block here); BatchNorm in training mode.
  model = MODELS.get("cvt")(_config(**_ONE_STAGE), num_classes=3, input_shape=(28, 28, 1),
                            rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 28, 28, 1)), jnp.float32)
  # Plain dicts, as the trainer passes them: BatchNorm's statistics update inside the trace.
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)
  params, extra = nnx.to_pure_dict(params), nnx.to_pure_dict(extra)

  def loss(p):
    logits = nnx.merge(graphdef, p, extra)({"inputs": images}, train=True,
                                           rngs=nnx.Rngs(dropout=0))
    return jnp.sum(logits ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(value)
  chex.assert_tree_all_finite(grads)
  assert np.any(np.asarray(grads["class_token"]) != 0)  # the class token reaches the head


def test_no_positional_encoding_so_one_set_of_weights_takes_any_image_size():
  config = _config(pool="mean", projection_norm="layer", **_ONE_STAGE)
  shapes = lambda m: jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  assert shapes(_abstract(config, (28, 28, 1))) == shapes(_abstract(config, (33, 33, 1)))
  model = MODELS.get("cvt")(config, num_classes=3, input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda images: nnx.merge(graphdef, state)({"inputs": images}, train=False))
  logits = forward(jnp.ones((1, 33, 33, 1)))  # the model built for 28 x 28, on 33 x 33
  assert logits.shape == (1, 3) and np.all(np.isfinite(logits))


def test_image_sizes_and_settings_the_config_cannot_take_are_refused():
  # Stride 4 with kernel 3 and no padding leaves the last row of 28 out of every window.
  with pytest.raises(ValueError, match="token embedding of stage 1 .* leave the last 1 real"):
    _abstract(_config(embed_kernels=(3, 3), embed_strides=(4, 2), embed_paddings=(0, 1)),
              (28, 28, 1))
  with pytest.raises(ValueError, match="smaller than the kernel"):
    _abstract(_config(embed_paddings=(0, 1)), (4, 4, 1))
  # Keys and values at stride 3 skip the last column of stage 1's 12 x 12 map.
  with pytest.raises(ValueError, match="key/value projection"):
    _abstract(_config(kv_stride=3), (24, 24, 1))
  with pytest.raises(ValueError, match="use pool='mean'"):
    _abstract(_config(mixer="window"), (28, 28, 1))
  with pytest.raises(ValueError, match="valid: conv_attention, attention"):
    _abstract(_config(mixer="conv"), (28, 28, 1))
