r"""The long-term forecasting grid: models x data sets x horizons x seeds, against the papers.

The command line is `python -m experiments.reproduce forecasting` (see experiments/reproduce.py);
a notebook calls the same functions:

    from experiments import forecasting_grid as grid
    grid.GRID.train(grid.Cells(["dlinear"], ["etth1"]), seeds=3)  # trains, resumes
    rows = grid.collect()                         # whatever has finished, the rest "not run"
    grid.write_report(rows, "/tmp/forecasting.md")  # + .csv and .png beside it

One run = (model, data set, horizon, seed): `paperzoo.train_and_evaluate(config, workdir)` with
`config = experiments/configs/<model>.py:data=<data>,seq_len=<L>,pred_len=<H>,seed=<seed>`,
in its own workdir `<root>/protocol/<model>/<data>_<L>_<H>/seed<seed>` (`<root>/fast/...` in
fast mode, so the two never mix). A run whose workdir holds `results.json` is finished and
skipped; a half-finished one resumes from its checkpoint (the trainer does that). A finished run
whose saved config differs from today's config (a hyper-parameter changed since) is "stale": it
is left out of the table and retrained only with `rerun_stale=True` (the run states and the
training loop live in `experiments.grids`, shared by every grid).

The protocol (experiments/forecasting_protocol.md): ETTh1, ETTh2, Exchange with lookback 96 and
horizons 96/192/336/720; ILI with lookback 36 and horizons 24/36/48/60; seeds 2021, 2022, ...;
each config's own hyper-parameters (the papers' scripts). The trainer scores every test window,
selects the checkpoint on validation MSE only and scores the test set once, on the best
checkpoint.

The models are every forecasting config in experiments/configs that has a paper number in
`PAPER_NUMBERS` or is listed in `NO_PAPER_NUMBER`: a new paper's config joins the grid by itself
once its numbers are added to the table below.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np

from experiments import configs
from experiments import grids
from experiments import run_ledger
from paperzoo import plots

DEFAULT_WORKDIR = pathlib.Path("/tmp/paperzoo_reproduce")
DEFAULT_REPORT = grids.REPO_ROOT / "experiments" / "results" / "forecasting.md"

# Data set -> (lookback, horizons): the protocol's grid.
PROTOCOL: dict[str, tuple[int, tuple[int, ...]]] = {
    "etth1": (96, (96, 192, 336, 720)),
    "etth2": (96, (96, 192, 336, 720)),
    "exchange": (96, (96, 192, 336, 720)),
    "illness": (36, (24, 36, 48, 60)),
}
TARGET = 0.03  # a cell meets the target when its mean MSE <= (1 + TARGET) x the paper's MSE
AVG = "avg"  # the "horizon" of the mean over a data set's horizons (the papers' headline number)

# Forecasting configs in the grid without a paper number here: Gateformer (none of its numbers
# is recorded here) and the vanilla Transformer baseline.
NO_PAPER_NUMBER: tuple[str, ...] = ("gateformer", "transformer")
# Display order; models not listed follow alphabetically.
MODEL_ORDER = ("itransformer", "patchtst", "dlinear", "autoformer", "smamba", "informer",
               "gateformer", "transformer")
# Configs in experiments/configs that are not grid models.
_NOT_MODELS = ("quickstart",)

# ---------------------------------------------------------------------------------------------
# The papers' numbers: (model, data, horizon or AVG) -> (MSE, MAE or None, source key).
# Only numbers from the cited sources or the project's records; never filled in from memory.

SOURCES = {
    "table10": "iTransformer (ICLR 2024) Table 10, lookback 96",
    "informer": "Informer at lookback 96 (recorded when the grid was set up; the source table "
                "is not recorded)",
    "spine": "paper column of experiments/results/etth1_spine.md (lookback 96)",
}
PAPER_NUMBERS: dict[tuple[str, str, int | str], tuple[float, float | None, str]] = {
    # ETTh1, mean of the four horizons.
    ("itransformer", "etth1", AVG): (0.454, 0.447, "table10"),
    ("patchtst", "etth1", AVG): (0.469, 0.454, "table10"),
    ("dlinear", "etth1", AVG): (0.456, 0.452, "table10"),
    ("autoformer", "etth1", AVG): (0.496, 0.487, "table10"),
    ("smamba", "etth1", AVG): (0.455, 0.450, "table10"),
    # ETTh2, mean of the four horizons.
    ("itransformer", "etth2", AVG): (0.383, 0.407, "table10"),
    ("patchtst", "etth2", AVG): (0.387, 0.407, "table10"),
    ("dlinear", "etth2", AVG): (0.559, 0.515, "table10"),
    ("autoformer", "etth2", AVG): (0.450, 0.459, "table10"),
    ("smamba", "etth2", AVG): (0.381, 0.405, "table10"),
    # Exchange, mean of the four horizons.
    ("itransformer", "exchange", AVG): (0.360, 0.403, "table10"),
    ("patchtst", "exchange", AVG): (0.367, 0.404, "table10"),
    ("dlinear", "exchange", AVG): (0.354, 0.414, "table10"),
    ("autoformer", "exchange", AVG): (0.613, 0.539, "table10"),
    ("smamba", "exchange", AVG): (0.367, 0.408, "table10"),
    # Single horizons.
    ("itransformer", "etth1", 96): (0.386, 0.405, "spine"),
    ("smamba", "etth1", 96): (0.386, 0.405, "spine"),
    ("dlinear", "etth1", 96): (0.386, None, "spine"),
    ("informer", "etth1", 96): (0.865, 0.713, "informer"),
    ("informer", "etth1", 192): (1.008, 0.792, "informer"),
}


def paper_number(model: str, data: str, horizon: int | str
                 ) -> tuple[float, float | None, str] | None:
  """(MSE, MAE or None, source text) of the paper for this cell, or None."""
  entry = PAPER_NUMBERS.get((model, data, horizon))
  if entry is None:
    return None
  mse, mae, source = entry
  return mse, mae, SOURCES[source]


# ---------------------------------------------------------------------------------------------
# Models and configs.

def config_names() -> list[str]:
  """The configs in experiments/configs that could be grid models (not quickstart)."""
  return [name for name in configs.names() if name not in _NOT_MODELS]


def _order(models: Iterable[str]) -> list[str]:
  rank = {name: i for i, name in enumerate(MODEL_ORDER)}
  return sorted(set(models), key=lambda m: (rank.get(m, len(rank)), m))


def is_forecasting_config(model: str) -> bool | None:
  """Whether experiments/configs/<model>.py's default config is a real-data forecasting run
  (None: the config fails to build, e.g. while it is being written)."""
  try:
    config = configs.load(model, None)
  except Exception:  # pylint: disable=broad-except  (reported per cell by grids.run_state)
    return None
  return config.task.name == "forecasting" and config.data.name != "synthetic"


def default_models() -> list[str]:
  """Every forecasting config with a paper number or in NO_PAPER_NUMBER, in display order.
  A listed config that fails to build stays in, so its cells show the error."""
  wanted = {model for model, _, _ in PAPER_NUMBERS} | set(NO_PAPER_NUMBER)
  return _order(name for name in config_names()
                if name in wanted and is_forecasting_config(name) is not False)


def report_models(requested: Iterable[str] = ()) -> list[str]:
  """The report's rows: the default models, the requested ones, and every model with a paper
  number or in NO_PAPER_NUMBER (shown as "no config" until its config exists)."""
  return _order(set(default_models()) | set(requested) | {m for m, _, _ in PAPER_NUMBERS}
                | set(NO_PAPER_NUMBER))


# ---------------------------------------------------------------------------------------------
# Runs.

@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the grid: a model on one data set, horizon and seed."""

  model: str
  data: str
  seq_len: int
  pred_len: int
  seed: int
  workdir: pathlib.Path
  fast: bool = False
  # The report's record of finished runs, read when the workdir holds none (run_ledger).
  ledger: run_ledger.Ledger | None = dataclasses.field(default=None, compare=False, repr=False)

  @property
  def key(self) -> str:
    """The run's name in the ledger: its workdir below the grid's root."""
    return (f"{'fast' if self.fast else 'protocol'}/{self.model}/"
            f"{self.data}_{self.seq_len}_{self.pred_len}/seed{self.seed}")

  @property
  def config_arg(self) -> str:
    arg = f"data={self.data},seq_len={self.seq_len},pred_len={self.pred_len},seed={self.seed}"
    return arg + (",runlocal" if self.fast else "")

  @property
  def command(self) -> str:
    """The `experiments.run` command that trains this run alone."""
    return grids.run_command(self.workdir, self.model, self.config_arg)

  def config(self):
    """This run's config; raises (ValueError, FileNotFoundError, ...) if the config refuses it."""
    config = configs.load(self.model, self.config_arg)
    got = (config.data.name, config.data.seq_len, config.data.pred_len, config.seed)
    want = (self.data, self.seq_len, self.pred_len, self.seed)
    if got != want:
      raise ValueError(f"experiments/configs/{self.model}.py:{self.config_arg} gives data, "
                       f"seq_len, pred_len, seed = {got}, not {want}")
    return config


