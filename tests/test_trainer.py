"""The trainer's promises, each checked end to end on tiny configs."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import optax
import pytest

import paperzoo
from paperzoo import checkpoint as checkpoint_lib
from paperzoo import config as config_lib
from paperzoo import metric_writers
from paperzoo import sharding
from paperzoo import trainer
from paperzoo import workdir as workdir_lib
from experiments.configs import dlinear, quickstart, uea


def train_losses(workdir) -> list[float]:
  return [r["loss"] for r in metric_writers.read_metrics(workdir) if r["split"] == "train"]


def tiny_dlinear(**train):
  config = dlinear.get_config("runlocal,pred_len=24")
  config.train.plots = False
  config.train.update(train)
  return config


def test_data_order_is_a_pure_function_of_seed_and_step():
  order = trainer.DataOrder(seed=3, num_examples=103, batch_size=10, steps_per_epoch=10)
  forward = [order.indices(step).copy() for step in range(25)]
  fresh = trainer.DataOrder(seed=3, num_examples=103, batch_size=10, steps_per_epoch=10)
  backward = [fresh.indices(step).copy() for step in reversed(range(25))][::-1]
  for a, b in zip(forward, backward):
    np.testing.assert_array_equal(a, b)
  epoch0 = np.concatenate(forward[:10])
  assert len(set(epoch0.tolist())) == 100  # no repeats inside an epoch
  assert not np.array_equal(forward[0], forward[10])  # a new order each epoch
  other_seed = trainer.DataOrder(seed=4, num_examples=103, batch_size=10, steps_per_epoch=10)
  assert not np.array_equal(forward[0], other_seed.indices(0))


class _IndexDataset:
  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def get_batch(self, indices):
    return {"index": indices.astype(np.float32)}


def test_evaluation_sees_every_example_exactly_once():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  batch_sharding = sharding.batch_sharding(mesh, (("batch", ("data", "fsdp")),))
  eval_fn = jax.jit(lambda b: {"count": b["mask"].sum(), "total": (b["index"] * b["mask"]).sum()})
  sums = trainer.evaluate_sums(_IndexDataset(37), eval_fn, batch_size=16,
                               batch_sharding=batch_sharding)
  assert sums == {"count": 37.0, "total": float(sum(range(37)))}


def test_a_split_smaller_than_the_eval_batch_is_not_padded_up_to_it(tmp_path, monkeypatch):
  seen = []  # (examples in the split, size of each batch it was scored in)
  original = trainer.evaluate_sums

  def recording(dataset, eval_fn, *, batch_size, batch_sharding):
    sizes = []

    def sized(batch):
      sizes.append(batch["mask"].shape[0])
      return eval_fn(batch)

    sums = original(dataset, sized, batch_size=batch_size, batch_sharding=batch_sharding)
    seen.extend((len(dataset), size) for size in sizes)
    return sums

  monkeypatch.setattr(trainer, "evaluate_sums", recording)
  one_batch = paperzoo.train_and_evaluate(tiny_dlinear(num_steps=2, eval_batch_size=100_000),
                                          tmp_path / "one_batch")
  assert seen and all(n <= size < n + jax.device_count() for n, size in seen), seen
  seen.clear()
  # Many small batches give the same scores: the batch size changes the cost, not the result.
  small = paperzoo.train_and_evaluate(tiny_dlinear(num_steps=2, eval_batch_size=7),
                                      tmp_path / "small")
  assert all(size == 7 for _, size in seen), seen
  assert small["test"] == pytest.approx(one_batch["test"], rel=1e-5)
  assert small["val"] == pytest.approx(one_batch["val"], rel=1e-5)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
  paperzoo.train_and_evaluate(tiny_dlinear(num_steps=3), tmp_path / "full")
  paperzoo.train_and_evaluate(tiny_dlinear(num_steps=3, grad_accum_steps=4), tmp_path / "accum")
  np.testing.assert_allclose(train_losses(tmp_path / "accum"), train_losses(tmp_path / "full"),
                             rtol=1e-5)


def test_ema_weights_are_evaluated(tmp_path):
  plain = paperzoo.train_and_evaluate(tiny_dlinear(num_steps=4), tmp_path / "plain")
  ema = paperzoo.train_and_evaluate(tiny_dlinear(num_steps=4, ema_decay=0.9), tmp_path / "ema")
  assert train_losses(tmp_path / "plain") == pytest.approx(train_losses(tmp_path / "ema"))
  assert ema["test"]["mse"] != pytest.approx(plain["test"]["mse"], rel=1e-4)


def test_early_stopping_selects_on_validation_and_tests_the_best(tmp_path):
  config = tiny_dlinear(num_steps=40, eval_every_steps=2, patience=2)
  config.optimizer.learning_rate = 0.5  # large enough that validation gets worse quickly
  config.optimizer.schedule = "constant"
  results = paperzoo.train_and_evaluate(config, tmp_path)
  val = [r for r in metric_writers.read_metrics(tmp_path) if r["split"] == "val"]
  best = min(val, key=lambda r: r["mse"])
  assert results["best_step"] == best["step"]
  assert results["val"]["mse"] == pytest.approx(best["mse"], rel=1e-6)
  # Those validation scores were recorded when the best checkpoint was saved; scoring the
  # restored checkpoint again gives them (the final test is scored on that same checkpoint).
  model, task = workdir_lib.load_best_model(tmp_path, config=config)
  sums = trainer.evaluate_sums(task.splits["val"], lambda batch: task.eval_sums(model, batch),
                               batch_size=64, batch_sharding=None)
  assert task.summarize(sums) == pytest.approx(results["val"], rel=1e-5)
  assert results["stopped_early"] and results["steps"] < 40
  # Patience 2: training stopped two evaluations after the best one.
  assert val[-1]["step"] == best["step"] + 2 * 2


class _Accuracy:
  selection_metric, selection_mode = "accuracy", "max"


class _MSE:
  selection_metric, selection_mode = "mse", "min"


def _record(metric, loss=None):
  return {"best_metric": metric, "best_val": None if loss is None else {"loss": loss}}


def test_improvement_and_the_loss_tie_break():
  improves = trainer._improves  # pylint: disable=protected-access
  assert improves({"accuracy": 0.5, "loss": 9.0}, _record(None), _Accuracy(), "")
  assert improves({"accuracy": 0.6, "loss": 9.0}, _record(0.5, 1.0), _Accuracy(), "")
  assert not improves({"accuracy": 0.4, "loss": 0.1}, _record(0.5, 1.0), _Accuracy(), "loss")
  assert improves({"mse": 0.4}, _record(0.5), _MSE(), "")
  assert not improves({"mse": 0.6}, _record(0.5), _MSE(), "")
  # A tie keeps the earlier checkpoint, unless the tie-break finds a lower validation loss.
  assert not improves({"accuracy": 0.5, "loss": 0.9}, _record(0.5, 1.0), _Accuracy(), "")
  assert improves({"accuracy": 0.5, "loss": 0.9}, _record(0.5, 1.0), _Accuracy(), "loss")
  assert not improves({"accuracy": 0.5, "loss": 1.0}, _record(0.5, 1.0), _Accuracy(), "loss")
  assert not improves({"accuracy": 0.5, "loss": 0.9}, _record(0.5), _Accuracy(), "loss")
  # "later" (Time-Series-Library's EarlyStopping with delta 0): any tie moves the checkpoint on.
  assert improves({"accuracy": 0.5, "loss": 2.0}, _record(0.5, 1.0), _Accuracy(), "later")
  assert improves({"mse": 0.5}, _record(0.5), _MSE(), "later")
  assert not improves({"mse": 0.6}, _record(0.5), _MSE(), "later")
  with pytest.raises(ValueError, match="reports no validation loss"):
    improves({"mse": 0.5}, _record(None), _MSE(), "loss")  # at the first evaluation


@pytest.mark.parametrize("tie_break", ["", "later", "loss"])
def test_selection_tie_break_picks_the_checkpoint_and_counts_patience(tmp_path, tie_break):
  """BasicMotions' validation set is 8 series, so its accuracy ties between evaluations."""
  config = uea.get_config("subset=BasicMotions,model=itransformer,seed=2023")
  config.train.update(num_steps=24, eval_every_steps=2, patience=3, plots=False,
                      progress_bar=False, selection_tie_break=tie_break)
  results = paperzoo.train_and_evaluate(config, tmp_path)
  val = [r for r in metric_writers.read_metrics(tmp_path) if r["split"] == "val"]
  top = max(r["accuracy"] for r in val)
  tied = [r for r in val if r["accuracy"] == top]
  assert len(tied) > 1  # the case the tie-break is for
  # Without a tie-break the first evaluation at the top accuracy is kept, with "later" the last
  # one, with "loss" the lowest loss there (the earliest of equal losses); patience counts from
  # that evaluation.
  best = {"": tied[0], "later": tied[-1],
          "loss": min(tied, key=lambda r: r["loss"])}[tie_break]
  assert results["best_step"] == best["step"]
  assert val[-1]["step"] in (best["step"] + 3 * 2, 24)  # patience 3 evaluations, or the end


