"""UEA multivariate time-series classification: the `.ts` reader, splits and normalization.

The `.ts` format (UEA & UCR archive, timeseriesclassification.com) is a text file:

  # comment lines, anywhere
  @problemName BasicMotions
  @timeStamps false
  @missing false
  @univariate false
  @dimensions 6
  @equalLength true
  @seriesLength 100
  @classLabel true Standing Running Walking Badminton
  @data
  0.07,0.07,-0.90,...:0.30,0.30,...:...:Standing

Header keywords are case-insensitive. After `@data` every non-blank line is one example: the
values of each dimension comma separated, dimensions separated by ':', the class label last.
`?` (or `NaN`) is a missing value. Series may differ in length between examples (JapaneseVowels:
7 to 29 steps); a dimension shorter than the example's longest is padded with missing values.
Timestamped files (`@timeStamps true`, values written `(t,v)`) are refused with a ValueError: no
file the project uses has them. `read_ts` returns the raw series; errors in a file name the file
and the line.

`load_uea` builds the splits a classifier trains on:

- TRAIN and TEST are the archive's official files. Validation is carved from TRAIN, stratified:
  per class, round(val_fraction * count) examples (at least one from a class with two or more, and
  never the class's last one), drawn with `seed`; the rest of TRAIN is the training part. Model
  selection therefore never looks at TEST.
- `legacy_test_selection=True` is Time-Series-Library's protocol instead: it trains on all of
  TRAIN and its "validation" set is TEST, so checkpoint selection and early stopping look at the
  test set. It exists only to compare with numbers published under that protocol, and a result
  obtained with it must be reported as TEST-selected (`UeaData.selection` says so).
- Normalization is per channel: mean and standard deviation (ddof=0) over every observed value
  (not missing, not padding) of the training part only, applied to all splits.
- Missing values become 0 after normalization, i.e. the training mean of their channel; they
  stay True in `padding_mask`, which marks the steps within a series' length (the model sees an
  imputed value, not a gap). `lengths` keeps each series' length.
- Every split is padded (after normalization, with 0) to the longest series of TRAIN and TEST
  together, so that all splits share one input shape.

    data = load_uea("JapaneseVowels")
    batch = data.train.get_batch(np.arange(16))  # inputs [16, 29, 12], padding_mask, label
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any

import numpy as np

from paperzoo.data.classification import stratified_split
from paperzoo.data.files import DataFileError, data_file

# The UEA sets the project has files (and checksums) for. Any other archive set works too when its
# files are at <data dir>/uea/<Name>/<Name>_{TRAIN,TEST}.ts.
UEA_DATASETS = ("AtrialFibrillation", "BasicMotions", "Handwriting", "JapaneseVowels")

_MISSING_TOKENS = frozenset({"?", "nan", "NaN", "NAN"})
# A channel whose training values are all equal has std 0: below this floor the channel is only
# centred (std 1, as scikit-learn's StandardScaler does), so a validation or test value that
# differs from the training value stays on its own scale instead of growing by 1 / floor.
STD_FLOOR = 1e-8


# --------------------------------------------------------------------------------------------
# The `.ts` reader.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TsFile:
  """One parsed `.ts` file.

  series: one float32 [length_i, channels] array per example, NaN where a value is missing.
  labels: each example's class label, as written in the file.
  class_names: the labels of the `@classLabel` header, in header order (the class index order).
  header: the `@` keywords, lowercased, with "true"/"false" as bools and integers as ints
    (`classlabel` holds True; the names are in `class_names`).
  """

  series: list[np.ndarray]
  labels: list[str]
  class_names: tuple[str, ...]
  header: dict[str, Any]

  @property
  def num_channels(self) -> int:
    return self.series[0].shape[1] if self.series else int(self.header.get("dimensions", 0))

  @property
  def lengths(self) -> np.ndarray:
    return np.array([len(s) for s in self.series], np.int64)


def _header_value(text: str) -> Any:
  lowered = text.lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  try:
    return int(text)
  except ValueError:
    return text


def _parse_dimension(text: str, where: str, dim: int) -> np.ndarray:
  tokens = text.split(",")
  try:
    # Fast path: numpy parses numbers and "NaN" itself; "?" (or a bad token) falls through.
    values = np.array(tokens, np.float64)
  except ValueError:
    values = np.empty(len(tokens), np.float64)
    for i, token in enumerate(tokens):
      token = token.strip()
      if token in _MISSING_TOKENS:
        values[i] = math.nan
        continue
      try:
        values[i] = float(token)
      except ValueError:
        raise ValueError(f"{where}: dimension {dim}, value {i}: {token!r} is not a number or a "
                         f"missing value ('?')") from None
  if np.isinf(values).any():
    i = int(np.flatnonzero(np.isinf(values))[0])
    raise ValueError(f"{where}: dimension {dim}, value {i}: infinite value {tokens[i].strip()!r}")
  return values


def read_ts(path: str | os.PathLike) -> TsFile:
  """Parses a UEA/UCR `.ts` classification file (see the module docstring for the format).

  Raises ValueError, naming the file and line, on: data before (or no) `@data`, timestamps,
  a dimension count different from `@dimensions` (or from the first example), an empty
  dimension, a value that is not a number or `?`, a label not in `@classLabel`, or a length
  different from `@seriesLength` in an `@equalLength true` file.
  """
  path = pathlib.Path(path)
  header: dict[str, Any] = {}
  class_names: tuple[str, ...] | None = None
  series: list[np.ndarray] = []
  labels: list[str] = []
  in_data = False
  num_dims: int | None = None
  # The archive's files are ASCII except for comments (some UTF-8); a stray byte in a comment
  # must not stop the reader.
  with open(path, encoding="utf-8", errors="replace") as stream:
    for line_number, raw in enumerate(stream, start=1):
      line = raw.strip()
      where = f"{path}, line {line_number}"
      if not line or line.startswith("#"):
        continue
      if not in_data:
        if not line.startswith("@"):
          raise ValueError(f"{where}: a data line before the @data header (missing @data?)")
        keyword, *rest = line[1:].split(None, 1)  # a space or a tab after the keyword
        keyword, rest = keyword.lower(), rest[0].strip() if rest else ""
        if keyword == "data":
          in_data = True
          if class_names is None:
            raise ValueError(f"{where}: no '@classLabel true <names...>' header before @data; "
                             "only labelled classification files are supported")
          if header.get("timestamps"):
            raise ValueError(f"{where}: @timeStamps true: timestamped (t,v) values are not "
                             "supported (none of the project's UEA files use them)")
          if header.get("univariate") is True:
            num_dims = 1
          elif isinstance(header.get("dimensions"), int):
            num_dims = header["dimensions"]
        elif keyword == "classlabel":
          words = rest.split()
          if not words or words[0].lower() != "true" or len(words) < 2:
            raise ValueError(f"{where}: expected '@classLabel true <names...>', got {line!r}; "
                             "only labelled classification files are supported")
          class_names = tuple(words[1:])
          if len(set(class_names)) != len(class_names):
            raise ValueError(f"{where}: repeated class names in {line!r}")
          header["classlabel"] = True
        else:
          header[keyword] = _header_value(rest)
        continue

      if "(" in line:
        raise ValueError(f"{where}: timestamped (t,v) values are not supported")
      *dims, label = line.split(":")
      label = label.strip()
      if not dims:
        raise ValueError(f"{where}: expected '<dim 1>:...:<dim d>:<label>', found no ':'")
      if num_dims is None:
        num_dims = len(dims)  # no @dimensions header: the first example fixes the count
      if len(dims) != num_dims:
        raise ValueError(f"{where}: {len(dims)} dimensions, expected {num_dims} (from "
                         f"{'@dimensions' if 'dimensions' in header else 'the first example'})")
      if label not in class_names:
        raise ValueError(f"{where}: label {label!r} is not one of the @classLabel names "
                         f"{list(class_names)}")
      if any(not d.strip() for d in dims):
        empty = [i for i, d in enumerate(dims) if not d.strip()]
        raise ValueError(f"{where}: dimension {empty[0]} is empty")
      columns = [_parse_dimension(d, where, i) for i, d in enumerate(dims)]
      length = max(len(c) for c in columns)
      example = np.full((length, num_dims), np.nan, np.float32)
      for i, column in enumerate(columns):
        example[:len(column), i] = column  # a shorter dimension ends in missing values
      if header.get("equallength") is True and isinstance(header.get("serieslength"), int):
        if length != header["serieslength"]:
          raise ValueError(f"{where}: series length {length}, but the header says "
                           f"@equalLength true, @seriesLength {header['serieslength']}")
      series.append(example)
      labels.append(label)
  if not in_data:
    raise ValueError(f"{path}: no @data line: not a .ts file, or a truncated one")
  return TsFile(series=series, labels=labels, class_names=class_names, header=header)


# --------------------------------------------------------------------------------------------
# Splits and normalization.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class UeaSplit:
  """One split, padded and normalized.

  inputs: float32 [N, max_len, C]; normalized, missing values 0, padding 0.
  padding_mask: bool [N, max_len]; True on the steps within each series' length.
  labels: int32 [N], indices into `UeaData.class_names`.
  lengths: int64 [N], each series' length.
  source: "TRAIN" or "TEST", the archive file the examples come from.
  rows: int64 [N], each example's position among that file's examples.
  """

  inputs: np.ndarray
  padding_mask: np.ndarray
  labels: np.ndarray
  lengths: np.ndarray
  source: str
  rows: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The trainer's dataset contract: numpy arrays for the examples at `indices`."""
    return {"inputs": self.inputs[indices], "padding_mask": self.padding_mask[indices],
            "label": self.labels[indices]}


