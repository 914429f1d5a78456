"""Tests of the long-term forecasting data pipeline against TSLib's protocol.

Real files are read from `data_dir()` (set PAPERZOO_DATA_DIR); the layouts whose files are not
shipped (ETTm, custom CSVs with OT elsewhere) are tested on small CSVs written here.
"""

from __future__ import annotations

import functools
import shutil

import numpy as np
import pandas as pd
import pytest

from paperzoo.data import files
from paperzoo.data.files import DataFileError, data_dir, data_file
from paperzoo.data.forecasting import (ForecastingData, load_custom_csv, load_ett,
                                       load_forecasting, time_features)
from paperzoo.registry import DATASETS, UnknownNameError

SEQ_LEN, LABEL_LEN = 96, 48
ETTH_TRAIN_STOP, ETTH_VAL_STOP, ETTH_TEST_STOP = 8640, 11520, 14400


@functools.lru_cache(maxsize=None)
def _etth1(pred_len: int) -> ForecastingData:
  return load_forecasting("etth1", seq_len=SEQ_LEN, label_len=LABEL_LEN, pred_len=pred_len)


@functools.lru_cache(maxsize=None)
def _etth1_raw() -> pd.DataFrame:
  return pd.read_csv(data_dir() / "ett" / "ETTh1.csv")


def _etth1_normalized() -> np.ndarray:
  """The whole ETTh1 series scaled by statistics of its first 8640 rows, computed here."""
  raw = _etth1_raw().drop(columns="date").to_numpy(np.float64)
  train = raw[:ETTH_TRAIN_STOP]
  return (raw - train.mean(0)) / train.std(0)


@pytest.mark.parametrize("pred_len,expected_test", [(96, 2785), (192, 2689), (336, 2545),
                                                    (720, 2161)])
def test_etth1_window_counts(pred_len, expected_test):
  data = _etth1(pred_len)
  assert len(data.test) == expected_test
  # Val and test both span 4 months plus seq_len rows of history.
  assert len(data.val) == expected_test
  assert len(data.train) == ETTH_TRAIN_STOP - SEQ_LEN - pred_len + 1
  assert data.borders == {"train": (0, ETTH_TRAIN_STOP),
                          "val": (ETTH_TRAIN_STOP - SEQ_LEN, ETTH_VAL_STOP),
                          "test": (ETTH_VAL_STOP - SEQ_LEN, ETTH_TEST_STOP)}
  assert (data.num_variates, data.num_time_features, data.freq) == (7, 4, "h")
  assert data.columns == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]


