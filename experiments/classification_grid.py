"""The classification reproduction: Long Range Arena, vision backbones and UEA, with seeds.

`python -m experiments.reproduce classification` (thin CLI in experiments/reproduce.py) calls
`GRID.train`, which trains every unfinished run of the chosen entries (one workdir per
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

import dataclasses
import math
import os
import pathlib
from typing import Any, Iterable, Sequence

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
_UEA = "Time-Series-Library protocol (selects on TEST), as published under it"
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
            "target >= 0.96")
      for model in ("vit", "poolformer", "swin", "biformer", "cvt", "t2t_vit")),
    Entry("mnist/vit-agent", "Vision, MNIST 8k/2k (CPU)", "vit", "data=mnist,mixer=agent", None,
          "target >= 0.96"),
    Entry("mnist/swin-agent", "Vision, MNIST 8k/2k (CPU)", "agent", "data=mnist", None,
          "target >= 0.96"),
    Entry("cifar10/vit", "Vision, CIFAR-10 (GPU)", "vit", "data=cifar10", None,
          "target >= 0.85"),
    Entry("cifar10/swin", "Vision, CIFAR-10 (GPU)", "swin", "data=cifar10", None,
          "target >= 0.88"),
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


# A run of this grid: an entry at one seed (`grids.EntryRun`).
ClassificationRun = grids.EntryRun
runs = grids.entry_runs


@dataclasses.dataclass
class Row:
  entry: Entry
  accuracies: list[float]
  status: str
  commands: list[str]
  finished: list[float | None]  # when the finished runs' results.json were written (None: unknown)
  seeds: list[int] = dataclasses.field(default_factory=list)  # the seeds asked for
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
    status = grids.status_line(states)
    rows.append(Row(entry, [s.results["test"]["accuracy"] for _, s in done], status,
                    [run.command for run in entry_runs], [s.finished for _, s in done],
                    [run.seed for run in entry_runs], [run for run, _ in done]))
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
  seeds = sorted({seed for row in rows for seed in row.seeds})
  lines = grids.report_header(
      "Classification: Long Range Arena, vision backbones, UEA", command=command,
      finished=[t for row in rows for t in row.finished], seeds=seeds, fast=fast)
  lines.append(
      "- Score: test accuracy in %; the test set is scored once, on the checkpoint selected by "
      "validation accuracy (UEA legacy rows: selected on TEST, Time-Series-Library's "
      "protocol, shown only to compare with the numbers published under it).")
  for group in dict.fromkeys(row.entry.group for row in rows):
    lines += ["", f"## {group}", ""]
    lines += grids.markdown_table(
        ["entry", "ours (test acc. %)", "published", "source / note", "status", "pictures",
         "command"],
        ([row.entry.key, _fmt(*row.mean_std, len(row.accuracies)),
          "-" if row.entry.published is None else f"{100 * row.entry.published:.2f}",
          row.entry.source, row.status, grids.picture_links(row.pictures, path.parent),
          f"`{row.commands[0]}`"] for row in rows if row.entry.group == group))
  path.write_text("\n".join(lines) + "\n")

  def csv_row(row: Row) -> dict[str, Any]:
    mean, std = row.mean_std
    return {"entry": row.entry.key, "group": row.entry.group, "n": len(row.accuracies),
            "mean_accuracy": "" if not row.accuracies else f"{mean:.6f}",
            "std_accuracy": "" if math.isnan(std) else f"{std:.6f}",
            "accuracies": " ".join(f"{a:.6f}" for a in row.accuracies),
            "published": "" if row.entry.published is None else row.entry.published,
            "status": row.status}

  csv_path = grids.write_csv(path.with_suffix(".csv"),
                             ["entry", "group", "n", "mean_accuracy", "std_accuracy",
                              "accuracies", "published", "status"], map(csv_row, rows))
  return {"md": path, "csv": csv_path}


GRID = grids.entry_grid(
    "classification", default_workdir=DEFAULT_WORKDIR, default_report=DEFAULT_REPORT,
    entries=entries, cpu_keys=CPU_KEYS, runs=runs, collect=collect, write_report=write_report,
    describe=lambda run: f"{run.entry.key} seed {run.seed}",
    summarize=lambda results: f"test accuracy={results['test']['accuracy']:.4f}")
