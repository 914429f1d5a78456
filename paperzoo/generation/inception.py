r"""Standard FID: the Inception-v3 of the FID reference code, in Flax NNX, with weights the user
supplies.

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to the 2048-d "pool3"
features of one particular network: the TensorFlow Inception graph of 2015-12-05 that the
original TTUR code loads. pytorch-fid (github.com/mseitzer/pytorch-fid) ported that graph's
weights to a PyTorch state dict and reports FIDs very close to the TF code's; this module is
pytorch-fid's network, written from the architecture, so that a FID computed here is comparable
with published FIDs. With random weights its features matched a PyTorch rendering of pytorch-fid's
network to ~1e-6 (relative) when written; the real weights could not be tried offline.

Nothing is downloaded at run time and no weights ship with paperzoo. To get them:

  # 1. On a machine with internet (about 95 MB; pytorch-fid's published file):
  wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  # 2. Anywhere with torch installed (torch is needed for this step only; not a dependency):
  python -m paperzoo.generation.inception \
      --convert=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz
  # 3. Score a generation run with it (the diffusion and next_scale tasks then add "fid" to
  #    their final metrics, next to the reference classifier's scores):
  python -m experiments.run --workdir=/tmp/dit_mnist \
      --config=experiments/configs/dit.py:data=mnist \
      --config.task.inception_weights=/path/to/inception_fid.npz

Or in Python, on uint8 images (or floats in [0, 1]) [N, H, W, C] with C = 1 or 3:

    from paperzoo.generation import inception
    fid = inception.frechet_inception_distance(real_images, samples, "inception_fid.npz")

e.g. on the `samples.npz` that a finished run wrote (`np.load(path)["images"]`): the way to
score a run trained without the key, since `config.task` is part of what a checkpoint means and
the trainer refuses to resume a workdir with another task section. FID is biased upwards for
small N: compare FIDs only at equal numbers of samples (50,000 in most papers; `num_samples` in
the final metrics says how many were scored here). Cost: ~5.7 GFLOPs per 299 x 299 image, i.e.
seconds for 10,000 images on a GPU but ~0.3-0.5 s per image on 2 CPU cores (MNIST's 2,000 test
images and 500 samples: ~15-20 minutes). The real images' features are computed once per
process and weights file (`pool3_features` keeps the last two sets).

What the network computes (pytorch-fid's `InceptionV3` with `use_fid_inception=True`, i.e.
torchvision's Inception3 with the blocks replaced by `FIDInceptionA/C/E`, up to pool3):

  input    images in [0, 1], grayscale repeated to 3 channels, resized to 299 x 299 bilinearly
           (half-pixel centers, no antialiasing: torch's `interpolate(..., align_corners=False)`)
           and scaled to [-1, 1] (2 x - 1)
  stem     BasicConv2d 3x3/2 (32), 3x3 (32), 3x3 pad 1 (64), max-pool 3x3/2,
           1x1 (80), 3x3 (192), max-pool 3x3/2                         -> 35 x 35 x 192
  Mixed_5b, 5c, 5d   InceptionA (pool features 32, 64, 64)              -> 35 x 35 x 288
  Mixed_6a           InceptionB (stride-2 reduction)                    -> 17 x 17 x 768
  Mixed_6b..6e       InceptionC (7x7 factorized as 1x7 / 7x1; 128, 160, 160, 192 channels)
  Mixed_7a           InceptionD (stride-2 reduction)                    ->  8 x  8 x 1280
  Mixed_7b, 7c       InceptionE                                         ->  8 x  8 x 2048
  pool3    the spatial mean                                             -> 2048

  BasicConv2d = ReLU(BatchNorm(conv(x))): the convolution has no bias; BatchNorm uses its stored
  statistics, y = (x - mean) / sqrt(var + 1e-3) * scale + bias (TensorFlow's epsilon 1e-3).

The TensorFlow graph differs from torchvision's Inception3 in two ways that change the numbers:
  - the average pool of the pool branch (3x3, stride 1, padding 1) of every A, C and E block
    divides by the number of *real* pixels in the window (TF's SAME padding; torch's
    `count_include_pad=False`), not by 9, so border pixels are not darkened;
  - the last E block (Mixed_7c) pools its pool branch with a *max* pool, not an average pool
    (pytorch-fid calls it a likely bug in the TF graph; it is what FID is defined by).

The network is fully convolutional, so `resize=False` runs it at the images' own size (at least
75 x 75); only the 299 x 299 path is FID.

Weights file (`.npz`, float32, 470 arrays): one group per BasicConv2d, named by the module path,
which is pytorch-fid's (torchvision's) attribute path with "/" for ".":

  <layer>/conv/kernel   [kh, kw, in, out]  (HWIO; torch stores OIHW)
  <layer>/bn/scale      [out]              (torch: bn.weight)
  <layer>/bn/bias       [out]              (torch: bn.bias)
  <layer>/bn/mean       [out]              (torch: bn.running_mean)
  <layer>/bn/var        [out]              (torch: bn.running_var)

with <layer> one of the 94 convolutions, e.g. `Conv2d_1a_3x3`, `Mixed_5b/branch5x5_2`,
`Mixed_7c/branch3x3dbl_3b` (`weight_shapes()` lists them all). The converter drops what FID does
not use: `fc.*` (the 1008-way classifier after pool3) and BatchNorm's `num_batches_tracked`.
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import os
import pathlib
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paperzoo.data import batches
from paperzoo.data import files

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPSILON = 1e-3  # TensorFlow's BatchNorm epsilon, kept by the ported weights
# FID is a reference number: full float32 convolutions on every backend (a GPU would otherwise
# use TF32 by default, ~3 significant digits per product).
PRECISION = jax.lax.Precision.HIGHEST
DEFAULT_BATCH_SIZE = 50  # pytorch-fid's default


def _convert_hint(out: str | os.PathLike = "inception_fid.npz") -> str:
  return (f"On a machine with internet, download pytorch-fid's weights ({FID_WEIGHTS_URL}), "
          f"then convert them (needs torch, once): python -m paperzoo.generation.inception "
          f"--convert={FID_WEIGHTS_FILE} --out={out}")


# --------------------------------------------------------------------------------------------
# Building blocks.
# --------------------------------------------------------------------------------------------
def _pair(value: int | Sequence[int]) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 average, stride 1, padding 1, dividing by the number of real (unpadded) pixels in the
  window: TF's SAME average pool, which the FID graph uses (torch's count_include_pad=False)."""
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                      count_include_pad=False)


