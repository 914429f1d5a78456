"""Reading a finished run: its config, its results, its best model.

The library reads runs; it never trains one. A task that builds on another run (VAR on its
tokenizer, sample scores on a reference classifier) names that run's workdir in its config and
lists it in `required_runs(config)` (see `paperzoo.tasks`); the trainer checks those runs before
any compute, and the task reads them with `load_best_model`. A run that is missing or not
finished raises `MissingRunError`, whose message names the workdir and the command that trains
it. `python -m experiments.run` trains the missing ones first (`experiments.prerequisites`).

    from paperzoo import workdir

    if workdir.is_done("/tmp/run"):
      model, task = workdir.load_best_model("/tmp/run")  # the config the run saved

A workdir holds `config.json` (written when the run starts), checkpoints, and `results.json`
(written once, when the run has finished, with `"status": "done"`).

One process writes a workdir at a time: `lock(workdir)` (an exclusive `flock` on
`.<name>.lock` beside it, naming its holder) is held by `paperzoo.train_and_evaluate` for the
whole run, and by the experiment layer around it. The kernel releases it when its process dies,
so the lock of a killed run is simply taken over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import pathlib
import socket
import sys
import threading
from typing import Any, Iterator

import jax
import ml_collections
from flax import nnx

from paperzoo import checkpoint as checkpoint_lib
from paperzoo import train_state
from paperzoo.data import files
from paperzoo.registry import MODELS, TASKS

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"


class MissingRunError(FileNotFoundError):
  """A run that a task reads is missing or has not finished."""


class WorkdirBusyError(RuntimeError):
  """Another process holds the workdir's lock: it is training (or resuming) the run there."""


@dataclasses.dataclass(frozen=True)
class RequiredRun:
  """A finished run that a task reads, and how to train it.

  `config` is the experiment config that trains it, as `experiments.run` takes it relative to
  `experiments/configs/` (e.g. "var_tokenizer.py:data=mnist,seed=2021"); the library only
  shows it in messages, `experiments.prerequisites` builds and trains it.
  """

  role: str  # what the run is for the task, e.g. "VAR tokenizer"
  workdir: pathlib.Path
  config: str
  model: str  # the model name the run must have trained
  data: str  # the data set it must have trained on

  @property
  def command(self) -> str:
    return (f"python -m experiments.run --workdir={self.workdir} "
            f"--config=experiments/configs/{self.config}")


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The config a run was trained with (`<workdir>/config.json`; tuples come back as lists)."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise MissingRunError(f"{path} not found: {workdir} is not a paperzoo workdir")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def read_results(workdir: str | pathlib.Path) -> dict[str, Any] | None:
  """`<workdir>/results.json`, or None while the run has not finished (or is not a run)."""
  try:
    return json.loads((pathlib.Path(workdir) / RESULTS_FILE).read_text())
  except (OSError, ValueError):
    return None


def is_done(workdir: str | pathlib.Path) -> bool:
  """Whether the run in `workdir` has finished (its results.json says "done")."""
  results = read_results(workdir)
  return results is not None and results.get("status") == "done"


def check_required(run: RequiredRun) -> ml_collections.ConfigDict:
  """The config of the finished run `run` names; raises MissingRunError (with the command that
  trains it) when it has not finished, ValueError when it trained another model or data set."""
  if not is_done(run.workdir):
    raise MissingRunError(
        f"the {run.role} in {run.workdir} has not finished ({run.workdir / RESULTS_FILE} is "
        f"missing or not 'done'). Train it: {run.command} (`python -m experiments.run` trains "
        f"what a config needs before the config itself)")
  config = read_config(run.workdir)
  if config.model.name != run.model or config.data.name != run.data:
    raise ValueError(
        f"the {run.role} in {run.workdir} is a {config.model.name!r} run on "
        f"{config.data.name!r}; this run needs a {run.model!r} run on {run.data!r}")
  return config


