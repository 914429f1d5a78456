"""Pieces shared by the experiment configs (the trainer's defaults live in paperzoo.config)."""

from __future__ import annotations

from paperzoo.config import ConfigDict

# Time-Series-Library's default decoder context for encoder-decoder forecasters.
LABEL_LEN = 48


def forecasting_data(name: str, *, seq_len: int, pred_len: int) -> ConfigDict:
  """The `data` section of a forecasting config (keys explained in paperzoo.tasks.forecasting).

  The decoder context is min(48, seq_len // 2): TSLib's 48 at lookback 96, and 18 at ILI's
  lookback 36 as its ILI scripts use. Models without a decoder ignore it.
  """
  label_len = min(LABEL_LEN, seq_len // 2)
  return ConfigDict({"name": name, "root": "", "seq_len": seq_len, "label_len": label_len,
                     "pred_len": pred_len})


def forecasting_protocol(config: ConfigDict) -> ConfigDict:
  """Time-Series-Library's long-term forecasting training protocol.

  Adam, batch 32, 10 epochs, early stopping with patience 3 on validation MSE, learning rate
  halved after every epoch (`lradj=type1`), MSE loss, seed 2021.
  """
  config.task = ConfigDict({"name": "forecasting", "loss": "mse"})
  config.train.batch_size = 32
  config.train.num_epochs = 10
  config.train.patience = 3
  config.optimizer.name = "adam"
  config.optimizer.schedule = "step"
  config.optimizer.decay_rate = 0.5
  config.optimizer.decay_every_epochs = 1
  return config


def runlocal(config: ConfigDict) -> ConfigDict:
  """Shrinks a config to a smoke run: two training steps, tiny batches, no progress bar."""
  config.train.num_steps = 2
  config.train.batch_size = 8
  config.train.eval_batch_size = 512
  config.train.log_every_steps = 1
  config.train.progress_bar = False
  return config
