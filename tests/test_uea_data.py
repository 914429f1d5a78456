"""The UEA `.ts` reader, the validation split carved from TRAIN, and train-only normalization."""

from __future__ import annotations

import collections
import pathlib
import re
import shutil

import numpy as np
import pytest

from paperzoo.data import uea
from paperzoo.data.classification import stratified_split
from paperzoo.data.files import DataFileError, data_file


def _path(name: str, split: str) -> pathlib.Path:
  return data_file(f"uea/{name}/{name}_{split}.ts")


def _write_set(root: pathlib.Path, name: str, train: str, test: str) -> pathlib.Path:
  folder = root / "uea" / name
  folder.mkdir(parents=True, exist_ok=True)
  (folder / f"{name}_TRAIN.ts").write_text(train)
  (folder / f"{name}_TEST.ts").write_text(test)
  return folder


# (train count, test count, channels, shortest, longest, classes), read from the files; these are
# the archive's published sizes.
_FACTS = {
    "AtrialFibrillation": (15, 15, 2, 640, 640, 3),
    "BasicMotions": (40, 40, 6, 100, 100, 4),
    "Handwriting": (150, 850, 3, 152, 152, 26),
    "JapaneseVowels": (270, 370, 12, 7, 29, 9),
}


@pytest.fixture(scope="module")
def japanese_vowels():
  return uea.load_uea("JapaneseVowels")


@pytest.mark.parametrize("name", uea.UEA_DATASETS)
def test_the_real_files_have_the_archive_sizes(name):
  n_train, n_test, channels, shortest, longest, classes = _FACTS[name]
  train, test = uea.read_ts(_path(name, "TRAIN")), uea.read_ts(_path(name, "TEST"))
  assert (len(train.series), len(test.series)) == (n_train, n_test)
  assert len(train.labels) == n_train and len(test.labels) == n_test
  assert train.num_channels == test.num_channels == channels
  lengths = np.concatenate([train.lengths, test.lengths])
  assert (lengths.min(), lengths.max()) == (shortest, longest)
  assert len(train.class_names) == classes and train.class_names == test.class_names
  assert set(train.labels) == set(test.labels) == set(train.class_names)
  assert all(s.dtype == np.float32 and s.shape[1] == channels for s in train.series)
  assert not any(np.isnan(s).any() for s in train.series + test.series)  # none are missing

  data = uea.load_uea(name)
  assert len(data.train) + len(data.val) == n_train and len(data.test) == n_test
  assert (data.num_channels, data.max_len, data.num_classes) == (channels, longest, classes)
  for split in (data.train, data.val, data.test):
    assert split.inputs.shape == (len(split), longest, channels)
    assert split.inputs.dtype == np.float32 and split.labels.dtype == np.int32
    assert split.padding_mask.shape == (len(split), longest)
    assert split.padding_mask.dtype == np.bool_
    assert np.isfinite(split.inputs).all()


def test_class_names_follow_the_header_order():
  basic = uea.read_ts(_path("BasicMotions", "TRAIN"))
  assert basic.class_names == ("Standing", "Running", "Walking", "Badminton")
  assert collections.Counter(basic.labels) == {c: 10 for c in basic.class_names}
  assert basic.header["problemname"] == "BasicMotions"
  assert basic.header["dimensions"] == 6 and basic.header["equallength"] is True
  data = uea.load_uea("BasicMotions")
  assert data.class_names == basic.class_names
  first = data.test.get_batch(np.array([0]))["label"][0]
  assert data.class_names[first] == uea.read_ts(_path("BasicMotions", "TEST")).labels[0]


def test_validation_is_stratified_disjoint_and_covers_train():
  data = uea.load_uea("BasicMotions", seed=0)
  assert data.train.source == data.val.source == "TRAIN" and data.test.source == "TEST"
  assert not set(data.train.rows) & set(data.val.rows)
  assert sorted([*data.train.rows, *data.val.rows]) == list(range(40))
  assert np.bincount(data.val.labels).tolist() == [2, 2, 2, 2]  # round(0.2 * 10) per class
  # AtrialFibrillation: 5 per class -> 1 each, leaving the 12 training series the config expects.
  atrial = uea.load_uea("AtrialFibrillation")
  assert (len(atrial.train), len(atrial.val)) == (12, 3)
  assert np.bincount(atrial.val.labels).tolist() == [1, 1, 1]


