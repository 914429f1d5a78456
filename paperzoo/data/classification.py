"""Classification data sets: one in-memory layout for token sequences, images and time series.

Every loader here is registered in `DATASETS` under its `config.data.name` and called as
`loader(config.data) -> ClassificationData`. The task (`paperzoo.tasks.classification`) reads
three splits, each an `ArraySplit` whose arrays share their first (example) axis:

  inputs        int32 [N, L] token ids (LRA ListOps, LRA Image and Pathfinder as pixel tokens),
                uint8 [N, H, W, C] images (CIFAR-10, MNIST), or
                float32 [N, T, C] series (UEA), normalized with training statistics
  padding_mask  bool [N, L] or [N, T], True on real positions (variable-length data only)
  label         int32 [N]

Selection never sees the test split: every data set has a validation split carved from its
training data (seeded, stratified by class) or generated apart. The one exception is UEA's
`legacy_test_selection`, Time-Series-Library's protocol, kept only to compare with its numbers
and labelled as such wherever it is reported.

Config keys (`config.data`), by data set:
  all           name; root ("" = $PAPERZOO_DATA_DIR or ../shared/data); val_seed (0): the seed of
                the validation split, fixed apart from `config.seed` so that every training seed
                is scored on the same examples
  listops       num_train/num_val/num_test (LRA: 96,000/2,000/2,000), min_len/max_len (LRA: 500
                and 2,000 tokens), seq_len (padded length, >= max_len), generator_seed (0)
  pathfinder    num_train/num_val/num_test (LRA: 160,000/20,000/20,000), resolution (32),
                contour_length (14, LRA's "hard"), generator_seed (0)
  lra_image     val_fraction (0.1: 5,000 of CIFAR-10's 50,000 training images); grayscale
                pixels as tokens (LRA's Image task: a sequence of 1,024 intensities, vocab 256);
                resolution (32; a divisor of 32 averages blocks of pixels, 16 -> 256 tokens)
  cifar10       val_fraction (0.1: 5,000)
  mnist         val_fraction (0.1: 799 of the 8,000 training images, 10% of each class rounded;
                the project's MNIST is the 10,000 test images split 8,000 train / 2,000
                test, see paperzoo.data.images)
  uea           subset (e.g. "BasicMotions"), val_fraction (0.2), legacy_test_selection (False)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from paperzoo.registry import DATASETS


@dataclasses.dataclass
class ArraySplit:
  """One split held in memory: `arrays` maps names to arrays with the example axis first."""

  arrays: dict[str, np.ndarray]

  def __post_init__(self):
    sizes = {name: len(array) for name, array in self.arrays.items()}
    if len(set(sizes.values())) != 1 or "label" not in sizes:
      raise ValueError(f"a split needs a 'label' array and equal leading sizes, got {sizes}")

  def __len__(self) -> int:
    return len(self.arrays["label"])

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {name: array[indices] for name, array in self.arrays.items()}


@dataclasses.dataclass
class ClassificationData:
  """Three splits and what a model needs to know about their inputs."""

  name: str
  kind: str  # the kind it is registered with: "tokens", "image" or "series" (DATA_KINDS)
  train: ArraySplit
  val: ArraySplit
  test: ArraySplit
  class_names: tuple[str, ...]
  vocab_size: int = 0  # > 0 for token inputs
  # Per-channel mean and standard deviation of the training images in [0, 1] (images only).
  image_mean: tuple[float, ...] = ()
  image_std: tuple[float, ...] = ()
  # How model selection was done, for reports: "validation" or "test (legacy)".
  selection: str = "validation"

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def input_shape(self) -> tuple[int, ...]:
    """One example's `inputs` shape: (L,), (H, W, C) or (T, C)."""
    return tuple(self.train.arrays["inputs"].shape[1:])


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(train rows, val rows), both sorted: per class, round(val_fraction * count) rows to val.

  Rounding is half up. A class with two or more examples gives at least one to validation (so
  every such class is scored) and keeps at least one for training; a class with a single
  example stays in training. Deterministic in `seed`.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  val = []
  for c in np.unique(labels):
    rows = np.flatnonzero(labels == c)
    if len(rows) < 2:
      continue
    quota = int(math.floor(val_fraction * len(rows) + 0.5))
    quota = min(max(quota, 1), len(rows) - 1)
    val.append(rng.permutation(rows)[:quota])
  val = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
  if not len(val):
    raise ValueError(f"no class has two examples: cannot carve a validation split from "
                     f"{len(labels)} training examples")
  train = np.setdiff1d(np.arange(len(labels)), val)
  return train, val


def _split_off_val(inputs: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int
                   ) -> tuple[ArraySplit, ArraySplit]:
  train, val = stratified_split(labels, val_fraction, seed)
  return (ArraySplit({"inputs": inputs[train], "label": labels[train]}),
          ArraySplit({"inputs": inputs[val], "label": labels[val]}))


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and population std of uint8 images scaled to [0, 1], exact from each
  channel's 256-bin histogram (a float64 copy of CIFAR-10 would take over a gigabyte)."""
  values = np.arange(256) / 255.0
  means, stds = [], []
  for c in range(images.shape[-1]):
    counts = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
    mean = counts @ values / counts.sum()
    means.append(float(mean))
    stds.append(float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum())))
  return tuple(means), tuple(stds)


