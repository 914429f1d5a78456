r"""Training speed of the forecasting models at the ETTh1 settings, against the reference.

  python -m experiments.benchmarks.forecasting_speed [--models=itransformer,dlinear] [--repeats=1]
  python -m experiments.benchmarks.forecasting_speed --models=all   # every forecasting config
  python -m experiments.benchmarks.forecasting_speed --models=all --steps=50 --project_grid

For each model it runs the paper's full protocol (`experiments/configs/<model>.py:data=etth1,
pred_len=96`: 10 epochs, validation each epoch, early stopping, test on the best checkpoint)
through `paperzoo.train_and_evaluate`, and prints:
  * seconds per training epoch (training steps only; compilation and evaluation apart),
    steps/s, and the whole run's wall time (from the call to results, compilation included);
  * the fraction of this machine's floor: the train step's FLOPs (XLA's cost analysis of the
    forward pass x 3 for forward + backward) over the float32 matmul throughput measured here;
  * for iTransformer and DLinear, the ratio to PyTorch baselines timed in this same run
    (`torch_reference.py`: the same model, sizes, data order and optimizer in PyTorch; needs
    `pip install torch`, which is not a paperzoo dependency): "reference", the operations of
    Time-Series-Library's code (its feed-forward is a kernel-1 Conv1d), and "linear", the same
    model with nn.Linear there,
    which is faster in PyTorch. Each times one training epoch and one validation + test pass,
    from which the reference protocol's whole run (validation and test after every epoch) is
    estimated;
  * for those two, the ratio to Time-Series-Library's own recorded epoch and run times
    (`RECORDED_REFERENCE`: its run.py with torch 2.13 on another 2-core CPU machine; where they
    come from is in experiments/forecasting_protocol.md). That machine was faster than the
    one of experiments/results/etth1_spine.md (iTransformer in PyTorch: 6.3 s/epoch there,
    16-17.5 s on the results machine), so the ratio that counts is the same-run one above;
  * the test MSE, so a speed-up is never bought with accuracy.

`--steps=N` trains N steps instead of the protocol's epochs (the heavy models spend minutes per
epoch here); seconds per epoch are then N steps' time scaled to an epoch, and the test MSE is
that of an undertrained model. `--project_grid` adds, per model, an estimate of the training
time of its whole `experiments.reproduce forecasting` grid (every data set and horizon, 3 seeds)
on this machine: each cell's train-step FLOPs (XLA's count) x steps per epoch x the config's
maximum epochs, divided by the FLOP rate the model achieved in the timed ETTh1 run. It is an
upper bound on training time (early stopping ends most runs sooner) and leaves out compilation
and evaluation.
"""

from __future__ import annotations

import json
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging
from flax import nnx

import paperzoo
from experiments.benchmarks import machine
from experiments.benchmarks import torch_reference
from experiments import configs
from experiments import forecasting_grid
from paperzoo import trainer
from paperzoo.registry import MODELS, TASKS

_MODELS = flags.DEFINE_list("models", ["itransformer", "dlinear"],
                            "Models to time (forecasting configs), or 'all'.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Full runs per model (the median is reported).")
_JSON = flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
_EPOCHS = flags.DEFINE_integer("epochs", 0, "Train this many epochs instead of the config's "
                               "(0: the paper's protocol); for a quick check of the script.")
_STEPS = flags.DEFINE_integer("steps", 0, "Train this many steps instead (0: epochs); seconds "
                              "per epoch are scaled from them.")
_PROJECT_GRID = flags.DEFINE_bool("project_grid", False, "Estimate each model's whole-grid "
                                  "training time on this machine (module docstring).")

# Time-Series-Library's own run.py at ETTh1 L=96, H=96 (experiments/forecasting_protocol.md,
# "Reference times"): seconds per training epoch, the whole 10-epoch run with validation and
# test after every epoch, and that run's test MSE.
RECORDED_REFERENCE = {
    "itransformer": {"epoch_seconds": 6.3, "run_seconds": 80.0, "test_mse": 0.3863},
    "dlinear": {"epoch_seconds": 0.48, "run_seconds": None, "test_mse": 0.3962},
}