def max_pool_3x3(x: jax.Array, *, stride: int, padding: int = 0) -> jax.Array:
  """3x3 max pool (padding counts as -inf, as in torch's max_pool2d)."""
  return nnx.max_pool(x, (3, 3), strides=(stride, stride),
                      padding=((padding, padding), (padding, padding)))


class BasicConv2d(nnx.Module):
  """ReLU(BatchNorm(conv(x))) with a bias-free conv and BatchNorm on stored statistics (eps
  1e-3): the unit every Inception layer is made of. Attribute names (`conv`, `bn`) follow the
  torch state dict, so converting a checkpoint is one renaming rule."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], *,
               stride: int = 1, padding: int | Sequence[int] = 0, rngs: nnx.Rngs):
    pad_h, pad_w = _pair(padding)
    # He-normal (activations keep their scale through 94 ReLU layers) only matters for random
    # networks; real use loads weights (`load_weights`).
    self.conv = nnx.Conv(in_channels, out_channels, _pair(kernel_size), strides=stride,
                         padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False,
                         precision=PRECISION, kernel_init=nnx.initializers.he_normal(),
                         rngs=rngs)
    self.bn = nnx.BatchNorm(out_channels, use_running_average=True, epsilon=BN_EPSILON,
                            rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


# Module attribute names below are pytorch-fid's (torchvision's), so that the weights file and
# the converter need no table of names.
# pylint: disable=invalid-name
class InceptionA(nnx.Module):
  """35x35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg-pool (real pixels) -> 1x1."""

  def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
    conv = functools.partial(BasicConv2d, rngs=rngs)
    self.branch1x1 = conv(in_channels, 64, 1)
    self.branch5x5_1 = conv(in_channels, 48, 1)
    self.branch5x5_2 = conv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = conv(in_channels, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
    self.branch_pool = conv(in_channels, pool_features, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(avg_pool_3x3(x)),
    ], axis=-1)


class InceptionB(nnx.Module):
  """35 -> 17 reduction: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max-pool 3x3/2 (input channels kept)."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    conv = functools.partial(BasicConv2d, rngs=rngs)
    self.branch3x3 = conv(in_channels, 384, 3, stride=2)
    self.branch3x3dbl_1 = conv(in_channels, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        max_pool_3x3(x, stride=2),
    ], axis=-1)


