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
