"""The classification reproduction: Long Range Arena, vision backbones and UEA, with seeds.

`python -m experiments.reproduce classification` (thin CLI in experiments/reproduce.py) calls
`run_classification`, which trains every unfinished run of the chosen entries (one workdir per
entry and seed under --workdir; a finished run is skipped, a half-finished one resumes) and
writes `experiments/results/classification.md` and `.csv`: per entry the test accuracy as
mean +- sample std over seeds, the published number where one exists and is comparable, the
selection protocol, and the command. The runs' workdirs also hold each run's confusion matrix
and example inputs (`PICTURES`); the report links those of each entry's first finished seed,
copied into `experiments/results/classification/`.

The training loop, run states (done / stale / failed / started) and the workdir check are
those every grid shares (`experiments.grids`).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterable, Sequence

from experiments import grids
from experiments import run_ledger

REPO_ROOT = grids.REPO_ROOT
DEFAULT_WORKDIR = pathlib.Path("/tmp/paperzoo_reproduce_classification")
DEFAULT_REPORT = REPO_ROOT / "experiments" / "results" / "classification.md"


@dataclasses.dataclass(frozen=True)
class Entry:
  """One line of the table: a config with its arguments (the seed is added per run)."""

  key: str
  group: str
  config: str
  arg: str
  published: float | None = None  # test accuracy in [0, 1]
  source: str = ""  # where the published number comes from, or why it is not comparable


_LRA = "LRA paper (Tay et al. 2021), Transformer, full size"
_UEA = "Time-Series-Library protocol (selects on TEST), as quoted in issue 5"
_UEA_PUBLISHED = {"BasicMotions": 1.000, "JapaneseVowels": 0.986, "Handwriting": 0.608,
                  "AtrialFibrillation": 0.533}

ENTRIES: tuple[Entry, ...] = (
    # Long Range Arena. The CPU size is a smaller task than LRA's (256 tokens: Image and
    # Pathfinder at 16x16); the published number is shown for orientation only, marked as such.
    *(Entry(f"lra/{task}/{mixer}/cpu", "LRA (CPU size)", "lra",
            f"task={task},mixer={mixer},size=cpu", None,
            f"not comparable (smaller data and model, 256 tokens); {_LRA}: {published}")
      for task, published in (("listops", "36.37"), ("image", "42.44"), ("pathfinder", "71.40"))
      for mixer in ("attention", "linear", "mamba")),
    *(Entry(f"lra/{task}/attention/full", "LRA (full size, GPU)", "lra",
            f"task={task},mixer=attention,size=full", published, _LRA)
      for task, published in (("listops", 0.3637), ("image", 0.4244), ("pathfinder", 0.7140))),
    # Vision: the tiny MNIST variants (target: at least 96%), then CIFAR-10 (GPU).
    *(Entry(f"mnist/{model}", "Vision, MNIST 8k/2k (CPU)", model, "data=mnist", None,
            "target >= 0.96 (issue 5)")
      for model in ("vit", "poolformer", "swin", "biformer", "cvt", "t2t_vit")),
    Entry("mnist/vit-agent", "Vision, MNIST 8k/2k (CPU)", "vit", "data=mnist,mixer=agent", None,
          "target >= 0.96 (issue 5)"),
    Entry("mnist/swin-agent", "Vision, MNIST 8k/2k (CPU)", "agent", "data=mnist", None,
          "target >= 0.96 (issue 5)"),
    Entry("cifar10/vit", "Vision, CIFAR-10 (GPU)", "vit", "data=cifar10", None,
          "target >= 0.85 (issue 5)"),
    Entry("cifar10/swin", "Vision, CIFAR-10 (GPU)", "swin", "data=cifar10", None,
          "target >= 0.88 (issue 5)"),
    # UEA, both protocols.
    *(Entry(f"uea/{subset}/{model}/{'legacy' if legacy else 'val'}",
            "UEA, " + ("TEST-selected (legacy)" if legacy else "validation-selected"), "uea",
            f"subset={subset},model={model}" + (",legacy_test_selection" if legacy else ""),
            _UEA_PUBLISHED[subset], _UEA)
      for legacy in (False, True)
      for subset in ("BasicMotions", "JapaneseVowels", "Handwriting", "AtrialFibrillation")
      for model in ("transformer", "itransformer", "mamba")),
)
# What runs on this 2-core CPU in reasonable time: everything except the full-size LRA and the
# CIFAR-10 backbones.
CPU_KEYS = tuple(e.key for e in ENTRIES if "GPU" not in e.group)


# What a finished run leaves for the report: the test confusion matrix and example inputs with
# their true and predicted labels (`ClassificationTask.write_pictures`; ListOps as text).
PICTURES = ("confusion_matrix.png", "examples.png", "examples.txt")


def entries(keys: Iterable[str] | None = None) -> list[Entry]:
  """The entries whose key equals or starts with one of `keys` (all when None; a prefix that
  also reaches CPU entries selects only those: `grids.select_entries`)."""
  return grids.select_entries(ENTRIES, keys, CPU_KEYS)


@dataclasses.dataclass(frozen=True)
class ClassificationRun:
  entry: Entry
  seed: int
  workdir: pathlib.Path
  fast: bool = False
  ledger: run_ledger.Ledger | None = dataclasses.field(default=None, compare=False, repr=False)

  @property
  def key(self) -> str:
    """The run's name in the ledger: its workdir below the grid's root."""
    return f"{'fast' if self.fast else 'protocol'}/{self.entry.key}/seed{self.seed}"

  @property
  def config_arg(self) -> str:
    return f"{self.entry.arg},seed={self.seed}" + (",runlocal" if self.fast else "")

  @property
  def command(self) -> str:
    return (f"python -m experiments.run --workdir={self.workdir} "
            f"--config=experiments/configs/{self.entry.config}.py:{self.config_arg}")

  def config(self):
    return grids.load_config(self.entry.config, self.config_arg)


def runs(chosen: Sequence[Entry], *, seeds: int | Sequence[int], workdir: str | os.PathLike,
         fast: bool = False, ledger: run_ledger.Ledger | None = None
         ) -> list[ClassificationRun]:
  root = grids.check_workdir(workdir) / ("fast" if fast else "protocol")
  return [ClassificationRun(entry, seed, root / entry.key / f"seed{seed}", fast, ledger)
          for entry in chosen for seed in grids.seeds_list(seeds)]


def run_classification(keys: Iterable[str] | None = None, *, seeds: int | Sequence[int] = 3,
                       workdir: str | os.PathLike = DEFAULT_WORKDIR, fast: bool = False,
                       report: str | os.PathLike | None = None, rerun_stale: bool = False,
                       train_fn: Callable[[Any, pathlib.Path], dict[str, Any]] | None = None,
                       log: Callable[[str], None] = print) -> dict[str, list[Any]]:
  """Trains every unfinished run of the chosen entries (default: the CPU ones), writing the
  report after each; returns the runs by outcome (`grids.train_runs`)."""
  chosen = entries(keys if keys is not None else CPU_KEYS)
  ledger = None if report is None else run_ledger.Ledger(run_ledger.ledger_path(report))
  grid_runs = runs(chosen, seeds=seeds, workdir=workdir, fast=fast, ledger=ledger)

  def write() -> None:
    if report is not None:
      update_report(chosen, seeds=seeds, workdir=workdir, fast=fast, report=report)

  return grids.train_runs(
      grid_runs, train_fn=train_fn, write=write, rerun_stale=rerun_stale, log=log,
      describe=lambda run: f"{run.entry.key} seed {run.seed}",
      summarize=lambda results: f"test accuracy={results['test']['accuracy']:.4f}")


def update_report(chosen: Sequence[Entry] = (), *,
                  seeds: int | Sequence[int] = grids.REPORT_SEEDS,
                  workdir: str | os.PathLike = DEFAULT_WORKDIR, fast: bool = False,
                  report: str | os.PathLike = DEFAULT_REPORT) -> dict[str, pathlib.Path]:
  """Records the finished workdirs in the report's ledger and rewrites the whole table (every
  CPU entry and `chosen`); see `grids.update_entry_report`."""
  return grids.update_entry_report(sys.modules[__name__], chosen, seeds=seeds,
                                   workdir=workdir, fast=fast, report=report)


def reproduce_command(keys: Sequence[str], *, seeds: int | Sequence[int],
                      workdir: str | os.PathLike, fast: bool) -> str:
  return grids.entries_command("classification", keys, seeds=seeds, workdir=workdir, fast=fast)


@dataclasses.dataclass
class Row:
  entry: Entry
  accuracies: list[float]
  status: str
  commands: list[str]
  finished: list[float]  # when the finished runs' results.json were written (where known)
  done_runs: list[ClassificationRun] = dataclasses.field(default_factory=list)
  # (picture name, its copy beside the report), filled by write_report
  pictures: list[tuple[str, pathlib.Path]] = dataclasses.field(default_factory=list)

  @property
  def mean_std(self) -> tuple[float, float]:
    return grids.mean_std(self.accuracies)


def collect(chosen: Sequence[Entry], *, seeds: int | Sequence[int],
            workdir: str | os.PathLike, fast: bool = False,
            ledger: run_ledger.Ledger | None = None) -> list[Row]:
  """Each entry's finished, up-to-date runs, from the workdirs, then `ledger` (stale and failed
  ones are named, not averaged)."""
  rows = []
  by_entry: dict[str, list[ClassificationRun]] = {}
  for run in runs(chosen, seeds=seeds, workdir=workdir, fast=fast, ledger=ledger):
    by_entry.setdefault(run.entry.key, []).append(run)
  for entry in chosen:
    entry_runs = by_entry[entry.key]
    states = [grids.run_state(run) for run in entry_runs]
    done = [(run, s) for run, s in zip(entry_runs, states) if s.status == "done"]
    counts: dict[str, int] = {}
    for state in states:
      counts[state.status] = counts.get(state.status, 0) + 1
    status = ("done" if len(done) == len(entry_runs) else
              ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    rows.append(Row(entry, [s.results["test"]["accuracy"] for _, s in done], status,
                    [run.command for run in entry_runs],
                    [s.finished for _, s in done if s.finished is not None],
                    [run for run, _ in done]))
  return rows


def _fmt(mean: float, std: float, n: int) -> str:
  if n == 0:
    return "-"
  spread = "" if math.isnan(std) else f" ± {100 * std:.2f}"
  return f"{100 * mean:.2f}{spread} (n={n})"


def write_report(rows: Sequence[Row], path: str | os.PathLike, *, command: str,
                 fast: bool = False) -> dict[str, pathlib.Path]:
  """Markdown and CSV: ours (mean ± std over seeds, in %), published, protocol, pictures (of
  each entry's first finished seed that has them, copied into `grids.picture_dir(path)`),
  command."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  for row in rows:
    for run in row.done_runs:
      row.pictures = grids.copy_pictures(run.workdir, PICTURES, grids.picture_dir(path),
                                         entry_key=run.entry.key, seed=run.seed)
      if row.pictures:
        break
  machine = grids.machine_description()
  finished = [t for row in rows for t in row.finished]
  done = sum(len(row.accuracies) for row in rows)
  dates = (f"runs finished between {grids.format_date(min(finished))} and "
           f"{grids.format_date(max(finished))}" if finished else "")
  if done > len(finished):  # records recovered without their time (run_ledger)
    dates += ("; " if dates else "") + (f"{done - len(finished)} of {done} finished runs at "
                                        "unknown times (recovered records, see the ledger)")
  dates = dates or "no run finished yet"
  lines = [
      "# Classification: Long Range Arena, vision backbones, UEA", "",
      f"- Command: `{command}`",
      f"- Written: {grids.format_date(time.time())}; {dates}",
      f"- Versions: Python {machine['python']}, jax {machine['jax']}, flax {machine['flax']}; "
      f"paperzoo commit {machine['commit']}",
      f"- Machine: {machine['platform']}; CPU {machine['cpu']}; {machine['devices']}",
      "- Score: test accuracy in %, mean ± sample std over the seeds that finished (n); the "
      "test set is scored once, on the checkpoint selected by validation accuracy (UEA legacy "
      "rows: selected on TEST, Time-Series-Library's protocol, shown only to compare with the "
      "numbers published under it).",
  ]
  if fast:
    lines.append("- **Smoke mode (--fast): two training steps per run, not the protocol.**")
  group = None
  for row in rows:
    if row.entry.group != group:
      group = row.entry.group
      lines += ["", f"## {group}", "",
                "| entry | ours (test acc. %) | published | source / note | status | pictures "
                "| command |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
    mean, std = row.mean_std
    published = "-" if row.entry.published is None else f"{100 * row.entry.published:.2f}"
    lines.append(f"| {row.entry.key} | {_fmt(mean, std, len(row.accuracies))} | {published} | "
                 f"{row.entry.source} | {row.status} | "
                 f"{grids.picture_links(row.pictures, path.parent)} | `{row.commands[0]}` |")
  path.write_text("\n".join(lines) + "\n")
  csv_path = path.with_suffix(".csv")
  with csv_path.open("w", newline="") as stream:
    writer = csv.writer(stream)
    writer.writerow(["entry", "group", "n", "mean_accuracy", "std_accuracy", "accuracies",
                     "published", "status"])
    for row in rows:
      mean, std = row.mean_std
      writer.writerow([row.entry.key, row.entry.group, len(row.accuracies),
                       "" if not row.accuracies else f"{mean:.6f}",
                       "" if math.isnan(std) else f"{std:.6f}",
                       " ".join(f"{a:.6f}" for a in row.accuracies),
                       "" if row.entry.published is None else row.entry.published, row.status])
  return {"md": path, "csv": csv_path}
