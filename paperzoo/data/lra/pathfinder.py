"""LRA Pathfinder: are the two circle markers on the same curved path?

The Long Range Arena task (Tay et al., 2021, after Linsley et al., 2018): a grayscale image holds
two long curved paths, distractor paths and two circle markers; label 1 ("connected") when both
markers sit on the two ends of one path, 0 when they sit on an end of each of the two paths.
LRA flattens the 32x32 image into a sequence of 1,024 pixel tokens; the "hard" variant uses
paths of 14 segments.

Definition (this generator; sizes in pixels at resolution 32, all scaled by resolution / 32):
  * A path is `contour_length` straight segments of length 2, each turned from the previous by
    an angle uniform in [-30, 30] degrees (angle continuity), the first in a uniform direction.
    The whole polyline is translated uniformly to a position where every vertex is at least 2
    from the border (so a marker on an end fits); a shape whose bounding box does not fit is
    drawn again.
  * Rendering is anti-aliased: a pixel (centre at integer coordinates) at distance d from a
    path's centre line gets ink clip(1 - d, 0, 1), i.e. a 1-pixel line with a 1-pixel linear
    ramp; markers are filled disks of radius 1.5 with the same ramp. Overlapping ink takes the
    maximum; images are uint8 in [0, 255], white on black.
  * Two main paths, A and B, of `contour_length` segments. Positive: markers on both ends of A.
    Negative: a marker on one end (drawn at random) of A and one of B. B is present, unmarked,
    in positives too, so the number and length of paths never tells the label.
  * In negatives B is placed relative to A: its marked end at distance |A's end - A's start|
    from A's marked end, in a uniform direction, B turned by a uniform angle about that end
    (32 such placements are tried on the vertices alone; the first that fits is kept, which is
    plain rejection sampling). So the distance between the markers follows the same law in both
    classes. Without this, positives' markers are a path's end-to-end distance apart (mostly
    22-27 pixels) and negatives' anywhere, and that distance alone classified 77% of images;
    with it, 54%.
  * `num_distractors` more paths of the same length, on which no marker lies.
Ambiguity is avoided by rejection (a failed placement is drawn again):
  * Paths may cross but not run together: two paths may share at most 6 pixels (scaled by the
    area, (resolution / 32)^2) that carry ink (> 0) of both. Measured on straight crossings: a
    right angle shares 4-5 pixels, 60 degrees 4-6, 45 degrees 5-8, 30 degrees 8-11; a path
    running alongside another for more than a few pixels is rejected. This applies between A
    and B and between every distractor and every path placed before it.
  * Markers are clear: no ink of any path but the marker's own within 2.5 of a marker's
    centre, and the two marker centres are at least 5 apart.
  * A distractor that cannot be placed in 25 draws (a crowded image) restarts the image.
Paths may cross themselves. Classes are exactly balanced (num_samples // 2 positives, the odd
one out a negative), in a seeded random order.

Measured at resolution 32 (20,000 images, default arguments): ink covers 22% of the pixels. A
flood fill over inked pixels from one marker reaches the other in 100% of positives (a path's
ink is one 4-connected band) and also in 99% of negatives: A and B cross in 80% of them, and
distractors bridge most of the rest. The label is therefore not pixel connectivity but which
branch a contour follows through its crossings, the ability Pathfinder tests. The weak cues
left: the markers' midpoint is nearer the centre in positives (alone: 58% accuracy), the
markers' distance (54%).

Timings (numpy, one core of a shared 2-core machine): 20,000 images at 32x32 in ~10 s
(LRA's 200,000 in under two minutes).

`load` caches the three splits (uint8 images, int32 labels) in one `.npz` under
`cache_dir("lra", "pathfinder")`, named by every argument.

    images, labels = generate(1_000, seed=0)  # uint8 [1000, 32, 32], int32 [1000]
"""

from __future__ import annotations

import dataclasses

import numpy as np

from paperzoo.data import files

SPLITS = ("train", "val", "test")

# Geometry at resolution 32; every length scales with resolution / 32.
_SEGMENT_LENGTH = 2.0
_HALF_WIDTH = 0.5  # Ink is clip(_HALF_WIDTH + 0.5 - distance, 0, 1): a 1-pixel anti-aliased line.
_MARKER_RADIUS = 1.5
_MARKER_CLEARANCE = 1.0  # No other path's ink within _MARKER_RADIUS + this of a marker centre.
_MARKER_GAP = 2.0  # Marker centres at least 2 * _MARKER_RADIUS + this apart.
_BORDER = 2.0  # Vertices at least this far from the image border: a marker on an end fits.
_MAX_TURN_DEGREES = 30.0
_TOUCH_TOLERANCE = 6  # Pixels two paths may both ink (crossings) before they "run together".

