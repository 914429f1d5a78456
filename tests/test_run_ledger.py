"""The run ledger (experiments/run_ledger.py): a report keeps its finished runs when their
workdirs are gone, does not retrain them, and still tells a run whose config changed since."""

from __future__ import annotations

import csv
import json
import shutil
import threading

import pytest

from experiments import classification_grid
from experiments import configs
from experiments import forecasting_grid as grid
from experiments import grids
from experiments import generation_grid
from experiments import run_ledger
from tests.test_reproduce import fake_finished


def read_csv(path) -> list[dict[str, str]]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def dlinear_cell(rows):
  return next(r for r in rows if r["model"] == "dlinear" and r["data"] == "etth1"
              and r["pred_len"] == "96")


def never_train(config, workdir):
  raise AssertionError(f"retrained {workdir}")


def test_config_digest_ignores_what_changes_nothing():
  config = configs.load("dlinear", "data=etth1,pred_len=96")
  base = run_ledger.config_dict(config)
  config.train.progress_bar = not config.train.progress_bar
  assert run_ledger.config_digest(run_ledger.config_dict(config)) == run_ledger.config_digest(base)
  config.optimizer.learning_rate *= 2
  changed = run_ledger.config_dict(config)
  assert run_ledger.config_differences(base, changed) == ["optimizer.learning_rate"]
  assert run_ledger.config_digest(changed) != run_ledger.config_digest(base)


def test_a_key_added_later_at_its_default_leaves_older_runs_fresh():
  config = configs.load("dlinear", "data=etth1,pred_len=96")
  today = run_ledger.config_dict(config)
  older = run_ledger.config_dict(config)
  del older["train"]["selection_tie_break"]  # recorded before the key existed
  assert run_ledger.config_differences(older, today) == []
  assert run_ledger.config_digest(older) == run_ledger.config_digest(today)
  config.train.selection_tie_break = "loss"
  changed = run_ledger.config_dict(config)
  assert run_ledger.config_differences(older, changed) == ["train.selection_tie_break"]
  assert run_ledger.config_digest(changed) != run_ledger.config_digest(older)


def test_forecasting_report_keeps_its_runs_after_the_workdirs_are_gone(tmp_path):
  workdir, report = tmp_path / "runs", tmp_path / "results" / "forecasting.md"
  (run,) = grid.runs(["dlinear"], ["etth1"], seeds=1, horizons=[96], workdir=workdir)
  fake_finished(run, 0.381, 0.402)
  grid.GRID.update_report(grid.Cells(["dlinear"]), seeds=1, workdir=workdir, report=report)
  ledger_file = tmp_path / "results" / "forecasting_runs.jsonl"
  (line,) = ledger_file.read_text().splitlines()
  record = json.loads(line)
  assert record["key"] == "protocol/dlinear/etth1_96_96/seed2021" == run.key
  assert record["results"]["test"] == {"mse": 0.381, "mae": 0.402}
  assert record["command"] == run.command
  before = dlinear_cell(read_csv(report.with_suffix(".csv")))

  shutil.rmtree(workdir)  # /tmp cleared, e.g. on a fresh machine
  grid.GRID.update_report(grid.Cells(["dlinear"]), seeds=1, workdir=workdir, report=report)
  after = dlinear_cell(read_csv(report.with_suffix(".csv")))
  assert after == before and after["mse_mean"] == "0.381"
  assert after["status"] == "partial (1/3 seeds)"  # the report shows seeds 2021-2023
  outcome = grid.GRID.train(grid.Cells(["dlinear"], ["etth1"], [96]), seeds=1,
                            workdir=workdir, report=report, train_fn=never_train,
                            log=lambda _: None)
  assert [r.key for r in outcome["skipped"]] == [run.key]
  assert ledger_file.read_text().splitlines() == [line]  # nothing rewritten


def test_a_recorded_run_whose_config_changed_is_stale_and_rerun_stale_replaces_it(tmp_path):
  workdir, report = tmp_path / "runs", tmp_path / "forecasting.md"
  (run,) = grid.runs(["dlinear"], ["etth1"], seeds=1, horizons=[96], workdir=workdir)
  old = run.config()
  old.optimizer.learning_rate *= 10  # trained before today's learning rate
  fake_finished(run, 0.5, 0.5, config=old)
  grid.GRID.update_report(grid.Cells(["dlinear"]), seeds=1, workdir=workdir, report=report)
  shutil.rmtree(workdir)
  ledger = run_ledger.Ledger(run_ledger.ledger_path(report))
  (run,) = grid.runs(["dlinear"], ["etth1"], seeds=1, horizons=[96], workdir=workdir,
                     ledger=ledger)
  state = grids.run_state(run)
  assert state.status == "stale" and "forecasting_runs.jsonl" in state.detail

  def train(config, run_workdir):
    fake_finished(run, 0.38, 0.40)
    return json.loads((run_workdir / "results.json").read_text())

  cells = grid.Cells(["dlinear"], ["etth1"], [96])
  kept = grid.GRID.train(cells, seeds=1, workdir=workdir, report=report, train_fn=never_train,
                         log=lambda _: None)
  assert len(kept["stale"]) == 1
  redone = grid.GRID.train(cells, seeds=1, workdir=workdir, report=report, rerun_stale=True,
                           train_fn=train, log=lambda _: None)
  assert len(redone["trained"]) == 1
  record = run_ledger.Ledger(run_ledger.ledger_path(report)).get(run.key)
  assert record.results["test"]["mse"] == 0.38
  assert record.config_digest == run_ledger.config_digest(run_ledger.config_dict(run.config()))