def load_best_model(workdir: str | pathlib.Path, *, config: Any = None, task: Any = None
                    ) -> tuple[nnx.Module, Any]:
  """The model of `workdir`'s best checkpoint (its EMA parameters if the run kept an EMA) and
  its task, built from `config` (default: the config the run saved).

  The abstract train state is `TrainStep`'s, the trainer's own (`paperzoo.train_state`), so
  orbax restores the checkpoint onto exactly what was saved; a config that does not match the
  checkpoint raises CheckpointMismatchError naming the parameters that differ.
  """
  workdir = pathlib.Path(workdir)
  config = read_config(workdir) if config is None else config
  task = TASKS.get(config.task.name)(config) if task is None else task
  step_def = train_state.TrainStep(config, task, MODELS.get(config.model.name), total_steps=1,
                                   steps_per_epoch=1)  # only the state's structure counts
  with nnx.use_eager_sharding(False):
    abstract = train_state.unbox_variables(jax.eval_shape(step_def.boxed_init_state))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
  checkpoints = checkpoint_lib.Checkpoints(workdir, keep=1)
  try:
    state, _ = checkpoints.restore_best(abstract)
  finally:
    checkpoints.close()
  return step_def.merge(state[step_def.eval_params_key], state["extra"]), task


def checkpoint_sha256(workdir: str | pathlib.Path) -> str:
  """sha256 over the files of `workdir`'s best checkpoint (relative names and contents): the
  identity of a trained model, e.g. as a cache key of what it computed."""
  best = pathlib.Path(workdir) / "best"
  paths = sorted(p for p in best.rglob("*") if p.is_file()) if best.exists() else []
  if not paths:
    raise MissingRunError(f"no best checkpoint under {best}")
  digest = hashlib.sha256()
  for path in paths:
    digest.update(str(path.relative_to(best)).encode())
    digest.update(files.file_sha256(path).encode())
  return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# One writer per workdir.
# --------------------------------------------------------------------------------------------
_HELD: dict[tuple[str, int], list[Any]] = {}  # (lock file, thread) -> [open file, depth]
_HELD_GUARD = threading.Lock()


def lock_path(workdir: str | pathlib.Path) -> pathlib.Path:
  """`<parent>/.<name>.lock`: beside the workdir, so it outlives the workdir being moved aside
  and never adds a file to a run's own folder."""
  workdir = pathlib.Path(workdir).absolute()
  return workdir.parent / f".{workdir.name}.lock"


def _holder(handle: Any) -> dict[str, Any]:
  handle.seek(0)
  try:
    return json.loads(handle.read() or "{}")
  except ValueError:
    return {}


def describe_holder(holder: dict[str, Any]) -> str:
  """"pid 123 on host h since 2026-12-06 10:00:00 (python -m experiments.run ...)"."""
  if not holder:
    return "a process that did not say who it is"
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
          f"{holder.get('since', '?')} ({holder.get('command', '?')})")


def _running_here(holder: dict[str, Any]) -> bool:
  if holder.get("host") != socket.gethostname():
    return True  # another host's process: not ours to judge
  try:
    os.kill(int(holder.get("pid", -1)), 0)
  except (OSError, ValueError):
    return False
  return True


@contextlib.contextmanager
def lock(workdir: str | pathlib.Path, *, wait: bool = False,
         on_takeover: Any = None) -> Iterator[None]:
  """Holds `workdir`'s lock for the block: the one process that may write there.

  Another process holding it raises WorkdirBusyError naming it (host, pid, since when, its
  command), or with `wait=True` blocks until it is released. Re-entrant within a thread, so the
  experiment layer can hold it around `train_and_evaluate`, which takes it too. A lock file left
  by a process that died is free (the kernel released it); `on_takeover(message)` is told whose
  it was.
  """
  path = lock_path(workdir)
  key = (str(path), threading.get_ident())
  with _HELD_GUARD:
    held = _HELD.get(key)
    if held is not None:
      held[1] += 1
  if held is not None:
    try:
      yield
    finally:
      with _HELD_GUARD:
        held[1] -= 1
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  handle = open(path, "a+")  # pylint: disable=consider-using-with  (closed below)
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
      raise WorkdirBusyError(
          f"{pathlib.Path(workdir)} is in use by {describe_holder(_holder(handle))}; wait "
          "for it to finish or use another --workdir") from None
    previous = _holder(handle)
    if previous and on_takeover is not None and not _running_here(previous):
      on_takeover(f"took over the lock of {pathlib.Path(workdir)} from "
                  f"{describe_holder(previous)}, which is no longer running")
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(),
        "since": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([pathlib.Path(sys.argv[0]).name] + sys.argv[1:])[:300]}))
    handle.flush()
    with _HELD_GUARD:
      _HELD[key] = [handle, 1]
    try:
      yield
    finally:
      with _HELD_GUARD:
        del _HELD[key]
      handle.seek(0)
      handle.truncate()  # a released lock names no holder
      handle.flush()
  finally:
    handle.close()  # (releases the flock)
