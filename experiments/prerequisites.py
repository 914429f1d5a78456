"""The runs a config reads, trained before it: the experiment layer's side of `paperzoo.workdir`.

A task that reads other finished runs (VAR its tokenizer; the generation tasks the reference
classifier that scores their samples) lists them in `required_runs(config)`, each with its
workdir and the experiment config that trains it; the library only reads them, and refuses to
start without them. Here:

  prerequisites(config)     what `config` needs, as [Prerequisite(config, workdir)], the
                            prerequisites' own needs first
  train_prerequisites(...)  trains each one that has not finished
  train(config, workdir)    that, then `config` itself: what `experiments.run` does
  train_run(...)            `train` for a run of a grid or a prerequisite: a failure leaves
                            `error.txt` (the command and the traceback) in its workdir

Each prerequisite is trained under the lock and done-check of every run
(`paperzoo.workdir.lock`, `paperzoo.workdir.is_done`), the grids' and the trainer's too: of two
processes that need the same run, one trains it, the other waits and then reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import pathlib
import re
import traceback
from typing import Any, Callable

import jax

import paperzoo
from experiments import configs
from paperzoo import workdir as workdir_lib
from paperzoo.data import files
from paperzoo.registry import TASKS

TrainFn = Callable[[Any, pathlib.Path], dict[str, Any]]


class PrerequisiteError(RuntimeError):
  """A run that a config needs could not be trained."""


@dataclasses.dataclass(frozen=True)
class Prerequisite:
  """A finished run a config reads: the config that trains it, and its workdir."""

  required: workdir_lib.RequiredRun
  config: Any = dataclasses.field(compare=False)

  @property
  def workdir(self) -> pathlib.Path:
    return self.required.workdir

  @property
  def command(self) -> str:
    return self.required.command


def prerequisites(config: Any) -> list[Prerequisite]:
  """The finished runs `config` needs (its task's `required_runs`), each with the config that
  trains it; a prerequisite's own prerequisites come before it, and each run appears once."""
  result: list[Prerequisite] = []

  def visit(needing: Any, chain: tuple[pathlib.Path, ...]) -> None:
    task_cls = TASKS.get(needing.task.name)
    for required in getattr(task_cls, "required_runs", lambda _: [])(needing):
      if required.workdir in chain:
        raise PrerequisiteError(f"{required.workdir} needs itself: "
                                f"{' -> '.join(map(str, chain + (required.workdir,)))}")
      needed = Prerequisite(required, configs.load(required.config))
      visit(needed.config, chain + (required.workdir,))
      if all(p.workdir != needed.workdir for p in result):
        result.append(needed)

  visit(config, ())
  return result


def train(config: Any, workdir: str | pathlib.Path, *, train_fn: TrainFn | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains what `config` needs (`train_prerequisites`), then `config` itself in `workdir` with
  `train_fn` (default `paperzoo.train_and_evaluate`); returns its results."""
  train_prerequisites(config, train_fn=train_fn, log=log)
  return (train_fn or paperzoo.train_and_evaluate)(config, pathlib.Path(workdir))


def train_run(config: Any, workdir: pathlib.Path, command: str, *,
              train_fn: TrainFn | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """`train`, for a run of a grid or a prerequisite: a failure writes `<workdir>/error.txt` (the
  command that trains the run, and the traceback) and raises; a finished run removes the
  error.txt of an earlier failure."""
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    results = train(config, workdir, train_fn=train_fn, log=log)
  except Exception:
    try:
      (workdir / "error.txt").write_text(f"{command}\n\n{traceback.format_exc()}")
    except OSError:  # (a full disk): the error itself says more
      pass
    raise
  if results.get("status") == "done":
    (workdir / "error.txt").unlink(missing_ok=True)
  return results


def train_prerequisites(config: Any, *, train_fn: TrainFn | None = None,
                        log: Callable[[str], None] = print) -> list[Prerequisite]:
  """Trains every prerequisite of `config` that has not finished, each under its run lock
  (waiting while another process trains it); returns them all. Raises PrerequisiteError,
  naming the run and its error.txt, when one fails or is preempted."""
  needed = prerequisites(config)
  for prerequisite in needed:
    workdir, role = prerequisite.workdir, prerequisite.required.role
    with _prerequisite_lock(workdir):
      if workdir_lib.is_done(workdir):
        continue
      log(f"training the {role} first, in {workdir}: {prerequisite.command}")
      try:
        results = train_run(prerequisite.config, workdir, prerequisite.command,
                            train_fn=train_fn, log=log)
      except Exception as error:
        raise PrerequisiteError(
            f"the {role} this run needs failed to train in {workdir} ({type(error).__name__}: "
            f"{error}; traceback in {workdir / 'error.txt'})") from error
      if results.get("status") != "done":
        raise PrerequisiteError(
            f"training the {role} in {workdir} stopped at step {results.get('step')} "
            f"({results.get('status')}); run again to resume it")
  return needed


def _prerequisite_lock(workdir: pathlib.Path) -> contextlib.AbstractContextManager[None]:
  """The run's lock, waited for. The processes of one multi-process run (`--distributed`) train
  a prerequisite together, every step a collective, so none of them may wait on another's lock:
  they take none here (the trainer's own lock, held by the first process, keeps other runs
  out)."""
  if jax.process_count() > 1:
    return contextlib.nullcontext()
  return workdir_lib.lock(workdir, wait=True)


def cached_workdir(kind: str, config_name: str, arg: str) -> pathlib.Path:
  """A prerequisite's default workdir: `cache_dir(kind)/<arg>_<digest>`, the digest that of the
  config `experiments/configs/<config_name>.py:<arg>` builds, so that a changed config trains a
  new run instead of reading one trained under the old config."""
  config_json = configs.load(config_name, arg).to_json(sort_keys=True)
  slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", arg) or "default"
  digest = hashlib.sha256(config_json.encode()).hexdigest()[:12]
  return files.cache_dir(kind) / f"{slug}_{digest}"
