"""The block-sparse prefill evaluation on a (smoke-size) long-context model, end to end."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from experiments import language_model_grid

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.long_context", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900)


def test_long_context_scores_dense_and_xattention_and_writes_its_report(tmp_path):
  outcome = language_model_grid.GRID.train(["long/attention"], seeds=1, workdir=tmp_path,
                                           fast=True, report=tmp_path / "lm.md",
                                           log=lambda _: None)
  assert len(outcome["trained"]) == 1, outcome
  workdir = outcome["trained"][0].workdir
  report = tmp_path / "long_context.md"
  done = _run(f"--workdir={workdir}", "--thresholds=0.0,1.0", "--lines=1", "--speed_lengths=128",
              "--density_windows=1", "--val_windows=16", "--repeats=1",
              f"--report={report}")
  assert done.returncode == 0, done.stderr[-3000:]
  text = report.read_text()
  rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()
          if line.startswith("| ")}
  assert rows["dense"].split(" | ")[1] == "100.0%"
  # Threshold 1 keeps every visible block; 0 only the diagonal: 2 of the 3 visible blocks of
  # a 128-character window in blocks of 64.
  assert rows["xattention (threshold 1)"].split(" | ")[1] == "100.0%"
  assert rows["xattention (threshold 1)"].split(" | ")[3] == "+0.0000"
  assert rows["xattention (threshold 0)"].split(" | ")[1] == "66.7%"
  # One vertical line (key 0, always kept) and one slash (offset 0): block 0 and the diagonal,
  # which in a 128-character window is every visible block, so dense attention exactly.
  assert rows["minference (1 vertical + 1 slash)"].split(" | ")[1] == "100.0%"
  assert rows["minference (1 vertical + 1 slash)"].split(" | ")[3] == "+0.0000"
  assert "| 128 | dense (XLA) | 100% |" in text
  assert report.with_suffix(".json").exists()
  assert "passkey accuracy" in text and "the first 16 validation windows only" in text

  unknown = _run(f"--workdir={workdir}", "--methods=flexprefill")
  assert unknown.returncode == 2
  assert unknown.stderr.strip().splitlines()[-1] == (
      "error: --methods: unknown ['flexprefill']; valid: xattention, minference")
  missing = _run(f"--workdir={tmp_path / 'nothing'}")
  assert missing.returncode == 3
  assert "holds no finished run" in missing.stderr.strip().splitlines()[-1]
