"""Tests for paperzoo.data.images (CIFAR-10 JPEG zip, MNIST IDX) and paperzoo.data.augment.

The real CIFAR-10 tests share one module-scoped load: on a cold cache it decodes the 60,000
JPEGs once (about 25 s on two busy cores), every later load reads the cached .npz (< 1 s).
"""

from __future__ import annotations

import fractions
import gzip
import io
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from paperzoo.data import augment
from paperzoo.data import images
from paperzoo.data.files import DataFileError


@pytest.fixture(scope="module")
def cifar():
  return images.load_cifar10()


def _jpeg(color, size=(32, 32)) -> bytes:
  stream = io.BytesIO()
  Image.new("RGB", size, tuple(color)).save(stream, format="JPEG", quality=95)
  return stream.getvalue()


def _write_zip(path, members: dict[str, bytes]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    for name, data in members.items():
      archive.writestr(name, data)


# A small zip in the real layout, listed out of order and with directory entries, as the real
# one is: (split, class, file name) -> flat colour.
_FAKE = {
    ("train", "truck", "0001.jpg"): (200, 30, 30),
    ("train", "airplane", "0001.jpg"): (30, 200, 30),
    ("train", "truck", "0000.jpg"): (30, 30, 200),
    ("train", "airplane", "0000.jpg"): (120, 120, 120),
    ("test", "cat", "0000.jpg"): (250, 250, 10),
}


def _fake_zip(path, extra: dict[str, bytes] | None = None):
  members = {"train/": b"", "train/truck/": b"", "test/": b""}
  members.update({f"{s}/{c}/{n}": _jpeg(color) for (s, c, n), color in _FAKE.items()})
  members.update(extra or {})
  _write_zip(path, members)
  return path


# --------------------------------------------------------------------------------------------
# CIFAR-10 on the real data.
# --------------------------------------------------------------------------------------------
def test_cifar10_shapes_counts_and_order(cifar):
  assert images.CIFAR10_CLASSES == ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                    "frog", "horse", "ship", "truck")
  assert set(cifar) == {"train", "test"}
  for split, per_class in (("train", 5000), ("test", 1000)):
    x, y = cifar[split]
    assert x.shape == (10 * per_class, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (10 * per_class,) and y.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(y, minlength=10), [per_class] * 10)
    # Ordered by class, then file name: labels are sorted blocks.
    np.testing.assert_array_equal(y, np.repeat(np.arange(10), per_class))
    assert 0 < x.mean() < 255 and x.std() > 10  # real pictures, not blank arrays


def test_cifar10_cache_hit_is_fast_and_identical(cifar, monkeypatch):
  def no_decoding(path):
    raise AssertionError(f"the cache should have been read, not {path} decoded")

  monkeypatch.setattr(images, "decode_cifar10_zip", no_decoding)
  start = time.perf_counter()
  again = images.load_cifar10()
  elapsed = time.perf_counter() - start
  assert elapsed < 15.0, f"cached load took {elapsed:.1f} s"  # ~0.5 s; generous for busy CI
  for split in ("train", "test"):
    np.testing.assert_array_equal(again[split][0], cifar[split][0])
    np.testing.assert_array_equal(again[split][1], cifar[split][1])


def test_cifar10_grayscale_is_lra_conversion(cifar):
  gray = images.load_cifar10(grayscale=True)
  x, y = cifar["test"]
  gx, gy = gray["test"]
  assert gx.shape == (10000, 32, 32) and gx.dtype == np.uint8
  np.testing.assert_array_equal(gy, y)
  # float64 reference of tf.image.rgb_to_grayscale: floor(dot(w, rgb / 255) * 255.5). Its error
  # (~1e-13) is far below the distance of any exact value but 0 from an integer (>= 1 / 5.1e6),
  # so it must agree with the exact conversion on every pixel, near-integer ones included.
  value = (x.astype(np.float64) / 255.0) @ np.asarray(images.LRA_GRAYSCALE_WEIGHTS) * 255.5
  assert np.count_nonzero(np.abs(value - np.round(value)) < 1e-5) > 1000  # float32's hard cases
  np.testing.assert_array_equal(gx, np.floor(value))
  np.testing.assert_array_equal(gray["train"][0][:100],
                                images.to_grayscale(cifar["train"][0][:100]))


def _lra_gray(r: int, g: int, b: int) -> int:
  """floor((0.2989 R + 0.587 G + 0.114 B) / 255 * 255.5) in exact rationals."""
  value = (fractions.Fraction("0.2989") * r + fractions.Fraction("0.587") * g
           + fractions.Fraction("0.114") * b) / 255 * fractions.Fraction("255.5")
  return value.numerator // value.denominator


