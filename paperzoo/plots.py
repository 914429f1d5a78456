"""Pictures: a run's loss curves, forecasts, confusion matrices and example inputs, the
reproduction grid's ours-vs-paper plot, and lines with error bars over seeds (a metric against
one axis of a grid) (matplotlib, no display needed)."""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from paperzoo import sharding  # noqa: E402


def loss_curves(records: Sequence[dict[str, Any]], path: str | pathlib.Path, *,
                selection_metric: str) -> pathlib.Path:
  """Training loss and the validation selection metric against the step."""
  train = [(r["step"], r["loss"]) for r in records
           if r["split"] == "train" and r.get("loss") is not None]
  val = [(r["step"], r[selection_metric]) for r in records
         if r["split"] == "val" and r.get(selection_metric) is not None]
  fig, ax = plt.subplots(figsize=(7, 4))
  if train:
    ax.plot(*zip(*train), label="train loss", color="tab:blue")
  if val:
    ax.plot(*zip(*val), "o-", label=f"val {selection_metric}", color="tab:orange")
  ax.set_xlabel("step")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  return save_figure(fig, path)


def forecast_windows(history: np.ndarray, truth: np.ndarray, prediction: np.ndarray,
                     path: str | pathlib.Path, *, channel_name: str, title: str = ""
                     ) -> pathlib.Path:
  """A grid of test windows: history, then truth and prediction over the horizon.

  history: [n, seq_len]; truth, prediction: [n, pred_len] (one channel).
  """
  n = len(history)
  fig, axes = plt.subplots(n, 1, figsize=(9, 2.2 * n), squeeze=False)
  seq_len, pred_len = history.shape[1], truth.shape[1]
  past = np.arange(-seq_len, 0)
  future = np.arange(pred_len)
  for ax, h, t, p in zip(axes[:, 0], history, truth, prediction):
    ax.plot(past, h, color="0.4", label="history")
    ax.plot(future, t, color="tab:blue", label="truth")
    ax.plot(future, p, color="tab:red", label="prediction")
    ax.axvline(0, color="0.7", lw=0.8)
    ax.grid(alpha=0.3)
  axes[0, 0].legend(loc="upper left", fontsize=8)
  axes[0, 0].set_title(title or channel_name)
  axes[-1, 0].set_xlabel(f"time step ({channel_name}, normalized)")
  fig.tight_layout()
  return save_figure(fig, path)


def paper_comparison(points: Sequence[dict[str, Any]], path: str | pathlib.Path, *,
                     title: str = "", target: float = 0.03) -> pathlib.Path:
  """Our numbers against the papers': a scatter (paper on x, ours on y, the y = x line and the
  `target` band above it) and the relative difference of every compared cell as bars.

  points: dicts with `label`, `model`, `ours_mse`, `ours_mse_std` (NaN if one seed),
  `paper_mse`. With no points, the figure says so (a partial grid still gets its picture).
  """
  fig, (scatter, bars) = plt.subplots(
      1, 2, figsize=(13, max(4.5, 0.28 * len(points) + 1.5)),
      gridspec_kw={"width_ratios": [1, 1.2]})
  if not points:
    for ax in (scatter, bars):
      ax.text(0.5, 0.5, "no cell with both our result and a paper number yet",
              ha="center", va="center", transform=ax.transAxes)
      ax.set_axis_off()
  else:
    models = sorted({p["model"] for p in points})
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    paper = np.array([p["paper_mse"] for p in points], np.float64)
    ours = np.array([p["ours_mse"] for p in points], np.float64)
    std = np.nan_to_num(np.array([p["ours_mse_std"] for p in points], np.float64))
    low, high = min(paper.min(), ours.min()) * 0.95, max(paper.max(), ours.max()) * 1.05
    line = np.linspace(low, high, 2)
    scatter.fill_between(line, line, line * (1 + target), color="tab:green", alpha=0.15,
                         label=f"within {100 * target:.0f}% of the paper")
    scatter.plot(line, line, color="0.4", lw=0.8, label="ours = paper")
    for model in models:
      index = [i for i, p in enumerate(points) if p["model"] == model]
      scatter.errorbar(paper[index], ours[index], yerr=std[index], fmt="o", ms=5, capsize=2,
                       color=colors[model], label=model)
    scatter.set_xlim(low, high)
    scatter.set_ylim(low, high)
    scatter.set_xlabel("paper MSE")
    scatter.set_ylabel("our MSE (mean ± std over seeds)")
    scatter.grid(alpha=0.3)
    scatter.legend(fontsize=8, loc="upper left")
    relative = 100 * (ours / paper - 1)
    y = np.arange(len(points))[::-1]
    bars.barh(y, relative, color=[colors[p["model"]] for p in points])
    bars.axvline(0, color="0.4", lw=0.8)
    bars.axvline(100 * target, color="tab:red", ls="--", lw=0.8,
                 label=f"+{100 * target:.0f}% (target)")
    bars.set_yticks(y, [p["label"] for p in points], fontsize=8)
    bars.set_xlabel("our MSE / paper MSE - 1 (%)")
    bars.grid(alpha=0.3, axis="x")
    bars.legend(fontsize=8, loc="lower right")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return save_figure(fig, path)


