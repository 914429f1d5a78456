"""FID's Inception-v3 (`paperzoo.generation.inception`) with random weights, since the real ones
are not available offline: the network's structure, its weights file and the errors around it,
the converter's name mapping (on a fake torch-layout state dict, without torch), the building
blocks and the input pipeline against numpy, and FID's basic properties. Torch is not needed;
one test of the converter's command line runs where it happens to be installed."""

from __future__ import annotations

import sys
import warnings
import zipfile

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx

from paperzoo.generation import inception, metrics

# torchvision's Inception3 has 27,161,264 parameters; without AuxLogits (3,326,696) and fc
# (2,049,000) the convolutions and BatchNorm scales / biases of the FID network remain.
FID_NETWORK_PARAMETERS = 21_785_568


@pytest.fixture(scope="module")
def network() -> inception.FIDInceptionV3:
  return inception.random_network(0)


@pytest.fixture(scope="module")
def weights_file(network, tmp_path_factory):
  return inception.save_weights(network, tmp_path_factory.mktemp("inception") / "fid.npz")


def unit_images(seed: int, shape: tuple[int, ...]) -> np.ndarray:
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def digits(seed: int, n: int, brightness: int) -> np.ndarray:
  """n uint8 28x28 grayscale images: noise in [0, brightness)."""
  return np.random.default_rng(seed).integers(0, brightness, size=(n, 28, 28, 1), dtype=np.uint8)


# ------------------------------------------------------------------------------------------
# Structure and features.
# ------------------------------------------------------------------------------------------
def test_the_network_has_the_fid_inception_structure(network):
  shapes = inception.weight_shapes()
  assert len(shapes) == 470
  assert sum(name.endswith("/conv/kernel") for name in shapes) == 94
  parameters = sum(int(np.prod(shape)) for name, shape in shapes.items()
                   if not name.endswith(("/bn/mean", "/bn/var")))
  assert parameters == FID_NETWORK_PARAMETERS
  assert shapes["Conv2d_1a_3x3/conv/kernel"] == (3, 3, 3, 32)
  assert shapes["Mixed_6b/branch7x7_2/conv/kernel"] == (1, 7, 128, 128)
  assert shapes["Mixed_7b/branch3x3_2b/conv/kernel"] == (3, 1, 384, 384)
  assert shapes["Mixed_7c/branch_pool/conv/kernel"] == (1, 1, 2048, 192)
  assert shapes["Mixed_7c/branch_pool/bn/var"] == (192,)
  # The FID graph's quirk: the last block max-pools its pool branch.
  assert (network.Mixed_7b.pool, network.Mixed_7c.pool) == ("avg", "max")
  assert network.Conv2d_1a_3x3.bn.epsilon == pytest.approx(1e-3)


def test_features_are_2048_per_image_at_native_size_and_after_the_299_resize(network,
                                                                             weights_file):
  small = inception.pool3_features(unit_images(0, (2, 75, 75, 3)), network, resize=False)
  assert small.shape == (2, inception.FEATURE_DIM) and small.dtype == np.float32
  assert np.all(np.isfinite(small)) and np.std(small) > 0
  assert not np.allclose(small[0], small[1])
  # The FID path: 28x28 grayscale uint8, repeated to RGB and resized to 299 x 299 (these are
  # the real images of the FID test below, which then reuses the features).
  resized = inception.pool3_features(digits(1, 6, 256), weights_file, batch_size=6)
  assert resized.shape == (6, inception.FEATURE_DIM)
  assert np.all(np.isfinite(resized)) and np.std(resized) > 0


# ------------------------------------------------------------------------------------------
# The weights file.
# ------------------------------------------------------------------------------------------
def test_save_and_load_round_trip_gives_identical_features(network, weights_file):
  loaded = inception.load_weights(weights_file)
  original, restored = inception.model_arrays(network), inception.model_arrays(loaded)
  assert original.keys() == inception.weight_shapes().keys()
  chex.assert_trees_all_equal(restored, original)
  images = unit_images(0, (2, 75, 75, 3))
  np.testing.assert_array_equal(inception.pool3_features(images, network, resize=False),
                                inception.pool3_features(images, loaded, resize=False))