def test_to_grayscale_by_hand():
  pixels = np.asarray([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                       [100, 150, 200]], np.uint8)
  # 0.2989 * 255.5 = 76.37 -> 76; 0.587 * 255.5 = 149.98 -> 149 (truncated, as TensorFlow's
  # convert_image_dtype does; rounding would give 150); 0.114 * 255.5 = 29.13 -> 29;
  # (0.2989 * 100 + 0.587 * 150 + 0.114 * 200) / 255 * 255.5 = 141.02 -> 141.
  np.testing.assert_array_equal(images.to_grayscale(pixels), [0, 255, 76, 149, 29, 141])
  # Pixels whose exact value lies within float32 rounding of an integer (a float32 evaluation,
  # as TensorFlow's, can truncate them to the integer above or below); the exact value decides:
  #   (254, 237, 66): 2989*254 + 5870*237 + 1140*66 = 2225636; * 511 / 5100000 = 223 - 4/5100000
  #   (224, 228, 191): the same sum 2225636, so also 223 - 4/5100000 -> 222
  #   (169, 15, 110): 718591 * 511 / 5100000 = 72 + 1/5100000 -> 72
  #   (115, 128, 160): 127.99998922 -> 127;  (221, 229, 255): 229.99999784 -> 229
  #   (118, 127, 96): 1207632 * 511 / 5100000 = 121 - 1/106250 -> 120 (CIFAR-10 test image 3,
  #   pixel (10, 28): float32 gave 121 in a batch of five, 120 among all 10,000)
  near = [((254, 237, 66), 222), ((224, 228, 191), 222), ((169, 15, 110), 72),
          ((115, 128, 160), 127), ((221, 229, 255), 229), ((118, 127, 96), 120)]
  for rgb, expected in near:
    assert _lra_gray(*rgb) == expected, rgb
    assert images.to_grayscale(np.asarray(rgb, np.uint8)) == expected, rgb
  for rgb, expected in zip(pixels.tolist(), [0, 255, 76, 149, 29, 141]):
    assert _lra_gray(*rgb) == expected, rgb
  assert images.to_grayscale(np.zeros((2, 4, 5, 3), np.uint8)).shape == (2, 4, 5)
  with pytest.raises(ValueError, match="uint8"):
    images.to_grayscale(np.zeros((4, 3), np.float32))


def test_to_grayscale_every_colour_matches_float64(monkeypatch):
  # All 2**24 RGB colours, against an independent float64 evaluation of the formula (exact here,
  # see test_cifar10_grayscale_is_lra_conversion), with the default chunks and with small chunks
  # that cut through rows: chunking must not change a pixel.
  rgb = np.stack(np.meshgrid(*[np.arange(256, dtype=np.uint8)] * 3, indexing="ij"), -1)
  rgb = rgb.reshape(4096, 4096, 3)
  value = (rgb.astype(np.float64) / 255.0) @ np.asarray(images.LRA_GRAYSCALE_WEIGHTS) * 255.5
  expected = np.floor(value).astype(np.uint8)
  np.testing.assert_array_equal(images.to_grayscale(rgb), expected)
  monkeypatch.setattr(images, "_GRAYSCALE_CHUNK", 999_983)
  np.testing.assert_array_equal(images.to_grayscale(rgb), expected)


def test_to_grayscale_is_batch_independent(cifar, monkeypatch):
  x = cifar["test"][0]
  value = (x[:5].astype(np.float64) / 255.0) @ np.asarray(images.LRA_GRAYSCALE_WEIGHTS) * 255.5
  assert np.count_nonzero(np.abs(value - np.round(value)) < 1e-5) >= 1  # a float32 hard case
  full = images.to_grayscale(x)  # the batch load_cifar10(grayscale=True) converts
  np.testing.assert_array_equal(images.load_cifar10(grayscale=True)["test"][0], full)
  alone = np.stack([images.to_grayscale(image) for image in x[:5]])
  np.testing.assert_array_equal(alone, full[:5])
  np.testing.assert_array_equal(images.to_grayscale(x[:5]), full[:5])
  np.testing.assert_array_equal(images.to_grayscale(x[:7]), full[:7])
  order = np.random.default_rng(0).permutation(len(x))[:777]
  order = np.concatenate([order, [4, 0, 3, 2, 1]])
  np.testing.assert_array_equal(images.to_grayscale(x[order]), full[order])
  # Pixels alone, in another layout, and with chunks that split images.
  np.testing.assert_array_equal(images.to_grayscale(x[:5].reshape(-1, 1, 3)).reshape(5, 32, 32),
                                full[:5])
  monkeypatch.setattr(images, "_GRAYSCALE_CHUNK", 1000)
  np.testing.assert_array_equal(images.to_grayscale(x[:300]), full[:300])


