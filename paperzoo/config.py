"""The config schema every experiment shares, each key explained where it is defined.

An experiment config (`experiments/configs/<paper>.py`) starts from `base_config()`, fills in the
`model`, `task` and `data` sections, and is locked: assigning a key that does not exist here or
in the experiment config is an error, so a typo never silently does nothing.

`parse_arg` reads big_vision-style argument strings, the part after `:` in
`--config=experiments/configs/itransformer.py:data=etth1,pred_len=192,runlocal`.
"""

from __future__ import annotations

import ast
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict


def parse_arg(arg: str | None, **defaults: Any) -> ConfigDict:
  """Parses `key=value,key2,...` into a ConfigDict, typed by `defaults`.

  A bare `key` means `key=True` (for switches such as `runlocal`). Values are converted to the
  type of the default; a key without a default is an error listing the valid keys.
  """
  result = ConfigDict(dict(defaults))
  if not arg:
    return result
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid arguments: "
                       f"{', '.join(sorted(defaults))}")
    default = defaults[key]
    if not _:
      value = "True"
    result[key] = _convert(key, value.strip(), default)
  return result


def _convert(key: str, value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes", "on"):
      return True
    if value.lower() in ("0", "false", "no", "off"):
      return False
    raise ValueError(f"config argument {key}={value!r} is not a boolean")
  if isinstance(default, (int, float)):
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = None
    # An int key takes whole numbers only (seq_len=96.5 must not become 96); a float key
    # takes ints too.
    wanted = (int,) if isinstance(default, int) else (int, float)
    if isinstance(parsed, bool) or not isinstance(parsed, wanted):
      raise ValueError(f"config argument {key}={value!r} is not "
                       + ("an integer" if isinstance(default, int) else "a number"))
    return type(default)(parsed)
  return value


def base_config() -> ConfigDict:
  """Defaults for the trainer, optimizer, mesh and outputs. Experiments override them."""
  config = ConfigDict()

  # Seeds everything: parameter init, data order and dropout. The data order is a pure function
  # of (seed, step), so a resumed run sees exactly the batches an uninterrupted run would.
  config.seed = 2021

  # Which code runs. Each `name` is looked up in `paperzoo.registry`; the other keys of the
  # section are read by that code (documented in its module docstring).
  config.task = ConfigDict({"name": ""})
  config.data = ConfigDict({"name": ""})
  config.model = ConfigDict({"name": ""})

  config.train = ConfigDict()
  # Global batch size of one optimizer update, summed over all devices and micro-batches.
  config.train.batch_size = 32
  # Evaluation batch size; the last partial batch is padded and masked, never dropped. A split
  # smaller than this is evaluated in one batch of its own size (rounded up to the shards).
  config.train.eval_batch_size = 256
  # Training length: `num_steps` if > 0, else `num_epochs` passes over the training set. An
  # epoch is floor(train examples / batch_size) steps; the incomplete last batch is skipped
  # (training only), each epoch in a fresh order.
  config.train.num_epochs = 10
  config.train.num_steps = 0
  # Evaluate on the validation set every this many steps; 0 means once per epoch.
  config.train.eval_every_steps = 0
  # Early stopping: stop after this many evaluations without a better validation metric
  # (0 disables). The metric and its direction come from the task.
  config.train.patience = 3
  # Ties in the validation metric: "" keeps the earlier checkpoint (a strict improvement);
  # "later": every tie counts as an improvement (best checkpoint, patience), as in
  # Time-Series-Library's EarlyStopping with delta 0; "loss": a tie with a lower validation loss
  # counts. Ties matter where a tiny validation set makes accuracy ties common (UEA).
  config.train.selection_tie_break = ""
  # Split each batch into this many micro-batches and average their gradients before one
  # update: less memory, and the full batch's gradient for models without batch statistics
  # (BatchNorm, as in PatchTST, Informer and CvT, sees each micro-batch alone).
  config.train.grad_accum_steps = 1
  # Exponential moving average of the parameters, used for evaluation when > 0 (e.g. 0.9999).
  config.train.ema_decay = 0.0
  # Print and write training metrics every this many steps.
  config.train.log_every_steps = 50
  # Save a checkpoint every this many steps (0: only at evaluations and at the end).
  config.train.checkpoint_every_steps = 0
  # How many of the latest checkpoints to keep (the best one is kept separately).
  config.train.keep_checkpoints = 2
  # A tqdm progress bar with steps/s and ETA on stderr.
  config.train.progress_bar = True
  # Write plots (loss curves, task pictures) into the workdir at the end.
  config.train.plots = True

  config.optimizer = ConfigDict()
  # "adam" or "adamw" (decoupled weight decay) or "sgd" (with momentum `b1`).
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-4
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.0
  # Which parameters weight decay applies to. decay_vectors=False spares every parameter with
  # at most one dimension (biases, normalization scales), as DeiT, Swin and VAR do;
  # no_decay_pattern spares those whose path (e.g. "positions", "stages/0/blocks/1/mixer/
  # relative_position_bias") matches this regular expression ("" spares none).
  config.optimizer.decay_vectors = True
  config.optimizer.no_decay_pattern = ""
  # Clip the global gradient norm to this value (0 disables).
  config.optimizer.grad_clip_norm = 0.0
  # Learning-rate schedule after warmup:
  #   "constant"
  #   "cosine": cosine decay to `min_lr_ratio` * learning_rate at the last step
  #   "step": epoch e (counted from 0 after warmup) trains at
  #           learning_rate * decay_rate ** (max(e - decay_start_epoch, 0) // decay_every_epochs).
  #           Time-Series-Library's `lradj=type1` (the forecasting papers' protocol) is
  #           decay_rate 0.5, decay_every_epochs 1, decay_start_epoch 1: it sets the rate for
  #           epoch e + 1 to lr * 0.5 ** e after epoch e, so epochs 0 and 1 both train at lr.
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 0
  config.optimizer.min_lr_ratio = 0.0
  config.optimizer.decay_rate = 0.5
  config.optimizer.decay_every_epochs = 1
  config.optimizer.decay_start_epoch = 0

  # The device mesh. Axis sizes: -1 takes all remaining devices (at most one axis may be -1).
  # `data`: pure data parallelism; `fsdp`: data parallelism that also shards parameters and
  # optimizer state; `tensor`: shards weight matrices (heads, hidden units).
  config.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # Logical axis name -> mesh axes. Layers name their weights' axes (see paperzoo.layers);
  # names not listed here are replicated. `batch` is the leading axis of every input batch.
  config.sharding_rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("vocab", "tensor"),
  )
  return config


