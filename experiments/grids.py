"""What the reproduction grids (forecasting, classification, generation) share.

A grid is a table of runs, one workdir per run under the grid's root; `experiments.reproduce`
trains the unfinished ones and rewrites the table's report. Every grid uses these pieces:

  * runs: `load_config` (the config `experiments.run` builds), `seeds_list`, the command flags,
    `select_entries` (entry keys and prefixes), `check_workdir`;
  * `run_state`: what a run's workdir, then the report's ledger (run_ledger), says about it:
    done, stale (its config changed since), failed, started, not run, or refused by its config;
  * `train_runs`: the training loop (skip the finished, resume the half-done, record failures,
    stop on preemption, rewrite the report after each run; a lock per run, `claim_run`, lets
    several processes share a grid); `rewrite_report`, every grid's report update under the
    report's lock, and `update_entry_report` for the grids of named entries;
  * the report's pieces: `mean_std`, `machine_description`, `format_date`, and the pictures
    copied beside a report (`picture_dir`, `copy_pictures`, `picture_links`).

A run is anything with `key`, `workdir`, `command`, `config()` and `ledger` (see each grid's
run class: `forecasting_grid.Run`, `classification_grid.ClassificationRun`,
`generation_grid.GenerationRun`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import json
import math
import os
import pathlib
import platform
import shutil
import traceback
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from experiments import run_ledger

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "experiments" / "configs"
FIRST_SEED = 2021  # seeds are FIRST_SEED, FIRST_SEED + 1, ...
# A report shows at least this many seeds, whatever a run asked for: a one-seed run updates its
# cells without hiding the other seeds of the table.
REPORT_SEEDS = 3


# ---------------------------------------------------------------------------------------------
# Runs: configs, seeds, entries, workdirs.

def config_files(config_dir: str | os.PathLike = CONFIG_DIR) -> list[str]:
  """The configs in `config_dir`: its .py files but common.py and private ones (_*.py)."""
  return sorted(p.stem for p in pathlib.Path(config_dir).glob("*.py")
                if p.stem != "common" and not p.stem.startswith("_"))


def load_config(model: str, arg: str | None):
  """`experiments/configs/<model>.py`'s get_config(arg), the config `experiments.run` builds."""
  if not (CONFIG_DIR / f"{model}.py").exists():
    raise FileNotFoundError(f"no config experiments/configs/{model}.py; configs: "
                            f"{', '.join(config_files())}")
  return importlib.import_module(f"experiments.configs.{model}").get_config(arg)


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


def check_workdir(workdir: str | os.PathLike) -> pathlib.Path:
  """The grid's root directory; never inside the repository (checkpoints do not belong there)."""
  workdir = pathlib.Path(workdir).expanduser().resolve()
  if workdir == REPO_ROOT or REPO_ROOT in workdir.parents:
    raise ValueError(f"--workdir={workdir} is inside the repository {REPO_ROOT}; put the runs "
                     "elsewhere (each grid's default is under /tmp)")
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
  results_path = run.workdir / "results.json"
  if results_path.exists():
    results = json.loads(results_path.read_text())
    saved_path = run.workdir / "config.json"
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    finished = results_path.stat().st_mtime
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


# ---------------------------------------------------------------------------------------------
# Training and reports.

OUTCOMES = ("trained", "skipped", "busy", "unsupported", "stale", "failed", "preempted")