class InceptionC(nnx.Module):
  """17x17 block with 7x7 convolutions factorized into 1x7 and 7x1; c7 channels inside."""

  def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
    conv = functools.partial(BasicConv2d, rngs=rngs)
    c7 = channels_7x7
    self.branch1x1 = conv(in_channels, 192, 1)
    self.branch7x7_1 = conv(in_channels, c7, 1)
    self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = conv(in_channels, c7, 1)
    self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = conv(in_channels, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    branch7x7dbl = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      branch7x7dbl = layer(branch7x7dbl)
    return jnp.concatenate([self.branch1x1(x), branch7x7, branch7x7dbl,
                            self.branch_pool(avg_pool_3x3(x))], axis=-1)


class InceptionD(nnx.Module):
  """17 -> 8 reduction: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max-pool 3x3/2."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    conv = functools.partial(BasicConv2d, rngs=rngs)
    self.branch3x3_1 = conv(in_channels, 192, 1)
    self.branch3x3_2 = conv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = conv(in_channels, 192, 1)
    self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch7x7x3 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                  self.branch7x7x3_4):
      branch7x7x3 = layer(branch7x7x3)
    return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), branch7x7x3,
                            max_pool_3x3(x, stride=2)], axis=-1)


class InceptionE(nnx.Module):
  """8x8 block with parallel 1x3 / 3x1 splits; `pool` is "avg" (Mixed_7b, real-pixel average)
  or "max" (Mixed_7c: the FID graph's max pool, module docstring)."""

  def __init__(self, in_channels: int, *, pool: str, rngs: nnx.Rngs):
    if pool not in ("avg", "max"):
      raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    self.pool = pool
    conv = functools.partial(BasicConv2d, rngs=rngs)
    self.branch1x1 = conv(in_channels, 320, 1)
    self.branch3x3_1 = conv(in_channels, 384, 1)
    self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = conv(in_channels, 448, 1)
    self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = conv(in_channels, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = self.branch3x3_1(x)
    branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = avg_pool_3x3(x) if self.pool == "avg" else max_pool_3x3(x, stride=1, padding=1)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3),
        self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl),
        self.branch_pool(pooled),
    ], axis=-1)


class FIDInceptionV3(nnx.Module):
  """Images [N, H, W, C] in [0, 1] (C = 1 or 3) -> pool3 features [N, 2048] (module
  docstring). Inference only: BatchNorm always uses the stored statistics."""

  def __init__(self, *, rngs: nnx.Rngs):
    conv = functools.partial(BasicConv2d, rngs=rngs)
    self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = conv(32, 32, 3)
    self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = conv(64, 80, 1)
    self.Conv2d_4a_3x3 = conv(80, 192, 3)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, pool="avg", rngs=rngs)
    self.Mixed_7c = InceptionE(2048, pool="max", rngs=rngs)

  def __call__(self, images: jax.Array, *, resize: bool = True) -> jax.Array:
    x = preprocess(images, resize=resize)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool_3x3(x, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = max_pool_3x3(x, stride=2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))
# pylint: enable=invalid-name


