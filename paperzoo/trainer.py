"""The one trainer: config in, trained model, checkpoints, metrics and pictures out.

Read it top to bottom. `train_and_evaluate(config, workdir)` is what `experiments/run.py` calls,
and what a notebook calls too. The sections:

  1. Resolve names    registry lookups, so a typo fails before any compute
  2. Data             the task's splits; the data order is a pure function of (seed, step)
  3. Mesh             devices arranged as (data, fsdp, tensor)
  4. Train state      built abstractly, sharded by logical axis rules, then created or restored
  5. Steps            one jitted train step (donated state) and one jitted evaluation step
  6. Loop             train, log, evaluate, stop early, checkpoint, honour SIGTERM
  7. Final test       the best checkpoint on the full validation and test sets, results.json

The train state and the step function are `paperzoo.train_state.TrainStep`'s.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import pathlib
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import tqdm
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from paperzoo import checkpoint as checkpoint_lib
from paperzoo import config as config_lib
from paperzoo import metric_writers
from paperzoo import plots
from paperzoo import sharding
from paperzoo import train_state
from paperzoo import workdir as workdir_lib
from paperzoo.data import batches
from paperzoo.data import files
from paperzoo.registry import DATASETS, MODELS, TASKS, UnknownNameError


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class DiskFullError(OSError):
  """The disk filled up while the run wrote its files; what was saved before is intact."""


class ChangedConfigError(checkpoint_lib.CheckpointMismatchError):
  """A resumed run's optimizer or training settings differ from the ones it was trained with."""


# The config history of a workdir: one JSON line per config the run trained under, with the step
# it started at (the first at step 0; another each time a resume changed its settings).
CONFIG_HISTORY_FILE = "config_history.jsonl"


