"""Checkpoints in the workdir, through orbax-checkpoint, each verified before it is trusted.

Two managers:
  `<workdir>/checkpoints/<step>`: the latest `keep` states, for resuming;
  `<workdir>/best/<step>`: the state with the best validation metric, for the final test.
Each checkpoint holds the train state and a small JSON record of the trainer's bookkeeping
(early-stopping counters), so a resumed run continues exactly where the saved one stopped.
Orbax writes into a temporary directory and renames it when complete, so a kill mid-save leaves
the previous checkpoints intact.

Once a checkpoint is complete, the sha256 of every file in it is written beside those files
(`<step>/paperzoo_sha256.json`). A restore first checks the files against it: a checkpoint that
fails the check (a truncated, garbled, flipped or deleted file) or cannot be read is moved aside
into `<workdir>/checkpoints_set_aside/` (never deleted), with a one-line warning naming it and
the reason, and the run resumes from the newest checkpoint that passes. A checkpoint made before
its digest was written (a kill in between) is trusted once orbax reads it without error.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from paperzoo import sharding
from paperzoo.data import files

DIGEST_FILE = "paperzoo_sha256.json"
SET_ASIDE_DIR = "checkpoints_set_aside"


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model or train state it is restored into."""


class CheckpointCorruptError(RuntimeError):
  """No checkpoint that passes its check is left where one is needed."""


class Checkpoints:
  """The latest-N and best checkpoints of one run.

  `warn(message)` receives the one-line warnings about checkpoints set aside.
  """

  def __init__(self, workdir: str | pathlib.Path, *, keep: int,
               warn: Callable[[str], None] = print):
    workdir = pathlib.Path(workdir).absolute()
    self.workdir = workdir
    self.warn = warn
    # On several processes orbax synchronizes each save at barriers named by the step, so the
    # two managers, which often save the same step at once, need barrier names of their own.
    def options(name: str, max_to_keep: int) -> ocp.CheckpointManagerOptions:
      return ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True,
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              barrier_sync_key_prefix=name))

    # Handlers named up front, so a manager that has not saved yet can read a checkpoint's
    # metadata (`restore` checks it against the model before reading any array).
    def handlers() -> dict[str, ocp.CheckpointHandler]:
      return {"state": ocp.StandardCheckpointHandler(), "record": ocp.JsonCheckpointHandler()}

    self.latest = ocp.CheckpointManager(workdir / "checkpoints", item_handlers=handlers(),
                                        options=options("checkpoints", max(int(keep), 1)))
    self.best = ocp.CheckpointManager(workdir / "best", item_handlers=handlers(),
                                      options=options("best", 1))

  def save(self, step: int, state: Any, record: dict[str, Any], *, best: bool = False) -> None:
    """Saves asynchronously: arrays are copied off the devices before this returns."""
    manager = self.best if best else self.latest
    if manager.latest_step() == step:
      return
    # The previous save must end first anyway; its checkpoint then gets its digest, before this
    # save's background thread may delete it (max_to_keep), never while.
    manager.wait_until_finished()
    self._write_digests(manager)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def best_step(self) -> int | None:
    return self.best.latest_step()

  def discard_best(self, *, after: int = -1) -> None:
    """Sets aside every best checkpoint after step `after` (all by default): a run that starts
    afresh, or resumes from an earlier step, must not inherit one from a future it will train
    again (orbax would also refuse to save a step at or before the newest it holds)."""
    for step in _steps_on_disk(self.best):
      if step > after:
        self._set_aside(self.best, step, "is from after the step this run resumes from")

  def newest_good_step(self) -> int | None:
    """The newest latest checkpoint whose files pass their check (None: none does), after the
    saves in flight have finished."""
    self.wait()
    for step in sorted(_steps_on_disk(self.latest), reverse=True):
      if _digest_problem(self._step_dir(self.latest, step)) is None:
        return step
    return None

  def restore_latest(self, abstract_state: Any
                     ) -> tuple[Any, dict[str, Any], int] | None:
    """(state, record, step) of the newest latest checkpoint that passes its check and reads,
    restored onto `abstract_state`'s shardings; the ones that fail are set aside on the way.
    None when no checkpoint is left. A checkpoint of another model raises
    CheckpointMismatchError (it is the config that is wrong, not the checkpoint)."""
    sharding.sync_processes("restore_latest")  # (every process sees the same checkpoints)
    for step in sorted(_steps_on_disk(self.latest), reverse=True):
      try:
        state, record = self._restore(self.latest, step, abstract_state)
      except _Unusable as unusable:
        self._set_aside(self.latest, step, str(unusable))
        continue
      return state, record, step
    return None

  def restore_best(self, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """The best checkpoint onto `abstract_state`'s shardings. One that fails its check is set
    aside and, where a latest checkpoint of the same step passes (both are saved at the same
    evaluation), that one is used; otherwise CheckpointCorruptError."""
    sharding.sync_processes("restore_best")  # (every process sees the same checkpoints)
    steps = _steps_on_disk(self.best)
    if not steps:
      raise CheckpointCorruptError(f"no best checkpoint in {self.best.directory}")
    step = steps[-1]
    try:
      return self._restore(self.best, step, abstract_state)
    except _Unusable as unusable:
      self._set_aside(self.best, step, str(unusable))
    if step in _steps_on_disk(self.latest):
      try:
        return self._restore(self.latest, step, abstract_state)
      except _Unusable as unusable:
        self._set_aside(self.latest, step, str(unusable))
    raise CheckpointCorruptError(
        f"the best checkpoint (step {step}) failed its check and no other copy of it is left; "
        f"the ones set aside are in {self.workdir / SET_ASIDE_DIR}")

  def _restore(self, manager: ocp.CheckpointManager, step: int, abstract_state: Any
               ) -> tuple[Any, dict[str, Any]]:
    directory = self._step_dir(manager, step)
    problem = _digest_problem(directory)
    if problem is not None:
      raise _Unusable(problem)
    # Compared from the saved metadata before any array is read: a restore that fails halfway
    # leaves orbax's pending reads behind, and its error names no parameter.
    try:
      saved = manager.item_metadata(step)["state"]
    except Exception as error:  # pylint: disable=broad-except  (any unreadable metadata)
      raise _Unusable(f"its metadata cannot be read ({_first_line(error)})") from error
    _check_fits(abstract_state, saved, str(directory))
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()))
    except Exception as error:  # pylint: disable=broad-except  (it fits, so it is unreadable)
      raise _Unusable(f"it cannot be read ({_first_line(error)})") from error
    return restored.state, dict(restored.record)

  def _step_dir(self, manager: ocp.CheckpointManager, step: int) -> pathlib.Path:
    return pathlib.Path(manager.directory) / str(step)

  def _set_aside(self, manager: ocp.CheckpointManager, step: int, reason: str) -> None:
    """Moves a checkpoint out of orbax's sight, keeping it, and says so in one line."""
    source = self._step_dir(manager, step)
    if sharding.is_primary_process():
      folder = self.workdir / SET_ASIDE_DIR
      folder.mkdir(parents=True, exist_ok=True)
      target = folder / f"{pathlib.Path(manager.directory).name}-{step}"
      for i in range(1, 1000):
        if not target.exists():
          break
        target = folder / f"{pathlib.Path(manager.directory).name}-{step}.{i}"
      shutil.move(str(source), str(target))
      self.warn(f"warning: checkpoint {source} {reason}; moved to {target}")
    sharding.sync_processes(f"set_aside_{pathlib.Path(manager.directory).name}_{step}")
    manager.reload()

  def _write_digests(self, manager: ocp.CheckpointManager) -> None:
    """Writes the digest of every complete checkpoint of `manager` that has none, while it saves
    nothing (the first process only; every process's files are there once orbax has finished a
    step)."""
    if not sharding.is_primary_process():
      return
    for step in _steps_on_disk(manager):
      directory = self._step_dir(manager, step)
      if not (directory / DIGEST_FILE).exists():
        digest = _file_digests(directory)
        files.atomic_write(directory / DIGEST_FILE,
                           lambda tmp, digest=digest: tmp.write_text(json.dumps(digest, indent=0)))

  def wait(self) -> None:
    for manager in (self.latest, self.best):
      manager.wait_until_finished()
      self._write_digests(manager)

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _steps_on_disk(manager: ocp.CheckpointManager) -> list[int]:
  """The complete checkpoints in a manager's folder, read from the folder itself (orbax writes a
  step under a temporary name and renames it when complete)."""
  directory = pathlib.Path(manager.directory)
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


