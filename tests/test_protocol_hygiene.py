"""The forecasting protocol's hygiene (experiments/forecasting_protocol.md), checked end to end
through paperzoo.train_and_evaluate:

1. the full test set is scored (no drop_last): ETTh1 96 -> 96 has 2,785 test windows, and the
   final evaluation counts every one of them;
2. the seed is a config field and really used: the same seed gives identical results, another
   seed different ones;
3. early stopping looks at the validation set only: the test split is not read before training
   ends, and it is scored exactly once, on the best checkpoint.
"""

from __future__ import annotations

import importlib

import pytest

import paperzoo
from experiments import forecasting_grid as grid
from paperzoo import metric_writers
from paperzoo import trainer
from paperzoo.data import forecasting as forecasting_data


def tiny(model: str, arg: str, **train):
  config = importlib.import_module(f"experiments.configs.{model}").get_config(arg)
  config.train.plots = False  # the pictures read test windows after the run; not wanted here
  config.train.update(train)
  return config


class EventLog:
  """Records every evaluation (split, windows, sums) and every read of a data split, in order,
  by wrapping trainer.evaluate_sums and WindowDataset.get_batch."""

  def __init__(self, monkeypatch):
    self.events: list[tuple] = []
    self.val_dataset = None
    self.test_state_val_mse = None  # val MSE of the very state that the test was scored on
    original_sums = trainer.evaluate_sums
    original_get_batch = forecasting_data.WindowDataset.get_batch
    log = self

    def evaluate_sums(dataset, eval_fn, *, batch_size, batch_sharding):
      log.events.append(("eval start", dataset.split, len(dataset)))
      sums = original_sums(dataset, eval_fn, batch_size=batch_size,
                           batch_sharding=batch_sharding)
      log.events.append(("eval end", dataset.split, sums))
      if dataset.split == "val":
        log.val_dataset = dataset
      elif dataset.split == "test":
        # Score validation with the same eval_fn: it is bound to the state the test was scored on.
        val = original_sums(log.val_dataset, eval_fn, batch_size=batch_size,
                            batch_sharding=batch_sharding)
        log.test_state_val_mse = val["squared_error"] / val["count"]
      return sums

    def get_batch(dataset, indices):
      log.events.append(("read", dataset.split))
      return original_get_batch(dataset, indices)

    monkeypatch.setattr(trainer, "evaluate_sums", evaluate_sums)
    monkeypatch.setattr(forecasting_data.WindowDataset, "get_batch", get_batch)

  def evaluations(self) -> list[str]:
    return [split for kind, split, *_ in self.events if kind == "eval start"]


def test_every_test_window_is_scored(monkeypatch, tmp_path):
  log = EventLog(monkeypatch)
  # runlocal evaluates in batches of 512: 2,785 = 5 x 512 + 225, so the last batch is padded.
  config = tiny("dlinear", "data=etth1,seq_len=96,pred_len=96,runlocal")
  assert config.train.eval_batch_size == 512
  paperzoo.train_and_evaluate(config, tmp_path)
  (test_start,) = [e for e in log.events if e[:2] == ("eval start", "test")]
  (test_end,) = [e for e in log.events if e[:2] == ("eval end", "test")]
  # ETTh1 has 2,785 test windows at L=96, H=96 (experiments/forecasting_protocol.md).
  assert test_start[2] == 2785
  assert test_end[2]["count"] == 2785 * 96 * 7  # every window x horizon x variate, no padding


@pytest.mark.parametrize("model", grid.config_names())
def test_the_seed_is_a_config_field(model):
  module = importlib.import_module(f"experiments.configs.{model}")
  assert module.get_config("seed=7").seed == 7
  assert module.get_config(None).seed == 2021


def test_the_seed_is_really_used(tmp_path):
  # DLinear's bias initialization and the data order both come from the seed.
  arg = "data=etth1,pred_len=24,runlocal"
  first = paperzoo.train_and_evaluate(tiny("dlinear", arg + ",seed=2021"), tmp_path / "a")
  again = paperzoo.train_and_evaluate(tiny("dlinear", arg + ",seed=2021"), tmp_path / "b")
  other = paperzoo.train_and_evaluate(tiny("dlinear", arg + ",seed=2022"), tmp_path / "c")
  assert (first["seed"], other["seed"]) == (2021, 2022)
  assert again["val"] == first["val"] and again["test"] == first["test"]
  assert other["val"]["mse"] != first["val"]["mse"]
  assert other["test"]["mse"] != first["test"]["mse"]


def test_selection_on_validation_only_and_one_test_on_the_best_checkpoint(monkeypatch,
                                                                          tmp_path):
  log = EventLog(monkeypatch)
  config = tiny("dlinear", "data=etth1,pred_len=24,runlocal", num_steps=40, eval_every_steps=2,
                patience=2)
  config.optimizer.learning_rate = 0.5  # validation gets worse soon, so the best is not the last
  config.optimizer.schedule = "constant"
  results = paperzoo.train_and_evaluate(config, tmp_path)

  # Validation after every evaluation interval, then the final validation and the one test.
  evaluations = log.evaluations()
  assert evaluations.count("test") == 1 and evaluations[-1] == "test"
  assert set(evaluations[:-1]) == {"val"}
  # The test split is read inside that one evaluation and nowhere else (training included).
  start = log.events.index(next(e for e in log.events if e[:2] == ("eval start", "test")))
  end = log.events.index(next(e for e in log.events if e[:2] == ("eval end", "test")))
  reads = [i for i, e in enumerate(log.events) if e == ("read", "test")]
  assert reads and all(start < i < end for i in reads)
  assert all(e != ("read", "train") for e in log.events[start:])  # training was over

  # The checkpoint is chosen by validation MSE, and the test is scored on that checkpoint.
  val = [r for r in metric_writers.read_metrics(tmp_path) if r["split"] == "val"]
  best = min(val, key=lambda r: r["mse"])
  assert results["stopped_early"] and best["step"] != val[-1]["step"]
  assert results["best_step"] == best["step"]
  assert log.test_state_val_mse == pytest.approx(best["mse"], rel=1e-6)
  assert log.test_state_val_mse != pytest.approx(val[-1]["mse"], rel=1e-6)
