"""The long-context evaluation (sparse prefill, SnapKV, decoding) on a smoke-size long-context
model, end to end."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from experiments import language_model_grid

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.long_context", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900)


def _trained_model(tmp_path) -> pathlib.Path:
  outcome = language_model_grid.GRID.train(["long/attention"], seeds=1, workdir=tmp_path,
                                           fast=True, report=tmp_path / "lm.md",
                                           log=lambda _: None)
  assert len(outcome["trained"]) == 1, outcome
  return outcome["trained"][0].workdir


def _rows(text: str) -> dict[str, list[str]]:
  return {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines()
          if line.startswith("| ")}


# Every section of the report, on the smallest settings (one window of the smoke model).
_COMMON = ("--budgets=48", "--snapkv_tail=16", "--new_tokens=2", "--speed_lengths=128",
           "--density_windows=1", "--val_windows=16", "--repeats=1")


def test_long_context_writes_every_section_resumes_and_refuses_bad_flags(tmp_path):
  workdir = _trained_model(tmp_path)
  report = tmp_path / "long_context.md"
  args = (f"--workdir={workdir}", "--methods=xattention,minference_heads",
          "--thresholds=0.0", "--head_budgets=1.0", *_COMMON, f"--report={report}")
  done = _run(*args)
  assert done.returncode == 0, done.stderr[-3000:]
  text = report.read_text()
  rows = _rows(text)
  assert rows["dense"][1] == "100.0%"
  # Threshold 0 keeps only the diagonal: 2 of the 3 visible blocks of a 128-character window
  # in blocks of 64.
  assert rows["xattention (threshold 0)"][1] == "66.7%"
  # A whole budget lets every head keep every block: dense attention.
  assert rows["minference per-head patterns (budget 1)"][1:4:2] == ["100.0%", "+0.0000"]
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
  assert len(ledger.read_text().splitlines()) == 3 + 1 + 2 + 1
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


@pytest.mark.slow
def test_every_selector_at_its_keep_everything_setting_is_dense_attention(tmp_path):
  workdir = _trained_model(tmp_path)
  report = tmp_path / "long_context.md"
  done = _run(f"--workdir={workdir}", "--thresholds=1.0", "--lines=1", "--head_budgets=1.0",
              "--gammas=1.0", "--sale_thresholds=0.0", *_COMMON, f"--report={report}")
  assert done.returncode == 0, done.stderr[-3000:]
  rows = _rows(report.read_text())
  # Threshold 1 and gamma 1 keep all the mass, a whole budget every block, a relative score
  # threshold of 0 drops nothing; one vertical line (key 0, always kept) and one slash
  # (offset 0) cover a 128-character window in blocks of 64: dense attention, each.
  for method in ("xattention (threshold 1)", "minference (1 vertical + 1 slash)",
                 "minference per-head patterns (budget 1)", "flexprefill (gamma 1)",
                 "sale (threshold 0)"):
    assert rows[method][1:4:2] == ["100.0%", "+0.0000"], rows[method]
