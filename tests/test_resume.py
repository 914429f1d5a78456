"""Nothing saved is lost: a run killed with SIGKILL, or stopped with SIGTERM, resumes from its
last checkpoint and ends with exactly the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import paperzoo
from experiments import cli
from experiments.configs import quickstart
from paperzoo import metric_writers
from tests.conftest import REPO_ROOT

NUM_STEPS = 300
OVERRIDES = {"num_steps": NUM_STEPS, "batch_size": 16, "eval_every_steps": 100,
             "checkpoint_every_steps": 20, "log_every_steps": 5, "plots": False}


def config():
  config = quickstart.get_config("runlocal")
  config.model.update(d_model=16, d_ff=16, num_heads=2)
  config.train.update(OVERRIDES)
  return config


def start_cli(workdir: pathlib.Path) -> subprocess.Popen:
  args = [f"--config.train.{k}={v}" for k, v in OVERRIDES.items()]
  args += ["--config.model.d_model=16", "--config.model.d_ff=16", "--config.model.num_heads=2"]
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.run", f"--workdir={workdir}",
       "--config=experiments/configs/quickstart.py:runlocal", *args],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def saved_steps(workdir: pathlib.Path) -> list[int]:
  """Completed checkpoints (orbax renames a finished temporary directory to the step)."""
  directory = workdir / "checkpoints"
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def wait_for_checkpoint_after(workdir, step, process, timeout=240.0) -> int:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = [s for s in saved_steps(workdir) if s > step]
    if steps:
      return steps[-1]
    assert process.poll() is None, process.communicate()[1][-3000:]
    time.sleep(0.02)
  raise TimeoutError(f"no checkpoint after step {step} in {workdir}")


def test_kill_and_sigterm_resume_to_the_uninterrupted_result(tmp_path):
  reference = paperzoo.train_and_evaluate(config(), tmp_path / "reference")

  workdir = tmp_path / "interrupted"
  # 1. SIGKILL right after a checkpoint: no chance to clean up.
  process = start_cli(workdir)
  wait_for_checkpoint_after(workdir, 0, process)
  process.kill()
  process.wait()
  killed_at = saved_steps(workdir)[-1]
  assert killed_at < NUM_STEPS

  # 2. Resume, then SIGTERM: the run saves and exits cleanly.
  process = start_cli(workdir)
  wait_for_checkpoint_after(workdir, killed_at, process)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=120)
  if '"status": "preempted"' in stdout:  # (else it finished before the signal arrived)
    assert process.returncode == cli.PREEMPTED, stderr[-3000:]  # "resume later", not done
    assert "resumed from" in stdout and saved_steps(workdir)[-1] < NUM_STEPS
  else:
    assert process.returncode == 0, stderr[-3000:]

  # 3. Resume to the end.
  process = start_cli(workdir)
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]

  resumed = json.loads((workdir / "results.json").read_text())
  assert resumed["test"] == reference["test"]
  assert resumed["val"] == reference["val"]
  assert resumed["best_step"] == reference["best_step"]
  # The metric log reads like one uninterrupted run.
  drop = ("learning_rate",)
  strip = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]
  assert strip(metric_writers.read_metrics(workdir)) == strip(
      metric_writers.read_metrics(tmp_path / "reference"))