# --------------------------------------------------------------------------------------------
# Long Range Arena.
# --------------------------------------------------------------------------------------------
@DATASETS.register("listops", kind="tokens")
def load_listops(data: Any) -> ClassificationData:
  from paperzoo.data.lra import listops  # pylint: disable=g-import-not-at-top
  if data.seq_len < data.max_len:
    raise ValueError(f"data.seq_len={data.seq_len} must be >= data.max_len={data.max_len}: "
                     "every expression must fit the padded sequence")
  splits = listops.load(data.num_train, data.num_val, data.num_test, min_len=data.min_len,
                        max_len=data.max_len, seed=data.generator_seed)

  def to_split(expressions, labels) -> ArraySplit:
    tokens = listops.tokenize(expressions, data.seq_len)
    return ArraySplit({"inputs": tokens, "padding_mask": tokens != 0,
                       "label": np.asarray(labels, np.int32)})

  return ClassificationData(
      name="listops", kind="tokens", train=to_split(*splits["train"]),
      val=to_split(*splits["val"]), test=to_split(*splits["test"]),
      class_names=tuple(str(d) for d in range(10)), vocab_size=len(listops.VOCAB))


@DATASETS.register("pathfinder", kind="tokens")
def load_pathfinder(data: Any) -> ClassificationData:
  from paperzoo.data.lra import pathfinder  # pylint: disable=g-import-not-at-top
  splits = pathfinder.load(data.num_train, data.num_val, data.num_test,
                           resolution=data.resolution, contour_length=data.contour_length,
                           seed=data.generator_seed)

  def to_split(images, labels) -> ArraySplit:
    return ArraySplit({"inputs": images.reshape(len(images), -1).astype(np.int32),
                       "label": np.asarray(labels, np.int32)})

  return ClassificationData(
      name="pathfinder", kind="tokens", train=to_split(*splits["train"]),
      val=to_split(*splits["val"]), test=to_split(*splits["test"]),
      class_names=("disconnected", "connected"), vocab_size=256)


@DATASETS.register("lra_image", kind="tokens")
def load_lra_image(data: Any) -> ClassificationData:
  from paperzoo.data import images  # pylint: disable=g-import-not-at-top
  if data.resolution < 1 or 32 % data.resolution:
    raise ValueError(f"data.resolution={data.resolution} must divide CIFAR-10's 32 pixels")
  cifar = images.load_cifar10(root=data.root or None, grayscale=True)
  train_images, train_labels = cifar["train"]
  test_images, test_labels = cifar["test"]

  def tokens(x: np.ndarray) -> np.ndarray:
    return images.downsample(x, 32 // data.resolution).reshape(len(x), -1).astype(np.int32)

  train, val = _split_off_val(tokens(train_images), train_labels, data.val_fraction, data.val_seed)
  return ClassificationData(
      name="lra_image", kind="tokens", train=train, val=val,
      test=ArraySplit({"inputs": tokens(test_images), "label": test_labels}),
      class_names=tuple(images.CIFAR10_CLASSES), vocab_size=256)


# --------------------------------------------------------------------------------------------
# Images.
# --------------------------------------------------------------------------------------------
def _image_data(name: str, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                class_names: tuple[str, ...], data: Any) -> ClassificationData:
  def with_channels(x: np.ndarray) -> np.ndarray:
    return x[..., None] if x.ndim == 3 else x

  train_images, train_labels = splits["train"]
  test_images, test_labels = splits["test"]
  train, val = _split_off_val(with_channels(train_images), train_labels, data.val_fraction,
                              data.val_seed)
  mean, std = _channel_stats(train.arrays["inputs"])
  return ClassificationData(
      name=name, kind="image", train=train, val=val,
      test=ArraySplit({"inputs": with_channels(test_images), "label": test_labels}),
      class_names=class_names, image_mean=mean, image_std=std)


@DATASETS.register("cifar10", kind="image")
def load_cifar10(data: Any) -> ClassificationData:
  from paperzoo.data import images  # pylint: disable=g-import-not-at-top
  return _image_data("cifar10", images.load_cifar10(root=data.root or None),
                     tuple(images.CIFAR10_CLASSES), data)


@DATASETS.register("mnist", kind="image")
def load_mnist(data: Any) -> ClassificationData:
  from paperzoo.data import images  # pylint: disable=g-import-not-at-top
  return _image_data("mnist", images.load_mnist(root=data.root or None),
                     tuple(str(d) for d in range(10)), data)


# --------------------------------------------------------------------------------------------
# UEA multivariate time series.
# --------------------------------------------------------------------------------------------
@DATASETS.register("uea", kind="series")
def load_uea(data: Any) -> ClassificationData:
  from paperzoo.data import uea  # pylint: disable=g-import-not-at-top
  loaded = uea.load_uea(data.subset, root=data.root or None, val_fraction=data.val_fraction,
                        seed=data.val_seed, legacy_test_selection=data.legacy_test_selection)

  def to_split(split) -> ArraySplit:
    return ArraySplit({"inputs": split.inputs, "padding_mask": split.padding_mask,
                       "label": split.labels})

  return ClassificationData(
      name=f"uea/{data.subset}", kind="series", train=to_split(loaded.train),
      val=to_split(loaded.val), test=to_split(loaded.test),
      class_names=tuple(loaded.class_names),
      selection="test (legacy)" if data.legacy_test_selection else "validation")