def preprocess(images: jax.Array, *, resize: bool = True) -> jax.Array:
  """uint8 (0..255) or float [0, 1] images [N, H, W, C], C = 1 or 3 -> float32 [N, 299, 299, 3]
  in [-1, 1] (or the input size when not `resize`): pytorch-fid's input pipeline."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"Inception takes images [N, H, W, C] with C = 1 or 3, got "
                     f"{images.shape}")
  x = (images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8
       else images.astype(jnp.float32))
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if resize:
    # antialias=False: torch's bilinear interpolate does not low-pass when shrinking.
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear",
                         antialias=False)
  return 2.0 * x - 1.0


# --------------------------------------------------------------------------------------------
# The weights file.
# --------------------------------------------------------------------------------------------
def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


@functools.lru_cache(maxsize=1)
def _abstract_split() -> tuple[Any, nnx.State]:
  """(graphdef, state of ShapeDtypeStructs) of the network, traced once (seconds)."""
  with nnx.use_eager_sharding(False):
    return nnx.split(nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0))))


@functools.lru_cache(maxsize=1)
def weight_shapes() -> dict[str, tuple[int, ...]]:
  """Every array name of the weights file and its shape (module docstring), without building
  the network."""
  state = nnx.to_pure_dict(_abstract_split()[1])
  return {name: tuple(value.shape) for name, value in sorted(_flatten(state).items())}


def model_arrays(model: FIDInceptionV3) -> dict[str, np.ndarray]:
  """The model's weights as the file's flat name -> float32 array dict."""
  return {name: np.asarray(value, np.float32)
          for name, value in _flatten(nnx.to_pure_dict(nnx.state(model))).items()}


def _mismatch(arrays: Mapping[str, Any]) -> str:
  """'' if `arrays` has exactly weight_shapes()' names and shapes, else what differs (with a
  few examples of each kind)."""
  expected = weight_shapes()
  missing = sorted(set(expected) - set(arrays))
  unexpected = sorted(set(arrays) - set(expected))
  wrong = [f"{name}: {tuple(np.shape(arrays[name]))}, expected {expected[name]}"
           for name in sorted(set(expected) & set(arrays))
           if tuple(np.shape(arrays[name])) != expected[name]]

  def some(items: list[str]) -> str:
    return ", ".join(items[:4]) + (", ..." if len(items) > 4 else "")

  problems = []
  if missing:
    problems.append(f"{len(missing)} missing ({some(missing)})")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected ({some(unexpected)})")
  if wrong:
    problems.append(f"{len(wrong)} with the wrong shape ({some(wrong)})")
  return "; ".join(problems)


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The arrays of a weights file, checked against the network: FileNotFoundError (with how to
  get the file) if it is missing; ValueError naming the differences if it holds other arrays."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(
        f"FID Inception weights not found: expected a .npz file at {path.absolute()} (set by "
        f"config.task.inception_weights or the weights argument; nothing is downloaded at run "
        f"time). {_convert_hint(path)}")

  def not_npz(why: str) -> ValueError:
    return ValueError(f"{path} is not a paperzoo FID Inception weights file (.npz of named "
                      f"arrays): {why}. A .pth state dict must be converted first. "
                      f"{_convert_hint(path.with_suffix('.npz'))}")

  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {name: npz[name] for name in npz.files}
  except (ValueError, OSError) as error:
    raise not_npz(str(error)) from error
  others = [name for name, value in arrays.items() if not isinstance(value, np.ndarray)]
  if others:  # e.g. the unconverted .pth: a zip too, of pickles and raw storages
    raise not_npz(f"it holds {', '.join(others[:3])}")
  problems = _mismatch(arrays)
  if problems:
    raise ValueError(f"{path} does not hold the FID Inception weights paperzoo expects: "
                     f"{problems}. Convert pytorch-fid's published state dict with python -m "
                     f"paperzoo.generation.inception --convert={FID_WEIGHTS_FILE} --out={path}")
  return {name: np.asarray(value, np.float32) for name, value in arrays.items()}


def model_from_arrays(arrays: Mapping[str, np.ndarray]) -> FIDInceptionV3:
  """The network with these weights (names and shapes as weight_shapes()), built without a
  random initialization."""
  problems = _mismatch(arrays)
  if problems:
    raise ValueError(f"the arrays do not match the FID Inception network: {problems}")
  graphdef, abstract = _abstract_split()
  state = jax.tree.map(lambda leaf: leaf, abstract)  # a copy: the cached one stays abstract
  nnx.replace_by_pure_dict(state, _unflatten({k: jnp.asarray(v, jnp.float32)
                                              for k, v in arrays.items()}))
  return nnx.merge(graphdef, state)


def random_network(seed: int = 0) -> FIDInceptionV3:
  """The network with He-normal random kernels and identity BatchNorm statistics, drawn with
  numpy: for tests and shape checks only (FID needs the real weights). Building it with
  `FIDInceptionV3(rngs=...)` gives the same kind of network but takes ~40 s on a CPU, one small
  compilation per kernel shape; this takes about one."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for name, shape in weight_shapes().items():
    leaf = name.rsplit("/", 1)[1]
    if leaf == "kernel":
      fan_in = int(np.prod(shape[:3]))
      arrays[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2 / fan_in))
    else:
      arrays[name] = np.full(shape, 1.0 if leaf in ("scale", "var") else 0.0, np.float32)
  return model_from_arrays(arrays)


