"""What the reproduction grids (forecasting, classification, generation) share.

A grid is a table of runs, one workdir per run under the grid's root; `experiments.reproduce`
trains the unfinished ones and rewrites the table's report. Each grid module defines its runs,
rows and report, and one `Grid` (its `GRID`): the explicit record of those pieces that the
command line and the shared code below take. Shared here:

  * runs: `seeds_list`, the command flags, `select_entries` (entry keys and prefixes),
    `check_workdir`;
  * `run_state`: what a run's workdir, then the report's ledger (run_ledger), says about it:
    done, stale (its config changed since), failed, started, not run, or refused by its config;
  * `Grid.train`: the training loop (skip the finished, resume the half-done, train what a run
    reads first (`experiments.prerequisites`), record failures, stop on preemption, rewrite the
    report after each run; a lock per run lets several processes share a grid), and
    `Grid.update_report`, every grid's report update under the report's lock;
  * the report's pieces: `report_header` (title, command, dates, versions, machine, seeds),
    `markdown_table`, `write_csv`, `mean_std`, `format_date`, `display_path`, and the pictures
    copied beside a report (`picture_dir`, `copy_pictures`, `picture_links`).

A run is anything with `key`, `workdir`, `command`, `config()` and `ledger` (see each grid's
run class: `forecasting_grid.Run`, `classification_grid.ClassificationRun`,
`generation_grid.GenerationRun`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import shutil
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from experiments import configs
from experiments import prerequisites
from experiments import run_ledger
from paperzoo import config as config_lib
from paperzoo import trainer
from paperzoo import workdir as workdir_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIRST_SEED = 2021  # seeds are FIRST_SEED, FIRST_SEED + 1, ...
# A report shows at least this many seeds, whatever a run asked for: a one-seed run updates its
# cells without hiding the other seeds of the table.
REPORT_SEEDS = 3


# ---------------------------------------------------------------------------------------------
# Runs: configs, seeds, entries, workdirs.

def seeds_list(seeds: int | Sequence[int]) -> list[int]:
  """`3` -> [2021, 2022, 2023]; an explicit list is kept."""
  if isinstance(seeds, int):
    if seeds < 1:
      raise ValueError(f"seeds must be >= 1, got {seeds}")
    return [FIRST_SEED + i for i in range(seeds)]
  return [int(s) for s in seeds]


def seeds_flag(seeds: int | Sequence[int]) -> str:
  """The reproduce flag that asks for `seeds`: `--seeds=3`, or `--seed_list=...` otherwise."""
  seeds = seeds_list(seeds)
  return (f"--seeds={len(seeds)}" if seeds == seeds_list(len(seeds))
          else f"--seed_list={','.join(map(str, seeds))}")


def _key_matches(key: str, wanted: str) -> bool:
  return key == wanted or key.startswith(wanted.rstrip("/") + "/")


def report_seeds(seeds: int | Sequence[int]) -> list[int]:
  """The seeds a report shows: the requested ones and the first REPORT_SEEDS."""
  return sorted(set(seeds_list(seeds)) | set(seeds_list(REPORT_SEEDS)))


def select_entries(all_entries: Sequence[Any], keys: Iterable[str] | None,
                   cpu_keys: Iterable[str] = ()) -> list[Any]:
  """The entries (anything with a `.key`) whose key equals or starts with one of `keys`, in
  table order (all when None); an unknown key is an error that lists the valid ones. A key that
  reaches both CPU entries (`cpu_keys`) and GPU ones selects only the CPU ones, so `lra/listops`
  never starts a full-size GPU run by accident; a key that reaches only GPU entries
  (`cifar10`, `lra/listops/attention/full`) selects them. The classification and generation
  grids choose their entries this way."""
  if keys is None:
    return list(all_entries)
  cpu_keys = set(cpu_keys)
  selected, unknown = set(), []
  for wanted in keys:
    matches = {e.key for e in all_entries if _key_matches(e.key, wanted)}
    if not matches:
      unknown.append(wanted)
    selected |= (matches & cpu_keys) or matches
  if unknown:
    raise ValueError(f"unknown entries {unknown}; valid keys (or their prefixes): "
                     f"{', '.join(e.key for e in all_entries)}")
  return [e for e in all_entries if e.key in selected]


def entries_command(subcommand: str, keys: Sequence[str], *, seeds: int | Sequence[int],
                    workdir: str | os.PathLike, fast: bool) -> str:
  """The command line that runs (or resumes) these entries of an entry grid."""
  parts = [f"python -m experiments.reproduce {subcommand}", f"--entries={','.join(keys)}",
           seeds_flag(seeds), f"--workdir={workdir}"]
  return " ".join(parts + (["--fast"] if fast else []))


def run_command(workdir: pathlib.Path, config: str, arg: str) -> str:
  """The `experiments.run` command that trains one run of a grid alone."""
  return (f"python -m experiments.run --workdir={display_path(workdir)} "
          f"--config=experiments/configs/{config}.py:{arg}")


@dataclasses.dataclass(frozen=True)
class EntryRun:
  """One run of an entry grid: an entry (anything with `key`, `config` (a config file's name)
  and `arg`) at one seed, in `workdir`. The classification and language-model grids' run."""

  entry: Any
  seed: int
  workdir: pathlib.Path
  fast: bool = False
  # The report's record of finished runs, read when the workdir holds none (run_ledger).
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
    return run_command(self.workdir, self.entry.config, self.config_arg)

  def config(self):
    return configs.load(self.entry.config, self.config_arg)


def entry_runs(chosen: Sequence[Any], *, seeds: int | Sequence[int],
               workdir: str | os.PathLike, fast: bool = False,
               ledger: run_ledger.Ledger | None = None) -> list[EntryRun]:
  """Every chosen entry at every seed, one workdir each: <root>/<protocol|fast>/<key>/seed<s>."""
  root = check_workdir(workdir) / ("fast" if fast else "protocol")
  return [EntryRun(entry, seed, root / entry.key / f"seed{seed}", fast, ledger)
          for entry in chosen for seed in seeds_list(seeds)]


def check_workdir(workdir: str | os.PathLike) -> pathlib.Path:
  """The grid's root directory; never inside the repository (checkpoints do not belong there)."""
  workdir = pathlib.Path(workdir).expanduser().resolve()
  if workdir == REPO_ROOT or REPO_ROOT in workdir.parents:
    raise config_lib.ConfigError(f"--workdir={workdir} is inside the repository {REPO_ROOT}; "
                                 "put the runs elsewhere (each grid's default is under /tmp)")
  return workdir


# ---------------------------------------------------------------------------------------------
# Run states.

@dataclasses.dataclass
class RunState:
  """What a run's workdir holds: status is one of done, stale, failed, started, not run,
  unsupported (the config refuses the cell), no config or config error."""

  status: str
  results: dict[str, Any] | None = None
  detail: str = ""
  finished: float | None = None  # when results.json was written (None: unknown)


# Cells the grid cannot run as configured (shown with the reason, never trained).
REFUSED = ("no config", "config error", "unsupported")


def run_state(run: Any) -> RunState:
  """Reads `run.workdir`, then `run.ledger` (a run's record there outlives its workdir):
  finished (and still matching today's config), half done, failed..."""
  try:
    config = run.config()
  except FileNotFoundError as error:
    return RunState("no config", detail=str(error))
  except ValueError as error:
    return RunState("unsupported", detail=str(error))
  except Exception as error:  # pylint: disable=broad-except  (a config being written)
    return RunState("config error", detail=f"{type(error).__name__}: {error}")
  results = workdir_lib.read_results(run.workdir)
  if results is not None:
    saved_path = run.workdir / workdir_lib.CONFIG_FILE
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    finished = (run.workdir / workdir_lib.RESULTS_FILE).stat().st_mtime
    differences = run_ledger.config_differences(saved, run_ledger.config_dict(config))
    if differences:
      return RunState("stale", results, "config changed since the run: "
                      + ", ".join(differences[:6]) + (" ..." if len(differences) > 6 else ""),
                      finished)
    return RunState("done", results, finished=finished)
  error_path = run.workdir / "error.txt"
  if error_path.exists():
    lines = error_path.read_text().strip().splitlines()
    return RunState("failed", detail=lines[-1] if lines else "")
  if (run.workdir / "checkpoints").exists():
    return RunState("started", detail="checkpoints without results.json: resumes when run")
  record = run.ledger.get(run.key) if run.ledger is not None else None
  if record is not None:
    if record.config_digest != run_ledger.config_digest(run_ledger.config_dict(config)):
      return RunState("stale", record.results, f"config changed since the run (recorded in "
                      f"{run.ledger.path.name} at commit {record.commit}; its workdir is gone)",
                      record.finished)
    return RunState("done", record.results, finished=record.finished)
  return RunState("not run")


def status_line(states: Sequence[RunState]) -> str:
  """A table cell for a row's runs: "done" when all are, else the count of each status."""
  if all(state.status == "done" for state in states):
    return "done"
  counts: dict[str, int] = {}
  for state in states:
    counts[state.status] = counts.get(state.status, 0) + 1
  return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


# ---------------------------------------------------------------------------------------------
# Training and reports.

OUTCOMES = ("trained", "skipped", "busy", "unsupported", "stale", "failed", "preempted")


@dataclasses.dataclass(frozen=True)
class Grid:
  """One reproduction table: the pieces a grid module defines, which `experiments.reproduce`
  and the shared loop take explicitly.

  A selection says which runs a caller wants: entry keys for the classification and generation
  grids, `forecasting_grid.Cells` for forecasting. Each function takes it as its first
  argument:

    runs(selection, *, seeds, workdir, fast, ledger)      the runs, in training order
    collect(selection, *, seeds, workdir, fast, ledger)   the report's rows, from the workdirs
                                                          and then the ledger
    write_report(rows, path, *, command, fast)            markdown (and CSV, ...) -> paths
    command(selection, *, seeds, workdir, fast)           the `experiments.reproduce` command
    whole_table(selection)                                what a report shows: the table's
                                                          CPU part and the selection
    describe(run), summarize(results)                     one log line each
  """

  name: str
  default_workdir: pathlib.Path
  default_report: pathlib.Path
  runs: Callable[..., list[Any]]
  collect: Callable[..., list[Any]]
  write_report: Callable[..., dict[str, pathlib.Path]]
  command: Callable[..., str]
  whole_table: Callable[[Any], Any]
  describe: Callable[[Any], str]
  summarize: Callable[[dict[str, Any]], str]

  def train(self, selection: Any, *, seeds: int | Sequence[int] = 3,
            workdir: str | os.PathLike | None = None, fast: bool = False,
            report: str | os.PathLike | None = None, rerun_stale: bool = False,
            train_fn: prerequisites.TrainFn | None = None,
            log: Callable[[str], None] = print) -> dict[str, list[Any]]:
    """Trains every unfinished run of `selection` in order (with `train_fn`, default
    `paperzoo.train_and_evaluate`; what a run reads first, `experiments.prerequisites`),
    rewriting `report` (if given) after each; returns the runs by outcome (OUTCOMES).

    A finished run is skipped, a half-finished one resumes; one that another process is
    training is "busy" (skipped); a stale one (config changed since) is kept unless
    `rerun_stale` (then moved aside to `<workdir>.staleK` and retrained). A run that raises is
    recorded in `<workdir>/error.txt` and the grid goes on; a preempted run (SIGTERM: the
    trainer saves and returns "preempted") stops the grid. Running again resumes both.
    """
    workdir = check_workdir(workdir or self.default_workdir)
    ledger = None if report is None else run_ledger.Ledger(run_ledger.ledger_path(report))
    grid_runs = self.runs(selection, seeds=seeds, workdir=workdir, fast=fast, ledger=ledger)

    def write() -> None:
      if report is not None:
        self.update_report(selection, seeds=seeds, workdir=workdir, fast=fast, report=report)

    outcome: dict[str, list[Any]] = {k: [] for k in OUTCOMES}
    for index, run in enumerate(grid_runs, 1):
      name = f"[{index}/{len(grid_runs)}] {self.describe(run)}"
      with contextlib.ExitStack() as held:
        try:  # held while this process trains the run; another process passes over it
          held.enter_context(workdir_lib.lock(run.workdir))
        except workdir_lib.WorkdirBusyError as busy:
          outcome["busy"].append(run)
          log(f"{name}: skipped, {busy}")
          continue
        state = run_state(run)
        if state.status == "done":
          outcome["skipped"].append(run)
          log(f"{name}: finished before, skipped ({run.workdir})")
          continue
        if state.status in REFUSED:
          outcome["unsupported"].append(run)
          log(f"{name}: {state.status}: {state.detail}")
          continue
        if state.status == "stale":
          if not rerun_stale:
            outcome["stale"].append(run)
            log(f"{name}: STALE, not retrained ({state.detail}); rerun_stale retrains it")
            continue
          if run.workdir.exists():  # (a stale run known only from the ledger has no workdir)
            _move_aside(run.workdir)
        log(f"{name}: training in {run.workdir}" + (" (resuming)" if state.status == "started"
                                                       else ""))
        try:
          results = prerequisites.train_run(run.config(), run.workdir, run.command,
                                            train_fn=train_fn,
                                            log=lambda message: log(f"{name}: {message}"))
        except trainer.DiskFullError:
          raise  # every run after it would fail the same way
        except Exception:  # pylint: disable=broad-except  (in error.txt; the grid goes on)
          outcome["failed"].append(run)
          log(f"{name}: FAILED, see {run.workdir / 'error.txt'}")
          write()
          continue
        if results.get("status") == "preempted":
          outcome["preempted"].append(run)
          log(f"{name}: preempted at step {results.get('step')}; run again to resume")
          break
        outcome["trained"].append(run)
        log(f"{name}: {self.summarize(results)}")
        write()
    write()
    return outcome

  def update_report(self, selection: Any = None, *,
                    seeds: int | Sequence[int] = REPORT_SEEDS,
                    workdir: str | os.PathLike | None = None, fast: bool = False,
                    report: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
    """Records the finished workdirs in the report's ledger, then rewrites the whole table
    (`whole_table(selection)`, `report_seeds(seeds)`) from the workdirs and the ledger, all
    under the report's lock (so several processes can share one report); returns
    write_report's paths."""
    workdir = check_workdir(workdir or self.default_workdir)
    report = report or self.default_report
    selection, seeds = self.whole_table(selection), report_seeds(seeds)
    command = self.command(selection, seeds=seeds, workdir=workdir, fast=fast)
    with run_ledger.report_lock(report):
      ledger = run_ledger.Ledger(run_ledger.ledger_path(report))
      ledger.sync(self.runs(selection, seeds=seeds, workdir=workdir, fast=fast, ledger=ledger))
      rows = self.collect(selection, seeds=seeds, workdir=workdir, fast=fast, ledger=ledger)
      return self.write_report(rows, report, command=command, fast=fast)


def entry_grid(name: str, *, default_workdir: pathlib.Path, default_report: pathlib.Path,
               entries: Callable[[Iterable[str]], list[Any]], cpu_keys: Sequence[str],
               runs: Callable[..., list[Any]], collect: Callable[..., list[Any]],
               write_report: Callable[..., dict[str, pathlib.Path]],
               describe: Callable[[Any], str],
               summarize: Callable[[dict[str, Any]], str]) -> Grid:
  """The Grid of a table of named entries (classification, generation), whose `runs` and
  `collect` take entries: a selection is entry keys or key prefixes (`entries(keys)`; None:
  the entries that fit a CPU), and a report shows every CPU entry and the ones chosen."""
  chosen = lambda keys: entries(list(cpu_keys) if keys is None else keys)
  return Grid(
      name=name, default_workdir=default_workdir, default_report=default_report,
      runs=lambda keys, **kwargs: runs(chosen(keys), **kwargs),
      collect=lambda keys, **kwargs: collect(chosen(keys), **kwargs),
      write_report=write_report,
      command=lambda keys, **kwargs: entries_command(name, [e.key for e in chosen(keys)],
                                                     **kwargs),
      whole_table=lambda keys: sorted(set(keys or ()) | set(cpu_keys)),
      describe=describe, summarize=summarize)


def _move_aside(workdir: pathlib.Path) -> pathlib.Path:
  for i in range(1, 1000):
    target = workdir.with_name(f"{workdir.name}.stale{i}")
    if not target.exists():
      workdir.rename(target)
      return target
  raise RuntimeError(f"too many stale copies of {workdir}")


# ---------------------------------------------------------------------------------------------
# Report pieces.

def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; NaN for a single value)."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return math.nan, math.nan
  return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan


def machine_description() -> dict[str, str]:
  """Versions and machine, for the report header."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  devices = jax.devices()
  return {
      "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
      "platform": platform.platform(), "cpu": f"{cpu} ({os.cpu_count()} cores)",
      "devices": f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})",
      "commit": run_ledger.current_commit(),
  }


def report_header(title: str, *, command: str, finished: Sequence[float | None],
                  seeds: Sequence[int], fast: bool, runs_used: Sequence[str] = (),
                  seeds_note: str = "") -> list[str]:
  """The lines every report starts with: its title, the smoke-mode warning, the command, when it
  was written and when its runs finished (`finished`: one time per finished run, None where
  only the ledger knows it without a time), versions, machine, seeds."""
  machine = machine_description()
  known = [t for t in finished if t is not None]
  dates = (f"runs finished between {format_date(min(known))} and {format_date(max(known))}"
           if known else "")
  if len(finished) > len(known):
    dates += ("; " if dates else "") + (f"{len(finished) - len(known)} of {len(finished)} "
                                        "finished runs at unknown times (recovered records, "
                                        "see the ledger)")
  lines = [f"# {title}", ""]
  if fast:
    lines += ["**Smoke mode (--fast): every run is its config's `runlocal` setting (two "
              "training steps, tiny models). These numbers test the machinery only; they are "
              "NOT the protocol.**", ""]
  used = f"; runs used {', '.join(runs_used)}" if runs_used else ""
  return lines + [
      f"- Command: `{command}`",
      f"- Written: {format_date(time.time())}; {dates or 'no run finished yet'}",
      f"- Versions: Python {machine['python']}, jax {machine['jax']}, flax {machine['flax']}; "
      f"paperzoo commit {machine['commit']}",
      f"- Machine (writing this report): {machine['platform']}; CPU {machine['cpu']}; "
      f"{machine['devices']}{used}",
      f"- Seeds: {', '.join(map(str, seeds)) or '-'}; scores are mean ± sample std over the "
      f"seeds that finished (n){seeds_note}.",
  ]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
  """A markdown table's lines (a "|" inside a cell is written as "/")."""
  cell = lambda value: str(value).replace("|", "/")
  return (["| " + " | ".join(map(cell, header)) + " |",
           "| " + " | ".join("---" for _ in header) + " |"]
          + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def write_csv(path: pathlib.Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]
              ) -> pathlib.Path:
  """A report's CSV: one line per row (dicts keyed by `fields`)."""
  with open(path, "w", newline="") as stream:
    writer = csv.DictWriter(stream, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows(rows)
  return path


def display_path(path: str | os.PathLike) -> str:
  """`path` as a report shows it: under the home directory as `$HOME/...` (which a shell expands
  inside `--workdir=...` too), so that a report never holds one machine's home path."""
  path = pathlib.Path(path)
  try:
    return f"$HOME/{path.relative_to(pathlib.Path.home())}"
  except ValueError:
    return str(path)


def format_date(timestamp: float | None) -> str:
  """Local time to the minute; "unknown" for None (a run recovered without its time)."""
  if timestamp is None:
    return "unknown"
  return datetime.datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M")


def picture_dir(report: str | os.PathLike) -> pathlib.Path:
  """The folder beside a report that holds its pictures: `generation.md` -> `generation/`."""
  report = pathlib.Path(report)
  return report.parent / report.stem


def copy_pictures(workdir: pathlib.Path, names: Sequence[str], folder: pathlib.Path, *,
                  entry_key: str, seed: int | None) -> list[tuple[str, pathlib.Path]]:
  """Copies the files `names` of a finished run's workdir that exist into `folder`, as
  `<entry key, / as _>[_seed<seed>]_<name>`, so that a report's links resolve inside the
  repository. PNGs are
  re-encoded with a 64-colour palette (grids of digits, plots and confusion matrices: about
  half the size, no visible change). A copy newer than its source is kept; a run known from
  the ledger alone (workdir gone) keeps the copy made before. Returns (name, copy) pairs."""
  folder.mkdir(parents=True, exist_ok=True)
  prefix = entry_key.replace("/", "_") + ("" if seed is None else f"_seed{seed}")
  copies = []
  for name in names:
    source = workdir / name
    target = folder / f"{prefix}_{name}"
    if not source.exists():
      if target.exists():
        copies.append((name, target))
      continue
    if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
      _write_copy(source, target)
    copies.append((name, target))
  return copies


def _write_copy(source: pathlib.Path, target: pathlib.Path) -> None:
  partial = target.with_name(target.name + ".partial")
  if source.suffix != ".png":
    shutil.copyfile(source, partial)
  else:
    try:
      from PIL import Image  # pylint: disable=g-import-not-at-top
      with Image.open(source) as image:
        image.convert("RGB").quantize(colors=64).save(partial, format="PNG", optimize=True)
    except Exception:  # pylint: disable=broad-except  (an unreadable picture is copied as is)
      shutil.copyfile(source, partial)
  partial.replace(target)


def picture_links(pictures: Sequence[tuple[str, pathlib.Path]], base: pathlib.Path) -> str:
  """Markdown links to copied pictures, relative to the report's folder `base`."""
  return " ".join(f"[{pathlib.Path(name).stem}]({os.path.relpath(copy, base)})"
                  for name, copy in pictures) or "-"
