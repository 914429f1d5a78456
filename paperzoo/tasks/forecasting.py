"""Long-term multivariate forecasting, as Time-Series-Library evaluates it.

Config keys:
  data.name        a registered forecasting data set (etth1, etth2, ettm1, ettm2, exchange,
                   illness, weather, electricity, traffic, synthetic)
  data.root        directory holding the data files ("" = $PAPERZOO_DATA_DIR or ../shared/data)
  data.seq_len     lookback window (input length)
  data.label_len   known steps fed to encoder-decoder models' decoders
  data.pred_len    forecast horizon
  task.loss        "mse" or "mae": the training loss

Scores: MSE and MAE on the normalized scale, averaged over every test window, horizon step and
variate (no window dropped). Model selection uses validation MSE only.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from paperzoo import plots
from paperzoo.data import forecasting as forecasting_data
from paperzoo.registry import TASKS

LOSSES = ("mse", "mae")


@TASKS.register("forecasting")
class ForecastingTask:
  """Predict the next `pred_len` steps of every variate from the last `seq_len`."""

  selection_metric = "mse"
  selection_mode = "min"
  data_kinds = ("forecasting",)

  def __init__(self, config: Any):
    if config.task.loss not in LOSSES:
      raise ValueError(f"unknown task.loss {config.task.loss!r}; valid: {', '.join(LOSSES)}")
    self.loss_name = config.task.loss
    self.data = forecasting_data.load_forecasting(
        config.data.name, seq_len=config.data.seq_len, label_len=config.data.label_len,
        pred_len=config.data.pred_len, root=config.data.root or None)
    self.splits = {"train": self.data.train, "val": self.data.val, "test": self.data.test}

  def model_kwargs(self) -> dict[str, int]:
    return dict(seq_len=self.data.train.seq_len, pred_len=self.data.train.pred_len,
                num_variates=self.data.num_variates,
                num_time_features=self.data.num_time_features)

  @staticmethod
  def inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """What the model may see: the history and the decoder input, never the target."""
    return {k: batch[k] for k in ("x", "x_mark", "dec_x", "dec_mark")}

  def loss(self, model: Any, batch: dict[str, jax.Array], *, train: bool, rngs: Any
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    prediction = model(self.inputs(batch), train=train, rngs=rngs)
    error = prediction - batch["y"]
    mse = jnp.mean(jnp.square(error))
    mae = jnp.mean(jnp.abs(error))
    return (mse if self.loss_name == "mse" else mae), {"mse": mse, "mae": mae}

  def eval_sums(self, model: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    prediction = model(self.inputs(batch), train=False, rngs=None)
    error = prediction - batch["y"]
    mask = batch["mask"].astype(error.dtype)[:, None, None]
    per_window = error[0].size  # pred_len * variates values in each window
    return {"squared_error": jnp.sum(jnp.square(error) * mask),
            "absolute_error": jnp.sum(jnp.abs(error) * mask),
            "count": jnp.sum(batch["mask"]) * per_window}

  def summarize(self, sums: dict[str, float]) -> dict[str, float]:
    count = sums["count"]
    return {"mse": sums["squared_error"] / count, "mae": sums["absolute_error"] / count}

  def write_pictures(self, predict: Callable[[dict[str, np.ndarray]], np.ndarray],
                     workdir: pathlib.Path, *, num_windows: int = 4) -> list[pathlib.Path]:
    """Test windows spread over the test set: history, truth and forecast of the last variate."""
    test = self.data.test
    indices = np.linspace(0, len(test) - 1, num_windows).astype(np.int64)
    batch = test.get_batch(indices)
    prediction = np.asarray(predict(self.inputs(batch)))
    channel = -1  # the target column (OT in the ETT and custom layouts) is last
    path = plots.forecast_windows(
        batch["x"][:, :, channel], batch["y"][:, :, channel], prediction[:, :, channel],
        workdir / "forecasts.png", channel_name=self.data.columns[channel],
        title=f"{self.data.name} test windows {indices.tolist()}")
    return [path]
