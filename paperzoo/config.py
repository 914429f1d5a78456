"""The config schema every experiment shares, each key explained where it is defined.

An experiment config (`experiments/configs/<paper>.py`) starts from `base_config()`, fills in the
`model`, `task` and `data` sections, and is locked: assigning a key that does not exist here or
in the experiment config is an error, so a typo never silently does nothing.

`parse_arg` reads big_vision-style argument strings, the part after `:` in
`--config=experiments/configs/itransformer.py:data=etth1,pred_len=192,runlocal`.

`validate(config)` checks a config before any compute: every key of `base_config()` against
its rule in `SCHEMA` (the table right below it: type and range), the keys of the free-form
sections (`model`, `task`, `data`) against the rules by key name in `SECTION_KEY_RULES`, and a
few rules between keys. It raises `ConfigError`, one line naming each bad key with its full
dotted path, its value and what is allowed (`optimizer.learning_rate=-0.001: must be > 0`).
`unknown_key_message(config, "model.d_modle")` is the one-line answer to a key that does not
exist: the keys of its section and the closest match.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import fnmatch
import numbers
import re
from typing import Any, Iterable

import ml_collections
import numpy as np

# config.py may import these: none of them imports config.py (only the trainer does).
from paperzoo import optim
from paperzoo import sharding
from paperzoo.data import randaugment

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


# ---------------------------------------------------------------------------------------------
# Rules: what one key takes, for the schema below base_config(). Int / Float (a float key takes
# an int too; neither takes a bool) with an optional range ("> 0", ">= 1", "[0, 1)", ...), Bool,
# Str (optionally its choices), Ints (a non-empty tuple of ints).

_RANGE = re.compile(r"(?:(>=|>|<=|<)\s*(\S+)|([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])]))")


def _parse_range(text: str) -> tuple[float | None, bool, float | None, bool]:
  """"> 0" -> (0, False, None, True); "[0, 1)" -> (0, True, 1, False); "" -> no bounds."""
  if not text:
    return None, True, None, True
  match = _RANGE.fullmatch(text.strip())
  if not match:
    raise ValueError(f"bad range {text!r}; write e.g. '> 0', '>= 1' or '[0, 1)'")
  op, bound, left, low, high, right = match.groups()
  if op:
    bound = float(bound)
    return ((bound, op == ">=", None, True) if op[0] == ">" else
            (None, True, bound, op == "<="))
  return float(low), left == "[", float(high), right == "]"


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one key takes. `kind`: "int", "float" (int or float), "bool", "str", "ints" (a
  non-empty tuple or list of ints) or "sharding_rules". `bounds` (numbers, and each int of
  "ints"): "> a", ">= a", "< a", "<= a" or an interval "[a, b)", "(a, b]", ...; `also`: values
  allowed outside the range (a mesh axis's -1); `choices`: the strings allowed; `nonempty`: no
  ""; `regex`: the string must compile as a regular expression."""

  kind: str
  bounds: str = ""
  also: tuple[Any, ...] = ()
  choices: tuple[str, ...] | None = None
  nonempty: bool = False
  regex: bool = False

  def __post_init__(self):
    _parse_range(self.bounds)  # a typo in a rule fails at import

  def describe(self) -> str:
    """What the key takes, as the end of "must be ..."."""
    if self.kind == "bool":
      return "a bool"
    if self.kind == "str":
      if self.choices is not None:
        return "one of " + ", ".join(repr(c) for c in self.choices)
      return ("a non-empty string" if self.nonempty else
              "a string") + (" (a regular expression)" if self.regex else "")
    if self.kind == "sharding_rules":
      return ("a tuple of (logical axis name, mesh axis | tuple of mesh axes | None) pairs; "
              f"logical names: {', '.join(_LOGICAL_NAMES)}; mesh axes: "
              f"{', '.join(sharding.MESH_AXES)}")
    noun = {"int": "an int", "float": "a number", "ints": "a non-empty tuple of ints"}[self.kind]
    if self.also:
      return f"{noun} ({self._range_text()})"
    return f"{noun} {self._range_text()}".strip()

  def _range_text(self) -> str:
    if not self.bounds:
      return ""
    text = self.bounds if self.bounds[0] in "<>" else f"in {self.bounds}"
    return " or ".join([repr(v) for v in self.also] + [text])

  def problem(self, value: Any) -> str | None:
    """None if `value` is allowed, else what is wrong ("must be > 0")."""
    if self.kind == "bool":
      return None if _is_bool(value) else f"must be {self.describe()}"
    if self.kind == "str":
      if not isinstance(value, str):
        return f"must be {self.describe()}"
      if self.choices is not None and value not in self.choices:
        return f"must be {self.describe()}"
      if self.nonempty and not value:
        return f"must be {self.describe()}"
      if self.regex:
        try:
          re.compile(value)
        except re.error as error:
          return f"must be a regular expression ({error})"
      return None
    if self.kind == "sharding_rules":
      return _sharding_rules_problem(value)
    if self.kind == "ints":
      if (not isinstance(value, (tuple, list)) or not value
          or not all(_is_int(v) for v in value)):
        return f"must be {self.describe()}"
      if not all(self._in_range(v) for v in value):
        return f"must be {self.describe()}"
      return None
    if _is_bool(value):
      return f"must be {self.describe()}, not a bool"
    if self.kind == "int" and not _is_int(value):
      return f"must be {self.describe()}" + (", not a float" if _is_number(value) else "")
    if not _is_number(value):
      return f"must be {self.describe()}"
    if not self._in_range(value):
      return f"must be {self._range_text()}"
    return None

  def _in_range(self, value: Any) -> bool:
    if value in self.also:
      return True
    low, low_closed, high, high_closed = _parse_range(self.bounds)
    if low is not None and not (value >= low if low_closed else value > low):
      return False
    if high is not None and not (value <= high if high_closed else value < high):
      return False
    return True