def train_step_gflop(config) -> float:
  """FLOPs of one training step: XLA's count for the forward pass, times 3 (fwd + bwd)."""
  return step_cost(config)[0]


def step_cost(config) -> tuple[float, int]:
  """(GFLOP of one training step, training steps per epoch) of a config."""
  task = TASKS.get(config.task.name)(config)
  model = MODELS.get(config.model.name)(config.model, **task.model_kwargs(),
                                        rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(model)
  batch = task.inputs(task.splits["train"].get_batch(np.arange(config.train.batch_size)))
  forward = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b, train=False))
  flops = machine.compiled_flops(forward.lower(params, batch).compile())
  return 3 * flops / 1e9, len(task.splits["train"]) // config.train.batch_size


def project_grid(name: str, achieved_gflops: float, seeds: int = 3) -> dict:
  """Upper bound on the training seconds of `name`'s grid (module docstring)."""
  cells, refused, seconds, epochs = 0, [], 0.0, 0
  for run in forecasting_grid.runs([name], list(forecasting_grid.PROTOCOL), seeds=1,
                                   workdir=tempfile.gettempdir()):
    try:
      config = run.config()
    except ValueError as e:  # a config that refuses a data set (S-Mamba on ILI) is not run
      refused.append(f"{run.data}/{run.pred_len}: {e}")
      continue
    step_gflop, steps_per_epoch = step_cost(config)
    cells += 1
    epochs += int(config.train.num_epochs)
    seconds += step_gflop * steps_per_epoch * int(config.train.num_epochs) / achieved_gflops
  return {"cells": cells, "seeds": seeds, "max_epochs_per_seed": epochs,
          "train_seconds_upper_bound": seeds * seconds, "refused": refused}


def torch_baseline(name: str) -> dict[str, dict] | None:
  """PyTorch times for the same config per variant, or None when torch is not installed."""
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return None
  if name not in torch_reference.MODELS:
    return None
  config = etth1_config(name)
  task = TASKS.get(config.task.name)(config)
  batch_size = config.train.batch_size
  steps_per_epoch = len(task.splits["train"]) // batch_size
  order = trainer.DataOrder(config.seed, len(task.splits["train"]), batch_size, steps_per_epoch)
  variants = {"reference": "conv1d", "linear": "linear"} if name == "itransformer" else {
      "reference": "conv1d"}
  return {variant: torch_reference.epoch_seconds(name, config, task, order, ffn=ffn)
          for variant, ffn in variants.items()}


def etth1_config(name: str):
  """The model's protocol config at the ETTh1 settings (lookback 96, horizon 96)."""
  return configs.load(name, "data=etth1,pred_len=96")