def train_runs(grid_runs: Sequence[Any], *,
               train_fn: Callable[[Any, pathlib.Path], dict[str, Any]] | None,
               write: Callable[[], None], rerun_stale: bool, log: Callable[[str], None],
               describe: Callable[[Any], str], summarize: Callable[[dict[str, Any]], str]
               ) -> dict[str, list[Any]]:
  """The loop every reproduction grid shares: trains each unfinished run in order (with
  `train_fn`, default `paperzoo.train_and_evaluate`), calling `write()` after each, and returns
  the runs sorted by outcome (OUTCOMES). A run is anything with `workdir`, `command` and
  `config()` (see `run_state`)."""
  if train_fn is None:
    import paperzoo  # pylint: disable=g-import-not-at-top
    train_fn = paperzoo.train_and_evaluate
  outcome: dict[str, list[Any]] = {k: [] for k in OUTCOMES}
  for index, run in enumerate(grid_runs, 1):
    name = f"[{index}/{len(grid_runs)}] {describe(run)}"
    with claim_run(run.workdir) as claimed:
      if not claimed:
        outcome["busy"].append(run)
        log(f"{name}: another process is training it, skipped ({run.workdir})")
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
      run.workdir.mkdir(parents=True, exist_ok=True)
      try:
        results = train_fn(run.config(), run.workdir)
      except Exception:  # pylint: disable=broad-except  (recorded; the grid goes on)
        (run.workdir / "error.txt").write_text(f"{run.command}\n\n{traceback.format_exc()}")
        outcome["failed"].append(run)
        log(f"{name}: FAILED, see {run.workdir / 'error.txt'}")
        write()
        continue
      if results.get("status") == "preempted":
        outcome["preempted"].append(run)
        log(f"{name}: preempted at step {results.get('step')}; run again to resume")
        break
      (run.workdir / "error.txt").unlink(missing_ok=True)
      outcome["trained"].append(run)
      log(f"{name}: {summarize(results)}")
      write()
  write()
  return outcome


def claim_run(workdir: pathlib.Path) -> contextlib.AbstractContextManager[bool]:
  """Held while a grid trains the run in `workdir` (`.<name>.lock` beside it, so it outlives
  `_move_aside`). Yields False when another process holds it: several processes given the same
  grid (one per core or per GPU) then share its runs out, each training the next free one."""
  return run_ledger.file_lock(workdir.parent / f".{workdir.name}.lock", wait=False)


def _move_aside(workdir: pathlib.Path) -> pathlib.Path:
  for i in range(1, 1000):
    target = workdir.with_name(f"{workdir.name}.stale{i}")
    if not target.exists():
      workdir.rename(target)
      return target
  raise RuntimeError(f"too many stale copies of {workdir}")


def update_entry_report(grid: Any, chosen: Sequence[Any], *, seeds: int | Sequence[int],
                        workdir: str | os.PathLike, fast: bool, report: str | os.PathLike
                        ) -> dict[str, pathlib.Path]:
  """`update_report` of an entry grid (the classification or generation module, `grid`):
  records the finished workdirs in the report's ledger, then rewrites the whole table (every
  entry of `grid.CPU_KEYS` and `chosen`, `report_seeds(seeds)`) from the workdirs and the
  ledger; returns write_report's paths."""
  chosen = grid.entries({e.key for e in chosen} | set(grid.CPU_KEYS))
  seeds = report_seeds(seeds)
  command = grid.reproduce_command([e.key for e in chosen], seeds=seeds, workdir=workdir,
                                   fast=fast)
  return rewrite_report(
      report,
      runs=lambda ledger: grid.runs(chosen, seeds=seeds, workdir=workdir, fast=fast,
                                    ledger=ledger),
      collect=lambda ledger: grid.collect(chosen, seeds=seeds, workdir=workdir, fast=fast,
                                          ledger=ledger),
      write=lambda rows: grid.write_report(rows, report, command=command, fast=fast))


def rewrite_report(report: str | os.PathLike, *,
                   runs: Callable[[run_ledger.Ledger], Iterable[Any]],
                   collect: Callable[[run_ledger.Ledger], Any],
                   write: Callable[[Any], dict[str, pathlib.Path]]
                   ) -> dict[str, pathlib.Path]:
  """What every grid's `update_report` does, under the report's lock: reads the ledger, records
  the finished workdirs of `runs(ledger)` in it, then `write(collect(ledger))`. Holding the
  lock from the read to the write is what lets several processes share one report."""
  with run_ledger.report_lock(report):
    ledger = run_ledger.Ledger(run_ledger.ledger_path(report))
    ledger.sync(runs(ledger))
    return write(collect(ledger))


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