# Rule constructors, named like the types they check (SCHEMA reads as a table of types).
def Int(bounds: str = "", *, also: tuple[int, ...] = ()) -> Rule:  # pylint: disable=invalid-name
  return Rule("int", bounds, also=also)


def Float(bounds: str = "") -> Rule:  # pylint: disable=invalid-name
  return Rule("float", bounds)


def Bool() -> Rule:  # pylint: disable=invalid-name
  return Rule("bool")


def Str(choices: Iterable[str] | None = None, *,  # pylint: disable=invalid-name
        nonempty: bool = False, regex: bool = False) -> Rule:
  return Rule("str", choices=None if choices is None else tuple(choices), nonempty=nonempty,
              regex=regex)


def Ints(bounds: str = "") -> Rule:  # pylint: disable=invalid-name
  return Rule("ints", bounds)


def _is_bool(value: Any) -> bool:
  return isinstance(value, (bool, np.bool_))


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not _is_bool(value)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not _is_bool(value)


def base_config() -> ConfigDict:
  """Defaults for the trainer, optimizer, mesh and outputs. Experiments override them. What each
  key takes (type, range) is in `SCHEMA`, right below."""
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
# The schema: the rule of every key of base_config(), listed once each in the order above
# (tests/test_config_schema.py checks that the two name the same keys). `validate` checks them.

# train.selection_tie_break's values (explained in base_config()).
SELECTION_TIE_BREAKS = ("", "later", "loss")

SCHEMA: dict[str, Rule] = {
    "seed": Int(">= 0"),                      # numpy's generators refuse negative seeds
    "task.name": Str(nonempty=True),          # a name in paperzoo.registry
    "data.name": Str(nonempty=True),
    "model.name": Str(nonempty=True),
    "train.batch_size": Int(">= 1"),
    "train.eval_batch_size": Int(">= 1"),
    "train.num_epochs": Int(">= 0"),          # and not both num_epochs and num_steps 0
    "train.num_steps": Int(">= 0"),
    "train.eval_every_steps": Int(">= 0"),    # 0: once per epoch
    "train.patience": Int(">= 0"),            # 0: no early stopping
    "train.selection_tie_break": Str(SELECTION_TIE_BREAKS),
    "train.grad_accum_steps": Int(">= 1"),    # and a divisor of batch_size
    "train.ema_decay": Float("[0, 1)"),       # 0: no EMA
    "train.log_every_steps": Int(">= 1"),
    "train.checkpoint_every_steps": Int(">= 0"),  # 0: at evaluations and at the end
    "train.keep_checkpoints": Int(">= 1"),
    "train.progress_bar": Bool(),
    "train.plots": Bool(),
    "optimizer.name": Str(optim.OPTIMIZERS),
    "optimizer.learning_rate": Float("> 0"),
    "optimizer.b1": Float("[0, 1)"),          # sgd: the momentum (0: none)
    "optimizer.b2": Float("[0, 1)"),
    "optimizer.eps": Float("> 0"),
    "optimizer.weight_decay": Float(">= 0"),
    "optimizer.decay_vectors": Bool(),
    "optimizer.no_decay_pattern": Str(regex=True),
    "optimizer.grad_clip_norm": Float(">= 0"),  # 0: no clipping
    "optimizer.schedule": Str(optim.SCHEDULES),
    "optimizer.warmup_steps": Int(">= 0"),
    "optimizer.min_lr_ratio": Float("[0, 1]"),
    "optimizer.decay_rate": Float("(0, 1]"),
    "optimizer.decay_every_epochs": Int(">= 1"),
    "optimizer.decay_start_epoch": Int(">= 0"),
    "mesh.data": Int(">= 1", also=(-1,)),     # and at most one axis -1
    "mesh.fsdp": Int(">= 1", also=(-1,)),
    "mesh.tensor": Int(">= 1", also=(-1,)),
    "sharding_rules": Rule("sharding_rules"),
}