def test_classification_report_keeps_its_runs_after_the_workdirs_are_gone(tmp_path):
  from tests.test_reproduce_classification import fake_finished as fake_classified
  workdir, report = tmp_path / "runs", tmp_path / "classification.md"
  keys = ["uea/BasicMotions/transformer/val"]
  chosen = classification_grid.entries(keys)
  runs = classification_grid.runs(chosen, seeds=2, workdir=workdir)
  for run, accuracy in zip(runs, (0.95, 1.0)):
    fake_classified(run, accuracy)
  (runs[0].workdir / "examples.txt").write_text("true 1 predicted 1: ...\n")
  classification_grid.GRID.update_report(keys, seeds=2, workdir=workdir, report=report)
  shutil.rmtree(workdir)
  classification_grid.GRID.update_report(keys, seeds=2, workdir=workdir, report=report)
  row = next(r for r in read_csv(report.with_suffix(".csv")) if r["entry"] == chosen[0].key)
  assert row["n"] == "2" and row["accuracies"] == "0.950000 1.000000"
  assert row["status"] == "2 done, 1 not run"  # the report shows seeds 2021-2023
  assert "97.50 ± 3.54 (n=2)" in report.read_text()
  # The picture copy made while the workdir existed is still linked.
  assert ("[examples](classification/uea_BasicMotions_transformer_val_seed2021_examples.txt)"
          in report.read_text())


def test_generation_report_keeps_the_picture_copies_of_recorded_runs(tmp_path):
  from tests.test_generation_grid import fake_finished as fake_generated
  workdir, report = tmp_path / "runs", tmp_path / "results" / "generation.md"
  keys = ["mnist/dit/flow"]
  (run,) = generation_grid.runs(generation_grid.entries(keys), seeds=1, workdir=workdir)
  fake_generated(run, index=0)
  generation_grid.GRID.update_report(keys, seeds=1, workdir=workdir, report=report)
  first = report.read_text()
  assert "](generation/mnist_dit_flow_seed2021_" in first
  shutil.rmtree(workdir)
  generation_grid.GRID.update_report(keys, seeds=1, workdir=workdir, report=report)
  line = lambda text: next(l for l in text.splitlines() if l.startswith("| mnist/dit/flow |"))
  assert line(report.read_text()) == line(first)


def test_two_grids_writing_one_report_wait_for_each_other(tmp_path):
  # Two processes train seeds 2021 and 2022 of one table (`--seed_list`). Seed 2022's report
  # update must wait while seed 2021's holds the lock, then read the ledger afresh: had it read
  # the ledger before, its rewrite would drop seed 2021's record, here the only trace of that
  # run (its workdir is gone).
  workdir, report = tmp_path / "runs", tmp_path / "forecasting.md"
  run_a, run_b = grid.runs(["dlinear"], ["etth1"], seeds=2, horizons=[96], workdir=workdir)
  fake_finished(run_a, 0.38, 0.40)
  fake_finished(run_b, 0.39, 0.41)
  writer = threading.Thread(target=grid.GRID.update_report, args=(grid.Cells(["dlinear"]),),
                            kwargs=dict(seeds=[2022], workdir=workdir, report=report))
  with run_ledger.report_lock(report):
    writer.start()
    writer.join(timeout=1.0)
    assert writer.is_alive(), "the second report update did not wait for the lock"
    run_ledger.Ledger(run_ledger.ledger_path(report)).sync([run_a])
    shutil.rmtree(run_a.workdir)
  writer.join(timeout=60)
  assert not writer.is_alive()
  ledger = run_ledger.Ledger(run_ledger.ledger_path(report))
  assert ledger.get(run_a.key).results["test"]["mse"] == 0.38
  assert ledger.get(run_b.key).results["test"]["mse"] == 0.39
  assert dlinear_cell(read_csv(report.with_suffix(".csv")))["mse_mean"] == "0.385"


def test_a_corrupt_ledger_line_names_the_file_and_line(tmp_path):
  path = tmp_path / "forecasting_runs.jsonl"
  path.write_text('{"key": "a"}\n')
  with pytest.raises(ValueError, match=r"forecasting_runs.jsonl:1 is not a run record"):
    run_ledger.Ledger(path)