def run_once(name: str) -> dict:
  config = etth1_config(name)
  config.train.progress_bar = False
  config.train.plots = False
  if _EPOCHS.value:
    config.train.num_epochs = _EPOCHS.value
  if _STEPS.value:
    config.train.num_steps = _STEPS.value
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    results = paperzoo.train_and_evaluate(config, workdir)
    results["run_seconds"] = time.perf_counter() - start
  return results


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  gflops = machine.matmul_gflops()
  print(f"machine: {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}"
        f", float32 matmul {gflops:.0f} GFLOP/s (measured now)")
  valid = forecasting_grid.default_models()
  names = valid if _MODELS.value == ["all"] else _MODELS.value
  for name in names:
    if name not in valid:
      raise app.UsageError(f"unknown model {name!r}; valid: {', '.join(valid)} (or all)")
  if _STEPS.value and _EPOCHS.value:
    raise app.UsageError("--steps and --epochs exclude each other")
  whole_run = not _STEPS.value  # whole-run times compare only when the protocol's epochs ran
  rows = []
  for name in names:
    runs = [run_once(name) for _ in range(_REPEATS.value)]
    run = sorted(runs, key=lambda r: r["epoch_seconds"])[len(runs) // 2]
    step_gflop = train_step_gflop(etth1_config(name))
    epoch_gflop = step_gflop * run["steps_per_epoch"]
    floor = epoch_gflop / gflops
    ref = RECORDED_REFERENCE.get(name, {"epoch_seconds": None, "run_seconds": None,
                                        "test_mse": None})
    torch_times = torch_baseline(name)
    row = {
        "model": name, "epoch_seconds": run["epoch_seconds"],
        "steps_per_second": run["steps_per_epoch"] / run["epoch_seconds"],
        "run_seconds": run["run_seconds"], "epochs": run["steps"] / run["steps_per_epoch"],
        "compile_seconds": run["seconds"]["compile"], "eval_seconds": run["seconds"]["eval"],
        "epoch_gflop": epoch_gflop, "floor_seconds": floor,
        "fraction_of_floor": floor / run["epoch_seconds"],
        "epoch_speedup_vs_reference": (ref["epoch_seconds"] / run["epoch_seconds"]
                                       if ref["epoch_seconds"] else None),
        "run_speedup_vs_reference": (ref["run_seconds"] / run["run_seconds"]
                                     if ref["run_seconds"] and whole_run else None),
        "test_mse": run["test"]["mse"], "reference_test_mse": ref["test_mse"],
        "torch": torch_times,
        "all_epoch_seconds": [r["epoch_seconds"] for r in runs],
        "timed_steps": run["steps"],
    }
    rows.append(row)
    timed = (f"{run['steps']} steps" if _STEPS.value else f"{row['epochs']:.0f} epochs")
    print(f"\n{name}: {timed}, {row['epoch_seconds']:.2f} s/epoch "
          f"({row['steps_per_second']:.0f} steps/s), whole run {row['run_seconds']:.1f} s "
          f"(compile {row['compile_seconds']:.1f} s, evaluation {row['eval_seconds']:.1f} s)")
    print(f"  floor: {epoch_gflop:.0f} GFLOP/epoch / {gflops:.0f} GFLOP/s = {floor:.2f} s; "
          f"achieved {100 * row['fraction_of_floor']:.0f}% of it")
    for variant, times in (torch_times or {}).items():
      torch_run = row["epochs"] * (times["train_epoch"] + times["val_and_test"])
      times["epoch_speedup"] = times["train_epoch"] / run["epoch_seconds"]
      times["run_seconds_estimate"] = torch_run if whole_run else None
      times["run_speedup"] = torch_run / run["run_seconds"] if whole_run else None
      print(f"  PyTorch {times['version']} {variant} baseline, this run ({times['threads']} "
            f"threads): {times['train_epoch']:.2f} s/epoch -> {times['epoch_speedup']:.2f}x "
            f"faster per epoch" + (f"; its protocol's whole run (val + test every epoch, "
                                   f"{row['epochs']:.0f} epochs) ~{torch_run:.0f} s -> "
                                   f"{times['run_speedup']:.2f}x faster" if whole_run else ""))
    if torch_times is None and name in torch_reference.MODELS:
      print("  PyTorch baseline skipped: torch is not installed (pip install torch)")
    if ref["epoch_seconds"]:
      print(f"  recorded reference (TSLib, other machine): {ref['epoch_seconds']} s/epoch -> "
            f"{row['epoch_speedup_vs_reference']:.2f}x faster per epoch"
            + (f"; whole run {ref['run_seconds']:.0f} s -> "
               f"{row['run_speedup_vs_reference']:.2f}x faster"
               if row["run_speedup_vs_reference"] else ""))
    print(f"  test MSE {row['test_mse']:.4f}"
          + (f" (reference run {ref['test_mse']})" if ref["test_mse"] else "")
          + (" (undertrained: --steps)" if _STEPS.value else ""))
    if _PROJECT_GRID.value:
      row["grid"] = project_grid(name, epoch_gflop / run["epoch_seconds"])
      grid = row["grid"]
      print(f"  grid ({grid['cells']} cells x {grid['seeds']} seeds, every run to its maximum "
            f"epochs): at most {grid['train_seconds_upper_bound'] / 3600:.1f} h of training "
            f"on this machine" + (f"; refused: {len(grid['refused'])} cells"
                                  if grid["refused"] else ""))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"jax_version": jax.__version__, "matmul_gflops": gflops, "rows": rows}, f,
                indent=2)


if __name__ == "__main__":
  app.run(main)