# The free-form sections: each model, task and data set reads its own keys (its module
# docstring lists them). These rules go by key name, in any of the three sections, and hold for
# every reader of a key of that name here: 0 stays allowed wherever one of them documents 0 as
# "off" or "the default" (e.g. DiT's and VAR's depth / width / heads: 0 keeps the size's value;
# a head width of 0 makes Swin and CvT use num_heads). The first matching pattern (fnmatch)
# decides; a key that matches none is left to its reader, which checks it before any compute.
SECTIONS = ("model", "task", "data")
SECTION_KEY_RULES: tuple[tuple[tuple[str, ...], Rule], ...] = (
    (("name",), Str(nonempty=True)),
    # Probabilities of dropping something, and other fractions: 1 would drop everything (or
    # divide by 1 - p = 0).
    (("dropout", "*_dropout", "*_prob", "drop_path", "label_smoothing", "*_fraction",
      "ema_decay"), Float("[0, 1)")),
    (("top_p", "phi_residual_ratio"), Float("[0, 1]")),   # top_p 0: off; ratio 0: identity
    (("beta_start", "beta_end"), Float("(0, 1)")),        # DDPM's noise schedule
    (("*mlp_ratio", "factor", "temperature", "norm_eps"), Float("> 0")),
    # mixup's Beta(a, a) (0: off), loss weights, DDIM's eta
    (("mixup_alpha", "beta", "vlb_weight", "ddim_eta"), Float(">= 0")),
    # Sizes, lengths, counts, kernels and strides.
    (("d_model", "d_ff", "num_layers", "encoder_layers", "decoder_layers", "e_layers",
      "d_layers", "seq_len", "pred_len", "patch_len", "stride", "patch_size", "moving_avg",
      "hidden", "expand", "d_state", "d_conv", "window_size", "agent_num", "routing_regions",
      "routing_topk", "pool_size", "qkv_kernel", "kv_stride", "t2t_dim", "t2t_heads",
      "latent_dim", "num_phi", "usage_window", "num_train", "num_val", "num_test", "min_len",
      "max_len", "resolution", "contour_length", "num_timesteps", "eval_timesteps",
      "sampling_steps", "sample_batch_size"), Int(">= 1")),
    (("codebook_size",), Int(">= 2")),
    # Where 0 means "the default" or "off" for some reader.
    (("num_heads", "heads", "head_dim", "depth", "width", "hidden_size", "label_len",
      "num_res_blocks", "padded_size", "restart_after_steps", "image_size", "crop_padding",
      "randaugment_ops", "samples_per_class", "top_k", "revision", "*_seed"), Int(">= 0")),
    (("randaugment_magnitude",), Int(f"[0, {randaugment.MAX_MAGNITUDE}]")),
    (("dims", "channels", "scales", "*_kernels", "*_strides"), Ints(">= 1")),
    (("depths", "*_paddings"), Ints(">= 0")),
    (("flip", "individual", "distil", "use_norm", "norm_first", "revin_affine", "learn_sigma",
      "clip_denoised", "legacy_test_selection"), Bool()),
)


# ---------------------------------------------------------------------------------------------
# Checking a config before any compute.