@dataclasses.dataclass(frozen=True)
class Cells:
  """A selection of the grid: models x data sets (x horizons; None: every protocol horizon).
  Empty models mean `default_models()`, empty data sets every data set of PROTOCOL."""

  models: Sequence[str] = ()
  datasets: Sequence[str] = ()
  horizons: Sequence[int] | None = None

  def resolved(self) -> Cells:
    return Cells(list(self.models) or default_models(), list(self.datasets) or list(PROTOCOL),
                 None if self.horizons is None else sorted(set(self.horizons)))


def horizons_of(data: str, horizons: Iterable[int] | None = None) -> list[int]:
  """The protocol's horizons of `data`, restricted to `horizons` if given."""
  if data not in PROTOCOL:
    raise ValueError(f"unknown grid data set {data!r}; the protocol has {', '.join(PROTOCOL)}")
  all_horizons = PROTOCOL[data][1]
  return list(all_horizons) if horizons is None else [h for h in all_horizons if h in horizons]


def runs(models: Sequence[str], datasets: Sequence[str], *, seeds: int | Sequence[int] = 3,
         horizons: Iterable[int] | None = None, workdir: str | os.PathLike = DEFAULT_WORKDIR,
         fast: bool = False, ledger: run_ledger.Ledger | None = None) -> list[Run]:
  """The grid's runs in order: model, data set, horizon, seed (reading `ledger` for runs whose
  workdir holds no result)."""
  root = grids.check_workdir(workdir) / ("fast" if fast else "protocol")
  horizons = None if horizons is None else set(horizons)
  result = []
  for model in models:
    for data in datasets:
      for pred_len in horizons_of(data, horizons):
        seq_len = PROTOCOL[data][0]
        for seed in grids.seeds_list(seeds):
          result.append(Run(model, data, seq_len, pred_len, seed,
                            root / model / f"{data}_{seq_len}_{pred_len}" / f"seed{seed}", fast,
                            ledger))
  return result


