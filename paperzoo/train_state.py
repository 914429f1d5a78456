"""The train state and the training step of a config, apart from the loop that runs them.

`TrainStep` is what the trainer jits (`paperzoo.trainer`, sections 4-5), what a benchmark times
(`experiments/benchmarks/dit_throughput.py`, `step_cost.py`) and what `paperzoo.workdir`
rebuilds abstractly to restore a finished run's best checkpoint: one definition of the state's
layout for all three.

The train state is a plain dict of pytrees:
  step      int32 number of optimizer updates done
  params    the model's nnx.Param variables (nnx.State)
  extra     every other model variable (batch statistics, ...), updated by the forward pass
  opt_state the optax state
  ema       exponential moving average of params (only when train.ema_decay > 0)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from paperzoo import optim


class TrainStep:
  """The train state and the training step of a config: what the trainer jits (sections 4-5)
  and what a benchmark times (experiments/benchmarks/dit_throughput.py), so both run one step.

  `boxed_init_state()` creates the state with nnx Variables, whose metadata carries the logical
  axis names; tracing it (`jax.eval_shape`) records the model's structure, `graphdef`, which
  `merge` and the step need. `train_step(state, batch)` is one optimizer update, not jitted:
  the caller jits it with its shardings.
  """

  def __init__(self, config: Any, task: Any, model_cls: Any, *, total_steps: int,
               steps_per_epoch: int):
    self.config, self.task, self.model_cls = config, task, model_cls
    self.schedule = optim.make_schedule(config.optimizer, total_steps=total_steps,
                                        steps_per_epoch=steps_per_epoch)
    self.tx = optim.make_optimizer(config.optimizer, self.schedule)
    root_key = jax.random.key(config.seed)
    self.init_key = jax.random.fold_in(root_key, 0)
    self.dropout_key = jax.random.fold_in(root_key, 1)
    self.ema_decay = float(config.train.ema_decay)
    self.accum = int(config.train.grad_accum_steps)
    # Evaluation and the final test use the EMA weights when there are some.
    self.eval_params_key = "ema" if self.ema_decay > 0 else "params"
    self.graphdef = None  # recorded when boxed_init_state is traced
    self._grad_fn = jax.value_and_grad(self._loss, has_aux=True)

  def boxed_init_state(self) -> dict[str, Any]:
    model = self.model_cls(self.config.model, **self.task.model_kwargs(),
                           rngs=nnx.Rngs(params=self.init_key))
    self.graphdef, params, extra = nnx.split(model, nnx.Param, ...)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "extra": extra,
             "opt_state": self.tx.init(params)}
    if self.ema_decay > 0:
      state["ema"] = params
    return state

  def init_state(self) -> dict[str, Any]:
    return unbox_variables(self.boxed_init_state())

  def merge(self, params: Any, extra: Any) -> nnx.Module:
    return nnx.merge(self.graphdef, params, extra)

  def _loss(self, params, extra, batch, key):
    model = self.merge(params, extra)
    loss, metrics = self.task.loss(model, batch, train=True, rngs=nnx.Rngs(dropout=key))
    return loss, (metrics, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))

  def train_step(self, state: dict[str, Any], batch: dict[str, jax.Array]):
    step_key = jax.random.fold_in(self.dropout_key, state["step"])
    accum = self.accum
    if accum == 1:
      (loss, (metrics, extra)), grads = self._grad_fn(state["params"], state["extra"], batch,
                                                      step_key)
    else:
      # Micro-batch i takes examples i, i + accum, ...: a strided slice of the batch axis keeps
      # each device's examples on that device. The mean of equal-size micro-batch means is the
      # full-batch mean, so the update equals the one without accumulation (for models
      # without batch statistics: BatchNorm normalizes each micro-batch alone).
      micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), batch)

      def accumulate(i, carry):
        grads_sum, loss_sum, metrics_sum, extra = carry
        micro_batch = jax.tree.map(lambda x: x[:, i], micro)
        (loss, (metrics, extra)), grads = self._grad_fn(
            state["params"], extra, micro_batch, jax.random.fold_in(step_key, i))
        return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss,
                jax.tree.map(jnp.add, metrics_sum, metrics), extra)

      zero_metrics = jax.eval_shape(self._loss, state["params"], state["extra"],
                                    jax.tree.map(lambda x: x[:, 0], micro), step_key)[1][0]
      carry = (jax.tree.map(jnp.zeros_like, state["params"]), jnp.zeros(()),
               jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics),
               state["extra"])
      grads, loss, metrics, extra = jax.lax.fori_loop(0, accum, accumulate, carry)
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum
      metrics = jax.tree.map(lambda m: m / accum, metrics)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"step": state["step"] + 1, "params": params, "extra": extra,
                 "opt_state": opt_state}
    if self.ema_decay > 0:
      decay = self.ema_decay
      new_state["ema"] = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                                      state["ema"], params)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=self.schedule(state["step"]))
    return new_state, metrics


def unbox_variables(tree: Any) -> Any:
  """Replaces nnx.State/Variable containers by plain dicts of their values.

  The train state crosses the jit boundary at every step; jax then flattens and rebuilds it in
  Python. Plain dicts cost microseconds; Variables with metadata cost milliseconds per step
  (flax flattens each Variable's metadata in Python), which on a small model is a fifth of the
  step. `nnx.merge` takes the plain dicts back inside the step.
  """
  def unbox(node):
    if isinstance(node, nnx.State):
      return nnx.to_pure_dict(node)
    return node.get_value() if isinstance(node, nnx.Variable) else node
  return jax.tree.map(unbox, tree, is_leaf=lambda x: isinstance(x, (nnx.State, nnx.Variable)))


def with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
