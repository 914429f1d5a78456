"""Tests of the LRA generators: ListOps against an independent evaluator and LRA's definition,
Pathfinder against the geometry it was drawn from; determinism and the on-disk cache of both."""

from __future__ import annotations

import functools
import random

import chex
import numpy as np
import pytest

from paperzoo.data.lra import listops, pathfinder


# --------------------------------------------------------------------------------------------
# ListOps.
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _listops(num_samples: int, min_len: int, max_len: int, seed: int):
  return listops.generate(num_samples, min_len=min_len, max_len=max_len, seed=seed)


def _structure(expression: str) -> tuple[int, list[int]]:
  """Tree depth (levels, root = 1, leaves counted) and every operator's arity."""
  depth, deepest, arities, open_counts = 0, 0, [], []
  for token in expression.split():
    if token.startswith("["):
      if open_counts:
        open_counts[-1] += 1
      open_counts.append(0)
      depth += 1
      deepest = max(deepest, depth)
    elif token == "]":
      arities.append(open_counts.pop())
      depth -= 1
    else:
      open_counts[-1] += 1
      deepest = max(deepest, depth + 1)  # A leaf is one level below its operator.
  assert depth == 0 and not open_counts, expression
  return deepest, arities


def test_listops_deterministic_in_seed():
  expressions, labels = _listops(200, 10, 80, 0)
  again = listops.generate(200, min_len=10, max_len=80, seed=0)
  assert again[0] == expressions and np.array_equal(again[1], labels)
  other = _listops(200, 10, 80, 1)
  assert other[0] != expressions
  # A fixed batch size makes fewer samples a prefix of more.
  prefix = listops.generate(50, min_len=10, max_len=80, seed=0)
  assert prefix[0] == expressions[:50] and np.array_equal(prefix[1], labels[:50])


@pytest.mark.parametrize("min_len,max_len", [(10, 80), (100, 300)])
def test_listops_lengths_labels_and_structure(min_len, max_len):
  expressions, labels = _listops(300, min_len, max_len, 2)
  assert len(expressions) == 300 and labels.dtype == np.int32 and labels.shape == (300,)
  for expression, label in zip(expressions, labels):
    tokens = expression.split()
    assert min_len <= len(tokens) <= max_len
    assert set(tokens) <= set(listops.VOCAB[1:])
    assert expression == " ".join(tokens)  # Single spaces, no stray whitespace.
    assert tokens[0] in listops.OPERATORS
    assert listops.evaluate(expression) == label
    depth, arities = _structure(expression)
    assert depth <= listops.MAX_DEPTH
    assert min(arities) >= 2 and max(arities) <= 10
  assert set(labels.tolist()) == set(range(10))


def test_listops_depth_limit_binds_at_lra_lengths():
  expressions, labels = _listops(40, 500, 2000, 3)
  depths = [_structure(e)[0] for e in expressions]
  # Trees of 500+ tokens reach the limit, so this checks the limit rather than missing it.
  assert max(depths) == listops.MAX_DEPTH
  assert all(len(e.split()) in range(500, 2001) for e in expressions)
  assert [listops.evaluate(e) for e in expressions] == labels.tolist()


def _lra_reference(num_samples: int, min_len: int, max_len: int, seed: int) -> list[list[str]]:
  """LRA's recursive generator, written out plainly (Python's `random`), lengths filtered.

  A tree is abandoned once it has more than max_len tokens: it would be rejected anyway, and
  the distribution's heavy tail (trees of tens of thousands of tokens) would dominate the time.
  """
  rand = random.Random(seed)

  class TooLong(Exception):
    pass

  def tree(depth: int, out: list[str]) -> None:
    if len(out) > max_len:
      raise TooLong
    if depth < 10 and rand.random() < 0.25:
      out.append(rand.choice(listops.OPERATORS))
      for _ in range(rand.randint(2, 10)):
        tree(depth + 1, out)
      out.append("]")
    else:
      out.append(str(rand.randint(0, 9)))

  kept = []
  while len(kept) < num_samples:
    tokens = []
    try:
      tree(1, tokens)
    except TooLong:
      continue
    if min_len <= len(tokens) <= max_len:
      kept.append(tokens)
  return kept