@dataclasses.dataclass
class NormStats:
  """Per-channel float32 [C] statistics of the training part's observed values."""

  mean: np.ndarray
  std: np.ndarray  # floored at STD_FLOOR


@dataclasses.dataclass
class UeaData:
  """The three splits of one UEA set and what a model needs to know about them."""

  name: str
  train: UeaSplit
  val: UeaSplit  # with legacy_test_selection: the TEST split itself
  test: UeaSplit
  class_names: tuple[str, ...]
  num_channels: int
  max_len: int
  stats: NormStats
  legacy_test_selection: bool = False

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def selection(self) -> str:
    """How checkpoints are selected, for reports: "validation" or "test (legacy)"."""
    return "test (legacy)" if self.legacy_test_selection else "validation"


def fit_stats(series: list[np.ndarray], num_channels: int) -> NormStats:
  """Per-channel mean and std (ddof=0) over the observed (non-NaN) values of `series`.

  A channel with no observed value gets mean 0 and std 1 (it is left as is; all 0 after NaNs are
  filled). Computed in float64.
  """
  values = (np.concatenate([s.reshape(-1, num_channels) for s in series]).astype(np.float64)
            if series else np.zeros((0, num_channels)))
  observed = ~np.isnan(values)
  count = observed.sum(0)
  filled = np.where(observed, values, 0.0)
  mean = filled.sum(0) / np.maximum(count, 1)
  var = np.where(observed, (values - mean) ** 2, 0.0).sum(0) / np.maximum(count, 1)
  std = np.sqrt(var)
  std = np.where(count > 0, std, 1.0)
  return NormStats(mean=mean.astype(np.float32),
                   std=np.where(std < STD_FLOOR, 1.0, std).astype(np.float32))