def load_weights(path: str | os.PathLike) -> FIDInceptionV3:
  """The network with the weights of the .npz file at `path` (errors: `read_weights`)."""
  return model_from_arrays(read_weights(path))


def save_weights(model: FIDInceptionV3, path: str | os.PathLike) -> pathlib.Path:
  """Writes the model's weights to `path` (.npz, module docstring), atomically."""
  arrays = model_arrays(model)

  def write(tmp: pathlib.Path) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a tmp name
      np.savez(f, **arrays)

  return files.atomic_write(pathlib.Path(path).expanduser(), write)


# --------------------------------------------------------------------------------------------
# pytorch-fid's state dict -> our names.
# --------------------------------------------------------------------------------------------
_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def convert_torch_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """pytorch-fid's Inception state dict (name -> array-like, torch layout) -> the weights
  file's arrays: `<layer>.conv.weight` OIHW -> `<layer>/conv/kernel` HWIO, `<layer>.bn.weight /
  bias / running_mean / running_var` -> `<layer>/bn/scale / bias / mean / var`. `fc.*` and
  `num_batches_tracked` are dropped (FID does not use them); any other name, or a result that
  does not cover the network exactly, raises ValueError."""
  arrays, unknown = {}, []
  for name, value in state_dict.items():
    value = np.asarray(value)
    parts = name.split(".")
    if parts[0] == "fc" or parts[-1] == "num_batches_tracked":
      continue
    if len(parts) >= 3 and parts[-2:] == ["conv", "weight"] and value.ndim == 4:
      arrays["/".join(parts[:-1] + ["kernel"])] = value.transpose(2, 3, 1, 0)
    elif len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN_NAMES:
      arrays["/".join(parts[:-1] + [_BN_NAMES[parts[-1]]])] = value
    else:
      unknown.append(name)
  if unknown:
    more = ", ..." if len(unknown) > 4 else ""
    raise ValueError(f"not an Inception state dict of pytorch-fid: {len(unknown)} names that "
                     f"map to nothing ({', '.join(unknown[:4])}{more})")
  problems = _mismatch(arrays)
  if problems:
    raise ValueError(f"the state dict does not match the FID Inception network: {problems}")
  return {name: value.astype(np.float32) for name, value in arrays.items()}


