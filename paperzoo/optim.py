"""Optimizer and learning-rate schedule from `config.optimizer` (keys explained in config.py)."""

from __future__ import annotations

import re
from typing import Any

import jax
import optax
from flax import nnx

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")


def make_schedule(opt: Any, *, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate as a function of the optimizer step."""
  lr = opt.learning_rate
  warmup = int(opt.warmup_steps)
  # Optimizer steps run 0 .. total_steps - 1, so the last one decays fully.
  decay_steps = max(total_steps - warmup - 1, 1)
  if opt.schedule == "constant":
    after = optax.constant_schedule(lr)
  elif opt.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=opt.min_lr_ratio)
  elif opt.schedule == "step":
    # Staircase: epoch e (counted from 0 after warmup) trains at
    # lr * decay_rate ** (max(e - decay_start_epoch, 0) // decay_every_epochs).
    start = int(opt.decay_start_epoch)
    if start < 0 or int(opt.decay_every_epochs) < 1:
      raise ValueError(f"optimizer.decay_start_epoch={start} must be >= 0 and "
                       f"optimizer.decay_every_epochs={opt.decay_every_epochs} >= 1")
    after = optax.exponential_decay(
        lr, transition_steps=steps_per_epoch * int(opt.decay_every_epochs),
        decay_rate=opt.decay_rate, staircase=True)
    if start:
      after = optax.join_schedules([optax.constant_schedule(lr), after],
                                   [start * steps_per_epoch])
  else:
    raise ValueError(f"unknown optimizer.schedule {opt.schedule!r}; valid: {', '.join(SCHEDULES)}")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def weight_decay_mask(opt: Any) -> Any:
  """None (every parameter decays), or a function from the parameter tree to a tree of bools:
  False where `optimizer.decay_vectors` is off and the parameter has at most one dimension
  (biases, normalization scales), or where its path ("stages/0/blocks/1/mixer/
  relative_position_bias") matches the regular expression `optimizer.no_decay_pattern`."""
  pattern = str(opt.no_decay_pattern)
  if opt.decay_vectors and not pattern:
    return None
  try:
    skipped = re.compile(pattern) if pattern else None
  except re.error as error:
    raise ValueError(f"optimizer.no_decay_pattern={pattern!r} is no regular expression: "
                     f"{error}") from None

  def decays(path, leaf) -> bool:
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    if not opt.decay_vectors and value.ndim <= 1:
      return False
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    return not (skipped and skipped.search(name))

  # The trainer initialises the optimizer on nnx.Param variables (their sharding names carry
  # over to the moments) and updates it on plain arrays: a variable is one leaf here, so both
  # see the same paths.
  return lambda params: jax.tree_util.tree_map_with_path(
      decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(opt: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Gradient clipping (optional) followed by the chosen update rule."""
  mask = weight_decay_mask(opt)
  if opt.name == "adam":
    update = optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
  elif opt.name == "adamw":
    update = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                         weight_decay=opt.weight_decay, mask=mask)
  elif opt.name == "sgd":
    update = optax.sgd(schedule, momentum=opt.b1 or None)
  else:
    raise ValueError(f"unknown optimizer.name {opt.name!r}; valid: {', '.join(OPTIMIZERS)}")
  if opt.name != "adamw" and opt.weight_decay:
    # L2 regularization added to the gradient, as torch.optim.Adam(weight_decay=...) does.
    update = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=mask), update)
  if opt.grad_clip_norm > 0:
    update = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), update)
  return update