def lines_with_error_bars(lines: dict[str, Sequence[tuple[float, float, float]]],
                          path: str | pathlib.Path, *, xlabel: str, ylabel: str,
                          title: str = "", log_x: bool = False, log_y: bool = False
                          ) -> pathlib.Path:
  """One line per name of `lines` through its (x, mean, std) points, the std as error bars
  (0: none): a metric against one axis of an ablation, another axis as the lines."""
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name, points in lines.items():
    x, mean, std = (np.asarray(v, np.float64) for v in zip(*points))
    ax.errorbar(x, mean, yerr=np.nan_to_num(std), fmt="o-", ms=4, capsize=3, label=name)
  if log_x:
    ax.set_xscale("log", base=2)
    ticks = sorted({p[0] for points in lines.values() for p in points})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
  if log_y:
    ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return save_figure(fig, path)


def confusion_matrix(counts: np.ndarray, class_names: Sequence[str], path: str | pathlib.Path,
                     *, title: str = "") -> pathlib.Path:
  """counts[true, predicted] as a heat map of row-normalized rates, with the counts written in
  the cells when there are few classes."""
  counts = np.asarray(counts)
  rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
  n = len(class_names)
  size = min(max(4.5, 3 + 0.45 * n), 14)  # 4.5 inches hold the title of a 2-class matrix
  fig, ax = plt.subplots(figsize=(size, size * 0.9))
  image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
  fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
  ticks = np.arange(n)
  ax.set_xticks(ticks, class_names, rotation=90 if n > 6 else 0, fontsize=8)
  ax.set_yticks(ticks, class_names, fontsize=8)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  if n <= 12:
    for i in range(n):
      for j in range(n):
        ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black")
  accuracy = np.trace(counts) / max(counts.sum(), 1)
  ax.set_title(f"{title}\naccuracy {accuracy:.4f} ({int(counts.sum())} examples)".strip(),
               fontsize=10)
  fig.tight_layout()
  return save_figure(fig, path)


def image_grid(images: np.ndarray, titles: Sequence[str], path: str | pathlib.Path, *,
               columns: int = 8, title: str = "") -> pathlib.Path:
  """Images [n, H, W] or [n, H, W, C] (uint8 or floats in [0, 1]) in a grid, one title each."""
  images = np.asarray(images)
  n = len(images)
  rows = -(-n // columns)
  # Constrained layout, not tight_layout: titles wider than their image (two lines of class
  # names) made tight_layout leave the next row's titles over the images above them.
  fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False,
                           layout="constrained")
  for ax in axes.flat:
    ax.axis("off")
  for ax, image, text in zip(axes.flat, images, titles):
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    ax.set_title(text, fontsize=7)
  if title:
    fig.suptitle(title)
  return save_figure(fig, path)


def save_figure(fig: Any, path: str | pathlib.Path) -> pathlib.Path:
  """Saves a matplotlib figure as `path` (its folder created) and closes it."""
  path = pathlib.Path(path)
  if sharding.is_primary_process():  # the other processes of a multi-process run draw alike
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