def test_a_missing_weights_file_says_where_it_was_expected_and_how_to_get_it(tmp_path):
  missing = tmp_path / "nowhere" / "inception_fid.npz"
  for load in (inception.load_weights,
               lambda path: inception.frechet_inception_distance(digits(0, 2, 9),
                                                                 digits(1, 2, 9), path)):
    with pytest.raises(FileNotFoundError) as error:
      load(missing)
    message = str(error.value)
    assert str(missing) in message
    assert inception.FID_WEIGHTS_URL in message
    assert "python -m paperzoo.generation.inception --convert=" in message


def test_a_mismatched_weights_file_lists_the_differences(network, tmp_path):
  arrays = inception.model_arrays(network)
  del arrays["Mixed_5b/branch1x1/conv/kernel"]
  arrays["Mixed_6a/branch3x3/bn/mean"] = np.zeros(7, np.float32)
  arrays["AuxLogits/fc/weight"] = np.zeros((3, 3), np.float32)
  path = tmp_path / "wrong.npz"
  np.savez(path, **arrays)
  with pytest.raises(ValueError) as error:
    inception.load_weights(path)
  message = str(error.value)
  assert "1 missing (Mixed_5b/branch1x1/conv/kernel)" in message
  assert "1 unexpected (AuxLogits/fc/weight)" in message
  assert "Mixed_6a/branch3x3/bn/mean: (7,), expected (384,)" in message
  assert "--convert=" in message
  # The unconverted .pth (a zip of pickles and raw storages, as torch writes) and a file that is
  # no zip at all are named as such.
  pth = tmp_path / "pt_inception.pth"
  with zipfile.ZipFile(pth, "w") as archive:
    archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    archive.writestr("archive/data/0", b"\x00" * 16)
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"\x80\x02not an npz")
  for path in (pth, garbage):
    with pytest.raises(ValueError, match="must be converted first"):
      inception.load_weights(path)


def test_the_tasks_check_the_weights_path_before_training(tmp_path):
  from experiments.configs import dit, var  # pylint: disable=g-import-not-at-top
  from paperzoo.registry import TASKS  # pylint: disable=g-import-not-at-top
  for config_module in (dit, var):
    config = config_module.get_config("runlocal")
    assert config.task.inception_weights == ""  # off by default
    config.task.inception_weights = str(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError, match="absent.npz"):
      TASKS.get(config.task.name)(config)


# ------------------------------------------------------------------------------------------
# The converter (pytorch-fid's state dict -> our names), without torch.
# ------------------------------------------------------------------------------------------
TORCH_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}