def test_validation_split_is_deterministic_in_the_seed():
  labels = np.repeat(np.arange(5), [2, 3, 10, 1, 24])
  a = stratified_split(labels, 0.2, seed=3)
  b = stratified_split(labels, 0.2, seed=3)
  c = stratified_split(labels, 0.2, seed=4)
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])
  # Per class: max(1, round(0.2 n)) when n >= 2 (2 -> 1, 3 -> 1, 10 -> 2, 24 -> 5); 1 -> 0.
  assert np.bincount(labels[a[1]], minlength=5).tolist() == [1, 1, 2, 0, 5]
  assert 3 in labels[a[0]]  # the single example of class 3 trains
  with pytest.raises(ValueError, match="val_fraction"):
    stratified_split(labels, 0.0, seed=0)


def test_validation_never_holds_test_series():
  data = uea.load_uea("BasicMotions", seed=1)
  train_file = uea.read_ts(_path("BasicMotions", "TRAIN"))
  stats = data.stats
  for i, row in enumerate(data.val.rows):
    expected = (train_file.series[row] - stats.mean) / stats.std
    np.testing.assert_allclose(data.val.inputs[i], expected, rtol=1e-5, atol=1e-5)
  flat_val = data.val.inputs.reshape(len(data.val), -1)
  flat_test = data.test.inputs.reshape(len(data.test), -1)
  assert not (flat_val[:, None, :] == flat_test[None, :, :]).all(-1).any()
  assert len(uea.load_uea("BasicMotions", seed=2).val.rows) == 8
  assert not np.array_equal(uea.load_uea("BasicMotions", seed=2).val.rows, data.val.rows)


