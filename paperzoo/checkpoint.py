"""Checkpoints in the workdir, through orbax-checkpoint.

Two managers:
  `<workdir>/checkpoints/<step>`: the latest `keep` states, for resuming;
  `<workdir>/best/<step>`: the state with the best validation metric, for the final test.
Each checkpoint holds the train state and a small JSON record of the trainer's bookkeeping
(early-stopping counters), so a resumed run continues exactly where the saved one stopped.
Orbax writes into a temporary directory and renames it when complete, so a kill mid-save leaves
the previous checkpoints intact.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model or train state it is restored into."""


class Checkpoints:
  """The latest-N and best checkpoints of one run."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int):
    workdir = pathlib.Path(workdir).absolute()
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
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def best_step(self) -> int | None:
    return self.best.latest_step()

  def discard_best(self) -> None:
    """Deletes every best checkpoint: a run that starts afresh must not inherit one (orbax
    would also refuse to save a step at or before the newest it holds)."""
    for step in self.best.all_steps():
      self.best.delete(step)

  def restore(self, abstract_state: Any, *, best: bool = False) -> tuple[Any, dict[str, Any]]:
    """Restores the newest latest (or the best) checkpoint onto `abstract_state`'s shardings."""
    manager = self.best if best else self.latest
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    where = f"{manager.directory}/{step}"
    # Compared from the saved metadata before any array is read: a restore that fails halfway
    # leaves orbax's pending reads behind, and its error names no parameter.
    _check_fits(abstract_state, manager.item_metadata(step)["state"], where)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(_mismatch(where, f"orbax said: {e}")) from e
    return restored.state, dict(restored.record)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


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
