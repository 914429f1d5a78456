"""The forecasting grid (experiments/forecasting_grid.py, `python -m experiments.reproduce`):
which runs it makes, that it resumes without redoing finished runs, and what its table says."""

from __future__ import annotations

import csv
import json
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
from flax import nnx

import paperzoo
from experiments import configs
from experiments import forecasting_grid as grid
from experiments import grids
from paperzoo import workdir as workdir_lib
from paperzoo.registry import MODELS, TASKS
from tests.conftest import REPO_ROOT

# The five configs this grid was written with; others join as their configs appear.
FIVE = ("itransformer", "patchtst", "dlinear", "autoformer", "smamba")  # with paper numbers
GRID_MODELS = FIVE + ("informer", "gateformer", "transformer")


def counting_train_fn(calls: list):
  """paperzoo.train_and_evaluate that records the workdirs it trains."""
  def train(config, workdir):
    calls.append(pathlib.Path(workdir))
    return paperzoo.train_and_evaluate(config, workdir)
  return train


def fake_finished(run: grid.Run, mse: float, mae: float, *, config=None) -> None:
  """Writes what a finished run leaves behind (its config and results.json), without training."""
  run.workdir.mkdir(parents=True, exist_ok=True)
  config = config if config is not None else run.config()
  (run.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  (run.workdir / "results.json").write_text(json.dumps({
      "status": "done", "test": {"mse": mse, "mae": mae}, "val": {"mse": mse, "mae": mae},
      "seed": run.seed, "seconds": {"train": 1.0}, "devices": "1 x cpu"}))


def read_csv(path) -> list[dict[str, str]]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# The grid's runs.

def test_protocol_grid_and_seeds():
  assert grid.PROTOCOL["illness"] == (36, (24, 36, 48, 60))
  for data in ("etth1", "etth2", "exchange"):
    assert grid.PROTOCOL[data] == (96, (96, 192, 336, 720))
  assert grids.seeds_list(3) == [2021, 2022, 2023]
  runs = grid.runs(["dlinear"], ["etth1", "illness"], seeds=2, workdir="/tmp/x")
  assert len(runs) == 2 * 4 * 2
  ili = [r for r in runs if r.data == "illness"]
  assert {(r.seq_len, r.pred_len) for r in ili} == {(36, h) for h in (24, 36, 48, 60)}
  assert ili[0].config_arg == "data=illness,seq_len=36,pred_len=24,seed=2021"
  assert str(ili[0].workdir) == "/tmp/x/protocol/dlinear/illness_36_24/seed2021"
  fast = grid.runs(["dlinear"], ["etth1"], seeds=1, horizons=[96], workdir="/tmp/x", fast=True)
  assert fast[0].config_arg.endswith(",runlocal") and "/tmp/x/fast/" in str(fast[0].workdir)


def test_workdir_inside_the_repository_is_refused():
  with pytest.raises(ValueError, match="inside the repository"):
    grid.runs(["dlinear"], ["etth1"], workdir=REPO_ROOT / "experiments" / "results" / "runs")


def test_default_models_are_the_forecasting_configs_with_paper_numbers_or_listed(
    monkeypatch):
  models = grid.default_models()
  assert set(GRID_MODELS) <= set(models)
  assert "quickstart" not in models
  for model in models:
    assert grid.is_forecasting_config(model)
  # A config joins the grid through the paper-number table (or NO_PAPER_NUMBER) alone.
  monkeypatch.setattr(grid, "PAPER_NUMBERS", {k: v for k, v in grid.PAPER_NUMBERS.items()
                                              if k[0] != "dlinear"})
  assert "dlinear" not in grid.default_models()
  monkeypatch.setattr(grid, "NO_PAPER_NUMBER", ("dlinear",))
  assert "dlinear" in grid.default_models()


@pytest.mark.parametrize("model", GRID_MODELS)
def test_every_grid_cell_builds_its_config_or_says_why_not(model):
  for run in grid.runs([model], list(grid.PROTOCOL), seeds=1, workdir="/tmp/x"):
    if model == "smamba" and run.data == "illness":
      with pytest.raises(ValueError, match="etth1, etth2 and exchange"):
        run.config()
      continue
    config = run.config()  # checks data, seq_len, pred_len and seed came through
    assert config.data.label_len <= config.data.seq_len
    if run.data == "illness":
      assert config.data.label_len == 18  # TSLib's ILI scripts


@pytest.mark.parametrize("model", [m for m in GRID_MODELS if m != "smamba"])
def test_models_forecast_at_ili_lookback_36(model):
  """The models' shapes at L=36 (PatchTST's patching, Autoformer's 18-step decoder context...),
  on real ILI windows; eager, so no compilation (training is the config tests' job)."""
  config = configs.load(model, "data=illness,seq_len=36,pred_len=60,runlocal")
  task = TASKS.get(config.task.name)(config)
  net = MODELS.get(config.model.name)(config.model, **task.model_kwargs(),
                                      rngs=nnx.Rngs(params=0))
  batch = task.splits["test"].get_batch(np.arange(2))
  prediction = np.asarray(net(task.inputs(batch), train=False, rngs=None))
  assert prediction.shape == batch["y"].shape == (2, 60, 7)
  assert np.isfinite(prediction).all()


def test_dataset_specific_settings_leave_etth1_alone():
  from experiments.configs import patchtst, smamba  # pylint: disable=g-import-not-at-top
  etth1 = patchtst.get_config("data=etth1,pred_len=96")
  assert (etth1.model.num_layers, etth1.model.num_heads, etth1.model.d_model) == (1, 2, 512)
  assert etth1.data.label_len == 48
  ili = patchtst.get_config("data=illness,seq_len=36,pred_len=60")
  assert (ili.model.num_layers, ili.model.num_heads, ili.model.d_model) == (4, 16, 2048)
  assert smamba.get_config("data=etth1,pred_len=720").optimizer.learning_rate == 5e-5
  exchange = smamba.get_config("data=exchange,pred_len=96")
  assert (exchange.model.d_model, exchange.train.batch_size) == (128, 16)


# ---------------------------------------------------------------------------------------------
# Running and resuming (real training, the fast smoke setting).

def test_tiny_grid_runs_resumes_and_reports(tmp_path):
  workdir, report = tmp_path / "runs", tmp_path / "report" / "forecasting.md"
  cells = grid.Cells(["dlinear"], ["etth1"], [96])
  kwargs = dict(seeds=2, workdir=workdir, fast=True, report=report, log=lambda _: None)
  calls = []
  outcome = grid.GRID.train(cells, train_fn=counting_train_fn(calls), **kwargs)
  assert len(outcome["trained"]) == 2 and len(calls) == 2
  results = [json.loads((run.workdir / "results.json").read_text())
             for run in outcome["trained"]]
  assert [r["seed"] for r in results] == [2021, 2022]
  assert results[0]["test"]["mse"] != results[1]["test"]["mse"]  # the seed is used
  mtimes = [(run.workdir / "results.json").stat().st_mtime_ns for run in outcome["trained"]]

  # Everything finished: nothing is trained again, nothing rewritten.
  calls.clear()
  outcome = grid.GRID.train(cells, train_fn=counting_train_fn(calls), **kwargs)
  assert calls == [] and len(outcome["skipped"]) == 2
  assert [(r.workdir / "results.json").stat().st_mtime_ns for r in outcome["skipped"]] == mtimes

  # A half-finished run (checkpoints, no results.json) is resumed, the finished one skipped.
  second = outcome["skipped"][1]
  (second.workdir / "results.json").unlink()
  assert grids.run_state(second).status == "started"
  outcome = grid.GRID.train(cells, train_fn=counting_train_fn(calls), **kwargs)
  assert calls == [second.workdir]
  assert json.loads((second.workdir / "results.json").read_text())["test"] == results[1]["test"]

  # The report: labelled fast, the two seeds' mean +- std, the rest of the grid "not run".
  text = report.read_text()
  assert "Smoke mode (--fast)" in text and "NOT the protocol" in text
  rows = {(r["model"], r["data"], r["pred_len"]): r for r in read_csv(report.with_suffix(".csv"))}
  cell = rows[("dlinear", "etth1", "96")]
  mse = [r["test"]["mse"] for r in results]
  assert cell["n"] == "2" and cell["mode"] == "fast"
  assert float(cell["mse_mean"]) == pytest.approx(np.mean(mse), rel=1e-5)
  assert float(cell["mse_std"]) == pytest.approx(np.std(mse, ddof=1), rel=1e-5)
  assert cell["meets_3pct"] == ""  # no verdict in fast mode
  assert rows[("dlinear", "etth1", "192")]["status"] == "not run"
  assert rows[("dlinear", "etth1", "avg")]["status"].startswith("incomplete (1/4")
  for model in FIVE:
    assert (model, "exchange", "avg") in rows  # the whole grid is shown, not only what ran
  assert report.with_suffix(".png").stat().st_size > 10_000


def test_a_failing_run_is_recorded_and_the_grid_goes_on(tmp_path):
  def failing(config, workdir):
    raise RuntimeError(f"boom at seed {config.seed}")
  outcome = grid.GRID.train(grid.Cells(["dlinear"], ["etth1"], [96, 192]), seeds=1,
                            workdir=tmp_path, fast=True, train_fn=failing, log=lambda _: None)
  assert len(outcome["failed"]) == 2
  state = grids.run_state(outcome["failed"][0])
  assert state.status == "failed" and "boom at seed 2021" in state.detail
  rows = grid.collect(["dlinear"], ["etth1"], seeds=1, workdir=tmp_path, fast=True)
  assert "failed" in rows[0].notes[0]


def test_processes_given_the_same_grid_share_its_runs(tmp_path):
  # Another process trains seed 2021 (it holds that run's lock): this one leaves it and trains
  # seed 2022; once the lock is free, the same call trains seed 2021.
  runs = grid.runs(["dlinear"], ["etth1"], seeds=2, horizons=[96], workdir=tmp_path, fast=True)
  trained = []

  def train(config, workdir):
    trained.append(config.seed)
    fake_finished(next(r for r in runs if r.workdir == pathlib.Path(workdir)), 0.4, 0.4)
    return {"status": "done", "test": {"mse": 0.4, "mae": 0.4}}

  cells = grid.Cells(["dlinear"], ["etth1"], [96])
  kwargs = dict(seeds=2, workdir=tmp_path, fast=True, train_fn=train, log=lambda _: None)
  held, release = threading.Event(), threading.Event()

  def other_process():  # (a thread takes the lock as another process would)
    with workdir_lib.lock(runs[0].workdir):
      held.set()
      release.wait(timeout=60)

  holder = threading.Thread(target=other_process)
  holder.start()
  assert held.wait(timeout=60)
  try:
    outcome = grid.GRID.train(cells, **kwargs)
  finally:
    release.set()
    holder.join()
  assert trained == [2022]
  assert [r.key for r in outcome["busy"]] == [runs[0].key]
  assert grids.run_state(runs[0]).status == "not run"
  outcome = grid.GRID.train(cells, **kwargs)
  assert trained == [2022, 2021]
  assert [r.key for r in outcome["skipped"]] == [runs[1].key] and not outcome["busy"]


# ---------------------------------------------------------------------------------------------
# The table's arithmetic, on results written by hand.

def test_mean_std_relative_difference_and_target(tmp_path):
  seeds = [2021, 2022, 2023]
  # (horizon, seed) -> mse; mae = mse + 0.05
  mse = {(h, s): 0.40 + 0.01 * i + 0.002 * j
         for i, h in enumerate((96, 192, 336, 720)) for j, s in enumerate(seeds)}
  for run in grid.runs(["dlinear"], ["etth1"], seeds=3, workdir=tmp_path):
    fake_finished(run, mse[run.pred_len, run.seed], mse[run.pred_len, run.seed] + 0.05)
  rows = {(r.model, r.data, r.pred_len): r
          for r in grid.collect(["dlinear", "smamba"], ["etth1", "illness"], seeds=3,
                                workdir=tmp_path)}
  cell = rows["dlinear", "etth1", 96]
  values = [mse[96, s] for s in seeds]
  assert cell.status == "done" and cell.n == 3
  assert cell.mse_mean_std == pytest.approx((np.mean(values), np.std(values, ddof=1)))
  assert cell.paper_mse == 0.386
  assert cell.rel_mse == pytest.approx(np.mean(values) / 0.386 - 1)
  assert cell.meets_target == (np.mean(values) <= 0.386 * 1.03)
  average = rows["dlinear", "etth1", grid.AVG]
  per_seed = [np.mean([mse[h, s] for h in (96, 192, 336, 720)]) for s in seeds]
  assert average.mse == pytest.approx(per_seed)
  assert average.mse_mean_std == pytest.approx((np.mean(per_seed), np.std(per_seed, ddof=1)))
  assert average.paper_mse == 0.456 and average.paper_mae == 0.452
  assert average.meets_target  # 0.417 <= 0.456 * 1.03
  assert rows["dlinear", "etth1", 192].paper_mse is None  # no number: none invented
  assert rows["dlinear", "illness", 24].status == "not run"
  assert rows["smamba", "illness", 24].status == "unsupported"

  paths = grid.write_report(list(rows.values()), tmp_path / "out" / "forecasting.md",
                            command="python -m experiments.reproduce forecasting")
  text = paths["md"].read_text()
  assert "Smoke mode" not in text and "jax " in text and "- Machine (writing this report):" in text
  assert "| dlinear | etth1 | 3 | 0.4170 ± 0.0020 |" in text
  # Compute: 12 finished runs of 1 s each; ILI's 12 left; S-Mamba's ILI cells are refused.
  assert "| dlinear | 12 | 0.00 | 0.0 | 12 | 0.00 |" in text
  assert "| smamba | 0 | - | - | 12 | - |" in text
  csv_rows = {(r["model"], r["data"], r["pred_len"]): r for r in read_csv(paths["csv"])}
  assert csv_rows["dlinear", "etth1", "avg"]["meets_3pct"] == "yes"
  assert float(csv_rows["dlinear", "etth1", "avg"]["rel_diff_mse"]) == pytest.approx(
      np.mean(per_seed) / 0.456 - 1, rel=1e-4)
  assert csv_rows["smamba", "illness", "24"]["status"].startswith("unsupported")


def test_target_boundary_and_single_seed():
  row = grid.Row("dlinear", "etth1", 96, grid.AVG, [2021], seeds_done=[2021], mse=[0.469],
                 mae=[0.46], paper_mse=0.456, paper_mae=0.452)
  assert row.meets_target  # +2.85%
  row.mse = [0.4700]
  assert not row.meets_target  # +3.07%
  assert np.isnan(row.mse_mean_std[1])  # one seed: no std
  row.mse = [0.40]
  assert row.meets_target and row.rel_mse < 0  # better than the paper meets the target too


def test_a_changed_config_makes_finished_runs_stale(tmp_path):
  run = grid.runs(["dlinear"], ["etth1"], seeds=1, horizons=[96], workdir=tmp_path,
                  fast=True)[0]
  old = run.config()
  old.optimizer.learning_rate = 0.123
  fake_finished(run, 0.5, 0.5, config=old)
  state = grids.run_state(run)
  assert state.status == "stale" and "optimizer.learning_rate" in state.detail
  row = grid.collect(["dlinear"], ["etth1"], seeds=1, workdir=tmp_path, fast=True)[0]
  assert row.n == 0 and "stale" in row.notes[0]  # never averaged in

  calls = []
  fake_train = lambda config, workdir: calls.append(workdir) or {
      "status": "done", "test": {"mse": 0.4, "mae": 0.4}}
  cells = grid.Cells(["dlinear"], ["etth1"], [96])
  kwargs = dict(seeds=1, workdir=tmp_path, fast=True, train_fn=fake_train, log=lambda _: None)
  assert len(grid.GRID.train(cells, **kwargs)["stale"]) == 1 and calls == []
  grid.GRID.train(cells, rerun_stale=True, **kwargs)
  assert calls == [run.workdir]
  assert (run.workdir.parent / "seed2021.stale1" / "results.json").exists()


def test_report_on_an_empty_grid(tmp_path):
  rows = grid.collect(seeds=3, workdir=tmp_path)
  paths = grid.write_report(rows, tmp_path / "forecasting.md", command="x")
  assert "no run finished yet" in paths["md"].read_text()
  assert all(r["n"] == "0" for r in read_csv(paths["csv"]))
  assert paths["png"].exists()


def test_cli_report_only_and_usage(tmp_path):
  run = lambda *args: subprocess.run([sys.executable, "-m", "experiments.reproduce", *args],
                                     cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  result = run("forecasting", "--models=dlinear", "--datasets=etth1", "--report_only",
               f"--workdir={tmp_path}", f"--report={tmp_path / 'r.md'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "r.md").exists() and (tmp_path / "r.csv").exists()
  assert run("regression", f"--workdir={tmp_path}").returncode != 0  # not a subcommand
  inside = run("forecasting", "--report_only", f"--workdir={REPO_ROOT / 'runs'}")
  assert inside.returncode != 0 and "inside the repository" in inside.stderr