def test_stats_come_from_the_training_part_only():
  data = uea.load_uea("Handwriting", seed=0)
  train_file = uea.read_ts(_path("Handwriting", "TRAIN"))
  values = np.concatenate([train_file.series[r] for r in data.train.rows]).astype(np.float64)
  np.testing.assert_allclose(data.stats.mean, values.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(data.stats.std, values.std(0), rtol=1e-5)
  observed = data.train.inputs[data.train.padding_mask]
  np.testing.assert_allclose(observed.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(observed.std(0), 1.0, atol=1e-4)
  # The validation rows are not in the statistics: all of TRAIN gives different ones.
  all_train = np.concatenate(train_file.series).astype(np.float64)
  assert not np.allclose(data.stats.mean, all_train.mean(0), rtol=1e-6, atol=0)


def test_changing_test_values_leaves_the_stats_alone(tmp_path):
  # A copy under a made-up name (a renamed set is not checked against the real files' sha256).
  train = _path("BasicMotions", "TRAIN").read_text()
  test_lines = _path("BasicMotions", "TEST").read_text().splitlines(keepends=True)
  start = next(i for i, line in enumerate(test_lines) if line.lower().startswith("@data")) + 1
  scaled = []
  for line in test_lines[start:]:
    *dims, label = line.rstrip("\n").split(":")
    dims = [",".join(str(float(v) * 1000 + 7) for v in d.split(",")) for d in dims]
    scaled.append(":".join(dims + [label]) + "\n")
  _write_set(tmp_path, "Motions", train, "".join(test_lines[:start] + scaled))
  original = uea.load_uea("BasicMotions")
  changed = uea.load_uea("Motions", root=tmp_path)
  np.testing.assert_array_equal(changed.stats.mean, original.stats.mean)
  np.testing.assert_array_equal(changed.stats.std, original.stats.std)
  np.testing.assert_array_equal(changed.train.inputs, original.train.inputs)
  np.testing.assert_array_equal(changed.val.inputs, original.val.inputs)
  assert not np.allclose(changed.test.inputs, original.test.inputs)


def test_padding_mask_equals_the_series_lengths(japanese_vowels):
  data = japanese_vowels
  test_file = uea.read_ts(_path("JapaneseVowels", "TEST"))
  assert data.max_len == 29
  np.testing.assert_array_equal(data.test.lengths, test_file.lengths)
  for split in (data.train, data.val, data.test):
    np.testing.assert_array_equal(split.padding_mask.sum(1), split.lengths)
    assert split.padding_mask[:, 0].all()  # the real steps come first
    np.testing.assert_array_equal(split.padding_mask,
                                  np.arange(29)[None] < split.lengths[:, None])
    assert (split.inputs[~split.padding_mask] == 0).all()  # padded after normalizing
  assert data.train.lengths.min() == 7 and data.test.lengths.max() == 29


def test_get_batch_is_the_trainers_contract(japanese_vowels):
  batch = japanese_vowels.train.get_batch(np.array([3, 0, 5]))
  assert set(batch) == {"inputs", "padding_mask", "label"}
  assert batch["inputs"].shape == (3, 29, 12) and batch["inputs"].dtype == np.float32
  assert batch["padding_mask"].shape == (3, 29) and batch["label"].dtype == np.int32
  np.testing.assert_array_equal(batch["label"], japanese_vowels.train.labels[[3, 0, 5]])


_SMALL_TRAIN = """\
# a hand-written file: comments, mixed-case keywords, '?' and NaN, variable lengths
@problemName Tiny
@timeStamps false
@missing true
@univariate false
@dimensions 2
@equalLength false
@classLabel true up down
@data
1,2,3:10,?,30:up

2,?,4,6:20,40,NaN,80:down
  5,5:50,50:up
7:?:down
3,1:30,10:down
"""
_SMALL_TEST = """\
@problemName Tiny
@dimensions 2
@classLabel true up down
@data
0,0,0,0,0:1,2,3,4,5:up
?,9:9,9:down
"""


def test_a_hand_written_file_with_missing_values_and_variable_lengths(tmp_path):
  folder = _write_set(tmp_path, "Tiny", _SMALL_TRAIN, _SMALL_TEST)
  parsed = uea.read_ts(folder / "Tiny_TRAIN.ts")
  assert parsed.class_names == ("up", "down")
  assert parsed.labels == ["up", "down", "up", "down", "down"]
  assert parsed.header["missing"] is True and parsed.header["equallength"] is False
  assert parsed.lengths.tolist() == [3, 4, 2, 1, 2]
  nan = np.nan
  np.testing.assert_array_equal(parsed.series[0], [[1, 10], [2, nan], [3, 30]])
  np.testing.assert_array_equal(parsed.series[1], [[2, 20], [nan, 40], [4, nan], [6, 80]])
  np.testing.assert_array_equal(parsed.series[3], [[7, nan]])

  # All of TRAIN trains (legacy), so the stats are over every observed TRAIN value.
  data = uea.load_uea("Tiny", root=tmp_path, legacy_test_selection=True)
  channel0 = np.array([1, 2, 3, 2, 4, 6, 5, 5, 7, 3, 1], np.float64)
  channel1 = np.array([10, 30, 20, 40, 80, 50, 50, 30, 10], np.float64)
  np.testing.assert_allclose(data.stats.mean, [channel0.mean(), channel1.mean()], rtol=1e-6)
  np.testing.assert_allclose(data.stats.std, [channel0.std(), channel1.std()], rtol=1e-6)
  assert data.max_len == 5 and data.num_channels == 2 and data.num_classes == 2
  # Missing values are 0 (the training mean) and stay inside the padding mask.
  second = data.train.inputs[1]
  assert second[1, 0] == 0 and second[2, 1] == 0
  assert data.train.padding_mask[1].tolist() == [True, True, True, True, False]
  np.testing.assert_allclose(second[0], ([2, 20] - data.stats.mean) / data.stats.std,
                             rtol=1e-6)
  np.testing.assert_array_equal(data.test.lengths, [5, 2])
  assert data.test.inputs[1, 0, 0] == 0 and data.test.labels.tolist() == [0, 1]

  # The validation protocol: one of each class (both have >= 2), three training series left.
  split = uea.load_uea("Tiny", root=tmp_path, val_fraction=0.2)
  assert sorted(split.val.labels.tolist()) == [0, 1] and len(split.train) == 3
  values = np.concatenate([parsed.series[r] for r in split.train.rows])
  np.testing.assert_allclose(split.stats.mean, np.nanmean(values, 0), rtol=1e-6)


def test_a_constant_channel_is_only_centred(tmp_path):
  # Tab-separated header keywords parse too.
  train = "@dimensions\t2\n@classLabel\ttrue a b\n@data\n" + "".join(
      f"1,1,1:{i},{i + 1},{i + 2}:{'ab'[i % 2]}\n" for i in range(6))
  test = train.replace("1,1,1:0,", "1,1,4:0,")  # one test value off the constant
  _write_set(tmp_path, "Flat", train, test)
  data = uea.load_uea("Flat", root=tmp_path)
  assert data.stats.std[0] == 1.0
  assert (data.train.inputs[..., 0] == 0).all() and np.isfinite(data.test.inputs).all()
  assert data.test.inputs[..., 0].max() == pytest.approx(3.0)  # 4 - 1, not 3 / 1e-8


@pytest.mark.parametrize("body, message", [
    ("@classLabel true a b\n@data\n1,2:3,4:a\n1,2:b\n", "line 5: 1 dimensions, expected 2"),
    ("@dimensions 3\n@classLabel true a b\n@data\n1,2:3,4:a\n", "line 5: 2 dimensions, expected 3"),
    ("@classLabel true a b\n@data\n1,2:3,4:a\n\n1,2:3,4:c\n", "line 6: label 'c' is not one"),
    ("@classLabel true a b\n1,2:3,4:a\n", "line 3: a data line before the @data header"),
    ("@classLabel true a b\n", "no @data line"),
    ("@classLabel true a b\n@data\n1,x:3,4:a\n", "line 4: dimension 0, value 1: 'x'"),
    ("@classLabel true a b\n@data\n1,2::a\n", "line 4: dimension 1 is empty"),
    ("@timeStamps true\n@classLabel true a b\n@data\n(0,1),(1,2):a\n", "line 4: @timeStamps"),
    ("@classLabel true a b\n@data\n(0,1),(1,2):a\n", "line 4: timestamped"),
    ("@classLabel false\n@data\n1,2:3\n", "line 2: expected '@classLabel true"),
    ("@equalLength true\n@seriesLength 3\n@classLabel true a\n@data\n1,2:a\n",
     "line 6: series length 2"),
    ("@classLabel true a b\n@data\n1,inf:3,4:a\n", "infinite value"),
])
def test_malformed_files_name_the_file_and_line(tmp_path, body, message):
  path = tmp_path / "Bad_TRAIN.ts"
  path.write_text("# comment\n" + body)  # so the body starts at line 2
  with pytest.raises(ValueError, match=re.escape(message)) as error:
    uea.read_ts(path)
  assert str(path) in str(error.value)


def test_legacy_selection_validates_on_test(japanese_vowels):
  legacy = uea.load_uea("JapaneseVowels", legacy_test_selection=True)
  assert legacy.val is legacy.test and legacy.selection == "test (legacy)"
  assert len(legacy.train) == 270 and legacy.train.rows.tolist() == list(range(270))
  assert len(legacy.test) == len(japanese_vowels.test) == 370
  assert japanese_vowels.selection == "validation"
  # Its statistics are fitted on all of TRAIN, so they differ from the validation protocol's.
  assert not np.allclose(legacy.stats.mean, japanese_vowels.stats.mean, rtol=1e-6, atol=0)


def test_an_unknown_name_lists_the_projects_sets(tmp_path):
  with pytest.raises(DataFileError, match="AtrialFibrillation, BasicMotions, Handwriting, "
                     "JapaneseVowels") as error:
    uea.load_uea("NoSuchSet", root=tmp_path)
  assert str(tmp_path / "uea" / "NoSuchSet" / "NoSuchSet_TRAIN.ts") in str(error.value)
  with pytest.raises(ValueError, match="bad UEA data set name"):
    uea.load_uea("../ett")


def test_another_archive_set_loads_from_its_folder(tmp_path):
  # A copy of a real set under a name the project does not list still loads.
  folder = tmp_path / "uea" / "Atrial"
  folder.mkdir(parents=True)
  for split in ("TRAIN", "TEST"):
    shutil.copy(_path("AtrialFibrillation", split), folder / f"Atrial_{split}.ts")
  data = uea.load_uea("Atrial", root=tmp_path)
  assert (len(data.train), len(data.val), len(data.test), data.max_len) == (12, 3, 15, 640)