@pytest.mark.parametrize("legacy", [False, True])
def test_results_name_the_split_that_selected_the_checkpoint(tmp_path, legacy):
  config = uea.get_config(f"subset=BasicMotions,model=itransformer,legacy_test_selection={legacy}")
  config.train.update(num_steps=2, plots=False, progress_bar=False)
  results = paperzoo.train_and_evaluate(config, tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert results["selection"] == saved["selection"] == ("test (legacy)" if legacy
                                                        else "validation")
  if legacy:  # its "validation" scores are the test scores
    assert results["val"]["accuracy"] == results["test"]["accuracy"]


def test_an_unknown_selection_tie_break_is_refused(tmp_path):
  config = tiny_dlinear(selection_tie_break="accuracy")
  with pytest.raises(config_lib.ConfigError,
                     match="train.selection_tie_break='accuracy': must be one of '', 'later'"):
    paperzoo.train_and_evaluate(config, tmp_path)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny_dlinear(num_steps=20, checkpoint_every_steps=1)
  config.optimizer.learning_rate = 1e30
  config.optimizer.schedule = "constant"
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step (\d+)") as error:
    paperzoo.train_and_evaluate(config, tmp_path / "run")
  bad_step = int(error.value.args[0].split("at step ")[1].split(";")[0])
  checkpoints = checkpoint_lib.Checkpoints(tmp_path / "run", keep=2)
  assert checkpoints.latest_step() == bad_step - 1
  checkpoints.close()
  assert (f"the newest checkpoint that passes its check, step {bad_step - 1}, is kept"
          in str(error.value))
  # Before any checkpoint: the message says so (not "step None").
  config.train.checkpoint_every_steps = 0
  config.train.log_every_steps = 1
  with pytest.raises(trainer.NonFiniteLossError,
                     match="no checkpoint had been saved before it"):
    paperzoo.train_and_evaluate(config, tmp_path / "early")


def test_resuming_with_a_different_model_is_refused(tmp_path):
  paperzoo.train_and_evaluate(tiny_dlinear(), tmp_path)
  config = tiny_dlinear(num_steps=4)
  config.model.individual = True
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="config.model differs"):
    paperzoo.train_and_evaluate(config, tmp_path)
  for key, value in (("seed", 7), ("train.batch_size", 5)):  # another data order
    other = tiny_dlinear(num_steps=4)
    other.update_from_flattened_dict({key: value})
    with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                       match=rf"config.{key} differs .*now: {value}\)"):
      paperzoo.train_and_evaluate(other, tmp_path)
  # Without the saved config to compare against, the checkpoint's metadata is checked before
  # any array is read, and the error names the parameters that differ.
  (tmp_path / "config.json").unlink()
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r"does not match the model being trained \(params\.seasonal_linear"
                           r"\.bias: model \(7, 24\), checkpoint \(24,\);"):
    paperzoo.train_and_evaluate(config, tmp_path)