def convert_checkpoint(pth_path: str | os.PathLike, out_path: str | os.PathLike
                       ) -> pathlib.Path:
  """Reads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (with torch, imported here only)
  and writes the .npz weights file; the result is checked by loading it back."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        "converting pytorch-fid's .pth needs torch (reading a torch pickle), which paperzoo does "
        "not depend on: pip install torch (the CPU build is enough), or convert on a machine "
        "that has it and copy the .npz") from error
  pth_path = pathlib.Path(pth_path).expanduser()
  if not pth_path.is_file():
    raise FileNotFoundError(f"no file at {pth_path.absolute()}. {_convert_hint(out_path)}")
  state_dict = torch.load(pth_path, map_location="cpu", weights_only=True)
  arrays = convert_torch_state_dict({name: tensor.detach().cpu().numpy()
                                     for name, tensor in state_dict.items()})
  model = model_from_arrays(arrays)
  path = save_weights(model, out_path)
  read_weights(path)
  return path


# --------------------------------------------------------------------------------------------
# Features and FID.
# --------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef", "resize"))
def _pool3(graphdef: Any, state: Any, images: jax.Array, resize: bool) -> jax.Array:
  # graphdef is static (hashable): every network of this structure shares one compilation per
  # input shape.
  return nnx.merge(graphdef, state)(images, resize=resize)


@functools.lru_cache(maxsize=1)
def _cached_network(path: str, mtime_ns: int, size: int) -> tuple[Any, Any]:
  del mtime_ns, size  # part of the cache key: a rewritten file is read again
  return nnx.split(load_weights(path))


# pool3 features of the last few (weights file, images) pairs: a task scores guided and unguided
# samples against the same real images, which need one Inception pass, not two.
_FEATURE_CACHE: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
_FEATURE_CACHE_SIZE = 2


def _check_images(images: Any) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim == 3:  # [N, H, W] grayscale
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
    raise ValueError(f"Inception takes images [N, H, W, C] (or [N, H, W]) with C = 1 or 3 and "
                     f"N >= 1, got {images.shape}")
  if images.dtype != np.uint8:
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"Inception takes uint8 images (0..255) or floats in [0, 1], got "
                       f"{images.dtype}")
    low, high = float(np.min(images)), float(np.max(images))
    if low < -1e-3 or high > 1 + 1e-3:
      raise ValueError(f"float images must lie in [0, 1] (FID's input range), got [{low:.3g}, "
                       f"{high:.3g}]; paperzoo's [-1, 1] samples: (x + 1) / 2, or uint8 via "
                       f"paperzoo.tasks.generation.to_uint8")
    images = images.astype(np.float32)
  return images


def pool3_features(images: Any, weights: str | os.PathLike | FIDInceptionV3, *,
                   batch_size: int = DEFAULT_BATCH_SIZE, resize: bool = True) -> np.ndarray:
  """float32 pool3 features [N, 2048] of uint8 (or [0, 1] float) images [N, H, W, C] (C = 1 or
  3), `batch_size` images per jitted call (the last batch padded, so one compilation).
  `weights` is the .npz path (loaded once and kept) or a network; `resize=False` skips the
  299 x 299 resize (not FID; for tests and feature inspection)."""
  images = _check_images(images)
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  batch = min(batch_size, len(images))
  cache_key = None
  if isinstance(weights, FIDInceptionV3):
    graphdef, state = nnx.split(weights)
  else:
    path = pathlib.Path(weights).expanduser()
    if not path.is_file():
      read_weights(path)  # raises the FileNotFoundError that explains where to get the file
    stat = path.stat()
    file_key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    graphdef, state = _cached_network(*file_key)
    cache_key = (file_key, images.shape, images.dtype.str, resize, batch,
                 hashlib.sha1(np.ascontiguousarray(images).data).hexdigest())
    if cache_key in _FEATURE_CACHE:
      _FEATURE_CACHE.move_to_end(cache_key)
      return _FEATURE_CACHE[cache_key].copy()
  features = batches.map_batches(
      lambda indices: _pool3(graphdef, state, jnp.asarray(images[indices]), resize),
      len(images), batch).astype(np.float32)
  if cache_key is not None:
    _FEATURE_CACHE[cache_key] = features.copy()
    while len(_FEATURE_CACHE) > _FEATURE_CACHE_SIZE:
      _FEATURE_CACHE.popitem(last=False)
  return features


def frechet_inception_distance(real_images: Any, fake_images: Any,
                               weights_path: str | os.PathLike | FIDInceptionV3, *,
                               batch_size: int = DEFAULT_BATCH_SIZE) -> float:
  """FID between two image sets (uint8, or floats in [0, 1]; [N, H, W, C], C = 1 or 3; N >= 2
  each, any sizes, each resized to 299 x 299): the Frechet distance
  (`paperzoo.generation.metrics.frechet_distance`) of their pool3 features under the weights
  at `weights_path` (or a network)."""
  from paperzoo.generation.metrics import frechet_distance  # pylint: disable=g-import-not-at-top
  return frechet_distance(pool3_features(real_images, weights_path, batch_size=batch_size),
                          pool3_features(fake_images, weights_path, batch_size=batch_size))


# --------------------------------------------------------------------------------------------
# Command line: the converter.
# --------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m paperzoo.generation.inception",
      description="Convert pytorch-fid's Inception state dict to paperzoo's FID weights file "
                  f"(.npz). Get the .pth from {FID_WEIGHTS_URL}.")
  parser.add_argument("--convert", required=True, metavar="PTH",
                      help=f"pytorch-fid's state dict ({FID_WEIGHTS_FILE})")
  parser.add_argument("--out", default="inception_fid.npz", metavar="NPZ",
                      help="where to write the weights (default: %(default)s)")
  args = parser.parse_args(argv)
  path = convert_checkpoint(args.convert, args.out)
  print(f"wrote {path} ({len(weight_shapes())} arrays); use it with "
        f"--config.task.inception_weights={path.absolute()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