# ---------------------------------------------------------------------------------------------
# Comparing a saved config with today's.

# Keys added to the schema after runs were saved, with the default that does what those runs
# did: a saved config (a workdir's `config.json`) without the key equals today's config at
# this default, and only at it. Add a key here when it joins the schema with an "off" default,
# so that finished runs neither read as stale nor refuse to reopen.
ADDED_KEY_DEFAULTS = {"train.selection_tie_break": "", "optimizer.decay_start_epoch": 0,
                      "optimizer.decay_vectors": True, "optimizer.no_decay_pattern": "",
                      "task.randaugment_ops": 0, "task.randaugment_magnitude": 9,
                      "model.revision": 0, "task.reference_workdir": "",
                      "task.reference_config": ""}

# Keys that say how to train a finished run a task reads (`paperzoo.workdir.RequiredRun`) when it
# is missing; what the task reads is the run in the matching `*_workdir`. They change nothing a
# run computes, so a saved config and today's compare them as "" (an older run's value).
PREREQUISITE_KEYS = ("task.tokenizer_config", "task.reference_config")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """A config as a dict (`json.loads(config.to_json_best_effort())`) -> {"a.b.c": value}."""
  if isinstance(tree, dict):
    flat = {}
    for key, value in tree.items():
      flat.update(flatten(value, f"{prefix}{key}."))
    return flat
  return {prefix[:-1]: tree}


def comparable(flat: dict[str, Any]) -> dict[str, Any]:
  """What to compare of a flattened config with another: `PREREQUISITE_KEYS` blanked, then the
  `ADDED_KEY_DEFAULTS` keys that hold their default left out."""
  flat = {key: "" if key in PREREQUISITE_KEYS else value for key, value in flat.items()}
  return {key: value for key, value in flat.items()
          if not (key in ADDED_KEY_DEFAULTS and value == ADDED_KEY_DEFAULTS[key])}