def reproduce_command(models: Sequence[str], datasets: Sequence[str], *,
                      seeds: int | Sequence[int], horizons: Iterable[int] | None,
                      workdir: str | os.PathLike, fast: bool, rerun_stale: bool = False) -> str:
  """The command line that runs (or resumes) this grid."""
  parts = ["python -m experiments.reproduce forecasting", f"--models={','.join(models)}",
           f"--datasets={','.join(datasets)}"]
  parts.append(grids.seeds_flag(seeds))
  if horizons is not None:
    parts.append(f"--horizons={','.join(str(h) for h in sorted(set(horizons)))}")
  parts.append(f"--workdir={workdir}")
  if fast:
    parts.append("--fast")
  if rerun_stale:
    parts.append("--rerun_stale")
  return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Aggregation.


@dataclasses.dataclass
class Row:
  """One line of the table: a (model, data, horizon) cell over seeds, or a data set's AVG."""

  model: str
  data: str
  seq_len: int | None
  pred_len: int | str
  seeds_requested: list[int]
  seeds_done: list[int] = dataclasses.field(default_factory=list)
  mse: list[float] = dataclasses.field(default_factory=list)  # per done seed
  mae: list[float] = dataclasses.field(default_factory=list)
  seconds: list[float] = dataclasses.field(default_factory=list)  # wall time per done seed
  devices: set[str] = dataclasses.field(default_factory=set)
  finished: list[float] = dataclasses.field(default_factory=list)  # results.json mtimes
  status: str = "not run"
  notes: list[str] = dataclasses.field(default_factory=list)
  paper_mse: float | None = None
  paper_mae: float | None = None
  paper_source: str = ""
  command: str = ""  # the command that runs (or resumes) this cell's seeds

  @property
  def n(self) -> int:
    return len(self.seeds_done)

  @property
  def mse_mean_std(self) -> tuple[float, float]:
    return grids.mean_std(self.mse)

  @property
  def mae_mean_std(self) -> tuple[float, float]:
    return grids.mean_std(self.mae)

  @property
  def rel_mse(self) -> float | None:
    """(ours - paper) / paper of the mean MSE; None without both numbers."""
    if self.paper_mse is None or not self.mse:
      return None
    return self.mse_mean_std[0] / self.paper_mse - 1.0

  @property
  def rel_mae(self) -> float | None:
    if self.paper_mae is None or not self.mae:
      return None
    return self.mae_mean_std[0] / self.paper_mae - 1.0

  @property
  def meets_target(self) -> bool | None:
    """Mean MSE within TARGET of the paper's, or better; None when there is nothing to compare."""
    rel = self.rel_mse
    return None if rel is None else rel <= TARGET + 1e-12


