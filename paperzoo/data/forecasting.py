"""Long-term forecasting data, split, scaled and windowed exactly as Time-Series-Library does.

The protocol (experiments/forecasting_protocol.md) is TSLib's `features='M'` (every column in,
every column out) with `timeenc=1` ("timeF" time features):

- ETT (`Dataset_ETT_hour` / `Dataset_ETT_minute`): 12/4/4 months of 30 days for
  train/val/test; rows after the 20 months are unused.
- Other CSVs (`Dataset_Custom`): `OT` moved last; 70% / rest / 20% of the rows.
- Validation and test windows start `seq_len` rows before their split's first target row, so the
  first window of a split predicts that split's first rows from the end of the previous split.
- A StandardScaler fitted on the training rows only normalizes the whole series.

    data = load_forecasting("etth1", seq_len=96, label_len=48, pred_len=96)
    batch = data.train.get_batch(np.arange(32))  # x, x_mark, y, dec_x, dec_mark
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from paperzoo.data.files import data_file
from paperzoo.registry import DATASETS

SPLITS = ("train", "val", "test")
DATE_COLUMN = "date"
TARGET_COLUMN = "OT"


# ---------------------------------------------------------------------------------------------
# Time features (TSLib `utils/timefeatures.py`, timeenc=1): each scaled to [-0.5, 0.5].

def _second_of_minute(dates: pd.DatetimeIndex) -> np.ndarray:
  return dates.second.to_numpy() / 59.0 - 0.5


def _minute_of_hour(dates: pd.DatetimeIndex) -> np.ndarray:
  return dates.minute.to_numpy() / 59.0 - 0.5


def _hour_of_day(dates: pd.DatetimeIndex) -> np.ndarray:
  return dates.hour.to_numpy() / 23.0 - 0.5


def _day_of_week(dates: pd.DatetimeIndex) -> np.ndarray:
  return dates.day_of_week.to_numpy() / 6.0 - 0.5  # Monday = 0


def _day_of_month(dates: pd.DatetimeIndex) -> np.ndarray:
  return (dates.day.to_numpy() - 1) / 30.0 - 0.5


def _day_of_year(dates: pd.DatetimeIndex) -> np.ndarray:
  return (dates.day_of_year.to_numpy() - 1) / 365.0 - 0.5


def _month_of_year(dates: pd.DatetimeIndex) -> np.ndarray:
  return (dates.month.to_numpy() - 1) / 11.0 - 0.5


def _week_of_year(dates: pd.DatetimeIndex) -> np.ndarray:
  week = dates.isocalendar().week.to_numpy().astype(np.int64)
  return (week - 1) / 52.0 - 0.5


# Per frequency, the features TSLib derives from the pandas offset of that frequency, in order.
TIME_FEATURES: dict[str, tuple[Callable[[pd.DatetimeIndex], np.ndarray], ...]] = {
    "s": (_second_of_minute, _minute_of_hour, _hour_of_day, _day_of_week, _day_of_month,
          _day_of_year),
    "t": (_minute_of_hour, _hour_of_day, _day_of_week, _day_of_month, _day_of_year),
    "h": (_hour_of_day, _day_of_week, _day_of_month, _day_of_year),
    "d": (_day_of_week, _day_of_month, _day_of_year),
    "w": (_day_of_month, _week_of_year),
    "m": (_month_of_year,),
}


def time_features(dates, freq: str) -> np.ndarray:
  """The timeF features of `dates` for `freq`, as a float64 array [len(dates), num_features]."""
  if freq not in TIME_FEATURES:
    raise ValueError(f"unknown frequency {freq!r}; valid: {', '.join(TIME_FEATURES)} "
                     "(s: second, t: minute, h: hour, d: day, w: week, m: month)")
  dates = pd.DatetimeIndex(dates)
  columns = [feature(dates) for feature in TIME_FEATURES[freq]]
  return np.stack(columns, axis=1).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Windows.

class WindowDataset:
  """The sliding windows of one split: window i reads rows [i, i + seq_len + pred_len).

  Keys of `get_batch` (float32): `x` [B, seq_len, C] the input; `x_mark` [B, seq_len, F] its time
  features; `y` [B, pred_len, C] the future to predict; `dec_x` [B, label_len + pred_len, C] the
  last label_len inputs followed by pred_len zeros (the decoder input of encoder-decoder models);
  `dec_mark` [B, label_len + pred_len, F] the time features of those steps (known in advance).
  """

  def __init__(self, values: np.ndarray, marks: np.ndarray, *, seq_len: int, label_len: int,
               pred_len: int, split: str = "", border: tuple[int, int] | None = None):
    """`values` [N, C] and `marks` [N, F] are the split's rows (scaled), window starts 0.."""
    if values.ndim != 2 or marks.ndim != 2 or len(values) != len(marks):
      raise ValueError(f"values {values.shape} and marks {marks.shape} must be [N, C] and "
                       "[N, F] with the same N")
    _check_lengths(seq_len, label_len, pred_len)
    self.values = np.ascontiguousarray(values, dtype=np.float32)
    self.marks = np.ascontiguousarray(marks, dtype=np.float32)
    self.seq_len = seq_len
    self.label_len = label_len
    self.pred_len = pred_len
    self.split = split
    self.border = border  # the split's rows [start, stop) in the whole series
    self.num_variates = values.shape[1]
    self.num_time_features = marks.shape[1]
    self._num_windows = max(len(values) - seq_len - pred_len + 1, 0)
    # Row offsets of one window; get_batch adds each window's start to it.
    self._window_offsets = np.arange(seq_len + pred_len, dtype=np.int64)

  def __len__(self) -> int:
    return self._num_windows

  def __repr__(self) -> str:
    return (f"WindowDataset(split={self.split!r}, windows={len(self)}, rows={self.border}, "
            f"seq_len={self.seq_len}, label_len={self.label_len}, pred_len={self.pred_len}, "
            f"variates={self.num_variates}, time_features={self.num_time_features})")

  def get_batch(self, indices) -> dict[str, np.ndarray]:
    """The windows at `indices` (ints in [0, len(self))), stacked along a leading batch axis."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= self._num_windows):
      raise IndexError(f"window indices must be in [0, {self._num_windows}) for the "
                       f"{self.split or 'window'} split; got min {indices.min()}, "
                       f"max {indices.max()}")
    # One fancy index gathers every row of every window, [B, seq_len + pred_len, *].
    rows = indices[:, None] + self._window_offsets[None, :]
    windows = self.values[rows]
    window_marks = self.marks[rows]
    seq_len, label_len = self.seq_len, self.label_len
    dec_x = np.zeros((len(indices), label_len + self.pred_len, self.num_variates), np.float32)
    dec_x[:, :label_len] = windows[:, seq_len - label_len:seq_len]
    return {
        "x": np.ascontiguousarray(windows[:, :seq_len]),
        "x_mark": np.ascontiguousarray(window_marks[:, :seq_len]),
        "y": np.ascontiguousarray(windows[:, seq_len:]),
        "dec_x": dec_x,
        "dec_mark": np.ascontiguousarray(window_marks[:, seq_len - label_len:]),
    }

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """One window, without the batch axis."""
    if not -self._num_windows <= index < self._num_windows:
      raise IndexError(f"window {index} out of range for {len(self)} windows")
    batch = self.get_batch(np.array([index % self._num_windows]))
    return {key: value[0] for key, value in batch.items()}

  def iter_batches(self, batch_size: int, *, rng: np.random.Generator | None = None,
                   drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Batches over every window: in order, or shuffled by `rng`. The last may be smaller.

    Keep `drop_last=False` for evaluation: the protocol scores every test window.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.arange(len(self)) if rng is None else rng.permutation(len(self))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
      yield self.get_batch(order[start:start + batch_size])


@dataclasses.dataclass
class ForecastingData:
  """A forecasting data set split into train/val/test windows, with its scaler."""

  train: WindowDataset
  val: WindowDataset
  test: WindowDataset
  num_variates: int
  num_time_features: int
  columns: list[str]
  mean: np.ndarray  # [C] training-row mean, float64
  std: np.ndarray  # [C] training-row std (ddof=0; 1 where a column is constant), float64
  freq: str
  name: str
  borders: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

  def inverse_transform(self, array) -> np.ndarray:
    """Undo the scaling: `array` [..., C] on the normalized scale -> the original units."""
    array = np.asarray(array)
    if array.shape[-1] != self.num_variates:
      raise ValueError(f"last axis must be the {self.num_variates} variates of {self.name}, "
                       f"got shape {array.shape}")
    return array * self.std + self.mean

  def split(self, name: str) -> WindowDataset:
    """The split called `name` ("train", "val" or "test")."""
    if name not in SPLITS:
      raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLITS)}")
    return getattr(self, name)


def _check_lengths(seq_len: int, label_len: int, pred_len: int) -> None:
  for label, value in (("seq_len", seq_len), ("label_len", label_len), ("pred_len", pred_len)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
      raise TypeError(f"{label} must be an int, got {value!r}")
  if seq_len < 1 or pred_len < 1:
    raise ValueError(f"seq_len and pred_len must be >= 1, got {seq_len} and {pred_len}")
  # The decoder's known steps are the input's last label_len steps.
  if not 0 <= label_len <= seq_len:
    raise ValueError(f"label_len must be in [0, seq_len={seq_len}], got {label_len}")


def build_forecasting(values: np.ndarray, dates, *, columns: list[str], freq: str, name: str,
                      train_rows: int, borders: dict[str, tuple[int, int]], seq_len: int,
                      label_len: int, pred_len: int) -> ForecastingData:
  """Scale, featurize and window a series given its split borders.

  `values` [N, C] raw; `train_rows` the rows [0, train_rows) the scaler is fitted on; `borders`
  each split's rows [start, stop), starts already moved seq_len rows early.
  """
  _check_lengths(seq_len, label_len, pred_len)
  values = np.asarray(values, dtype=np.float64)
  for split in SPLITS:
    start, stop = borders[split]
    num_windows = stop - start - seq_len - pred_len + 1
    if start < 0 or stop > len(values) or num_windows < 1:
      raise ValueError(
          f"{name}: seq_len={seq_len}, pred_len={pred_len} leave no windows in the {split} "
          f"split: its rows are [{start}, {stop}) of {len(values)} ({stop - start} rows, "
          f"{num_windows} windows); a window needs seq_len + pred_len = {seq_len + pred_len} "
          f"rows, and the split must not start before row 0")
  train = values[:train_rows]
  mean = train.mean(axis=0)
  std = train.std(axis=0)  # ddof=0, as sklearn's StandardScaler
  std = np.where(std == 0.0, 1.0, std)  # sklearn leaves constant columns unscaled, not inf
  scaled = ((values - mean) / std).astype(np.float32)
  marks = time_features(dates, freq).astype(np.float32)
  windows = {
      split: WindowDataset(scaled[start:stop], marks[start:stop], seq_len=seq_len,
                           label_len=label_len, pred_len=pred_len, split=split,
                           border=(start, stop))
      for split, (start, stop) in borders.items()}
  return ForecastingData(
      train=windows["train"], val=windows["val"], test=windows["test"],
      num_variates=values.shape[1], num_time_features=marks.shape[1], columns=list(columns),
      mean=mean, std=std, freq=freq, name=name, borders=dict(borders))


# ---------------------------------------------------------------------------------------------
# CSV layouts.

def read_series_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray, pd.DatetimeIndex]:
  """A CSV with a `date` column and numeric columns -> (columns, values [N, C], dates)."""
  path = pathlib.Path(path)
  frame = pd.read_csv(path)
  if DATE_COLUMN not in frame.columns:
    raise ValueError(f"{path}: no {DATE_COLUMN!r} column; columns are {list(frame.columns)}")
  try:
    dates = pd.DatetimeIndex(pd.to_datetime(frame[DATE_COLUMN]))
  except (ValueError, TypeError) as error:
    raise ValueError(f"{path}: cannot parse the {DATE_COLUMN!r} column as dates: {error}") \
        from None
  columns = [column for column in frame.columns if column != DATE_COLUMN]
  if not columns:
    raise ValueError(f"{path}: no data columns besides {DATE_COLUMN!r}")
  for column in columns:
    if not pd.api.types.is_numeric_dtype(frame[column]) or \
        pd.api.types.is_bool_dtype(frame[column]):
      numeric = pd.to_numeric(frame[column], errors="coerce")
      bad = np.flatnonzero(numeric.isna().to_numpy() & frame[column].notna().to_numpy())
      where = (f"; first at data row {bad[0]} (file line {bad[0] + 2}): "
               f"{frame[column].iloc[bad[0]]!r}") if bad.size else ""
      raise ValueError(f"{path}: column {column!r} has non-numeric values{where}")
  values = frame[columns].to_numpy(dtype=np.float64)
  missing = ~np.isfinite(values)
  if missing.any():
    row, col = np.argwhere(missing)[0]
    raise ValueError(f"{path}: {int(missing.sum())} missing or non-finite values; first in "
                     f"column {columns[col]!r} at data row {row} (file line {row + 2})")
  return [str(column) for column in columns], values, dates


# Rows in one day of ETT data, by frequency: the borders are counted in 30-day months.
_ETT_ROWS_PER_DAY = {"h": 24, "t": 96}


def load_ett(path: str | os.PathLike, freq: str, *, seq_len: int, label_len: int,
             pred_len: int, name: str | None = None) -> ForecastingData:
  """An ETT CSV (`ETTh*` with freq "h", `ETTm*` with freq "t"), split 12/4/4 months."""
  if freq not in _ETT_ROWS_PER_DAY:
    raise ValueError(f"ETT freq must be 'h' (ETTh) or 't' (ETTm, 15 minutes), got {freq!r}")
  path = pathlib.Path(path)
  columns, values, dates = read_series_csv(path)
  month = 30 * _ETT_ROWS_PER_DAY[freq]
  train_stop, val_stop, test_stop = 12 * month, 16 * month, 20 * month
  if len(values) < test_stop:
    raise ValueError(f"{path}: the ETT layout needs at least {test_stop} rows (20 months of 30 "
                     f"days at freq {freq!r}), the file has {len(values)}")
  borders = {"train": (0, train_stop), "val": (train_stop - seq_len, val_stop),
             "test": (val_stop - seq_len, test_stop)}
  return build_forecasting(values, dates, columns=columns, freq=freq, name=name or path.stem,
                           train_rows=train_stop, borders=borders, seq_len=seq_len,
                           label_len=label_len, pred_len=pred_len)


def custom_borders(num_rows: int, seq_len: int) -> tuple[int, dict[str, tuple[int, int]]]:
  """TSLib `Dataset_Custom` borders: (train rows, split -> rows [start, stop))."""
  num_train = int(num_rows * 0.7)
  num_test = int(num_rows * 0.2)
  num_val = num_rows - num_train - num_test
  borders = {"train": (0, num_train),
             "val": (num_train - seq_len, num_train + num_val),
             "test": (num_rows - num_test - seq_len, num_rows)}
  return num_train, borders


def load_custom_csv(path: str | os.PathLike, freq: str, *, seq_len: int, label_len: int,
                    pred_len: int, target: str = TARGET_COLUMN,
                    name: str | None = None) -> ForecastingData:
  """A CSV of `date` + columns with target `OT` (moved last), split 70% / 10% / 20%."""
  path = pathlib.Path(path)
  columns, values, dates = read_series_csv(path)
  if target not in columns:
    raise ValueError(f"{path}: no target column {target!r}; columns are {columns}")
  # TSLib orders the columns as date, the others in file order, then the target.
  order = [i for i, column in enumerate(columns) if column != target] + [columns.index(target)]
  columns = [columns[i] for i in order]
  values = values[:, order]
  train_rows, borders = custom_borders(len(values), seq_len)
  return build_forecasting(values, dates, columns=columns, freq=freq, name=name or path.stem,
                           train_rows=train_rows, borders=borders, seq_len=seq_len,
                           label_len=label_len, pred_len=pred_len)


# ---------------------------------------------------------------------------------------------
# Registered data sets.

FORECASTING_DATASETS: dict[str, tuple[str, str, str]] = {
    # name: (layout, file under the data directory, freq)
    "etth1": ("ett", "ett/ETTh1.csv", "h"),
    "etth2": ("ett", "ett/ETTh2.csv", "h"),
    "ettm1": ("ett", "ett/ETTm1.csv", "t"),
    "ettm2": ("ett", "ett/ETTm2.csv", "t"),
    "exchange": ("custom", "exchange_rate/exchange_rate.csv", "d"),
    "illness": ("custom", "illness/national_illness.csv", "w"),
    "weather": ("custom", "weather/weather.csv", "t"),  # every 10 minutes
    "electricity": ("custom", "electricity/electricity.csv", "h"),
    "traffic": ("custom", "traffic/traffic.csv", "h"),
}


def _make_file_loader(name: str, layout: str, relpath: str,
                      freq: str) -> Callable[..., ForecastingData]:
  """A registry loader for the file-backed data set `name`."""
  load = load_ett if layout == "ett" else load_custom_csv

  def loader(*, seq_len: int, label_len: int, pred_len: int,
             root: str | os.PathLike | None = None) -> ForecastingData:
    path = data_file(relpath, root=root)
    return load(path, freq, seq_len=seq_len, label_len=label_len, pred_len=pred_len, name=name)

  loader.__name__ = loader.__qualname__ = f"load_{name}"
  loader.__doc__ = (f"The {name} data set ({relpath}, freq {freq!r}, {layout} layout) under "
                    f"`root` or the data directory.")
  return loader


for _name, (_layout, _relpath, _freq) in FORECASTING_DATASETS.items():
  DATASETS.register(_name, kind="forecasting")(_make_file_loader(_name, _layout, _relpath, _freq))
del _name, _layout, _relpath, _freq

SYNTHETIC_NUM_ROWS = 4000
SYNTHETIC_NUM_CHANNELS = 7
SYNTHETIC_START = "2016-07-01 00:00:00"
SYNTHETIC_SEED = 2021


def synthetic_series(num_rows: int = SYNTHETIC_NUM_ROWS,
                     num_channels: int = SYNTHETIC_NUM_CHANNELS,
                     seed: int = SYNTHETIC_SEED) -> tuple[list[str], np.ndarray, pd.DatetimeIndex]:
  """A deterministic hourly series: daily + weekly sinusoids, a slow trend, a little noise."""
  rng = np.random.default_rng(seed)
  hours = np.arange(num_rows, dtype=np.float64)[:, None]
  daily_amplitude = rng.uniform(0.5, 2.0, num_channels)
  weekly_amplitude = rng.uniform(0.2, 1.0, num_channels)
  daily_phase = rng.uniform(0.0, 2 * np.pi, num_channels)
  weekly_phase = rng.uniform(0.0, 2 * np.pi, num_channels)
  trend_per_hour = rng.uniform(-1.0, 1.0, num_channels) / num_rows
  level = rng.uniform(-2.0, 2.0, num_channels)
  values = (level
            + daily_amplitude * np.sin(2 * np.pi * hours / 24 + daily_phase)
            + weekly_amplitude * np.sin(2 * np.pi * hours / (24 * 7) + weekly_phase)
            + trend_per_hour * hours
            + 0.05 * rng.standard_normal((num_rows, num_channels)))
  columns = [f"x{i}" for i in range(num_channels - 1)] + [TARGET_COLUMN]
  dates = pd.date_range(SYNTHETIC_START, periods=num_rows, freq="h")
  return columns, values, dates


@DATASETS.register("synthetic", kind="forecasting")
def load_synthetic(*, seq_len: int, label_len: int, pred_len: int,
                   root: str | os.PathLike | None = None) -> ForecastingData:
  """The synthetic hourly set (no file; `root` is ignored), split 70/10/20 like custom CSVs."""
  del root  # generated, not read
  columns, values, dates = synthetic_series()
  train_rows, borders = custom_borders(len(values), seq_len)
  return build_forecasting(values, dates, columns=columns, freq="h", name="synthetic",
                           train_rows=train_rows, borders=borders, seq_len=seq_len,
                           label_len=label_len, pred_len=pred_len)


def load_forecasting(name: str, *, seq_len: int, label_len: int, pred_len: int,
                     root: str | os.PathLike | None = None) -> ForecastingData:
  """The forecasting data set registered as `name` (a ValueError for another kind of data)."""
  loader = DATASETS.get(name, kinds=("forecasting",))
  return loader(seq_len=seq_len, label_len=label_len, pred_len=pred_len, root=root)