class _Unusable(Exception):
  """A checkpoint that fails its check or cannot be read; the message says why."""


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _file_digests(directory: pathlib.Path) -> dict[str, str]:
  """Relative path -> sha256 of every file of a checkpoint but the digest itself."""
  return {str(path.relative_to(directory)): files.file_sha256(path)
          for path in sorted(directory.rglob("*"))
          if path.is_file() and path.name != DIGEST_FILE and not path.name.startswith(".")}


def _digest_problem(directory: pathlib.Path) -> str | None:
  """Why the checkpoint in `directory` fails its check, or None (also when it has no digest)."""
  digest_path = directory / DIGEST_FILE
  if not digest_path.exists():
    return None if directory.exists() else "is missing"
  try:
    saved = json.loads(digest_path.read_text())
  except ValueError:
    return f"has an unreadable {DIGEST_FILE}"
  present = _file_digests(directory)
  missing = sorted(set(saved) - set(present))
  if missing:
    return f"lacks {missing[0]}" + (f" and {len(missing) - 1} more files" if len(missing) > 1
                                    else "")
  changed = sorted(name for name in saved if present[name] != saved[name])
  if changed:
    return (f"failed its check: {changed[0]} differs from the file saved"
            + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""))
  return None


def _mismatch(where: str, details: str) -> str:
  return (f"the checkpoint {where} does not match the model being trained ({details}). Was it "
          f"written with a different model config? Use a new --workdir, or the config the "
          f"checkpoint was written with.")


def _leaves_by_name(tree: Any) -> dict[str, Any]:
  """Leaves keyed by their path as orbax names them on disk ("opt_state.1.count"): the saved
  metadata comes back with dicts and lists where the train state has namedtuples and tuples."""
  return {jax.tree_util.keystr(path, simple=True, separator="."): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_fits(abstract_state: Any, saved: Any, where: str) -> None:
  """Raises `CheckpointMismatchError` naming the leaves that are missing, extra or reshaped."""
  want, have = _leaves_by_name(abstract_state), _leaves_by_name(saved)
  def params_first(names: Any) -> list[str]:  # the optimizer's leaves repeat the params'
    return sorted(names, key=lambda n: not n.startswith("params."))
  bad = [f"{n}: not in the checkpoint" for n in params_first(want) if n not in have]
  bad += [f"{n}: in the checkpoint, not in the model" for n in params_first(have) if n not in want]
  bad += [f"{n}: model {tuple(want[n].shape)}, checkpoint {tuple(have[n].shape)}"
          for n in params_first(want) if n in have and tuple(want[n].shape) != tuple(have[n].shape)]
  if bad:
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    raise CheckpointMismatchError(_mismatch(where, "; ".join(bad[:5]) + more))
