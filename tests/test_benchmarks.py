"""The speed benchmark runs end to end (one epoch of DLinear) and prints its ratios."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


def test_step_cost_counts_the_run_with_the_configs_own_data_size():
  from experiments import configs  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import step_cost  # pylint: disable=g-import-not-at-top
  config = configs.load("lra", "task=listops,mixer=linear,size=cpu")
  row = step_cost.step_cost(config, shrink_data=True)
  assert row["steps"] == int(config.train.num_epochs) * (20_000 // 64)
  assert row["example_shapes"]["inputs"] == (256,) and row["batch"] == 64
  # At least the matmuls of the forward and backward passes through the blocks' weights.
  block_weights = 2 * (4 * 64 * 64 + 2 * 64 * 128)
  assert row["step_gflop"] * 1e9 > 3 * 2 * 64 * 256 * block_weights
  assert row["run_pflop"] == pytest.approx(row["step_gflop"] * row["steps"] / 1e6)
  assert not row["undercounted"]  # linear attention: no loops, no kernels


def test_step_cost_cli_prints_a_line_per_config():
  result = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.step_cost", "--config=dlinear.py:runlocal",
       "--config=vit.py:data=mnist,runlocal"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [l for l in result.stdout.splitlines() if "GFLOP/step" in l]
  assert [l.split(":")[0] for l in lines] == ["dlinear.py", "vit.py"]


def test_step_cost_flags_loops_whose_bodies_xla_counts_once():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import step_cost  # pylint: disable=g-import-not-at-top
  x = jnp.ones((4, 4))
  nested_scan = jax.make_jaxpr(lambda a: jax.jit(lambda b: jax.lax.cond(
      True, lambda c: jax.lax.scan(lambda h, _: (h @ c, None), c, None, length=3)[0],
      lambda c: c, b))(a))(x).jaxpr
  assert step_cost.has_loops_or_kernels(nested_scan)
  dropout_only = jax.make_jaxpr(lambda a: a * jax.random.bernoulli(jax.random.key(0), 0.5,
                                                                   a.shape))(x).jaxpr
  assert not step_cost.has_loops_or_kernels(dropout_only)


def test_lm_speed_parts_run_and_print_their_ratios(tmp_path):
  from experiments.benchmarks import lm_speed  # pylint: disable=g-import-not-at-top
  lines = []
  step = lm_speed.step_part("mixer=attention,runlocal", repeats=1, steps=2, use_torch=False,
                            print_fn=lines.append)
  assert step["step_seconds"] > 0 and step["forward_seconds"] > 0
  assert "ms/step" in lines[0] and "of this machine's float32 matmul rate" in lines[1]
  # The profile names the step's phases: the products of forward and backward are timed.
  phases = {(phase, op) for phase, op, ms, _ in step["profile"]["rows"] if ms > 0}
  assert {("forward", "dot_general"), ("backward", "dot_general")} <= phases
  assert any("where the time goes" in line for line in lines)
  length = lm_speed.length_part([16, 32], 64, repeats=1, steps=2, arg="runlocal",
                                mixers=lm_speed.LENGTH_MIXERS[1:2],
                                plot=str(tmp_path / "speed.png"), print_fn=lines.append)
  assert [r["length"] for r in length["rows"]] == [16, 32]
  assert (tmp_path / "speed.png").exists()
  decode = lm_speed.decode_part(24, repeats=1, steps=1, arg="runlocal",
                                mixers=("attention",), print_fn=lines.append)
  assert [r["mixer"] for r in decode["rows"]] == ["attention"]
  assert all(r["speedup"] > 0 and r["generate_tokens_per_second"] > 0 for r in decode["rows"])
  assert any("x per character" in line for line in lines)
