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


def test_long_context_scores_every_method_resumes_and_writes_its_report(tmp_path):
  outcome = language_model_grid.GRID.train(["long/attention"], seeds=1, workdir=tmp_path,
                                           fast=True, report=tmp_path / "lm.md",
                                           log=lambda _: None)
  assert len(outcome["trained"]) == 1, outcome
  workdir = outcome["trained"][0].workdir
  report = tmp_path / "long_context.md"
  args = (f"--workdir={workdir}", "--thresholds=0.0,1.0", "--lines=1", "--head_budgets=1.0",
          "--gammas=1.0", "--sale_thresholds=0.0", "--budgets=48", "--snapkv_tail=16",
          "--new_tokens=2", "--speed_lengths=128", "--density_windows=1", "--val_windows=16",
          "--repeats=1", f"--report={report}")
  done = _run(*args)
  assert done.returncode == 0, done.stderr[-3000:]
  text = report.read_text()
  rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines()
          if line.startswith("| ")}
  assert rows["dense"][1] == "100.0%"
  # Threshold 1 keeps every visible block; 0 only the diagonal: 2 of the 3 visible blocks of
  # a 128-character window in blocks of 64.
  assert rows["xattention (threshold 1)"][1:4:2] == ["100.0%", "+0.0000"]
  assert rows["xattention (threshold 0)"][1] == "66.7%"
  # One vertical line (key 0, always kept) and one slash (offset 0): block 0 and the diagonal,
  # which in a 128-character window is every visible block, so dense attention exactly.
  assert rows["minference (1 vertical + 1 slash)"][1:4:2] == ["100.0%", "+0.0000"]
  # A whole budget lets every head keep every block, gamma 1 keeps all the mass and a
  # relative score threshold of 0 drops nothing: dense attention, each.
  for method in ("minference per-head patterns (budget 1)", "flexprefill (gamma 1)",
                 "sale (threshold 0)"):
    assert rows[method][1:4:2] == ["100.0%", "+0.0000"], rows[method]
  assert "heads per pattern" in text
  assert "| 128 | dense (XLA) | 100% |" in text
  # SnapKV: the full cache and a budget of 48 of a 112-character prompt, both decoded.
  assert rows["full"][2] == ""
  assert float(rows["48 positions per head"][1]) > 0
  assert "| 128 | full | dense |" in text and "| 128 | 48 per head | dense |" in text
  assert "| 128 | full | lean |" in text
  assert (report.parent / "long_context" / "quality.png").exists()
  assert "passkey accuracy" in text and "the first 16 validation windows only" in text

  # Every row is in the ledger: a second run computes nothing and writes the same tables.
  ledger = report.with_name("long_context_runs.jsonl")
  assert len(ledger.read_text().splitlines()) == 7 + 1 + 2 + 1
  again = _run(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert report.read_text().split("## ")[1:] == text.split("## ")[1:]

  unknown = _run(f"--workdir={workdir}", "--methods=snapkv")
  assert unknown.returncode == 2
  assert unknown.stderr.strip().splitlines()[-1] == (
      "error: --methods: unknown ['snapkv']; valid: xattention, minference, "
      "minference_heads, flexprefill, sale")
  missing = _run(f"--workdir={tmp_path / 'nothing'}")
  assert missing.returncode == 3
  assert "holds no finished run" in missing.stderr.strip().splitlines()[-1]
