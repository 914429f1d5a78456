"""Image data sets from the project's data files: CIFAR-10 from a JPEG zip, MNIST from IDX.

    from paperzoo.data import images

    cifar = images.load_cifar10()        # {"train": (uint8 [50000, 32, 32, 3], int32 [50000]),
                                         #  "test":  (uint8 [10000, 32, 32, 3], int32 [10000])}
    gray = images.load_cifar10(grayscale=True)   # uint8 [N, 32, 32], LRA's "Image" pixels
    mnist = images.load_mnist()          # {"train": (uint8 [8000, 28, 28], ...), "test": 2000}

CIFAR-10 (`cifar10/cifar10_jpg.zip`) is a stored zip of `<split>/<class>/NNNN.jpg` files (JPEG
quality ~75, so pixels differ slightly from the original lossless CIFAR-10). Decoding its 60,000
JPEGs with Pillow takes tens of seconds, so the decoded arrays are cached once as an `.npz` under
`cache_dir("images")`, named by the zip's sha256: a changed zip never reads a stale cache, and a
second load takes about a second. Examples are ordered by split, then class (in
`CIFAR10_CLASSES` order), then file name, so indices mean the same thing on every machine.

Images are decoded with Pillow rather than through tensorflow-datasets: `tfds.ImageFolder` lists
folders and decodes images with TensorFlow (`tf.io.gfile`, `tf.image.decode_image`), which is not
a dependency of this project.

MNIST: the project ships only the 10,000 MNIST *test* images (`mnist/t10k-*-idx?-ubyte.gz`) and
splits them by index: every fifth image (indices 4, 9, 14, ...) is "test" (2,000), the rest
"train" (8,000). MNIST's test file holds 5,000 cleaner digits (NIST SD-3) followed by 5,000 harder
ones (SD-1); interleaving puts both halves in both splits in equal proportion, where "the last
2,000" would test on the harder writers only.
"""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import re
import zipfile

import numpy as np
from PIL import Image

from paperzoo.data import files

CIFAR10_RELPATH = "cifar10/cifar10_jpg.zip"
MNIST_IMAGES_RELPATH = "mnist/t10k-images-idx3-ubyte.gz"
MNIST_LABELS_RELPATH = "mnist/t10k-labels-idx1-ubyte.gz"

# The standard CIFAR-10 label order (that of the original batches.meta and of tfds' cifar10).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_SPLITS = ("train", "test")
CIFAR10_IMAGE_SHAPE = (32, 32, 3)

# tf.image.rgb_to_grayscale's weights (ITU-R BT.601 luma), used by LRA's Image task.
LRA_GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)
# The same weights in units of 1/10000, so that to_grayscale can compute in exact integers.
_LRA_GRAYSCALE_WEIGHTS_E4 = (2989, 5870, 1140)

MNIST_TEST_EVERY = 5  # every fifth MNIST image is in the project's test split
MNIST_IMAGE_SHAPE = (28, 28)

# Bump when the cached layout or the decoding changes, so old cache files are not read.
_CACHE_VERSION = 1
_JPEG_ENTRY = re.compile(r"^(?P<split>[^/]+)/(?P<label>[^/]+)/(?P<name>[^/]+\.jpe?g)$",
                         re.IGNORECASE)
_GRAYSCALE_CHUNK = 1 << 20  # pixels per int64 chunk in to_grayscale (bounds its memory only)


class DataFormatError(ValueError):
  """A data file exists (and may have passed its checksum) but its contents are not as expected."""