def collect(models: Sequence[str] | None = None, datasets: Sequence[str] | None = None, *,
            seeds: int | Sequence[int] = 3, workdir: str | os.PathLike = DEFAULT_WORKDIR,
            fast: bool = False, ledger: run_ledger.Ledger | None = None) -> list[Row]:
  """The table over the whole grid of `models` x `datasets` (every protocol horizon), from
  whatever the workdirs (then `ledger`) hold: one Row per (model, data, horizon), then one AVG
  row per (model, data) whose per-seed value is the mean over the horizons (seeds with every
  horizon finished count)."""
  models = list(models) if models is not None else report_models()
  datasets = list(datasets) if datasets is not None else list(PROTOCOL)
  seeds = grids.seeds_list(seeds)
  rows = []
  for model in models:
    for data in datasets:
      cell_rows = []
      for pred_len in horizons_of(data):
        row = Row(model, data, PROTOCOL[data][0], pred_len, seeds)
        states = []
        for run in runs([model], [data], seeds=seeds, horizons=[pred_len], workdir=workdir,
                        fast=fast, ledger=ledger):
          state = grids.run_state(run)
          states.append(state)
          if state.status == "done":
            row.seeds_done.append(run.seed)
            row.mse.append(float(state.results["test"]["mse"]))
            row.mae.append(float(state.results["test"]["mae"]))
            row.seconds.append(float(sum(state.results.get("seconds", {}).values())))
            row.devices.add(str(state.results.get("devices", "?")))
            if state.finished is not None:
              row.finished.append(state.finished)
        row.status, row.notes = _cell_status(states, len(seeds))
        row.command = reproduce_command([model], [data], seeds=seeds, horizons=[pred_len],
                                        workdir=workdir, fast=fast)
        _attach_paper(row)
        cell_rows.append(row)
      rows.extend(cell_rows)
      rows.append(_average_row(model, data, seeds, cell_rows, workdir=workdir, fast=fast))
  return rows


def _cell_status(states: list[grids.RunState], requested: int) -> tuple[str, list[str]]:
  by_status: dict[str, list[grids.RunState]] = {}
  for state in states:
    by_status.setdefault(state.status, []).append(state)
  for refused in grids.REFUSED:
    if refused in by_status:
      return refused, [by_status[refused][0].detail]
  done = len(by_status.get("done", []))
  status = "done" if done == requested else ("not run" if done == 0 else
                                             f"partial ({done}/{requested} seeds)")
  notes = []
  for other in ("stale", "failed", "started"):
    if other in by_status:
      notes.append(f"{len(by_status[other])} seed(s) {other}: {by_status[other][0].detail}")
  return status, notes