def test_downsample_by_hand():
  image = np.asarray([[[0, 1, 10, 10],
                       [2, 2, 10, 11],
                       [255, 255, 0, 0],
                       [255, 254, 0, 1]]], np.uint8)
  # Block means 1.25, 10.25, 254.75, 0.25 round half up to 1, 10, 255, 0; 0.5 rounds up.
  np.testing.assert_array_equal(images.downsample(image, 2), [[[1, 10], [255, 0]]])
  np.testing.assert_array_equal(images.downsample(np.asarray([[[0, 1]]], np.uint8), 1),
                                [[[0, 1]]])
  half = np.asarray([[[0, 1], [0, 1]]], np.uint8)
  np.testing.assert_array_equal(images.downsample(half, 2), [[[1]]])
  with pytest.raises(ValueError, match="divisor"):
    images.downsample(np.zeros((1, 6, 6), np.uint8), 4)
  with pytest.raises(ValueError, match="uint8"):
    images.downsample(np.zeros((1, 4, 4), np.float32), 2)


def test_lra_image_resolution(cifar):
  from paperzoo.data import classification  # pylint: disable=g-import-not-at-top
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  small = classification.load_lra_image(common.classification_data("lra_image", resolution=16))
  assert small.test.arrays["inputs"].shape == (10_000, 256)
  gray = images.to_grayscale(cifar["test"][0][:5])
  np.testing.assert_array_equal(small.test.arrays["inputs"][:5],
                                images.downsample(gray, 2).reshape(5, -1))
  assert len(small.train) + len(small.val) == 50_000
  with pytest.raises(ValueError, match="must divide CIFAR-10's 32 pixels"):
    classification.load_lra_image(common.classification_data("lra_image", resolution=12))


