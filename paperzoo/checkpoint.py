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

    self.latest = ocp.CheckpointManager(workdir / "checkpoints",
                                        options=options("checkpoints", max(int(keep), 1)))
    self.best = ocp.CheckpointManager(workdir / "best", options=options("best", 1))

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
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(
          f"the checkpoint {manager.directory}/{step} does not match the model being trained "
          f"(was it written with a different model config?). Use a new --workdir, or the "
          f"config the checkpoint was written with. Orbax said: {e}") from e
    _check_shapes(abstract_state, restored.state, f"{manager.directory}/{step}")
    return restored.state, dict(restored.record)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def _check_shapes(expected: Any, restored: Any, where: str) -> None:
  bad = []
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(expected),
                               jax.tree.leaves(restored)):
    if tuple(want.shape) != tuple(got.shape):
      bad.append(f"{jax.tree_util.keystr(path)}: model {tuple(want.shape)}, "
                 f"checkpoint {tuple(got.shape)}")
  if bad:
    raise CheckpointMismatchError(
        f"the checkpoint {where} does not match the model: " + "; ".join(bad[:5]))