def test_scaler_fitted_on_train_rows_only():
  data = _etth1(96)
  raw = _etth1_raw().drop(columns="date").to_numpy(np.float64)
  np.testing.assert_allclose(data.mean, raw[:ETTH_TRAIN_STOP].mean(0), rtol=1e-12)
  np.testing.assert_allclose(data.std, raw[:ETTH_TRAIN_STOP].std(0), rtol=1e-12)
  assert not np.allclose(data.mean, raw[:ETTH_TEST_STOP].mean(0), rtol=1e-3)
  train = data.train.values.astype(np.float64)
  np.testing.assert_allclose(train.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(train.std(0), 1.0, atol=1e-5)
  # Rows after the train border are scaled with train statistics, so they are not standardized.
  for split in (data.val, data.test):
    own_rows = split.values[SEQ_LEN:].astype(np.float64)
    assert np.abs(own_rows.mean(0)).max() > 0.05 or np.abs(own_rows.std(0) - 1).max() > 0.05
  np.testing.assert_allclose(data.inverse_transform(data.train.values), raw[:ETTH_TRAIN_STOP],
                             rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("pred_len", [96, 720])
def test_windows_match_direct_slicing(pred_len):
  data = _etth1(pred_len)
  series = _etth1_normalized()

  def check(split, index, start):
    batch = split.get_batch(np.array([index]))
    assert {key: value.dtype for key, value in batch.items()} == dict.fromkeys(batch, np.float32)
    np.testing.assert_allclose(batch["x"][0], series[start:start + SEQ_LEN], atol=1e-5)
    np.testing.assert_allclose(batch["y"][0],
                               series[start + SEQ_LEN:start + SEQ_LEN + pred_len], atol=1e-5)
    np.testing.assert_allclose(batch["dec_x"][0, :LABEL_LEN],
                               series[start + SEQ_LEN - LABEL_LEN:start + SEQ_LEN], atol=1e-5)
    assert not batch["dec_x"][0, LABEL_LEN:].any()

  check(data.train, 0, 0)
  check(data.train, 1234, 1234)
  check(data.train, len(data.train) - 1, ETTH_TRAIN_STOP - SEQ_LEN - pred_len)
  # The first val window reads the last seq_len train rows and predicts the first val rows.
  check(data.val, 0, ETTH_TRAIN_STOP - SEQ_LEN)
  check(data.test, 0, ETTH_VAL_STOP - SEQ_LEN)
  # The last test window predicts up to the last used row.
  check(data.test, len(data.test) - 1, ETTH_TEST_STOP - SEQ_LEN - pred_len)


def test_batch_shapes_and_marks():
  data = _etth1(192)
  indices = np.array([0, 7, 2000, len(data.train) - 1])
  batch = data.train.get_batch(indices)
  assert batch["x"].shape == (4, SEQ_LEN, 7)
  assert batch["x_mark"].shape == (4, SEQ_LEN, 4)
  assert batch["y"].shape == (4, 192, 7)
  assert batch["dec_x"].shape == (4, LABEL_LEN + 192, 7)
  assert batch["dec_mark"].shape == (4, LABEL_LEN + 192, 4)
  dates = pd.to_datetime(_etth1_raw()["date"])
  marks = time_features(dates, "h")
  np.testing.assert_allclose(batch["x_mark"][2], marks[2000:2000 + SEQ_LEN], atol=1e-6)
  np.testing.assert_allclose(batch["dec_mark"][2],
                             marks[2000 + SEQ_LEN - LABEL_LEN:2000 + SEQ_LEN + 192], atol=1e-6)
  single = data.train[7]
  np.testing.assert_array_equal(single["x"], batch["x"][1])
  with pytest.raises(IndexError):
    data.train.get_batch(np.array([len(data.train)]))
  with pytest.raises(IndexError):
    data.train.get_batch(np.array([-1]))
  sizes = [len(b["x"]) for b in data.test.iter_batches(1000)]
  assert sum(sizes) == len(data.test)  # every test window, none dropped


def test_time_features_known_timestamp():
  # 2016-07-01 00:00 (ETTh1's first row) is a Friday, day 183 of a leap year.
  first = _etth1(96).train.get_batch(np.array([0]))["x_mark"][0, 0]
  np.testing.assert_allclose(first, [-0.5, 4 / 6 - 0.5, -0.5, 182 / 365 - 0.5], atol=1e-6)
  # 2021-03-14 15:26:53 is a Sunday (6), day 73, ISO week 10, March.
  stamp = pd.DatetimeIndex(["2021-03-14 15:26:53"])
  second, minute, hour = 53 / 59 - 0.5, 26 / 59 - 0.5, 15 / 23 - 0.5
  dow, dom, doy = 6 / 6 - 0.5, 13 / 30 - 0.5, 72 / 365 - 0.5
  expected = {"s": [second, minute, hour, dow, dom, doy], "t": [minute, hour, dow, dom, doy],
              "h": [hour, dow, dom, doy], "d": [dow, dom, doy], "w": [dom, 9 / 52 - 0.5],
              "m": [2 / 11 - 0.5]}
  for freq, values in expected.items():
    np.testing.assert_allclose(time_features(stamp, freq)[0], values, atol=1e-12, err_msg=freq)
  with pytest.raises(ValueError, match="frequency"):
    time_features(stamp, "q")


def test_exchange_custom_borders():
  data = load_forecasting("exchange", seq_len=SEQ_LEN, label_len=LABEL_LEN, pred_len=96)
  num_rows = 7588
  num_train, num_test = int(num_rows * 0.7), int(num_rows * 0.2)
  num_val = num_rows - num_train - num_test
  assert (num_train, num_val, num_test) == (5311, 760, 1517)
  assert data.borders == {"train": (0, num_train),
                          "val": (num_train - SEQ_LEN, num_train + num_val),
                          "test": (num_rows - num_test - SEQ_LEN, num_rows)}
  assert len(data.test) == 1422  # TSLib's log for exchange at 96 -> 96
  assert data.columns[-1] == "OT" and data.num_variates == 8
  assert (data.freq, data.num_time_features) == ("d", 3)


def _write_hourly_csv(path, num_rows, columns, freq="h", start="2020-01-01"):
  rng = np.random.default_rng(0)
  frame = pd.DataFrame({"date": pd.date_range(start, periods=num_rows, freq=freq)
                        .strftime("%Y-%m-%d %H:%M:%S")})
  for column in columns:
    frame[column] = rng.normal(size=num_rows).round(4)
  path.parent.mkdir(parents=True, exist_ok=True)
  frame.to_csv(path, index=False)
  return frame


def test_custom_csv_moves_target_last(tmp_path):
  path = tmp_path / "custom.csv"
  frame = _write_hourly_csv(path, 200, ["OT", "a", "b"])
  data = load_custom_csv(path, "h", seq_len=24, label_len=12, pred_len=8)
  assert data.columns == ["a", "b", "OT"]
  assert data.borders == {"train": (0, 140), "val": (116, 160), "test": (136, 200)}
  assert (len(data.train), len(data.val), len(data.test)) == (109, 13, 33)
  raw = frame[["a", "b", "OT"]].to_numpy(np.float64)
  expected = (raw - raw[:140].mean(0)) / raw[:140].std(0)
  np.testing.assert_allclose(data.test.values, expected[136:], atol=1e-5)
  y = data.val.get_batch(np.array([0]))["y"][0]
  np.testing.assert_allclose(y, expected[140:148], atol=1e-5)


def test_ettm_layout(tmp_path):
  path = tmp_path / "ETTm1.csv"
  num_rows = 4 * ETTH_TEST_STOP + 50  # rows after 20 months are unused
  _write_hourly_csv(path, num_rows, ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"],
                    freq="15min", start="2016-07-01")
  data = load_ett(path, "t", seq_len=SEQ_LEN, label_len=LABEL_LEN, pred_len=96)
  assert data.borders == {"train": (0, 4 * ETTH_TRAIN_STOP),
                          "val": (4 * ETTH_TRAIN_STOP - SEQ_LEN, 4 * ETTH_VAL_STOP),
                          "test": (4 * ETTH_VAL_STOP - SEQ_LEN, 4 * ETTH_TEST_STOP)}
  assert (data.freq, data.num_time_features, data.num_variates) == ("t", 5, 7)
  assert len(data.test) == 4 * 2880 - 96 + 1
  marks = data.train.get_batch(np.array([0]))["x_mark"][0]
  np.testing.assert_allclose(marks[3, 0], 45 / 59 - 0.5, atol=1e-6)  # 00:45
  np.testing.assert_allclose(marks[4, :2], [-0.5, 1 / 23 - 0.5], atol=1e-6)  # 01:00
  # A file shorter than the 20 months the borders need fails instead of shrinking the test set.
  short = tmp_path / "short.csv"
  pd.read_csv(path, nrows=1000).to_csv(short, index=False)
  with pytest.raises(ValueError, match="short.csv.*at least 57600 rows"):
    load_ett(short, "t", seq_len=SEQ_LEN, label_len=LABEL_LEN, pred_len=96)


def test_csv_errors_name_the_file(tmp_path):
  no_date = tmp_path / "no_date.csv"
  pd.DataFrame({"time": ["2020-01-01"], "OT": [1.0]}).to_csv(no_date, index=False)
  with pytest.raises(ValueError, match="no_date.csv.*'date'"):
    load_custom_csv(no_date, "h", seq_len=4, label_len=2, pred_len=2)
  bad = tmp_path / "bad.csv"
  frame = _write_hourly_csv(bad, 50, ["a", "OT"])
  frame["a"] = frame["a"].astype(str)
  frame.loc[10, "a"] = "oops"
  frame.to_csv(bad, index=False)
  with pytest.raises(ValueError, match="bad.csv.*'a'.*non-numeric.*oops"):
    load_custom_csv(bad, "h", seq_len=4, label_len=2, pred_len=2)
  # Illness has 966 weekly rows: its val split (193 rows) cannot hold 96 + 192.
  with pytest.raises(ValueError, match="illness.*no windows in the val split.*193 rows"):
    load_forecasting("illness", seq_len=96, label_len=48, pred_len=192)


def test_missing_file_message(tmp_path):
  with pytest.raises(DataFileError) as error:
    data_file("ett/ETTm1.csv", root=tmp_path)
  message = str(error.value)
  assert str(tmp_path / "ett" / "ETTm1.csv") in message
  assert "PAPERZOO_DATA_DIR" in message and "zhouhaoyi/ETDataset" in message
  assert isinstance(error.value, FileNotFoundError)
  with pytest.raises(DataFileError, match="Time-Series-Library") as error:
    load_forecasting("weather", seq_len=96, label_len=48, pred_len=96, root=tmp_path)
  assert str(tmp_path / "weather" / "weather.csv") in str(error.value)


def test_corrupt_file_fails_checksum(tmp_path):
  source = data_file("ett/ETTh1.csv")
  content = bytearray(source.read_bytes())
  # Change one digit of the first data row, so the copy is still a valid CSV.
  position = content.index(b"5.827")
  content[position] = ord("6")
  copy = tmp_path / "ett" / "ETTh1.csv"
  copy.parent.mkdir()
  copy.write_bytes(bytes(content))
  with pytest.raises(DataFileError, match="sha256") as error:
    load_forecasting("etth1", seq_len=96, label_len=48, pred_len=96, root=tmp_path)
  message = str(error.value)
  assert files.KNOWN_SHA256["ett/ETTh1.csv"] in message
  assert files.file_sha256(copy) in message and "corrupt or modified" in message
  assert data_file("ett/ETTh1.csv", root=tmp_path, verify=False) == copy
  shutil.copyfile(source, copy)  # restored: accepted again
  assert data_file("ett/ETTh1.csv", root=tmp_path) == copy


def test_checksum_verified_once_per_process(tmp_path, monkeypatch):
  copy = tmp_path / "illness" / "national_illness.csv"
  copy.parent.mkdir()
  shutil.copyfile(data_file("illness/national_illness.csv"), copy)
  calls = []
  real_sha256 = files.file_sha256
  monkeypatch.setattr(files, "file_sha256", lambda path: calls.append(path) or real_sha256(path))
  for _ in range(3):
    data_file("illness/national_illness.csv", root=tmp_path)
  assert len(calls) == 1


def test_data_dir_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv("PAPERZOO_DATA_DIR", str(tmp_path))
  assert data_dir() == tmp_path
  monkeypatch.delenv("PAPERZOO_DATA_DIR")
  assert data_dir() == files.repo_root().parent / "shared" / "data"
  assert (files.repo_root() / "paperzoo").is_dir()


def test_unknown_name_lists_valid_names():
  with pytest.raises(UnknownNameError) as error:
    load_forecasting("etth3", seq_len=96, label_len=48, pred_len=96)
  for name in ("etth1", "ettm2", "exchange", "illness", "weather", "electricity", "traffic",
               "synthetic"):
    assert name in str(error.value)
    assert name in DATASETS


def test_synthetic_is_deterministic():
  first = load_forecasting("synthetic", seq_len=96, label_len=48, pred_len=96)
  second = DATASETS.get("synthetic")(seq_len=96, label_len=48, pred_len=96)
  assert (first.num_variates, first.num_time_features, first.freq) == (7, 4, "h")
  num_rows = first.borders["test"][1]
  assert first.borders["train"] == (0, int(0.7 * num_rows))
  for split in ("train", "val", "test"):
    np.testing.assert_array_equal(first.split(split).values, second.split(split).values)
    np.testing.assert_array_equal(first.split(split).marks, second.split(split).marks)
  np.testing.assert_array_equal(first.mean, second.mean)
  np.testing.assert_allclose(first.train.values.mean(0), 0.0, atol=1e-5)
  assert len(first.test) > 0
