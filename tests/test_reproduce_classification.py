"""The classification reproduction (experiments/classification_grid.py and
`python -m experiments.reproduce classification`): its entries, resume, and report."""

from __future__ import annotations

import csv
import json
import pathlib
import subprocess
import sys

import pytest

import paperzoo
from experiments import classification_grid as grid
from tests.conftest import REPO_ROOT


def fake_finished(run: grid.ClassificationRun, accuracy: float) -> None:
  run.workdir.mkdir(parents=True, exist_ok=True)
  (run.workdir / "config.json").write_text(run.config().to_json_best_effort(indent=2))
  (run.workdir / "results.json").write_text(json.dumps(
      {"status": "done", "test": {"accuracy": accuracy, "loss": 1.0},
       "val": {"accuracy": accuracy, "loss": 1.0}}))


def test_entries_select_by_key_prefix_and_refuse_unknown_keys():
  uea = grid.entries(["uea/BasicMotions"])
  assert len(uea) == 6  # 3 models x 2 selection protocols
  assert {e.config for e in uea} == {"uea"}
  assert all("GPU" not in grid.entries([k])[0].group for k in grid.CPU_KEYS)
  with pytest.raises(ValueError, match="valid keys .*mnist/vit"):
    grid.entries(["mnist/resnet"])


def test_a_prefix_that_reaches_cpu_entries_never_selects_the_gpu_ones():
  listops = [e.key for e in grid.entries(["lra/listops"])]
  assert listops == [f"lra/listops/{m}/cpu" for m in ("attention", "linear", "mamba")]
  assert all(e.key in grid.CPU_KEYS for e in grid.entries(["lra"]))
  assert [e.key for e in grid.entries(["lra/listops/attention/full"])] == [
      "lra/listops/attention/full"]
  assert [e.key for e in grid.entries(["cifar10"])] == ["cifar10/vit", "cifar10/swin"]


@pytest.mark.parametrize("entry", grid.ENTRIES, ids=lambda e: e.key)
def test_every_entry_builds_its_config(entry, tmp_path):
  (run,) = grid.runs([entry], seeds=1, workdir=tmp_path)
  config = run.config()
  assert config.seed == 2021 and config.task.name == "classification"
  assert run.command.startswith(f"python -m experiments.run --workdir={run.workdir} ")
  if "legacy" in entry.key:
    assert config.data.legacy_test_selection


def test_tiny_grid_trains_resumes_and_reports(tmp_path):
  calls = []

  def train(config, workdir):
    calls.append(pathlib.Path(workdir))
    return paperzoo.train_and_evaluate(config, workdir)

  report = tmp_path / "classification.md"
  keys = ["uea/BasicMotions/transformer/val"]
  outcome = grid.GRID.train(keys, seeds=1, workdir=tmp_path / "runs", fast=True,
                            report=report, train_fn=train, log=lambda _: None)
  assert len(outcome["trained"]) == 1 and len(calls) == 1
  again = grid.GRID.train(keys, seeds=1, workdir=tmp_path / "runs", fast=True,
                          report=report, train_fn=train, log=lambda _: None)
  assert len(again["skipped"]) == 1 and len(calls) == 1  # nothing retrained
  text = report.read_text()
  assert "Smoke mode" in text and "uea/BasicMotions/transformer/val" in text and "(n=1)" in text
  assert (calls[0] / "confusion_matrix.png").exists()  # the pictures the report links
  copy = tmp_path / "classification" / (
      "uea_BasicMotions_transformer_val_seed2021_confusion_matrix.png")
  assert copy.exists()  # copied beside the report, and linked from its row
  row_line = next(l for l in text.splitlines() if l.startswith(f"| {keys[0]} |"))
  assert f"[confusion_matrix](classification/{copy.name})" in row_line
  with open(report.with_suffix(".csv"), newline="") as f:
    rows = {r["entry"]: r for r in csv.DictReader(f)}
  assert set(rows) == set(grid.CPU_KEYS)  # the whole table, with seeds 2021-2023
  assert rows[keys[0]]["n"] == "1" and rows[keys[0]]["status"] == "1 done, 2 not run"


def test_report_mean_std_and_published(tmp_path):
  (entry,) = grid.entries(["uea/JapaneseVowels/itransformer/legacy"])
  runs = grid.runs([entry], seeds=3, workdir=tmp_path)
  for run, accuracy in zip(runs, (0.97, 0.98, 0.99)):
    fake_finished(run, accuracy)
  rows = grid.collect([entry], seeds=3, workdir=tmp_path)
  paths = grid.write_report(rows, tmp_path / "c.md", command="cmd")
  line = next(l for l in paths["md"].read_text().splitlines() if entry.key in l)
  assert "98.00 ± 1.00 (n=3)" in line and "98.60" in line and "| done |" in line
  assert "TEST-selected (legacy)" in paths["md"].read_text()


def test_cli_report_only(tmp_path):
  report = tmp_path / "c.md"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.reproduce", "classification", "--report_only",
       "--entries=mnist", f"--workdir={tmp_path / 'runs'}", f"--report={report}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  text = report.read_text()
  assert "mnist/vit" in text and "cifar10/vit" not in text