class ConfigError(ValueError):
  """A config that cannot run. The message is one line: each problem names the key by its full
  dotted path, its value and what is allowed (`optimizer.learning_rate=-0.001: must be > 0`),
  problems joined with "; ". Built from one message or a list of them; `problems` holds them one
  by one, each with its whitespace (newlines too) collapsed to single spaces."""

  def __init__(self, problems: str | Iterable[str]):
    problems = [problems] if isinstance(problems, str) else list(problems)
    self.problems = [" ".join(str(p).split()) for p in problems]
    super().__init__("; ".join(self.problems))


def validate(config: Any) -> None:
  """Raises ConfigError naming every problem of `config` (a ConfigDict or a nested dict) at
  once; returns None for a config that may run. Reads nothing but the config: no data, no
  devices. Checks every key of `SCHEMA` (missing keys, types, ranges, unknown keys in the
  trainer's sections), the free-form sections by `SECTION_KEY_RULES`, and the rules between
  keys: not both train.num_epochs and train.num_steps 0; train.batch_size a multiple of
  train.grad_accum_steps; at most one mesh axis -1."""
  problems = []
  bad = set()  # keys with a problem of their own: the rules between keys skip them
  for key, rule in SCHEMA.items():
    found, value = lookup(config, key)
    if not found:
      problems.append(f"{key}: missing (base_config() defines it; {rule.describe()})")
      bad.add(key)
      continue
    problem = rule.problem(value)
    if problem:
      problems.append(f"{key}={value!r}: {problem}")
      bad.add(key)

  # Keys nothing reads: at the top level and in the trainer's own sections.
  known = {key.split(".")[0] for key in SCHEMA}
  for key in _keys(config):
    if key not in known:
      problems.append(_unknown_key_short(config, key))
  trainer_sections = dict.fromkeys(key.split(".")[0] for key in SCHEMA if "." in key)
  for section in [section for section in trainer_sections if section not in SECTIONS]:
    found, node = lookup(config, section)
    if found and _is_section(node):
      for key in _keys(node):
        if f"{section}.{key}" not in SCHEMA:
          problems.append(_unknown_key_short(config, f"{section}.{key}"))

  # The free-form sections.
  for section in SECTIONS:
    found, node = lookup(config, section)
    if not found:
      continue  # reported above as `<section>.name: missing`
    if not _is_section(node):
      problems.append(f"{section}={node!r}: must be a section (a ConfigDict)")
      continue
    problems.extend(_section_problems(node, section, skip={f"{section}.name"}))

  # Rules between keys.
  def value(key: str) -> Any:
    return lookup(config, key)[1]

  if not bad & {"train.num_epochs", "train.num_steps"}:
    if value("train.num_epochs") == 0 and value("train.num_steps") == 0:
      problems.append("train.num_epochs=0, train.num_steps=0: one of them must be > 0 "
                      "(num_steps > 0 trains that many steps, else num_epochs epochs)")
  if not bad & {"train.batch_size", "train.grad_accum_steps"}:
    batch, accum = value("train.batch_size"), value("train.grad_accum_steps")
    if batch % accum:
      problems.append(f"train.batch_size={batch!r}: must be a multiple of "
                      f"train.grad_accum_steps={accum!r}")
  axes = [f"mesh.{axis}" for axis in sharding.MESH_AXES]
  if not bad & set(axes):
    free = [axis for axis in axes if value(axis) == -1]
    if len(free) > 1:
      problems.append(", ".join(f"{axis}=-1" for axis in free)
                      + ": at most one mesh axis may be -1 (it takes the remaining devices)")
  if problems:
    raise ConfigError(problems)


def unknown_key_message(config: Any, dotted_key: str) -> str:
  """One line for a key that `config` does not have, e.g. `unknown key model.d_modle; keys of
  config.model: d_ff, d_model, ...; closest: d_model` (difflib's close matches among the keys
  of the deepest section that exists). If a section on the way is missing, the line says which
  and lists the keys of the section above it (for a top-level one: the top-level keys)."""
  parts = dotted_key.split(".")
  node, path = config, []
  for i, part in enumerate(parts):
    where = "config" + "".join(f".{p}" for p in path)
    if not _is_section(node):
      return (f"unknown key {dotted_key}: {where[len('config.'):]}={node!r} is a value, not a "
              "section")
    keys = sorted(_keys(node))
    if part not in keys:
      closest = difflib.get_close_matches(part, keys, n=3)
      missing = ("" if i == len(parts) - 1 else
                 f": {where} has no section {part}")
      return (f"unknown key {dotted_key}{missing}; keys of {where}: {', '.join(keys)}"
              + (f"; closest: {', '.join(closest)}" if closest else "; no close match"))
    node = node[part]
    path.append(part)
  return f"key {dotted_key} exists: {dotted_key}={node!r}"