# --------------------------------------------------------------------------------------------
# CIFAR-10 decoding and caching on a small zip.
# --------------------------------------------------------------------------------------------
def test_decode_zip_order_labels_and_pixels(tmp_path):
  splits = images.decode_cifar10_zip(_fake_zip(tmp_path / "fake.zip"))
  assert set(splits) == {"train", "test"}
  x, y = splits["train"]
  assert x.shape == (4, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int32
  # airplane (0) before truck (9), file names ascending within a class.
  np.testing.assert_array_equal(y, [0, 0, 9, 9])
  order = [("airplane", "0000.jpg"), ("airplane", "0001.jpg"), ("truck", "0000.jpg"),
           ("truck", "0001.jpg")]
  for image, (label, name) in zip(x, order):
    # JPEG is lossy; a flat colour at quality 95 comes back within a few levels.
    assert np.abs(image.astype(int) - _FAKE[("train", label, name)]).max() <= 3
  np.testing.assert_array_equal(splits["test"][1], [images.CIFAR10_CLASSES.index("cat")])


def test_decode_zip_rejects_unexpected_entries(tmp_path):
  bad = _fake_zip(tmp_path / "bad.zip", {"train/plane/0000.jpg": _jpeg((0, 0, 0))})
  with pytest.raises(images.DataFormatError, match="train/plane/0000.jpg") as error:
    images.decode_cifar10_zip(bad)
  assert str(bad) in str(error.value)
  stray = _fake_zip(tmp_path / "stray.zip", {"README.txt": b"hello"})
  with pytest.raises(images.DataFormatError, match="README.txt"):
    images.decode_cifar10_zip(stray)
  small = _fake_zip(tmp_path / "small.zip", {"test/dog/0000.jpg": _jpeg((1, 2, 3), (16, 16))})
  with pytest.raises(images.DataFormatError, match=r"test/dog/0000.jpg.*\(16, 16, 3\)"):
    images.decode_cifar10_zip(small)
  broken = _fake_zip(tmp_path / "broken.zip", {"test/dog/0001.jpg": b"not a jpeg"})
  with pytest.raises(images.DataFormatError, match="test/dog/0001.jpg.*JPEG"):
    images.decode_cifar10_zip(broken)


def test_cold_cache_then_hit(tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  monkeypatch.setenv("PAPERZOO_CACHE_DIR", str(cache))
  path = _fake_zip(tmp_path / "fake.zip")
  first = images.load_cifar10_zip(path)
  entries = sorted((cache / "images").iterdir())
  assert len(entries) == 1 and entries[0].suffix == ".npz"  # no temporary file left behind

  decoded = images.decode_cifar10_zip

  def no_decoding(path):
    raise AssertionError("cache miss")

  monkeypatch.setattr(images, "decode_cifar10_zip", no_decoding)
  second = images.load_cifar10_zip(path)
  assert set(second) == set(first)
  for split in first:
    np.testing.assert_array_equal(second[split][0], first[split][0])
    np.testing.assert_array_equal(second[split][1], first[split][1])
    assert second[split][1].dtype == np.int32

  # A different zip (another sha256) gets its own entry; it is never served the old one.
  monkeypatch.setattr(images, "decode_cifar10_zip", decoded)
  other = _fake_zip(tmp_path / "other.zip", {"test/dog/0000.jpg": _jpeg((9, 9, 9))})
  assert len(images.load_cifar10_zip(other)["test"][1]) == 2
  assert len(list((cache / "images").iterdir())) == 2

  # An unreadable cache entry is rebuilt rather than trusted.
  for garbage in (b"garbage", b""):
    entries[0].write_bytes(garbage)
    rebuilt = images.load_cifar10_zip(path)
    assert list(rebuilt) == list(first)
    np.testing.assert_array_equal(rebuilt["train"][0], first["train"][0])


def test_load_cifar10_checks_the_data_file(tmp_path, monkeypatch):
  monkeypatch.setenv("PAPERZOO_CACHE_DIR", str(tmp_path / "cache"))
  with pytest.raises(DataFileError, match="expected it at"):
    images.load_cifar10(root=tmp_path)
  # A zip at the right place that is not the project's file fails its checksum.
  _fake_zip(tmp_path / images.CIFAR10_RELPATH)
  with pytest.raises(DataFileError, match="sha256"):
    images.load_cifar10(root=tmp_path)


# --------------------------------------------------------------------------------------------
# MNIST.
# --------------------------------------------------------------------------------------------
def test_mnist_split():
  mnist = images.load_mnist()
  assert set(mnist) == {"train", "test"}
  (train_x, train_y), (test_x, test_y) = mnist["train"], mnist["test"]
  assert train_x.shape == (8000, 28, 28) and test_x.shape == (2000, 28, 28)
  assert train_x.dtype == test_x.dtype == np.uint8
  assert train_y.dtype == test_y.dtype == np.int32
  train_counts = np.bincount(train_y, minlength=10)
  test_counts = np.bincount(test_y, minlength=10)
  assert len(train_counts) == len(test_counts) == 10
  assert train_counts.sum() == 8000 and test_counts.sum() == 2000
  assert train_counts.min() > 600 and test_counts.min() > 100  # every digit well represented
  # The documented rule: every fifth of MNIST's test images (indices 4, 9, ...) is test.
  from paperzoo.data.files import data_file  # pylint: disable=g-import-not-at-top
  raw_x = images.read_idx(data_file(images.MNIST_IMAGES_RELPATH))
  raw_y = images.read_idx(data_file(images.MNIST_LABELS_RELPATH))
  assert raw_x.shape == (10000, 28, 28)
  np.testing.assert_array_equal(test_x, raw_x[4::5])
  np.testing.assert_array_equal(test_y, raw_y[4::5])
  np.testing.assert_array_equal(train_x[:4], raw_x[:4])
  assert train_x.max() == 255 and train_x.min() == 0


def _idx_bytes(array: np.ndarray) -> bytes:
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  return header + array.astype(np.uint8).tobytes()


def test_read_idx_roundtrip_and_corruption(tmp_path):
  array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  good = tmp_path / "good-idx3-ubyte.gz"
  good.write_bytes(gzip.compress(_idx_bytes(array)))
  np.testing.assert_array_equal(images.read_idx(good), array)
  plain = tmp_path / "plain-idx3-ubyte"
  plain.write_bytes(_idx_bytes(array))
  np.testing.assert_array_equal(images.read_idx(plain), array)

  bad_magic = tmp_path / "bad-idx3-ubyte.gz"
  bad_magic.write_bytes(gzip.compress(b"\x12\x34" + _idx_bytes(array)[2:]))
  with pytest.raises(images.DataFormatError, match="magic") as error:
    images.read_idx(bad_magic)
  assert str(bad_magic) in str(error.value)

  truncated = tmp_path / "short-idx3-ubyte.gz"
  truncated.write_bytes(gzip.compress(_idx_bytes(array)[:-5]))
  with pytest.raises(images.DataFormatError, match="truncated") as error:
    images.read_idx(truncated)
  assert str(truncated) in str(error.value)

  not_gzip = tmp_path / "raw-idx3-ubyte.gz"
  not_gzip.write_bytes(_idx_bytes(array))
  with pytest.raises(images.DataFormatError, match="corrupt") as error:
    images.read_idx(not_gzip)
  assert str(not_gzip) in str(error.value)


def test_load_mnist_missing_file(tmp_path):
  with pytest.raises(DataFileError, match="expected it at"):
    images.load_mnist(root=tmp_path)


# --------------------------------------------------------------------------------------------
# Augmentation.
# --------------------------------------------------------------------------------------------
def _batch(seed=0, shape=(16, 8, 10, 3)):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_random_crop_is_a_window_of_the_padded_image():
  x = _batch()
  padding = 3
  out = np.asarray(augment.random_crop(x, jax.random.key(0), padding=padding))
  assert out.shape == x.shape and out.dtype == np.float32
  padded = np.pad(np.asarray(x), ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)))
  offsets = []
  for i in range(len(x)):
    matches = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
               if np.array_equal(out[i], padded[i, dy:dy + 8, dx:dx + 10])]
    assert len(matches) == 1, f"example {i}: {matches}"
    offsets.append(matches[0])
  assert len(set(offsets)) > 1  # per-example offsets, not one for the batch
  np.testing.assert_array_equal(augment.random_crop(x, jax.random.key(0), padding=0), x)


