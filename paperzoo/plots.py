"""Pictures written into the workdir at the end of a run (matplotlib, no display needed)."""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402


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
  return _save(fig, path)


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
  return _save(fig, path)


def _save(fig: Any, path: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