def _unknown_key_short(config: Any, dotted_key: str) -> str:
  """`train.batchsize=8: unknown key, nothing reads it (closest: batch_size)`, for validate's
  joined line (`unknown_key_message` lists the section's keys too)."""
  parent, _, name = dotted_key.rpartition(".")
  depth = dotted_key.count(".")
  known = sorted({key.split(".")[depth] for key in SCHEMA
                  if key.count(".") >= depth and key.startswith(parent)})
  closest = difflib.get_close_matches(name, known, n=1)
  _, value = lookup(config, dotted_key)
  return (f"{dotted_key}={value!r}: unknown key, nothing reads it"
          + (f" (closest: {closest[0]})" if closest else ""))


def _section_problems(node: Any, prefix: str, skip: set[str] = frozenset()) -> list[str]:
  """The problems of a free-form section's keys (and of its subsections') by key name."""
  problems = []
  for key in sorted(_keys(node)):
    value, path = node[key], f"{prefix}.{key}"
    if _is_section(value):
      problems.extend(_section_problems(value, path))
      continue
    if path in skip or value is None:  # None: the reader's default, if it has one
      continue
    rule = section_key_rule(key)
    problem = rule and rule.problem(value)
    if problem:
      problems.append(f"{path}={value!r}: {problem}")
  return problems


def section_key_rule(name: str) -> Rule | None:
  """The rule of `SECTION_KEY_RULES` for a key of this name in model, task or data (None: the
  key is its reader's to check)."""
  for patterns, rule in SECTION_KEY_RULES:
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
      return rule
  return None


_LOGICAL_NAMES = tuple(sorted({"batch"} | {n for n in sharding.LOGICAL_AXIS_NAMES if n}))


def _sharding_rules_problem(value: Any) -> str | None:
  if not isinstance(value, (tuple, list)):
    return f"must be {SCHEMA['sharding_rules'].describe()}"
  for i, pair in enumerate(value):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      return (f"entry {i} must be a pair (logical axis name, mesh axis | tuple of mesh axes | "
              "None)")
    name, axes = pair
    if name not in _LOGICAL_NAMES:
      return f"entry {i}: the logical axis {name!r} must be one of {', '.join(_LOGICAL_NAMES)}"
    axes = (axes,) if axes is None or isinstance(axes, str) else axes
    if not isinstance(axes, (tuple, list)) or not all(
        a is None or a in sharding.MESH_AXES for a in axes):
      return (f"entry {i}: {pair[1]!r} must be a mesh axis ({', '.join(sharding.MESH_AXES)}), "
              "a tuple of them or None")
  return None


def _is_section(node: Any) -> bool:
  return isinstance(node, (ml_collections.ConfigDict, dict))


def _keys(node: Any) -> list[str]:
  return list(node.keys()) if _is_section(node) else []


def lookup(config: Any, dotted_key: str) -> tuple[bool, Any]:
  """(True, value) for a dotted key the config (a ConfigDict or a nested dict) has, else
  (False, None)."""
  node = config
  for part in dotted_key.split("."):
    if not _is_section(node) or part not in node:
      return False, None
    node = node[part]
  return True, node


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


# Keys (and sections) that change nothing a run computes, or only its float rounding: where
# output goes, how often it is shown, how devices are arranged. A finished run reads as done
# and a resumed one as unchanged whatever they hold.
NON_COMPUTING_KEYS = ("train.progress_bar", "train.plots", "train.log_every_steps",
                      "train.eval_batch_size", "data.root", "mesh", "sharding_rules")


def changes_nothing(key: str) -> bool:
  """Whether the flattened key `key` is one of NON_COMPUTING_KEYS or inside one of them."""
  return any(key == k or key.startswith(k + ".") for k in NON_COMPUTING_KEYS)


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