def _attach_paper(row: Row) -> None:
  number = paper_number(row.model, row.data, row.pred_len)
  if number is not None:
    row.paper_mse, row.paper_mae, row.paper_source = number


def _average_row(model: str, data: str, seeds: list[int], cell_rows: list[Row], *,
                 workdir: str | os.PathLike, fast: bool) -> Row:
  row = Row(model, data, PROTOCOL[data][0], AVG, seeds)
  row.command = reproduce_command([model], [data], seeds=seeds, horizons=None,
                                  workdir=workdir, fast=fast)
  per_seed = [{seed: (mse, mae) for seed, mse, mae in zip(r.seeds_done, r.mse, r.mae)}
              for r in cell_rows]
  for seed in seeds:
    if all(seed in cell for cell in per_seed):
      row.seeds_done.append(seed)
      row.mse.append(float(np.mean([cell[seed][0] for cell in per_seed])))
      row.mae.append(float(np.mean([cell[seed][1] for cell in per_seed])))
  for r in cell_rows:
    row.devices |= r.devices
    row.finished += r.finished
    row.seconds += r.seconds
  refused = [r for r in cell_rows if r.status in grids.REFUSED]
  if refused:
    row.status, row.notes = refused[0].status, refused[0].notes[:1]
  elif row.n == len(seeds):
    row.status = "done"
  elif row.n:
    row.status = f"partial ({row.n}/{len(seeds)} seeds with every horizon)"
  else:
    done = sum(1 for r in cell_rows if r.n)
    row.status = "not run" if done == 0 else f"incomplete ({done}/{len(cell_rows)} horizons)"
  _attach_paper(row)
  return row


# ---------------------------------------------------------------------------------------------
# Report: markdown table, CSV, plot.


def _fmt(value: float | None, digits: int = 3) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{value:.{digits}f}"


def _fmt_mean_std(values: list[float]) -> str:
  if not values:
    return "-"
  mean, std = grids.mean_std(values)
  return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _fmt_rel(rel: float | None) -> str:
  return "-" if rel is None else f"{100 * rel:+.1f}%"


def _meets(row: Row, fast: bool) -> str:
  if row.paper_mse is None:
    return "no paper number"
  if not row.mse:
    return "not run"
  if fast:
    return "n/a (fast mode)"
  partial = "" if row.status == "done" else f", {row.n} seed(s) only"
  return ("yes" if row.meets_target else "**no**") + partial


def _status_text(row: Row) -> str:
  return "; ".join([row.status] + row.notes)


