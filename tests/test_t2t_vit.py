"""T2T-ViT: the soft split against a numpy unfold loop, the re-structurization between T2T
layers on the module's own weights, token counts for 28 and 32 px images, gradients, and the
image sizes a soft-split setting cannot take."""

from __future__ import annotations

import chex
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from experiments.configs import common
from paperzoo.config import ConfigDict
from paperzoo.models import t2t_vit
from paperzoo.registry import MODELS


def _np_unfold(image, kernel, stride, padding):
  """PyTorch nn.Unfold as a loop: [B, H, W, C] -> [B, H' W', C k^2], features (c, i, j)."""
  batch, height, width, channels = image.shape
  padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out_h = (height + 2 * padding - kernel) // stride + 1
  out_w = (width + 2 * padding - kernel) // stride + 1
  tokens = np.zeros((batch, out_h * out_w, channels * kernel * kernel), image.dtype)
  for y in range(out_h):
    for x in range(out_w):
      for c in range(channels):
        for i in range(kernel):
          for j in range(kernel):
            tokens[:, y * out_w + x, c * kernel * kernel + i * kernel + j] = (
                padded[:, y * stride + i, x * stride + j, c])
  return tokens, (out_h, out_w)


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((2, 7, 5, 3), 3, 2, 1), ((1, 28, 28, 1), 5, 2, 2), ((1, 9, 6, 2), 3, 1, 1),
    ((1, 8, 8, 2), 7, 4, 2)])
def test_soft_split_is_the_unfold(shape, kernel, stride, padding):
  image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  grids = []

  @jax.jit
  def split(x):  # the grid is static: record it while tracing
    tokens, grid = t2t_vit.soft_split(x, kernel=kernel, stride=stride, padding=padding)
    grids.append(grid)
    return tokens

  tokens, (grid,) = split(jnp.asarray(image)), grids
  expected, expected_grid = _np_unfold(image, kernel, stride, padding)
  assert grid == expected_grid
  np.testing.assert_array_equal(tokens, expected)  # data movement only: exact


def test_soft_splits_that_leave_pixels_out_or_have_no_window_are_refused():
  assert t2t_vit.strided_output_size(28, kernel=3, stride=2, padding=1, what="x") == 14
  with pytest.raises(ValueError, match="side 32, .* leave the last 1 real"):
    t2t_vit.strided_output_size(32, kernel=3, stride=2, padding=0, what="x")
  with pytest.raises(ValueError, match="smaller than the kernel"):
    t2t_vit.strided_output_size(2, kernel=5, stride=1, padding=1, what="x")
  with pytest.raises(ValueError, match="kernel and stride must be >= 1"):
    t2t_vit.strided_output_size(8, kernel=3, stride=0, padding=1, what="x")


def _config(**overrides):
  return ConfigDict({**common.MIXER_DEFAULTS, "t2t_kernels": (5, 3, 3), "t2t_strides": (2, 2, 1),
                     "t2t_paddings": (2, 1, 1), "t2t_dim": 8, "t2t_heads": 1,
                     "t2t_mlp_ratio": 1.0, "mixer": "attention", "d_model": 16,
                     "num_layers": 1, "num_heads": 2, "mlp_ratio": 2.0, "pool": "cls",
                     "positions": "sinusoidal", "dropout": 0.0, "drop_path": 0.0,
                     "layer_scale_init": 0.0, "init": "lecun", **overrides})


def _abstract(config, input_shape):
  """The model built with shapes only: checks of its structure and of construction errors need
  no values (eager initialization compiles one program per parameter shape, seconds here)."""
  return nnx.eval_shape(lambda: MODELS.get("t2t_vit")(config, num_classes=3,
                                                      input_shape=input_shape,
                                                      rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def two_split_model():
  """Two soft splits around one T2T layer, on an odd image (9 x 7 -> 5 x 4 -> 3 x 2), learned
  positions; built once for the tests that need values."""
  return MODELS.get("t2t_vit")(_config(t2t_kernels=(3, 3), t2t_strides=(2, 2),
                                       t2t_paddings=(1, 1), positions="learned"),
                               num_classes=3, input_shape=(9, 7, 2), rngs=nnx.Rngs(0))


def test_tokens_to_token_restructurizes_row_major_and_splits_again(two_split_model):
  model = two_split_model
  assert model.grid == (3, 2)
  image = np.random.default_rng(1).standard_normal((2, 9, 7, 2)).astype(np.float32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(image, first):  # the module's T2T module, and its T2T layer alone on `first`
    module = nnx.merge(graphdef, state)
    return (module.tokens_to_token(image, train=False)[0],
            module.t2t_layers[0](first, train=False, rngs=None))

  first, first_grid = _np_unfold(image, 3, 2, 1)
  assert first_grid == (5, 4)
  tokens, layer_out = (np.asarray(a) for a in run(jnp.asarray(image), jnp.asarray(first)))
  assert layer_out.shape == (2, 20, 8)  # C k^2 = 18 -> t2t_dim
  # Re-structurize (row-major 5 x 4 map), then the second soft split.
  expected, expected_grid = _np_unfold(layer_out.reshape(2, 5, 4, 8), 3, 2, 1)
  assert model.grid == expected_grid == (3, 2)
  np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-5)


def test_token_counts_for_mnist_and_cifar():
  for shape, grid in (((28, 28, 1), (7, 7)), ((32, 32, 3), (8, 8))):
    model = _abstract(_config(), shape)
    assert model.grid == grid
    assert model.project.kernel.shape == (8 * 3 * 3, 16)  # t2t_dim k^2 -> d_model


def test_gradients_are_finite_and_reach_the_first_t2t_layer(two_split_model):
  model = two_split_model
  assert model.positions[...].shape == (3 * 2 + 1, 16)  # the tokens and the class token
  images = jnp.asarray(np.random.default_rng(2).standard_normal((2, 9, 7, 2)), jnp.float32)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p)({"inputs": images}, train=False) ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(value)
  chex.assert_tree_all_finite(grads)
  first_layer = grads["t2t_layers"][0]["proj"]["kernel"][...]
  assert np.any(np.asarray(first_layer) != 0)  # the loss reaches the first T2T layer


def test_image_sizes_and_settings_the_model_cannot_take_are_refused():
  # Without padding, a 3x3 stride-2 soft split covers a side of 31 (15 windows) but leaves
  # the last row and column of 32 out.
  unpadded = _config(t2t_kernels=(3, 3, 3), t2t_paddings=(0, 1, 1))
  assert _abstract(unpadded, (31, 31, 1)).grid == (8, 8)
  with pytest.raises(ValueError, match="soft split 1 of 3 on the 32x32 map .* leave the last 1"):
    _abstract(unpadded, (32, 32, 1))
  with pytest.raises(ValueError, match="soft split 3 of 3 on the 1x1 map"):
    _abstract(_config(t2t_paddings=(2, 1, 0)), (4, 4, 1))
  with pytest.raises(ValueError, match="same length"):
    _abstract(_config(t2t_strides=(2, 2)), (28, 28, 1))
  with pytest.raises(ValueError, match="use pool='mean'"):
    _abstract(_config(mixer="window"), (28, 28, 1))