# --------------------------------------------------------------------------------------------
# CIFAR-10.
# --------------------------------------------------------------------------------------------
def load_cifar10(*, root: str | os.PathLike | None = None, grayscale: bool = False
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """CIFAR-10's "train" (50,000) and "test" (10,000) splits as (images, int32 labels).

  Images are uint8 [N, 32, 32, 3], or uint8 [N, 32, 32] with `grayscale` (LRA's conversion, see
  `to_grayscale`). `root` is the data directory (default `files.data_dir()`); the zip is checked
  against its known sha256. The first call decodes the JPEGs and caches them (see module doc).
  """
  path = files.data_file(CIFAR10_RELPATH, root=root)
  splits = load_cifar10_zip(path, sha256=files.KNOWN_SHA256.get(CIFAR10_RELPATH))
  if grayscale:
    splits = {name: (to_grayscale(x), y) for name, (x, y) in splits.items()}
  return splits


def load_cifar10_zip(path: str | os.PathLike, *, sha256: str | None = None
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The decoded splits of the CIFAR-10 zip at `path`, from the cache or decoded and cached.

  `sha256` is the zip's checksum when the caller already knows it (a verified data file); else
  the file is hashed here. It names the cache entry.
  """
  path = pathlib.Path(path)
  sha256 = sha256 or files.file_sha256(path)
  cached = files.cache_dir("images") / f"cifar10_v{_CACHE_VERSION}_{sha256[:24]}.npz"

  def build() -> dict[str, np.ndarray]:
    return {f"{name}_{kind}": array for name, arrays in decode_cifar10_zip(path).items()
            for kind, array in zip(("images", "labels"), arrays)}

  arrays = files.cached_arrays(cached, build)
  present = {key.rsplit("_", 1)[0] for key in arrays}
  names = [name for name in CIFAR10_SPLITS if name in present]  # decode_cifar10_zip's order
  return {name: (arrays[f"{name}_images"], arrays[f"{name}_labels"]) for name in names}


def decode_cifar10_zip(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Decodes every `<split>/<class>/<name>.jpg` of the zip at `path` (no cache, no checksum).

  Splits must be among CIFAR10_SPLITS and class folders among CIFAR10_CLASSES (mapped to their
  index there, never to their position in the listing); anything else in the zip besides
  directory entries is an error. Returns the splits present, each ordered by (class, file name).
  """
  path = pathlib.Path(path)
  entries: dict[str, list[tuple[int, str]]] = {}
  unexpected = []
  with zipfile.ZipFile(path) as archive:
    for info in archive.infolist():
      if info.is_dir():
        continue
      match = _JPEG_ENTRY.match(info.filename)
      if (match is None or match["split"] not in CIFAR10_SPLITS
          or match["label"] not in CIFAR10_CLASSES):
        unexpected.append(info.filename)
        continue
      entries.setdefault(match["split"], []).append(
          (CIFAR10_CLASSES.index(match["label"]), info.filename))
    if unexpected:
      raise DataFormatError(
          f"{path}: {len(unexpected)} unexpected entries, e.g. {unexpected[:5]}; expected only "
          f"<split>/<class>/<name>.jpg with split in {CIFAR10_SPLITS} and class in "
          f"{CIFAR10_CLASSES}")
    if not entries:
      raise DataFormatError(f"{path}: no <split>/<class>/<name>.jpg images in the zip")

    splits = {}
    for split in CIFAR10_SPLITS:
      if split not in entries:
        continue
      items = sorted(entries[split])  # (class index, file name): the documented order
      images = np.empty((len(items), *CIFAR10_IMAGE_SHAPE), np.uint8)
      for i, (_, name) in enumerate(items):
        images[i] = _decode_jpeg(archive.read(name), f"{path}:{name}")
      labels = np.asarray([label for label, _ in items], np.int32)
      splits[split] = (images, labels)
  return splits


def _decode_jpeg(data: bytes, where: str) -> np.ndarray:
  try:
    # formats=("JPEG",) skips Pillow's probing of other formats (~15% of the decode time here).
    with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
      if image.mode != "RGB":
        image = image.convert("RGB")
      pixels = np.asarray(image)
  except (OSError, SyntaxError) as error:  # Pillow's "cannot identify" / truncated-file errors
    raise DataFormatError(f"{where}: not a decodable JPEG ({error})") from error
  if pixels.shape != CIFAR10_IMAGE_SHAPE:
    raise DataFormatError(f"{where}: image of shape {pixels.shape}, expected "
                          f"{CIFAR10_IMAGE_SHAPE}")
  return pixels


def to_grayscale(images: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] RGB -> uint8 [...] intensities: LRA's Image task conversion, computed exactly.

  LRA (`lra_benchmarks/image/input_pipeline.py`) feeds `tf.image.rgb_to_grayscale(image)`, which
  scales to float32 in [0, 1] (x * (1/255)), takes the dot product with LRA_GRAYSCALE_WEIGHTS,
  and converts back with `convert_image_dtype`: multiply by 255.5 and *truncate*. So the value is
  floor((0.2989 R + 0.587 G + 0.114 B) * 255.5 / 255), not round-to-nearest: pure green
  (0, 255, 0) gives 149 where rounding would give 150.

  Here that formula is evaluated exactly, in int64: with the weights as 2989, 5870, 1140
  (/ 10000) and 255.5 = 511 / 2, the pixel is

      floor((2989 R + 5870 G + 1140 B) * 511 / (255 * 10000 * 2)),

  so every pixel depends on its own R, G, B alone, whatever the batch, chunking or BLAS.
  TensorFlow evaluates the same formula in float32, in a summation order its kernel chooses, so
  it can be one above or below the exact value where that lies within float32 rounding (~1e-5)
  of an integer (it is never an integer, except for black): about 1 in 100,000 of CIFAR-10's
  pixels. The exact value is chosen because it is the formula's true value and the same on
  every batch and machine, which no float32 evaluation is; a float64 evaluation agrees with it.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.shape[-1:] != (3,):
    raise ValueError(f"to_grayscale expects uint8 [..., 3] RGB images, got {images.dtype} "
                     f"{images.shape}")
  pixels = images.reshape(-1, 3)
  out = np.empty(len(pixels), np.uint8)
  for start in range(0, len(pixels), _GRAYSCALE_CHUNK):  # chunks: int64 copies of 60k images
    rgb = pixels[start:start + _GRAYSCALE_CHUNK].astype(np.int64)
    weighted = sum(rgb[:, c] * w for c, w in enumerate(_LRA_GRAYSCALE_WEIGHTS_E4))  # <= 2.55e6
    out[start:start + _GRAYSCALE_CHUNK] = weighted * 511 // (255 * 10000 * 2)  # floor, <= 255
  return out.reshape(images.shape[:-1])


def downsample(images: np.ndarray, factor: int) -> np.ndarray:
  """uint8 [N, H, W] -> uint8 [N, H / factor, W / factor]: the mean of each factor x factor
  block, rounded half up (an area resize with no interpolation across blocks)."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 3:
    raise ValueError(f"downsample expects uint8 [N, H, W] images, got {images.dtype} "
                     f"{images.shape}")
  n, height, width = images.shape
  if factor < 1 or height % factor or width % factor:
    raise ValueError(f"factor={factor} must be a positive divisor of the image size "
                     f"{height}x{width}")
  if factor == 1:
    return images
  blocks = images.reshape(n, height // factor, factor, width // factor, factor)
  total = blocks.sum(axis=(2, 4), dtype=np.int32)  # at most 255 * factor**2
  return ((2 * total + factor**2) // (2 * factor**2)).astype(np.uint8)  # floor(mean + 1/2)


# --------------------------------------------------------------------------------------------
# MNIST.
# --------------------------------------------------------------------------------------------
def load_mnist(*, root: str | os.PathLike | None = None
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The project's MNIST: "train" uint8 [8000, 28, 28] and "test" uint8 [2000, 28, 28], int32
  labels, split from MNIST's 10,000 test images by index (every fifth is test; module doc)."""
  images_path = files.data_file(MNIST_IMAGES_RELPATH, root=root)
  labels_path = files.data_file(MNIST_LABELS_RELPATH, root=root)
  images = read_idx(images_path)
  labels = read_idx(labels_path)
  if images.ndim != 3 or images.shape[1:] != MNIST_IMAGE_SHAPE:
    raise DataFormatError(f"{images_path}: images of shape {images.shape}, expected "
                          f"[N, {MNIST_IMAGE_SHAPE[0]}, {MNIST_IMAGE_SHAPE[1]}]")
  if labels.ndim != 1 or len(labels) != len(images):
    raise DataFormatError(f"{labels_path}: labels of shape {labels.shape}, expected "
                          f"[{len(images)}] to match {images_path}")
  if labels.max(initial=0) > 9:
    raise DataFormatError(f"{labels_path}: label {labels.max()} is not a digit")
  is_test = np.arange(len(images)) % MNIST_TEST_EVERY == MNIST_TEST_EVERY - 1
  labels = labels.astype(np.int32)
  return {"train": (images[~is_test], labels[~is_test]),
          "test": (images[is_test], labels[is_test])}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """The uint8 array in an IDX file (LeCun's MNIST format), gzipped if its name ends in `.gz`.

  The header is two zero bytes, a type code (0x08: unsigned byte, the only type MNIST uses), the
  number of dimensions, then each dimension as a big-endian uint32. Any other layout, or a size
  that disagrees with the header, raises DataFormatError naming the file.
  """
  path = pathlib.Path(path)
  try:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
      data = stream.read()
  except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
    raise DataFormatError(f"{path}: cannot read the IDX file ({error}); the file is corrupt"
                          ) from error
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise DataFormatError(f"{path}: bad IDX magic number {data[:4].hex() or '(empty file)'}, "
                          "expected 0000 08 <ndim> (unsigned-byte data); the file is corrupt or "
                          "not an IDX file")
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DataFormatError(f"{path}: truncated IDX header ({len(data)} bytes)")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  size = int(np.prod(shape, dtype=np.int64))
  if len(data) - header != size:
    raise DataFormatError(f"{path}: IDX header says shape {shape} ({size} bytes of data), the "
                          f"file has {len(data) - header}; the file is truncated or corrupt")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy()