def test_listops_matches_lra_distribution():
  """The batched sampler draws from LRA's distribution: compare summary statistics with the
  plain recursive generator (fixed seeds; tolerances about 4 standard errors)."""
  reference = _lra_reference(2000, 10, 60, 0)
  expressions, labels = _listops(2000, 10, 60, 4)
  ours = [e.split() for e in expressions]

  def summary(trees):
    lengths = np.array([len(t) for t in trees])
    operators = np.array([sum(tok.startswith("[") for tok in t) for t in trees])
    return lengths.mean(), (operators / lengths).mean()

  (ref_len, ref_ops), (our_len, our_ops) = summary(reference), summary(ours)
  assert abs(ref_len - our_len) < 1.5, (ref_len, our_len)
  assert abs(ref_ops - our_ops) < 0.01, (ref_ops, our_ops)
  ref_labels = np.bincount([listops.evaluate(" ".join(t)) for t in reference], minlength=10)
  our_labels = np.bincount(labels, minlength=10)
  assert np.abs(ref_labels - our_labels).max() / 2000 < 0.04


@pytest.mark.parametrize("expression,value", [
    ("[MAX 4 3 [MIN 2 3 ] 1 0 ]", 4),
    ("[MED 1 2 3 4 ]", 2),  # Mean of the two middle values, rounded down.
    ("[MED 0 9 ]", 4),
    ("[MED 3 1 2 ]", 2),
    ("[MED 9 9 1 1 5 ]", 5),
    ("[SM 9 8 7 ]", 4),
    ("[SM [MED 1 2 3 4 ] 9 ]", 1),
    ("[MIN 5 [MAX 1 7 ] 6 ]", 5),
    ("7", 7),
])
def test_listops_evaluate(expression, value):
  assert listops.evaluate(expression) == value


@pytest.mark.parametrize("expression", ["[MAX 1 2", "[MAX 1 ] ]", "[FOO 1 ]", "[MAX ]", "",
                                        "[SM 1 2 ] 3"])
def test_listops_evaluate_rejects_malformed(expression):
  with pytest.raises(ValueError):
    listops.evaluate(expression)


def test_listops_vocab_and_tokenize_round_trip():
  assert listops.VOCAB[0] == listops.PAD and len(listops.VOCAB) == 16
  assert listops.VOCAB[1:11] == tuple(str(d) for d in range(10))
  assert listops.VOCAB[11:] == ("[MIN", "[MAX", "[MED", "[SM", "]")
  expressions, _ = _listops(200, 10, 80, 0)
  ids = listops.tokenize(expressions, 96)
  assert ids.dtype == np.int32 and ids.shape == (200, 96)
  for expression, row in zip(expressions, ids):
    length = len(expression.split())
    assert " ".join(listops.VOCAB[i] for i in row[:length]) == expression
    assert (row[:length] > 0).all() and (row[length:] == 0).all()


def test_listops_tokenize_errors():
  with pytest.raises(ValueError, match="max_len=3"):
    listops.tokenize(["[SM 1 2 ]"], 3)
  with pytest.raises(ValueError, match="unknown token '\\[FIRST'"):
    listops.tokenize(["[FIRST 1 2 ]"], 8)
  with pytest.raises(ValueError, match="unknown token"):
    listops.tokenize([f"[SM 1 {listops.PAD} ]"], 8)


def test_listops_generate_validates_arguments():
  with pytest.raises(ValueError, match="min_len"):
    listops.generate(1, min_len=50, max_len=40, seed=0)
  with pytest.raises(ValueError, match="4 tokens"):
    listops.generate(1, min_len=1, max_len=3, seed=0)


def test_listops_load_caches_splits(tmp_path, monkeypatch):
  monkeypatch.setenv("PAPERZOO_CACHE_DIR", str(tmp_path))
  splits = listops.load(60, 20, 0, min_len=10, max_len=50, seed=5)
  assert {name: len(split[0]) for name, split in splits.items()} == {
      "train": 60, "val": 20, "test": 0}
  cached = list((tmp_path / "lra" / "listops").glob("*.npz"))
  assert [p.name for p in cached] == ["listops_v1_train60_val20_test0_len10-50_seed5.npz"]
  # The splits come from different seeds: they differ.
  assert splits["train"][0][:20] != splits["val"][0]
  expected = listops.generate(20, min_len=10, max_len=50, seed=listops.split_seed(5, "val"))
  assert splits["val"][0] == expected[0]

  def fail(*args, **kwargs):
    raise AssertionError("generate called although the cache holds the splits")

  monkeypatch.setattr(listops, "generate", fail)
  again = listops.load(60, 20, 0, min_len=10, max_len=50, seed=5)
  for name in listops.SPLITS:
    assert again[name][0] == splits[name][0]
    assert again[name][1].dtype == np.int32
    np.testing.assert_array_equal(again[name][1], splits[name][1])
  with pytest.raises(AssertionError, match="generate called"):
    listops.load(60, 20, 0, min_len=10, max_len=50, seed=6)  # Another seed: another file.