def test_a_checkpoint_is_checked_leaf_by_leaf_before_it_is_read(tmp_path):
  """Missing, extra and reshaped leaves are named; namedtuples (optax states) and tuples in the
  train state match the dicts and lists that orbax's saved metadata holds."""
  params = {"w": np.ones((3, 4), np.float32), "b": np.zeros(4, np.float32)}
  state = {"params": params, "opt_state": optax.adam(1e-3).init(params),
           "step": np.int32(2)}
  saved = checkpoint_lib.Checkpoints(tmp_path, keep=1)
  saved.save(2, state, {"best": 1.0})
  saved.close()

  def restore(state):
    checkpoints = checkpoint_lib.Checkpoints(tmp_path, keep=1)  # fresh, as on a resume
    try:
      return checkpoints.restore_latest(jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                         sharding=jax.sharding.SingleDeviceSharding(
                                             jax.devices()[0])), state))
    finally:
      checkpoints.close()

  restored, record, step = restore(state)
  assert step == 2
  np.testing.assert_array_equal(restored["opt_state"][0].mu["w"], 0)
  assert record == {"best": 1.0}
  for other, named in (
      ({**params, "extra": np.ones(2, np.float32)}, r"params\.extra: not in the checkpoint"),
      ({"w": params["w"]}, r"params\.b: in the checkpoint, not in the model"),
      ({**params, "w": np.ones((3, 5), np.float32)},
       r"params\.w: model \(3, 5\), checkpoint \(3, 4\)")):
    with pytest.raises(checkpoint_lib.CheckpointMismatchError, match=named):
      restore({**state, "params": other})