def _make_split(series: list[np.ndarray], labels: np.ndarray, rows: np.ndarray, source: str,
                stats: NormStats, max_len: int) -> UeaSplit:
  num_channels = len(stats.mean)
  inputs = np.zeros((len(rows), max_len, num_channels), np.float32)
  lengths = np.array([len(series[r]) for r in rows], np.int64)
  for i, r in enumerate(rows):
    normalized = (series[r] - stats.mean) / stats.std
    # Missing -> 0 = the channel's training mean; set after normalizing, padding is 0 too.
    inputs[i, :lengths[i]] = np.nan_to_num(normalized, nan=0.0)
  padding_mask = np.arange(max_len)[None, :] < lengths[:, None]
  return UeaSplit(inputs=inputs, padding_mask=padding_mask,
                  labels=labels[rows].astype(np.int32), lengths=lengths, source=source,
                  rows=np.asarray(rows, np.int64))


def _read_split(name: str, split: str, root) -> TsFile:
  relpath = f"uea/{name}/{name}_{split}.ts"
  try:
    path = data_file(relpath, root=root)
  except DataFileError as error:
    if name in UEA_DATASETS:
      raise
    raise DataFileError(f"unknown UEA data set {name!r}: the project's are "
                        f"{', '.join(UEA_DATASETS)}; another archive set needs its files at "
                        f"<data dir>/uea/{name}/{name}_{{TRAIN,TEST}}.ts. {error}") from None
  return read_ts(path)