def torch_layout(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our arrays as pytorch-fid's state dict would hold them: dotted names, OIHW kernels, bn
  weight / running statistics, num_batches_tracked, and the 1008-way fc after pool3."""
  state_dict = {}
  for name, value in arrays.items():
    *layer, module, leaf = name.split("/")
    prefix = ".".join(layer + [module])
    if module == "conv":
      state_dict[f"{prefix}.weight"] = value.transpose(3, 2, 0, 1)
    else:
      state_dict[f"{prefix}.{TORCH_BN_NAMES[leaf]}"] = value
      state_dict[f"{prefix}.num_batches_tracked"] = np.zeros((), np.int64)
  state_dict["fc.weight"] = np.zeros((1008, 2048), np.float32)
  state_dict["fc.bias"] = np.zeros((1008,), np.float32)
  return state_dict


def test_the_converter_maps_exactly_the_parameters_of_the_network(network):
  arrays = inception.model_arrays(network)
  state_dict = torch_layout(arrays)
  assert len(state_dict) == 94 * 6 + 2  # conv weight, 4 bn tensors, num_batches_tracked; fc
  assert state_dict["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
  converted = inception.convert_torch_state_dict(state_dict)
  # The same names, shapes, dtypes (float32, as model_arrays gives) and values.
  chex.assert_trees_all_equal(converted, arrays, strict=True)

  with pytest.raises(ValueError, match=r"map to nothing \(AuxLogits.conv0.conv.bias\)"):
    inception.convert_torch_state_dict({**state_dict, "AuxLogits.conv0.conv.bias": np.zeros(3)})
  incomplete = dict(state_dict)
  del incomplete["Mixed_7c.branch_pool.bn.running_var"]
  with pytest.raises(ValueError, match="1 missing .Mixed_7c/branch_pool/bn/var"):
    inception.convert_torch_state_dict(incomplete)


def test_the_converter_says_that_it_needs_torch(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  with pytest.raises(ImportError, match="needs torch"):
    inception.main([f"--convert={tmp_path / 'x.pth'}", f"--out={tmp_path / 'x.npz'}"])


def test_the_converter_command_line_with_torch(network, tmp_path, capsys):
  torch = pytest.importorskip("torch")  # optional: not a dependency, not in CI
  state_dict = {name: torch.from_numpy(np.array(value))
                for name, value in torch_layout(inception.model_arrays(network)).items()}
  pth = tmp_path / inception.FID_WEIGHTS_FILE
  torch.save(state_dict, pth)
  out = tmp_path / "inception_fid.npz"
  assert inception.main([f"--convert={pth}", f"--out={out}"]) == 0
  assert "--config.task.inception_weights=" in capsys.readouterr().out
  converted = inception.read_weights(out)
  for name, value in inception.model_arrays(network).items():
    np.testing.assert_array_equal(converted[name], value)


# ------------------------------------------------------------------------------------------
# Building blocks and the input pipeline against numpy.
# ------------------------------------------------------------------------------------------
def numpy_conv(x, kernel, stride, padding):
  """Cross-correlation of NHWC x with an HWIO kernel, explicit zero padding (ph, pw)."""
  kh, kw = kernel.shape[:2]
  padded = np.pad(x, ((0, 0), (padding[0],) * 2, (padding[1],) * 2, (0, 0)))
  windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(1, 2))
  return np.einsum("nhwcij,ijco->nhwo", windows[:, ::stride, ::stride], kernel)


@pytest.mark.parametrize("kernel_size,stride,padding", [((3, 3), 2, (1, 1)),
                                                        ((1, 3), 1, (0, 1))])
def test_basic_conv2d_is_conv_then_batchnorm_eps_1e3_then_relu(kernel_size, stride, padding):
  rng = np.random.default_rng(0)
  layer = inception.BasicConv2d(4, 5, kernel_size, stride=stride, padding=padding,
                                rngs=nnx.Rngs(0))
  mean, var = rng.normal(size=5), rng.uniform(1e-3, 2.0, size=5)
  scale, bias = rng.normal(size=5), rng.normal(size=5)
  layer.bn.mean.set_value(jnp.asarray(mean, jnp.float32))
  layer.bn.var.set_value(jnp.asarray(var, jnp.float32))
  layer.bn.scale.set_value(jnp.asarray(scale, jnp.float32))
  layer.bn.bias.set_value(jnp.asarray(bias, jnp.float32))
  x = rng.normal(size=(2, 7, 8, 4)).astype(np.float32)
  kernel = np.asarray(layer.conv.kernel[...], np.float64)
  conv = numpy_conv(x.astype(np.float64), kernel, stride, padding)
  expected = np.maximum((conv - mean) / np.sqrt(var + 1e-3) * scale + bias, 0.0)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


def test_pools_match_numpy_with_tf_same_padding():
  x = np.random.default_rng(0).normal(size=(2, 5, 6, 3)).astype(np.float32)
  height, width = x.shape[1:3]
  average, maximum = np.zeros_like(x), np.zeros_like(x)
  for i in range(height):
    for j in range(width):
      window = x[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]  # the real pixels only
      average[:, i, j] = window.mean(axis=(1, 2))
      maximum[:, i, j] = window.max(axis=(1, 2))
  pooled = np.asarray(inception.avg_pool_3x3(jnp.asarray(x)))
  np.testing.assert_allclose(pooled, average, rtol=1e-6, atol=1e-6)
  # A corner averages 4 real pixels, not 9 with 5 zeros (torch's count_include_pad=True).
  assert pooled[0, 0, 0, 0] == pytest.approx(x[0, :2, :2, 0].mean(), abs=1e-6)
  np.testing.assert_allclose(
      np.asarray(inception.max_pool_3x3(jnp.asarray(x), stride=1, padding=1)), maximum)
  strided = np.asarray(inception.max_pool_3x3(jnp.asarray(x), stride=2))
  assert strided.shape == (2, 2, 2, 3)
  np.testing.assert_allclose(strided[:, 1, 0], x[:, 2:5, 0:3].max(axis=(1, 2)))


def torch_bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[out, in] weights of torch's interpolate(mode="bilinear", align_corners=False) along one
  axis: source coordinate (i + 0.5) in / out - 0.5, clamped at 0, no antialiasing."""
  source = np.maximum((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0.0)
  low = np.minimum(np.floor(source).astype(int), size_in - 1)
  high = np.minimum(low + 1, size_in - 1)
  fraction = source - low
  matrix = np.zeros((size_out, size_in))
  np.add.at(matrix, (np.arange(size_out), low), 1 - fraction)
  np.add.at(matrix, (np.arange(size_out), high), fraction)
  return matrix


@pytest.mark.parametrize("height,width", [(13, 20), (400, 310)])  # up- and downsampling
def test_preprocess_resizes_like_torch_bilinear_and_scales_to_minus_one_one(height, width):
  x = unit_images(0, (1, height, width, 3))
  rows = torch_bilinear_matrix(height, inception.INPUT_SIZE)
  columns = torch_bilinear_matrix(width, inception.INPUT_SIZE)
  resized_rows = np.einsum("hi,nijc->nhjc", rows, x.astype(np.float64))
  expected = 2 * np.einsum("nhjc,wj->nhwc", resized_rows, columns) - 1
  # torch (and jax) place the source pixels in float32: up to ~4e-5 from this float64 formula
  # when shrinking. Antialiasing (jax's default) would be off by ~0.6 at 400 -> 299.
  np.testing.assert_allclose(np.asarray(inception.preprocess(jnp.asarray(x))), expected,
                             atol=1e-4)


def test_preprocess_takes_uint8_and_grayscale():
  gray = np.random.default_rng(0).integers(0, 256, size=(2, 9, 11, 1), dtype=np.uint8)
  from_uint8 = np.asarray(inception.preprocess(jnp.asarray(gray)))
  from_rgb = np.asarray(inception.preprocess(jnp.asarray(np.repeat(gray, 3, -1) / 255.0)))
  assert from_uint8.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(from_uint8, from_rgb, atol=1e-6)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):  # paperzoo's [-1, 1] floats are refused
    inception.pool3_features(np.full((2, 9, 9, 3), -1.0, np.float32), "unused.npz")


# ------------------------------------------------------------------------------------------
# FID.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_a,n_b", [(6, 9), (3, 40), (2, 2)])
def test_frechet_distance_with_fewer_examples_than_dimensions_is_the_general_formula(n_a, n_b):
  # FID of a few samples (n <= 2048) takes frechet_distance's n x n route.
  rng = np.random.default_rng(n_a)
  a = rng.normal(size=(n_a, 12)) @ rng.normal(size=(12, 12))
  b = rng.normal(size=(n_b, 12)) + 0.5
  s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sqrtm of the singular S1 S2
    root = scipy.linalg.sqrtm(s1 @ s2).real
  expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1 + s2) - 2 * np.trace(root)
  assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
  assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
  assert metrics.frechet_distance(a, a + 2.0) == pytest.approx(4.0 * 12, rel=1e-9)


class ConstantClassifier:
  """Enough of a reference classifier for sample_scores."""

  def logits(self, images):
    return np.zeros((len(images), 10))

  def features(self, images):
    return images.reshape(len(images), -1)[:, :4].astype(np.float64)


def test_fid_of_a_set_with_itself_is_zero_and_positive_between_different_sets(weights_file):
  real = digits(1, 6, 256)
  darker = digits(2, 6, 64)
  same = inception.frechet_inception_distance(real, real, weights_file, batch_size=6)
  different = inception.frechet_inception_distance(real, darker, weights_file, batch_size=6)
  assert same == pytest.approx(0.0, abs=1e-6)
  assert different > 1e-3
  # The same number through the tasks' entry point (features reused from the calls above).
  scores = metrics.sample_scores(darker, np.zeros(6, int), real, ConstantClassifier(),
                                 inception_weights=str(weights_file))
  assert scores["fid"] == pytest.approx(different, rel=1e-9)
  assert "fid" not in metrics.sample_scores(darker, np.zeros(6, int), real,
                                            ConstantClassifier())