def test_a_finished_workdir_resumes_without_training_again(tmp_path):
  first = paperzoo.train_and_evaluate(tiny_dlinear(num_steps=3), tmp_path)
  second = paperzoo.train_and_evaluate(tiny_dlinear(num_steps=3), tmp_path)
  assert second["test"] == first["test"]
  assert len(train_losses(tmp_path)) == 3
  splits = [r["split"] for r in metric_writers.read_metrics(tmp_path)]
  assert splits.count("test") == 1 and splits[-1] == "test"  # the final test, once


def test_a_run_saved_before_a_key_was_added_reopens_at_the_keys_default(tmp_path):
  """A finished run whose config.json predates a schema key (`config.ADDED_KEY_DEFAULTS`)
  reopens at that key's default, as the grids count it done; at another value it is refused."""
  first = paperzoo.train_and_evaluate(tiny_dlinear(num_steps=3), tmp_path)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert "revision" not in saved["model"]  # DLinear's config has no model.revision yet
  for revision, refused in ((0, False), (1, True)):
    config = tiny_dlinear(num_steps=3)
    with config.unlocked():
      config.model.revision = revision  # as if the key joined the schema after this run
    if refused:
      with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                         match=r"config.model differs .*'revision': 1"):
        paperzoo.train_and_evaluate(config, tmp_path)
    else:
      assert paperzoo.train_and_evaluate(config, tmp_path)["test"] == first["test"]


def test_a_fresh_start_discards_a_left_over_best_checkpoint(tmp_path):
  """Latest checkpoints removed, best kept: the run starts afresh and must not test the old
  best (orbax would also skip saving the new best at the same step)."""
  paperzoo.train_and_evaluate(tiny_dlinear(num_steps=3), tmp_path / "run")
  shutil.rmtree(tmp_path / "run" / "checkpoints")
  config = tiny_dlinear(num_steps=3)
  config.optimizer.learning_rate *= 10  # another run: other weights
  again = paperzoo.train_and_evaluate(config, tmp_path / "run")
  clean = paperzoo.train_and_evaluate(config, tmp_path / "clean")
  assert again["test"] == clean["test"]


def test_a_best_checkpoint_lost_at_the_resume_step_is_saved_again(tmp_path):
  """A kill while the best checkpoint of step s is written, after the latest of step s: the
  latest state is the best one, so resuming saves it as the best again."""
  first = paperzoo.train_and_evaluate(tiny_dlinear(num_steps=3), tmp_path)
  assert first["best_step"] == 3
  shutil.rmtree(tmp_path / "best" / "3")
  second = paperzoo.train_and_evaluate(tiny_dlinear(num_steps=3), tmp_path)
  assert second["best_step"] == 3 and second["test"] == first["test"]


def test_quickstart_learns_the_synthetic_series(tmp_path):
  config = quickstart.get_config()
  config.train.num_epochs = 1
  config.train.progress_bar = False
  results = paperzoo.train_and_evaluate(config, tmp_path)
  # Predicting the mean of the normalized series scores about 1.0; one epoch gets well below.
  assert results["test"]["mse"] < 0.3, results["test"]
  assert (tmp_path / "forecasts.png").stat().st_size > 10_000