def load_uea(name: str, *, root: str | os.PathLike | None = None, val_fraction: float = 0.2,
             seed: int = 0, legacy_test_selection: bool = False) -> UeaData:
  """The UEA set `name` (e.g. "BasicMotions") as train/val/test splits; see the module docstring.

  `root` is the data directory (default: `paperzoo.data.files.data_dir()`); the files are
  `<root>/uea/<name>/<name>_{TRAIN,TEST}.ts`. `val_fraction` and `seed` define the validation
  split carved from TRAIN; with `legacy_test_selection` (Time-Series-Library's protocol, which
  selects on TEST) both are ignored, train is all of TRAIN and val is TEST.
  """
  if not name or "/" in name or "\\" in name:
    raise ValueError(f"bad UEA data set name {name!r}; the project's are "
                     f"{', '.join(UEA_DATASETS)}")
  train_file = _read_split(name, "TRAIN", root)
  test_file = _read_split(name, "TEST", root)
  if train_file.class_names != test_file.class_names:
    raise ValueError(f"{name}: TRAIN and TEST declare different classes: "
                     f"{train_file.class_names} vs {test_file.class_names}")
  if train_file.num_channels != test_file.num_channels:
    raise ValueError(f"{name}: TRAIN has {train_file.num_channels} dimensions, TEST "
                     f"{test_file.num_channels}")
  if not train_file.series or not test_file.series:
    raise ValueError(f"{name}: TRAIN has {len(train_file.series)} examples and TEST "
                     f"{len(test_file.series)}; both need at least one")
  class_names = train_file.class_names
  index = {c: i for i, c in enumerate(class_names)}
  train_labels = np.array([index[c] for c in train_file.labels], np.int32)
  test_labels = np.array([index[c] for c in test_file.labels], np.int32)
  num_channels = train_file.num_channels
  max_len = int(max(train_file.lengths.max(), test_file.lengths.max()))

  if legacy_test_selection:
    train_rows, val_rows = np.arange(len(train_labels)), None
  else:
    train_rows, val_rows = stratified_split(train_labels, val_fraction, seed)
  stats = fit_stats([train_file.series[r] for r in train_rows], num_channels)

  train = _make_split(train_file.series, train_labels, train_rows, "TRAIN", stats, max_len)
  test = _make_split(test_file.series, test_labels, np.arange(len(test_labels)), "TEST", stats,
                     max_len)
  val = (test if val_rows is None else
         _make_split(train_file.series, train_labels, val_rows, "TRAIN", stats, max_len))
  return UeaData(name=name, train=train, val=val, test=test, class_names=class_names,
                 num_channels=num_channels, max_len=max_len, stats=stats,
                 legacy_test_selection=legacy_test_selection)