# --------------------------------------------------------------------------------------------
# Pathfinder.
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _pathfinder(num_samples: int, seed: int):
  return pathfinder._generate_with_paths(num_samples, seed=seed)  # pylint: disable=protected-access


def _flood(ink: np.ndarray, start: np.ndarray) -> np.ndarray:
  """Pixels of `ink` [N, H, W] 4-connected to `start` (bool, same shape) within `ink`."""
  reached = start & ink
  while True:
    grown = reached.copy()
    grown[:, 1:] |= reached[:, :-1]
    grown[:, :-1] |= reached[:, 1:]
    grown[:, :, 1:] |= reached[:, :, :-1]
    grown[:, :, :-1] |= reached[:, :, 1:]
    grown &= ink
    if np.array_equal(grown, reached):
      return reached
    reached = grown


def _marker_pixels(markers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Image index, row and column of each marker centre's pixel, [N, 2] each."""
  pixels = np.rint(markers).astype(np.int64)
  rows = np.arange(len(markers))[:, None].repeat(2, 1)
  return rows, pixels[..., 1], pixels[..., 0]


def test_pathfinder_shapes_determinism_balance():
  images, labels, _ = _pathfinder(200, 0)
  assert images.shape == (200, 32, 32) and images.dtype == np.uint8
  assert labels.shape == (200,) and labels.dtype == np.int32
  assert labels.sum() == 100 and set(labels.tolist()) == {0, 1}
  again = pathfinder.generate(200, seed=0)
  np.testing.assert_array_equal(again[0], images)
  np.testing.assert_array_equal(again[1], labels)
  other = pathfinder.generate(200, seed=1)
  assert not np.array_equal(other[0], images)
  # Nonblank, and not filled: paths are thin lines.
  ink = (images > 0).mean(axis=(1, 2))
  assert ink.min() > 0.05 and ink.max() < 0.5
  assert (images.max(axis=(1, 2)) == 255).all()
  odd_images, odd_labels = pathfinder.generate(7, seed=3)
  assert odd_images.shape == (7, 32, 32) and odd_labels.sum() == 3


def test_pathfinder_markers_on_the_labelled_paths():
  images, labels, paths = _pathfinder(200, 0)
  points, markers, on_path = paths["points"], paths["markers"], paths["marker_path"]
  ends = points[:, :2, [0, -1]]  # [N, 2 main paths, 2 ends, 2]
  for i in range(len(labels)):
    if labels[i] == 1:
      assert on_path[i].tolist() == [0, 0]
      # Both ends of A, one marker each.
      assert np.allclose(np.sort(markers[i], axis=0), np.sort(ends[i, 0], axis=0))
    else:
      assert on_path[i].tolist() == [0, 1]
      for marker, path in zip(markers[i], (0, 1)):
        assert np.isclose(ends[i, path], marker).all(-1).any()
  # The marker is drawn (full intensity at its centre) and lies on its path's ink, not on the
  # other main path's.
  image, row, col = _marker_pixels(markers)
  assert (images[image, row, col] == 255).all()
  ink = paths["main_ink"]
  assert (ink[image, on_path, row, col] > 0).all()
  assert (ink[image, 1 - on_path, row, col] == 0).all()


def test_pathfinder_paths_stay_inside_and_keep_apart():
  images, _, paths = _pathfinder(200, 0)
  geometry = pathfinder._Geometry.at(32)  # pylint: disable=protected-access
  points = paths["points"]
  assert points.shape == (200, 4, 15, 2)
  assert points.min() >= geometry.border - 1e-4 and points.max() <= 31 - geometry.border + 1e-4
  steps = np.linalg.norm(np.diff(points, axis=2), axis=-1)
  np.testing.assert_allclose(steps, geometry.segment_length, rtol=1e-4)
  # Angle continuity: consecutive segments turn by at most the maximum turn.
  direction = np.diff(points, axis=2)
  heading = np.arctan2(direction[..., 1], direction[..., 0])
  turn = np.angle(np.exp(1j * np.diff(heading, axis=-1)))
  assert np.abs(turn).max() <= geometry.max_turn + 1e-4
  # A and B share at most the tolerated number of inked pixels (crossings, not runs).
  ink = paths["main_ink"] > 0
  assert (ink[:, 0] & ink[:, 1]).sum(axis=(1, 2)).max() <= geometry.touch_tolerance
  # No ink of any path but a marker's own near a marker.
  coverage = pathfinder._render_paths(  # pylint: disable=protected-access
      points.reshape(-1, 15, 2), geometry).reshape(200, 4, 32, 32)
  all_ink = coverage > 0
  y, x = np.mgrid[:32, :32]
  for i in range(200):
    for marker, own in zip(paths["markers"][i], paths["marker_path"][i]):
      near = np.hypot(x - marker[0], y - marker[1]) <= geometry.clearance_radius
      others = np.delete(all_ink[i], own, axis=0)
      assert not (others & near).any()
  # The picture is the maximum of its parts: every path's ink is in it.
  # (Re-rendered from float32 vertices: equal up to rounding.)
  assert (images.astype(np.int64) >= np.round(coverage.max(1) * 255) - 1).all()
  np.testing.assert_allclose(coverage[:, :2], paths["main_ink"], atol=1e-4)


def test_pathfinder_connectivity():
  """Flood fill from the first marker over inked pixels (4-neighbours).

  Required: 100% of positives reach the other marker, both through A's own ink and through the
  whole image (a path is one contiguous band of ink; crossings only add connections). Negatives
  never connect through A's ink alone; through the whole image they usually do (~99%), because
  A and B may cross (~80% of negatives) and distractors bridge them. That is by design, as in
  Pathfinder: the label is decided by following a contour through crossings, not by
  connectivity, so nothing is required of that fraction beyond being reported here.
  """
  images, labels, paths = _pathfinder(400, 1)
  image, row, col = _marker_pixels(paths["markers"])
  start = np.zeros(images.shape, bool)
  start[image[:, 0], row[:, 0], col[:, 0]] = True

  def connected(ink):
    return _flood(ink, start)[image[:, 1], row[:, 1], col[:, 1]]

  own = connected(paths["main_ink"][:, 0] > 0)
  assert own[labels == 1].all() and not own[labels == 0].any()
  whole = connected(images > 0)
  assert whole[labels == 1].all()
  print(f"negatives connected through the image's ink: {whole[labels == 0].mean():.1%}")


def test_pathfinder_marker_distance_does_not_tell_the_label():
  """Negatives place B so that the markers are as far apart as a path's two ends: the best
  threshold on the marker distance alone stays near chance (77% without the matching)."""
  _, labels, paths = _pathfinder(400, 1)
  distance = np.linalg.norm(paths["markers"][:, 0] - paths["markers"][:, 1], axis=-1)
  medians = [np.median(distance[labels == label]) for label in (0, 1)]
  assert abs(medians[0] - medians[1]) < 1.5, medians
  accuracy = max(max(((distance < t) == labels).mean(), ((distance >= t) == labels).mean())
                 for t in np.unique(distance))
  assert accuracy < 0.65, accuracy


def test_pathfinder_other_resolution_and_options():
  images, labels = pathfinder.generate(8, resolution=64, contour_length=10, seed=0,
                                       num_distractors=0)
  assert images.shape == (8, 64, 64) and labels.sum() == 4
  with pytest.raises(ValueError, match="too short"):
    pathfinder.generate(2, contour_length=2, seed=0)


def test_pathfinder_load_caches_and_saves_png(tmp_path, monkeypatch):
  monkeypatch.setenv("PAPERZOO_CACHE_DIR", str(tmp_path))
  splits = pathfinder.load(40, 10, 10, seed=3)
  cached = list((tmp_path / "lra" / "pathfinder").glob("*.npz"))
  assert [p.name for p in cached] == [
      "pathfinder_v1_train40_val10_test10_res32_len14_distractors2_seed3.npz"]
  assert {name: split[0].shape for name, split in splits.items()} == {
      "train": (40, 32, 32), "val": (10, 32, 32), "test": (10, 32, 32)}
  assert all(split[1].sum() * 2 == len(split[1]) for split in splits.values())
  assert not np.array_equal(splits["val"][0], splits["test"][0])

  def fail(*args, **kwargs):
    raise AssertionError("generate called although the cache holds the splits")

  monkeypatch.setattr(pathfinder, "generate", fail)
  again = pathfinder.load(40, 10, 10, seed=3)
  chex.assert_trees_all_equal(again, splits, strict=True)  # values, shapes, dtypes
  for images, labels in again.values():
    chex.assert_type([images, labels], [np.uint8, np.int32])
