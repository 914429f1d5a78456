"""The speed benchmark runs end to end (one epoch of DLinear) and prints its ratios."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_forecasting_speed_benchmark_runs(tmp_path):
  out = tmp_path / "speed.json"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.forecasting_speed", "--models=dlinear",
       "--epochs=1", f"--json={out}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "s/epoch" in result.stdout and "floor:" in result.stdout
  row = json.loads(out.read_text())["rows"][0]
  assert row["model"] == "dlinear" and row["epochs"] == 1
  assert 0 < row["fraction_of_floor"] < 1.5
  assert row["epoch_gflop"] > 0 and row["test_mse"] < 1.0


def test_forecasting_speed_benchmark_knows_every_forecasting_model():
  from experiments import forecasting_grid  # pylint: disable=g-import-not-at-top
  assert {"itransformer", "dlinear", "patchtst", "autoformer", "smamba", "informer",
          "gateformer", "transformer"} <= set(forecasting_grid.default_models())
  result = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.forecasting_speed", "--models=dlinaer"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "unknown model 'dlinaer'; valid: itransformer" in result.stderr + result.stdout


def test_forecasting_speed_benchmark_steps_and_grid_projection(tmp_path):
  """--steps times a few steps and scales them to an epoch; --project_grid bounds the grid."""
  out = tmp_path / "speed.json"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.forecasting_speed", "--models=dlinear",
       "--steps=20", "--project_grid", f"--json={out}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "20 steps" in result.stdout and "undertrained" in result.stdout
  row = json.loads(out.read_text())["rows"][0]
  assert row["timed_steps"] == 20 and row["run_speedup_vs_reference"] is None
  grid = row["grid"]
  # DLinear runs on every data set: 3 x 4 horizons plus ILI's 4, at most 10 epochs each.
  assert grid["cells"] == 16 and not grid["refused"] and grid["max_epochs_per_seed"] == 160
  assert 0 < grid["train_seconds_upper_bound"] < 3 * 3600