def write_report(rows: list[Row], path: str | os.PathLike, *, command: str,
                 fast: bool = False) -> dict[str, pathlib.Path]:
  """Writes `path` (markdown), the CSV and the PNG plot beside it; returns the three paths.

  Works on any partial grid: cells without results say "not run" (or why they cannot run)."""
  md_path = pathlib.Path(path)
  csv_path, png_path = md_path.with_suffix(".csv"), md_path.with_suffix(".png")
  md_path.parent.mkdir(parents=True, exist_ok=True)
  cells = [r for r in rows if r.pred_len != AVG]
  compared = [r for r in rows if r.paper_mse is not None]
  lines = grids.report_header(
      "Long-term forecasting: our grid against the papers", command=command,
      finished=[t for row in cells for t in row.finished],
      seeds=rows[0].seeds_requested if rows else [], fast=fast,
      runs_used=sorted({d for row in cells for d in row.devices}))
  lines += [
      "- Protocol (experiments/forecasting_protocol.md): lookback 96, horizons 96/192/336/720 "
      "(ILI: lookback 36, horizons 24/36/48/60); each config's paper hyper-parameters "
      "(`experiments/configs/<model>.py`); every test window scored (no drop_last); checkpoint "
      "selected on validation MSE only; test scored once, on the best checkpoint. MSE/MAE on "
      "the normalized scale.",
      f"- Target: mean MSE within {100 * TARGET:.0f}% of the paper's, or better. Relative "
      "difference = ours / paper - 1 (negative: better than the paper).",
      "- Paper numbers: " + "; ".join(SOURCES.values()) + ". Cells without a paper number say "
      "so.",
      "",
  ]
  run_cells = [r for r in cells if r.n]
  met = [r for r in compared if r.mse and r.meets_target]
  missed = [r for r in compared if r.mse and not r.meets_target]
  lines += [f"Runs finished: {sum(r.n for r in cells)} of "
            f"{sum(len(r.seeds_requested) for r in cells if r.status not in grids.REFUSED)}"
            f" possible ({len(run_cells)} of {len(cells)} cells have at least one seed). "
            f"Comparisons with a paper number: {len(compared)}, of which "
            f"{len(met) + len(missed)} run: "
            + (f"{len(met)} meet the target, {len(missed)} miss it." if not fast
               else "fast mode, no verdict."), ""]

  lines += ["## Averages over the horizons (the papers' headline numbers)", ""]
  lines += grids.markdown_table(
      ["model", "data", "seeds", "MSE", "MAE", "paper MSE / MAE", "rel. MSE", "rel. MAE",
       "meets 3%", "status"],
      ([row.model, row.data, row.n, _fmt_mean_std(row.mse), _fmt_mean_std(row.mae),
        f"{_fmt(row.paper_mse)} / {_fmt(row.paper_mae)}", _fmt_rel(row.rel_mse),
        _fmt_rel(row.rel_mae), _meets(row, fast), _status_text(row)]
       for row in rows if row.pred_len == AVG))
  lines += ["", "## Every cell", ""]
  lines += grids.markdown_table(
      ["model", "data", "L", "H", "seeds", "MSE", "MAE", "per-seed MSE", "paper MSE / MAE",
       "rel. MSE", "meets 3%", "status"],
      ([row.model, row.data, row.seq_len, row.pred_len, row.n, _fmt_mean_std(row.mse),
        _fmt_mean_std(row.mae), " / ".join(f"{v:.4f}" for v in row.mse) or "-",
        f"{_fmt(row.paper_mse)} / {_fmt(row.paper_mae)}", _fmt_rel(row.rel_mse),
        _meets(row, fast), _status_text(row)] for row in cells))
  if missed and not fast:
    lines += ["", "## Cells that miss the target", ""]
    for row in missed:
      lines.append(f"- {row.model} {row.data} H={row.pred_len}: MSE "
                   f"{row.mse_mean_std[0]:.4f} vs paper {row.paper_mse:.3f} "
                   f"({_fmt_rel(row.rel_mse)}, n={row.n})")
  lines += ["", "## Compute", "",
            "Wall time of the finished runs (compilation, training, evaluation, checkpoints; "
            "from each run's results.json), and what the rest of the requested grid would take "
            "at the same mean per run. Runs made while other jobs shared the machine count as "
            "they were. Per-epoch speed on a quiet machine, and a projection for the models not "
            "run yet: `experiments/results/forecasting_speed.md` (`python -m "
            "experiments.benchmarks.forecasting_speed --models=all --steps=20 --project_grid`).",
            ""]
  compute = []
  for model in dict.fromkeys(r.model for r in cells):
    runnable = [r for r in cells if r.model == model and r.status not in grids.REFUSED]
    done = sum(r.n for r in runnable)
    left = sum(len(r.seeds_requested) for r in runnable) - done
    seconds = sum(s for r in runnable for s in r.seconds)
    per_run = seconds / done if done else None
    compute.append([model, done, _fmt(seconds / 3600 if done else None, 2),
                    _fmt(per_run / 60 if per_run else None, 1), left,
                    _fmt(per_run * left / 3600 if per_run else None, 2)])
  lines += grids.markdown_table(["model", "runs finished", "hours", "minutes per run",
                                 "runs left", "hours left (est.)"], compute)
  lines += ["", f"CSV with the per-seed numbers and each run's command: `{csv_path.name}`; "
            f"plot: `{png_path.name}`.", ""]
  md_path.write_text("\n".join(lines))

  fields = ["mode", "model", "data", "seq_len", "pred_len", "seeds_requested", "seeds_done",
            "n", "mse_mean", "mse_std", "mae_mean", "mae_std", "mse_per_seed", "mae_per_seed",
            "paper_mse", "paper_mae", "paper_source", "rel_diff_mse", "rel_diff_mae",
            "meets_3pct", "status", "seconds_per_run", "devices", "last_finished", "command"]

  def csv_row(row: Row) -> dict[str, Any]:
    mse_mean, mse_std = row.mse_mean_std
    mae_mean, mae_std = row.mae_mean_std
    meets = row.meets_target
    return {
        "mode": "fast" if fast else "protocol", "model": row.model, "data": row.data,
        "seq_len": row.seq_len, "pred_len": row.pred_len,
        "seeds_requested": " ".join(map(str, row.seeds_requested)),
        "seeds_done": " ".join(map(str, row.seeds_done)), "n": row.n,
        "mse_mean": _csv_number(mse_mean), "mse_std": _csv_number(mse_std),
        "mae_mean": _csv_number(mae_mean), "mae_std": _csv_number(mae_std),
        "mse_per_seed": " ".join(f"{v:.6f}" for v in row.mse),
        "mae_per_seed": " ".join(f"{v:.6f}" for v in row.mae),
        "paper_mse": _csv_number(row.paper_mse), "paper_mae": _csv_number(row.paper_mae),
        "paper_source": row.paper_source,
        "rel_diff_mse": _csv_number(row.rel_mse), "rel_diff_mae": _csv_number(row.rel_mae),
        "meets_3pct": "" if meets is None or fast else ("yes" if meets else "no"),
        "status": _status_text(row),
        "seconds_per_run": _csv_number(float(np.mean(row.seconds)) if row.seconds else None),
        "devices": " ".join(sorted(row.devices)),
        "last_finished": grids.format_date(max(row.finished)) if row.finished else "",
        "command": row.command,
    }

  grids.write_csv(csv_path, fields, map(csv_row, rows))
  points = [{"label": f"{r.model} {r.data} {r.pred_len}", "model": r.model, "data": r.data,
             "horizon": r.pred_len, "ours_mse": r.mse_mean_std[0],
             "ours_mse_std": r.mse_mean_std[1], "paper_mse": r.paper_mse, "n": r.n}
            for r in compared if r.mse]
  title = "Test MSE, ours (mean ± std over seeds) vs paper" + (" - SMOKE MODE, not the protocol"
                                                              if fast else "")
  plots.paper_comparison(points, png_path, title=title, target=TARGET)
  return {"md": md_path, "csv": csv_path, "png": png_path}