_DISTRACTOR_ROUNDS = 25  # Draws per distractor before the image is restarted.
_NEGATIVE_TRIES = 32  # Placements of B per negative and round, checked on vertices only.
_MAX_ROUNDS = 1000  # Safety net: an unplaceable pair of main paths is a bug, not bad luck.
_CHUNK = 2048  # Images generated together (bounds memory: ~4 float32 images per path each).
_CACHE_VERSION = 1  # Bump when the generator's output for given arguments changes.


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Pixel sizes at one resolution."""
  resolution: int
  segment_length: float
  half_width: float
  marker_radius: float
  clearance_radius: float
  min_marker_distance: float
  border: float
  max_turn: float
  touch_tolerance: int

  @classmethod
  def at(cls, resolution: int) -> "_Geometry":
    scale = resolution / 32
    return cls(resolution=resolution, segment_length=_SEGMENT_LENGTH * scale,
               half_width=_HALF_WIDTH * scale, marker_radius=_MARKER_RADIUS * scale,
               clearance_radius=(_MARKER_RADIUS + _MARKER_CLEARANCE) * scale,
               min_marker_distance=(2 * _MARKER_RADIUS + _MARKER_GAP) * scale,
               border=_BORDER * scale, max_turn=np.radians(_MAX_TURN_DEGREES),
               touch_tolerance=int(round(_TOUCH_TOLERANCE * scale**2)))


def generate(num_samples: int, *, resolution: int = 32, contour_length: int = 14, seed: int,
             num_distractors: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """Images uint8 [num_samples, resolution, resolution] and labels int32 (1 = connected).

  Deterministic in every argument; exactly num_samples // 2 labels are 1.
  """
  images, labels, _ = _generate_with_paths(num_samples, resolution=resolution,
                                           contour_length=contour_length, seed=seed,
                                           num_distractors=num_distractors, keep_paths=False)
  return images, labels


def _generate_with_paths(num_samples: int, *, resolution: int = 32, contour_length: int = 14,
                         seed: int, num_distractors: int = 2, keep_paths: bool = True
                         ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """`generate`, plus the geometry behind each image (for tests; {} if not `keep_paths`, as
  `main_ink` alone takes 8 KB per image):

    points        float32 [N, 2 + num_distractors, contour_length + 1, 2]: vertices (x, y) of
                  A, B, then the distractors (x = column, y = row, pixel centres at integers)
    markers       float32 [N, 2, 2]: marker centres (x, y)
    marker_path   int32 [N, 2]: the main path (0 = A, 1 = B) each marker is on
    main_ink      float32 [N, 2, resolution, resolution]: the ink of A and of B alone
  """
  if num_samples < 0:
    raise ValueError(f"num_samples must be >= 0, got {num_samples}")
  if resolution < 16:
    raise ValueError(f"resolution={resolution} is too small to hold two paths and markers")
  if contour_length < 1 or num_distractors < 0:
    raise ValueError(f"need contour_length >= 1 and num_distractors >= 0, got "
                     f"{contour_length} and {num_distractors}")
  geometry = _Geometry.at(resolution)
  if contour_length * geometry.segment_length < geometry.min_marker_distance:
    raise ValueError(f"contour_length={contour_length} is too short: a path must be at least "
                     f"{geometry.min_marker_distance:g} pixels long to carry two markers")
  rng = np.random.default_rng(seed)
  labels = np.zeros(num_samples, np.int32)
  labels[:num_samples // 2] = 1
  labels = labels[rng.permutation(num_samples)]
  num_paths = 2 + num_distractors
  images = np.zeros((num_samples, resolution, resolution), np.uint8)
  paths = {
      "points": np.zeros((num_samples, num_paths, contour_length + 1, 2), np.float32),
      "markers": np.zeros((num_samples, 2, 2), np.float32),
      "marker_path": np.zeros((num_samples, 2), np.int32),
      "main_ink": np.zeros((num_samples, 2, resolution, resolution), np.float32),
  } if keep_paths else {}
  for start in range(0, num_samples, _CHUNK):
    chunk = slice(start, min(start + _CHUNK, num_samples))
    result = _generate_chunk(rng, labels[chunk], geometry, contour_length, num_distractors)
    images[chunk] = result.pop("images")
    for name, array in paths.items():
      array[chunk] = result[name]
  return images, labels, paths


def _generate_chunk(rng: np.random.Generator, labels: np.ndarray, geometry: _Geometry,
                    contour_length: int, num_distractors: int) -> dict[str, np.ndarray]:
  """One chunk of images for `labels`, placed by rejection (see the module docstring)."""
  res2 = geometry.resolution**2
  count = len(labels)
  num_paths = 2 + num_distractors
  points = np.zeros((count, num_paths, contour_length + 1, 2))
  ink = np.zeros((count, num_paths, res2), np.float32)
  markers = np.zeros((count, 2, 2))
  marker_path = np.zeros((count, 2), np.int64)
  zones = np.zeros((count, res2), bool)  # Discs around the markers: only their own path's ink.
  todo = np.arange(count)
  rounds = 0
  while len(todo):
    rounds += 1
    if rounds > _MAX_ROUNDS:
      raise RuntimeError("pathfinder: could not place the paths of some images")
    _place_main_paths(rng, todo, labels[todo], geometry, contour_length, points, ink, markers,
                      marker_path, zones)
    restart = np.zeros(count, bool)
    for path in range(2, num_paths):
      pending = todo[~restart[todo]]
      for _ in range(_DISTRACTOR_ROUNDS):
        if not len(pending):
          break
        candidate, fits = _sample_paths(rng, len(pending), geometry, contour_length)
        ok = np.flatnonzero(fits)
        candidate_ink = _render_paths(candidate[ok], geometry)
        image = pending[ok]
        placed = ink[image, :path] > 0
        touch = (placed & (candidate_ink[:, None] > 0)).sum(-1)
        keep = ((touch <= geometry.touch_tolerance).all(1)
                & ~(zones[image] & (candidate_ink > 0)).any(1))
        points[image[keep], path] = candidate[ok[keep]]
        ink[image[keep], path] = candidate_ink[keep]
        failed = np.ones(len(pending), bool)
        failed[ok[keep]] = False
        pending = pending[failed]
      restart[pending] = True
    todo = np.flatnonzero(restart)
  marker_ink = _render_discs(markers, geometry.marker_radius, geometry.resolution)
  picture = np.maximum(ink.max(1), marker_ink)
  shape = (count, geometry.resolution, geometry.resolution)
  return {
      "images": np.round(picture * 255).astype(np.uint8).reshape(shape),
      "points": points.astype(np.float32),
      "markers": markers.astype(np.float32),
      "marker_path": marker_path.astype(np.int32),
      "main_ink": ink[:, :2].reshape(count, 2, *shape[1:]),
  }


def _place_main_paths(rng: np.random.Generator, todo: np.ndarray, labels: np.ndarray,
                      geometry: _Geometry, contour_length: int, points: np.ndarray,
                      ink: np.ndarray, markers: np.ndarray, marker_path: np.ndarray,
                      zones: np.ndarray) -> None:
  """Draws paths A and B and the markers for the images `todo` until every pair is valid;
  writes them into the chunk's arrays (indexed by image)."""
  positive = labels == 1
  # The main path of each marker: (A, A) in positives, (A, B) in negatives.
  on_path = np.stack([np.zeros(len(todo), np.int64), np.where(positive, 0, 1)], axis=1)
  pending = np.arange(len(todo))
  for _ in range(_MAX_ROUNDS):
    if not len(pending):
      return
    count = len(pending)
    pair, fits = _sample_paths(rng, 2 * count, geometry, contour_length)
    pair, fits = pair.reshape(count, 2, contour_length + 1, 2), fits.reshape(count, 2)
    # Which end carries the marker: in positives A's two ends, in negatives a random end each.
    end = rng.integers(0, 2, (count, 2)) * contour_length
    negative = ~positive[pending]
    end[~negative] = (0, contour_length)
    rows = np.arange(count)[:, None]
    # Negatives: B is moved so that its marked end lies at a uniform angle and at distance
    # |A's end - A's start| from A's marked end, and turned by a uniform angle about that end
    # (B's shape law is rotation invariant). The marker distance then follows the same law in
    # both classes (a path's end-to-end distance) and does not give the label away. Most such
    # placements leave the image, so _NEGATIVE_TRIES are tried on the vertices alone and the
    # first that fits is kept (the first success of i.i.d. tries is a draw from the fitting
    # ones, as plain rejection would give).
    span = np.linalg.norm(pair[:, 0, -1] - pair[:, 0, 0], axis=-1)[:, None, None]
    angle = rng.uniform(0, 2 * np.pi, (count, _NEGATIVE_TRIES, 2))
    target = pair[rows[:, 0], 0, end[:, 0]][:, None] + span * np.stack(
        [np.cos(angle[..., 0]), np.sin(angle[..., 0])], axis=-1)  # [count, tries, 2]
    relative = pair[:, 1] - pair[rows[:, 0], 1, end[:, 1]][:, None]  # [count, L + 1, 2]
    cos, sin = np.cos(angle[..., 1])[..., None], np.sin(angle[..., 1])[..., None]
    turned = np.stack([cos * relative[:, None, :, 0] - sin * relative[:, None, :, 1],
                       sin * relative[:, None, :, 0] + cos * relative[:, None, :, 1]], axis=-1)
    moved = target[:, :, None] + turned  # [count, tries, L + 1, 2]
    inside = ((moved >= geometry.border)
              & (moved <= geometry.resolution - 1 - geometry.border)).all(axis=(2, 3))
    first = np.argmax(inside, axis=1)
    pair[negative, 1] = moved[rows[:, 0], first][negative]
    fits = fits[:, 0] & np.where(negative, inside.any(1), fits[:, 1])
    centre = pair[rows, on_path[pending], end]  # [count, 2 markers, 2]
    apart = np.linalg.norm(centre[:, 0] - centre[:, 1], axis=-1) >= geometry.min_marker_distance
    # The checks run cheapest first; each later one only on the survivors of the earlier ones.
    ok = np.flatnonzero(fits & apart)
    pair_ink = _render_paths(pair[ok].reshape(-1, contour_length + 1, 2), geometry)
    pair_ink = pair_ink.reshape(len(ok), 2, geometry.resolution**2)
    touch = ((pair_ink[:, 0] > 0) & (pair_ink[:, 1] > 0)).sum(-1)
    keep = touch <= geometry.touch_tolerance
    ok, pair_ink = ok[keep], pair_ink[keep]
    zone = _disc_masks(centre[ok], geometry.clearance_radius, geometry.resolution)
    rows = np.arange(len(ok))[:, None]
    other = pair_ink[rows, 1 - on_path[pending[ok]]] > 0  # The main path a marker is not on.
    keep = ~(zone & other).any(axis=(1, 2))
    ok, pair_ink, zone = ok[keep], pair_ink[keep], zone[keep]
    image = todo[pending[ok]]
    points[image, :2] = pair[ok]
    ink[image, :2] = pair_ink
    markers[image] = centre[ok]
    marker_path[image] = on_path[pending[ok]]
    zones[image] = zone.any(1)
    failed = np.ones(count, bool)
    failed[ok] = False
    pending = pending[failed]
  raise RuntimeError("pathfinder: could not place the main paths of some images")