def test_random_flip_per_example():
  x = _batch()
  out = np.asarray(augment.random_flip(x, jax.random.key(1)))
  flipped = []
  for i in range(len(x)):
    same = np.array_equal(out[i], np.asarray(x[i]))
    mirrored = np.array_equal(out[i], np.asarray(x[i, :, ::-1]))
    assert same != mirrored
    flipped.append(mirrored)
  assert 0 < sum(flipped) < len(x)
  rate = np.mean(augment.random_flip(jnp.arange(8000.0).reshape(4000, 1, 2, 1),
                                     jax.random.key(2))[:, 0, 0, 0] % 2 == 1)
  assert abs(rate - 0.5) < 0.05


def test_crop_and_flip_keys_determinism_and_jit():
  x = _batch()
  key = jax.random.key(3)
  crop = jax.jit(augment.random_crop, static_argnames="padding")
  a = crop(x, key, padding=4)
  np.testing.assert_array_equal(crop(x, key, padding=4), a)
  assert not np.array_equal(a, crop(x, jax.random.key(4), padding=4))
  np.testing.assert_array_equal(augment.random_crop(x, key, padding=4), a)  # eager == jitted
  np.testing.assert_array_equal(jax.jit(augment.random_flip)(x, key),
                                augment.random_flip(x, key))
  uint8 = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3)), jnp.uint8)
  assert crop(uint8, key, padding=2).dtype == jnp.uint8
  assert augment.random_flip(uint8, key).dtype == jnp.uint8
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    augment.random_crop(x[0], key)


def test_mixup():
  x = _batch(shape=(8, 4, 4, 3))
  y = jax.nn.one_hot(jnp.arange(8) % 4, 4)
  key = jax.random.key(5)
  # Under jit only: jax.random.beta's sampler is slow to run op by op.
  mixup = jax.jit(augment.mixup, static_argnames="alpha")
  mx, my = mixup(x, y, key, alpha=0.4)
  assert mx.shape == x.shape and my.shape == y.shape
  np.testing.assert_allclose(my.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(mixup(x, y, key, alpha=0.4)[0], mx)
  # Partners come from the documented permutation; the one lam that explains the images (least
  # squares) must lie in [0, 1] and explain the targets too.
  perm = jax.random.permutation(jax.random.split(key)[1], 8)
  x, mx, y, my, perm = map(np.asarray, (x, mx, y, my, perm))
  diff = x - x[perm]
  lam = np.sum((mx - x[perm]) * diff) / np.sum(diff * diff)
  assert 0.0 <= lam <= 1.0
  np.testing.assert_allclose(mx, lam * x + (1 - lam) * x[perm], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(my, lam * y + (1 - lam) * y[perm], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="alpha"):
    augment.mixup(x, y, key, alpha=0.0)
