"""Layout checks of the shared plots (paperzoo/plots.py)."""

import numpy as np

from paperzoo import plots


def test_image_grid_titles_stay_clear_of_the_row_above(tmp_path, monkeypatch):
  # Two-line titles wider than their image, as in the LRA Pathfinder examples
  # ("true disconnected / pred disconnected"): each title must lie below the images above it.
  boxes = {}
  save_figure = plots.save_figure

  def measure_then_save(fig, path):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.images]
    boxes["images"] = [ax.get_window_extent(renderer) for ax in axes]
    boxes["titles"] = [ax.title.get_window_extent(renderer) for ax in axes]
    return save_figure(fig, path)

  monkeypatch.setattr(plots, "save_figure", measure_then_save)
  images = np.random.default_rng(0).integers(0, 256, (13, 16, 16), dtype=np.uint8)
  path = plots.image_grid(images, ["true disconnected\npred disconnected"] * 13,
                          tmp_path / "examples.png", columns=8, title="Pathfinder")
  assert path.is_file()
  rows = np.split(np.arange(13), [8])
  for above, below in zip(rows, rows[1:]):
    lowest_image_above = min(boxes["images"][i].y0 for i in above)  # pixels from the bottom
    highest_title_below = max(boxes["titles"][i].y1 for i in below)
    assert highest_title_below <= lowest_image_above