def _sample_paths(rng: np.random.Generator, count: int, geometry: _Geometry,
                  contour_length: int) -> tuple[np.ndarray, np.ndarray]:
  """`count` random polylines [count, contour_length + 1, 2] (x, y) and whether each fits.

  The shape comes first (uniform start direction, bounded turns); it is then translated
  uniformly over the positions that keep every vertex `border` from the image's edge.
  """
  heading = rng.uniform(0, 2 * np.pi, (count, 1))
  turns = rng.uniform(-geometry.max_turn, geometry.max_turn, (count, contour_length))
  turns[:, 0] = 0  # The first segment points along `heading`.
  angle = heading + np.cumsum(turns, axis=1)
  steps = geometry.segment_length * np.stack([np.cos(angle), np.sin(angle)], axis=-1)
  shape = np.concatenate([np.zeros((count, 1, 2)), np.cumsum(steps, axis=1)], axis=1)
  low, high = shape.min(1), shape.max(1)
  room = (geometry.resolution - 1 - 2 * geometry.border) - (high - low)  # [count, 2]
  fits = (room >= 0).all(1)
  offset = geometry.border - low + rng.uniform(0, 1, (count, 2)) * np.maximum(room, 0)
  return shape + offset[:, None], fits


def _render_paths(points: np.ndarray, geometry: _Geometry) -> np.ndarray:
  """Ink float32 [count, resolution**2] of polylines [count, K + 1, 2] (see module docstring).

  Each segment only reaches pixels within its length plus `half_width + 0.5`, so distances are
  computed in a small square window around it, and windows merge by maximum.
  """
  res = geometry.resolution
  count = len(points)
  start, end = points[:, :-1], points[:, 1:]  # [count, K, 2]
  reach = geometry.half_width + 0.5
  width = int(np.ceil(geometry.segment_length + 2 * reach)) + 1
  corner = np.floor(np.minimum(start, end) - reach).astype(np.int64)  # [count, K, 2]
  offsets = np.arange(width)
  x = (corner[..., 0, None] + offsets)[..., None, :]  # [count, K, 1, width]
  y = (corner[..., 1, None] + offsets)[..., :, None]  # [count, K, width, 1]
  # float32 from here: sub-pixel geometry needs no more, and it halves the memory traffic.
  direction = (end - start).astype(np.float32)
  length2 = np.maximum((direction**2).sum(-1), 1e-12)[..., None, None]
  rx = x.astype(np.float32) - start[..., 0, None, None].astype(np.float32)
  ry = y.astype(np.float32) - start[..., 1, None, None].astype(np.float32)
  dx, dy = direction[..., 0, None, None], direction[..., 1, None, None]
  along = np.clip((rx * dx + ry * dy) / length2, 0, 1)
  distance = np.hypot(rx - along * dx, ry - along * dy)
  coverage = np.clip(np.float32(reach) - distance, 0, 1)
  inside = (x >= 0) & (x < res) & (y >= 0) & (y < res) & (coverage > 0)
  image = np.arange(count)[:, None, None, None]
  index = (image * res + y) * res + x
  out = np.zeros(count * res * res, np.float32)
  np.maximum.at(out, index[inside], coverage[inside])
  return out.reshape(count, res * res)