def _csv_number(value: float | None) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ""
  return f"{value:.6g}"


def _cell_runs(cells: Cells, **kwargs: Any) -> list[Run]:
  cells = cells.resolved()  # (once: the default models come from loading every config)
  return runs(cells.models, cells.datasets, horizons=cells.horizons, **kwargs)


def _cell_rows(cells: Cells, **kwargs: Any) -> list[Row]:
  cells = cells.resolved()
  return collect(cells.models, cells.datasets, **kwargs)


def _cell_command(cells: Cells, **kwargs: Any) -> str:
  cells = cells.resolved()
  return reproduce_command(cells.models, cells.datasets, horizons=cells.horizons, **kwargs)


GRID = grids.Grid(
    name="forecasting", default_workdir=DEFAULT_WORKDIR, default_report=DEFAULT_REPORT,
    runs=_cell_runs, collect=_cell_rows, write_report=write_report, command=_cell_command,
    # A report shows every model with a paper number and every data set, whatever ran.
    whole_table=lambda cells: Cells(report_models((cells or Cells()).models), list(PROTOCOL)),
    describe=lambda run: f"{run.model} {run.data} {run.seq_len}->{run.pred_len} seed {run.seed}",
    summarize=lambda results: (f"test mse={results['test']['mse']:.4f} "
                               f"mae={results['test']['mae']:.4f}"),
)