def train_and_evaluate(config: Any, workdir: str | pathlib.Path, *,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints) and returns results.

  Returns the content of `<workdir>/results.json`: final validation and test metrics of the
  best checkpoint, the best step, and run information. If SIGTERM arrives, the state is saved
  and `{"status": "preempted", "step": ...}` is returned instead; running again resumes.

  The config is checked before any compute (`paperzoo.config.validate`; a problem found before
  the first step raises `config.ConfigError`); the workdir is held for the whole run
  (`workdir.lock`: another process gets WorkdirBusyError). Resuming with other optimizer or
  training settings than the run's raises ChangedConfigError unless `allow_config_change`;
  the workdir then keeps every config it ran under (`config_history.jsonl`). A full disk raises
  DiskFullError; the checkpoints saved before it are intact.
  """
  workdir = pathlib.Path(workdir)
  stage = {"training": False}  # set when the first step starts
  try:
    with contextlib.ExitStack() as closing:  # checkpoint managers and writers, even on errors
      return _train_and_evaluate(config, workdir, closing, stage,
                                 allow_config_change=allow_config_change)
  except Exception as error:
    if _disk_full(error):
      raise DiskFullError(errno.ENOSPC, f"no space left on device while the run in {workdir} "
                          "wrote its files; the checkpoints saved before are intact; free "
                          "some space and run again to resume") from error
    if (isinstance(error, ValueError) and not stage["training"]
        and not isinstance(error, (config_lib.ConfigError, UnknownNameError,
                                   checkpoint_lib.CheckpointMismatchError))):
      # A setting the task, data or model refused while the run was being set up.
      raise config_lib.ConfigError(" ".join(str(error).split())) from error
    raise


def _train_and_evaluate(config: Any, workdir: pathlib.Path, closing: contextlib.ExitStack,
                        stage: dict[str, bool], *, allow_config_change: bool
                        ) -> dict[str, Any]:
  # ------------------------------------------------------------------------------------------
  # 1. Check the config, resolve names and the runs this one reads, hold the workdir: all
  #    before any compute.
  # ------------------------------------------------------------------------------------------
  config_lib.validate(config)
  task_cls = TASKS.get(config.task.name)
  model_cls = MODELS.get(config.model.name)
  DATASETS.get(config.data.name, kinds=task_cls.data_kinds)
  for required in getattr(task_cls, "required_runs", lambda _: [])(config):
    workdir_lib.check_required(required)  # e.g. VAR's tokenizer: MissingRunError names it
  primary = sharding.is_primary_process()  # the one process of several that writes files
  _hold_workdir(workdir, closing)
  saved_config, changed = _check_workdir_config(config, workdir, allow_config_change)

  # ------------------------------------------------------------------------------------------
  # 2. Data.
  # ------------------------------------------------------------------------------------------
  task = task_cls(config)
  train_set = task.splits["train"]
  batch_size = int(config.train.batch_size)
  steps_per_epoch = len(train_set) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"train.batch_size={batch_size} is larger than the training set "
                     f"({len(train_set)} examples)")
  total_steps = int(config.train.num_steps) or int(config.train.num_epochs) * steps_per_epoch
  tie_break = config.train.selection_tie_break  # (one of config.SELECTION_TIE_BREAKS)
  eval_every = int(config.train.eval_every_steps) or steps_per_epoch
  data_order = DataOrder(config.seed, len(train_set), batch_size, steps_per_epoch)

  # ------------------------------------------------------------------------------------------
  # 3. Mesh.
  # ------------------------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(rule) for rule in config.sharding_rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  shards = sharding.batch_shards(batch_sharding)
  accum = int(config.train.grad_accum_steps)
  if batch_size % (accum * shards):
    raise ValueError(f"train.batch_size={batch_size} must be a multiple of "
                     f"train.grad_accum_steps ({accum}) x batch shards ({shards})")

  # ------------------------------------------------------------------------------------------
  # 4. Train state: abstract first (no memory), shardings from the logical names, then real.
  # ------------------------------------------------------------------------------------------
  step_def = train_state.TrainStep(config, task, model_cls, total_steps=total_steps,
                                   steps_per_epoch=steps_per_epoch)

  # Variables are created without eager sharding: their logical names are resolved by the rules
  # below, not read as mesh axes.
  with nnx.use_eager_sharding(False):
    boxed_abstract_state = jax.eval_shape(step_def.boxed_init_state)  # records graphdef
    sharding.check_logical_names(boxed_abstract_state["params"])
    state_shardings = train_state.unbox_variables(
        sharding.state_shardings(boxed_abstract_state, mesh, rules))
    abstract_state = train_state.unbox_variables(boxed_abstract_state)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep=config.train.keep_checkpoints,
                                             warn=_report)
    closing.callback(checkpoints.close)
    # The newest checkpoint that passes its check; those that fail are set aside, with a line.
    restored = checkpoints.restore_latest(
        train_state.with_shardings(abstract_state, state_shardings))
    if restored is not None:
      state, record, resume_step = restored
      checkpoints.discard_best(after=resume_step)  # (a future this run trains again)
      _report(f"resumed from {workdir}/checkpoints/{resume_step}")
    else:
      resume_step = None
      checkpoints.discard_best()  # (left by a run whose latest checkpoints were removed)
      state = jax.jit(step_def.init_state, out_shardings=state_shardings)()
      record = {"best_metric": None, "best_step": None, "evals_without_improvement": 0,
                "training_done": False,
                "seconds": {"compile": 0.0, "train": 0.0, "eval": 0.0, "checkpoint": 0.0}}
  num_params = sum(x.size for x in jax.tree.leaves(abstract_state["params"]))
  if primary:  # what the run trains under, once its data, model and checkpoints are known
    _record_config(config, workdir, resume_step, saved_config, changed)

  # ------------------------------------------------------------------------------------------
  # 5. Steps.
  # ------------------------------------------------------------------------------------------
  # The train step itself (TrainStep.train_step, below): forward and backward, gradient
  # accumulation, the optax update and the EMA, jitted here with the state donated.
  train_step = jax.jit(step_def.train_step, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, None), donate_argnums=0)

  def eval_step(params, extra, batch):
    return task.eval_sums(step_def.merge(params, extra), batch)

  eval_params_key = step_def.eval_params_key
  eval_step = jax.jit(eval_step, in_shardings=(state_shardings[eval_params_key],
                                               state_shardings["extra"], batch_sharding))

  def evaluate(state, split: str) -> dict[str, float]:
    sums = evaluate_sums(
        task.splits[split], lambda batch: eval_step(state[eval_params_key], state["extra"], batch),
        batch_size=int(config.train.eval_batch_size), batch_sharding=batch_sharding)
    return task.summarize(sums)

  # ------------------------------------------------------------------------------------------
  # 6. Loop.
  # ------------------------------------------------------------------------------------------
  writer = metric_writers.MetricWriter(workdir, resume_step=resume_step, enabled=primary)
  closing.callback(writer.close)
  start_step = int(jax.device_get(state["step"]))
  pending: list[tuple[int, dict[str, jax.Array]]] = []  # train metrics not yet on the host

  def flush_train_metrics() -> None:
    """Moves pending metrics to the host, checks the loss, writes the mean over the interval."""
    if not pending:
      return
    host = jax.device_get([m for _, m in pending])
    for (step, _), metrics in zip(pending, host):
      if not math.isfinite(float(metrics["loss"])):
        good = checkpoints.newest_good_step()
        kept = (f"the newest checkpoint that passes its check, step {good}, is kept in "
                f"{workdir}/checkpoints" if good is not None else
                "no checkpoint had been saved before it")
        raise NonFiniteLossError(
            f"the training loss is {float(metrics['loss'])} at step {step + 1}; the run "
            f"stopped, and {kept}")
    mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    writer.write(pending[-1][0] + 1, "train", mean)
    pending.clear()

  stopwatch = Stopwatch(record["seconds"])

  def save(state, *, best: bool = False) -> None:
    flush_train_metrics()  # never save a state that followed a non-finite loss
    with stopwatch("checkpoint"):
      record["seconds"] = dict(stopwatch.seconds)
      checkpoints.save(int(jax.device_get(state["step"])), state, dict(record), best=best)

  # Both managers save asynchronously, the best first: a kill can leave the latest checkpoint
  # of step s, the best by its record, complete and the best one of step s not. The latest
  # state is that best state, so it is saved as the best again.
  if (resume_step is not None and record["best_step"] == resume_step
      and checkpoints.best_step() != resume_step):
    save(state, best=True)

  # Preemption: SIGTERM sets a flag that the loop reads after each step. Processes of a
  # multi-process run must stop at the same step, so there jax's preemption service (which
  # catches SIGTERM itself, on whichever process gets it) chooses that step instead.
  preempted = False
  multi_process = jax.process_count() > 1

  def on_sigterm(signum, frame):
    nonlocal preempted
    preempted = True

  bar = metric_writers.progress_bar(total=total_steps, initial=start_step,
                                    enabled=config.train.progress_bar and primary)
  stage["training"] = True
  try:
    with (contextlib.nullcontext() if multi_process
          else _signal_handler(signal.SIGTERM, on_sigterm)):
      step = start_step
      compiled = False
      while step < total_steps and not record["training_done"]:
        with stopwatch("train" if compiled else "compile"):
          batch = train_set.get_batch(data_order.indices(step))
          state, metrics = train_step(state, sharding.shard_batch(batch, batch_sharding))
          if not compiled:  # the first call compiles; time it apart from training
            jax.block_until_ready(metrics)
            compiled = True
        pending.append((step, metrics))
        step += 1
        bar.update(1)
        if step % config.train.log_every_steps == 0:
          with stopwatch("train"):  # waits for the steps in flight
            flush_train_metrics()
          bar.set_postfix(loss=f"{writer.last_train_loss:.4g}", refresh=False)
        if step % eval_every == 0 or step == total_steps:
          with stopwatch("train"):
            flush_train_metrics()
          with stopwatch("eval"):
            val = evaluate(state, "val")
          writer.write(step, "val", val)
          better = _improves(val, record, task, tie_break)
          metric = val[task.selection_metric]
          if better:
            record.update(best_metric=metric, best_step=step, evals_without_improvement=0,
                          best_val=val)
          else:
            record["evals_without_improvement"] += 1
          patience = int(config.train.patience)
          if step == total_steps or (patience and record["evals_without_improvement"] >= patience):
            record["training_done"] = True
          _report(f"step {step}/{total_steps} (epoch {step / steps_per_epoch:.2f}): val "
                  + " ".join(f"{k}={v:.4f}" for k, v in val.items())
                  + (" (best)" if better else
                     f" (no improvement for {record['evals_without_improvement']})"))
          if better:
            save(state, best=True)
          save(state)
        elif (config.train.checkpoint_every_steps
              and step % config.train.checkpoint_every_steps == 0):
          save(state)
        if multi_process:
          preempted = multihost_utils.reached_preemption_sync_point(step)
        if preempted:
          save(state)
          checkpoints.wait()
          _report(f"SIGTERM: saved step {step} in {workdir}/checkpoints; run again to resume")
          return {"status": "preempted", "step": step}
      flush_train_metrics()
  finally:
    bar.close()
    checkpoints.wait()

  # ------------------------------------------------------------------------------------------
  # 7. Final test with the best checkpoint.
  # ------------------------------------------------------------------------------------------
  best_state, best_record = checkpoints.restore_best(
      train_state.with_shardings(abstract_state, state_shardings))
  results = {
      "status": "done",
      # The best checkpoint's validation metrics were computed when it was saved.
      "val": best_record.get("best_val") or evaluate(best_state, "val"),
      "test": evaluate(best_state, "test"),
      "best_step": best_record["best_step"],
      # The split that chose the best checkpoint: "validation", unless a task says otherwise
      # (UEA's legacy protocol selects on TEST and reports "test (legacy)").
      "selection": getattr(task, "selection", "validation"),
      "steps": int(jax.device_get(state["step"])),
      "steps_per_epoch": steps_per_epoch,
      "stopped_early": int(jax.device_get(state["step"])) < total_steps,
      # Wall time by activity, summed over resumptions. "train" counts the training steps only
      # (synchronized at logging and evaluation), "compile" the first step of each process.
      "seconds": stopwatch.seconds,
      "epoch_seconds": stopwatch.seconds["train"] * steps_per_epoch / max(
          int(jax.device_get(state["step"])) - 1, 1),
      "num_params": int(num_params),
      "model": config.model.name, "task": config.task.name, "data": config.data.name,
      "seed": int(config.seed),
      "jax_version": jax.__version__,
      "devices": f"{len(mesh.devices.flat)} x {jax.devices()[0].device_kind}",
      "mesh": dict(mesh.shape),
  }
  # Outputs replicated: every process of a multi-process run can then read them on the host.
  predict_fn = jax.jit(lambda params, extra, inputs: step_def.merge(params, extra)(
      inputs, train=False, rngs=None), out_shardings=NamedSharding(mesh, PartitionSpec()))

  def predict(inputs):  # the best checkpoint's model, for the task's final scores and pictures
    return predict_fn(best_state[eval_params_key], best_state["extra"], inputs)

  if hasattr(task, "final_metrics"):  # optional: scores that need the model, e.g. of samples
    results["final_metrics"] = task.final_metrics(predict, workdir)
  writer.write(results["best_step"], "test", results["test"])
  if primary:
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
  _report(f"test (best checkpoint, step {results['best_step']}): "
          + " ".join(f"{k}={v:.4f}" for k, v in results["test"].items()))

  if config.train.plots:
    if primary:
      plots.loss_curves(metric_writers.read_metrics(workdir), workdir / "loss_curves.png",
                        selection_metric=task.selection_metric)
    task.write_pictures(predict, workdir)
  return results


def _improves(val: dict[str, float], record: dict[str, Any], task: Any, tie_break: str
              ) -> bool:
  """Whether validation metrics `val` beat the best so far (`record`): a better selection
  metric, or an equal one where `tie_break` is "later" (any tie) or "loss" (a tie with a lower
  validation loss)."""
  if tie_break == "loss" and "loss" not in val:  # (found at the first evaluation)
    raise ValueError(f"train.selection_tie_break='loss', but the {type(task).__name__} "
                     f"reports no validation loss (it reports {', '.join(val)})")
  best = record["best_metric"]
  metric = val[task.selection_metric]
  if best is None:
    return True
  if metric != best:
    return metric < best if task.selection_mode == "min" else metric > best
  if tie_break != "loss":
    return tie_break == "later"
  best_loss = (record.get("best_val") or {}).get("loss")  # (records of older runs lack it)
  return best_loss is not None and val["loss"] < best_loss


def evaluate_sums(dataset: Any, eval_fn: Callable[[dict[str, jax.Array]], dict[str, jax.Array]],
                  *, batch_size: int, batch_sharding: Any) -> dict[str, float]:
  """Sums `eval_fn`'s statistics over every example of `dataset`, none dropped.

  Batches come from `batches.batch_indices`, rounded up to a multiple of the batch shards: the
  last one is padded (so the jitted step compiles once) and `batch["mask"]` marks the padding
  with 0 for `eval_fn` to ignore; a split smaller than `batch_size` is one batch of its own
  size (UEA's 3-series validation split must not cost 256 forward passes at every
  evaluation). The per-batch sums are added up on the host in float64.
  """
  sums = []
  for indices, count in batches.batch_indices(len(dataset), batch_size, shrink=True,
                                              multiple_of=sharding.batch_shards(batch_sharding)):
    mask = (np.arange(len(indices)) < count).astype(np.float32)
    batch = dict(dataset.get_batch(indices), mask=mask)
    sums.append(eval_fn(sharding.shard_batch(batch, batch_sharding)))
  return jax.tree.map(lambda *xs: float(np.sum(np.asarray(xs, np.float64))),
                      *jax.device_get(sums))


class DataOrder:
  """Which training examples make up batch `step`: a pure function of (seed, step).

  Each epoch is a fresh permutation drawn from (seed, epoch); the incomplete last batch of an
  epoch is skipped. Resuming at any step therefore replays exactly the uninterrupted order.
  """

  def __init__(self, seed: int, num_examples: int, batch_size: int, steps_per_epoch: int):
    self.seed, self.num_examples = seed, num_examples
    self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
    self._epoch, self._permutation = -1, np.empty(0, np.int64)

  def indices(self, step: int) -> np.ndarray:
    epoch, position = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._epoch = epoch
      self._permutation = np.random.default_rng([self.seed, epoch]).permutation(
          self.num_examples)
    start = position * self.batch_size
    return self._permutation[start:start + self.batch_size]


class Stopwatch:
  """Wall-clock seconds per named activity: `with stopwatch("eval"): ...`."""

  def __init__(self, seconds: dict[str, float]):
    self.seconds = dict(seconds)

  @contextlib.contextmanager
  def __call__(self, name: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


# Config entries that decide what a checkpoint means or which batches come next (the data
# order is a function of seed, step and batch size); resuming with one changed is refused.
_STATE_DEFINING_KEYS = ("task", "data", "model", "seed", "train.batch_size")


def _hold_workdir(workdir: pathlib.Path, closing: contextlib.ExitStack) -> None:
  """Takes the workdir's lock for the run (the first process of several takes it for all of
  them); raises WorkdirBusyError, on every process, while another run holds it."""
  error = None
  if sharding.is_primary_process():
    try:
      closing.enter_context(workdir_lib.lock(workdir, on_takeover=_report))
    except workdir_lib.WorkdirBusyError as busy:
      error = busy
  if not sharding.primary_value(error is None):
    raise error or workdir_lib.WorkdirBusyError(
        f"{workdir} is in use by another run (its first process could not take the lock)")


def _check_workdir_config(config: Any, workdir: pathlib.Path, allow_change: bool
                          ) -> tuple[dict[str, Any] | None, list[str]]:
  """The config saved in a workdir with checkpoints (None without), and the keys this config
  changes that matter. A change to what the checkpoints mean (_STATE_DEFINING_KEYS) is always
  refused; one to the optimizer or the training settings unless `allow_change`."""
  saved_path = workdir / "config.json"
  if not saved_path.exists() or not (workdir / "checkpoints").exists():
    return None, []
  saved_dict = json.loads(saved_path.read_text())
  # Keys added to the schema since the run was saved count as equal at their "off" default.
  saved = config_lib.comparable(config_lib.flatten(saved_dict))
  current = config_lib.comparable(config_lib.flatten(json.loads(config.to_json_best_effort())))

  def get(flat: dict[str, Any], key: str) -> Any:  # the value, or the section as a dict
    if key in flat:
      return flat[key]
    return {k[len(key) + 1:]: v for k, v in flat.items() if k.startswith(key + ".")} or None

  for key in _STATE_DEFINING_KEYS:
    if get(saved, key) != get(current, key):
      raise checkpoint_lib.CheckpointMismatchError(
          f"{workdir} holds checkpoints of a run whose config.{key} differs from this one "
          f"(saved: {get(saved, key)}, now: {get(current, key)}). Resume with the same "
          f"config or use a new --workdir.")
  changed = sorted(key for key in set(saved) | set(current)
                   if saved.get(key) != current.get(key) and not config_lib.changes_nothing(key))
  if changed and not allow_change:
    shown = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
                      for key in changed[:4]) + (" ..." if len(changed) > 4 else "")
    raise ChangedConfigError(
        f"{workdir} holds a run trained with other settings ({shown}); resume with the same "
        "config, use a new --workdir, or allow the change (--allow_config_change; "
        f"{CONFIG_HISTORY_FILE} then keeps both)")
  return saved_dict, changed


def _record_config(config: Any, workdir: pathlib.Path, resume_step: int | None,
                   saved: dict[str, Any] | None, changed: list[str]) -> None:
  """Writes `config.json` (the config the run trains under now) and, for a fresh start or a
  resume that changed settings, a line of the config history."""
  history = workdir / CONFIG_HISTORY_FILE
  config_dict = json.loads(config.to_json_best_effort())
  lines = []
  if resume_step is None:
    history.unlink(missing_ok=True)
    lines.append({"step": 0, "config": config_dict})
  elif changed:
    if not history.exists() and saved is not None:  # (a run saved before the history existed)
      lines.append({"step": 0, "config": saved})
    lines.append({"step": resume_step, "changed": changed, "config": config_dict})
    _report(f"resuming at step {resume_step} with changed settings: {', '.join(changed)} "
            f"(recorded in {history})")
  if lines:
    with open(history, "a") as stream:
      stream.writelines(json.dumps(line, sort_keys=True) + "\n" for line in lines)
  # Atomically: another process may be reading it in _check_workdir_config.
  files.atomic_write(workdir / "config.json",
                     lambda tmp: tmp.write_text(config.to_json_best_effort(indent=2)))


def _disk_full(error: BaseException | None) -> bool:
  """Whether `error`, or an error it came from, is "no space left on device" (orbax and
  tensorstore wrap it in their own exceptions)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
        "No space left on device" in str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


@contextlib.contextmanager
def _signal_handler(signum: int, handler: Callable[..., None]):
  """Installs a handler for the duration of the block (main thread only, else a no-op)."""
  try:
    previous = signal.signal(signum, handler)
  except ValueError:  # not the main thread: a notebook worker, for example
    yield
    return
  try:
    yield
  finally:
    signal.signal(signum, previous)


def _report(message: str) -> None:
  if not sharding.is_primary_process():  # one log for a multi-process run
    return
  tqdm.tqdm.write(message, file=sys.stdout)
  sys.stdout.flush()