def _pixel_grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates x, y, flattened row-major [resolution**2]."""
  y, x = np.divmod(np.arange(resolution**2), resolution)
  return x.astype(np.float32), y.astype(np.float32)


def _disc_distance(centres: np.ndarray, resolution: int) -> np.ndarray:
  """Distance of every pixel centre to each centre [..., 2] -> [..., resolution**2]."""
  x, y = _pixel_grid(resolution)
  centres = centres.astype(np.float32)
  return np.hypot(x - centres[..., 0, None], y - centres[..., 1, None])


def _disc_masks(centres: np.ndarray, radius: float, resolution: int) -> np.ndarray:
  """Pixels within `radius` of each centre: bool [..., resolution**2]."""
  return _disc_distance(centres, resolution) <= radius


def _render_discs(centres: np.ndarray, radius: float, resolution: int) -> np.ndarray:
  """Ink float32 [count, resolution**2] of filled anti-aliased discs, centres [count, j, 2]."""
  coverage = np.clip(radius + 0.5 - _disc_distance(centres, resolution), 0, 1)
  return coverage.max(1).astype(np.float32)


def split_seed(seed: int, split: str) -> int:
  """The generator seed of one split of `load(..., seed=seed)`: distinct per split."""
  state = np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(2, np.uint32)
  return int(state[0]) << 32 | int(state[1])


def load(num_train: int, num_val: int, num_test: int, *, resolution: int = 32,
         contour_length: int = 14, seed: int, num_distractors: int = 2
         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{"train", "val", "test"}: (uint8 images, int32 labels), generated once, cached on disk.

  Split k is `generate(num_k, ..., seed=split_seed(seed, k))`, each balanced on its own.
  """
  sizes = dict(zip(SPLITS, (num_train, num_val, num_test)))
  path = files.cache_dir("lra", "pathfinder") / (
      f"pathfinder_v{_CACHE_VERSION}_train{num_train}_val{num_val}_test{num_test}"
      f"_res{resolution}_len{contour_length}_distractors{num_distractors}_seed{seed}.npz")

  def build() -> dict[str, np.ndarray]:
    arrays = {}
    for name, size in sizes.items():
      arrays[f"{name}_images"], arrays[f"{name}_labels"] = generate(
          size, resolution=resolution, contour_length=contour_length,
          seed=split_seed(seed, name), num_distractors=num_distractors)
    return arrays

  arrays = files.cached_arrays(path, build, compresslevel=1)
  return {name: (arrays[f"{name}_images"], arrays[f"{name}_labels"]) for name in SPLITS}
