r"""What a config's training run costs in FLOPs: a plan for a device session, not a timing.

  python -m experiments.benchmarks.step_cost \
      --config=vit.py:data=cifar10 --config=swin.py:data=cifar10
  python -m experiments.benchmarks.step_cost --shrink_data \
      --config=lra.py:task=listops,size=full --config=lra.py:task=pathfinder,size=full

For each config (a file of experiments/configs with its arguments): XLA's cost analysis of the
compiled training step (the trainer's own `paperzoo.train_state.TrainStep`: forward, backward
and the optimizer update), traced on abstract parameters, so nothing is initialised or trained;
the run's steps (`train.num_steps`, else epochs x whole batches of the training split, as the
trainer counts them); and the minutes those FLOPs take at 50 and 100 TFLOP/s sustained
(assumed rates for a small float32 model with TF32 matmuls on an H100, not measured; a small
model may sustain less, so the minutes are a lower bound).

XLA's cost analysis counts the body of a loop once, and a custom call (a Pallas kernel) as
nothing: a step with a `lax.scan` over time (Mamba's sequential scan on CPU, gradient
accumulation) or a kernel is undercounted, and its line says so ("at least"). `--shrink_data`
builds generated data sets (ListOps, Pathfinder) with 64 training examples, which keeps the
step's shapes, and counts the steps with the config's own `num_train`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from absl import app
from absl import flags
from flax import nnx

from experiments import configs
from experiments.benchmarks import machine
from paperzoo import train_state
from paperzoo.registry import MODELS, TASKS

_CONFIGS = flags.DEFINE_multi_string(
    "config", ["vit.py:data=cifar10"],
    "<file>.py:<arguments>, a file of experiments/configs with its arguments; repeatable.")
_SHRINK = flags.DEFINE_bool("shrink_data", False,
                            "Build data sets that have num_train with 64 training examples.")
SHRUNK_EXAMPLES = 64
RATES_TFLOPS = (50.0, 100.0)


def has_loops_or_kernels(jaxpr: Any) -> bool:
  """Whether the program holds a loop (scan, while, fori_loop) or a Pallas kernel, at any
  depth. Read from the jaxpr, not the compiled HLO, where the CPU's random number generator
  is itself a loop (of a few elementwise rounds)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("scan", "while", "pallas_call"):
      return True
    for value in eqn.params.values():
      for inner in value if isinstance(value, (list, tuple)) else (value,):
        inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr holds its Jaxpr
        if hasattr(inner, "eqns") and has_loops_or_kernels(inner):
          return True
  return False


def step_cost(config: Any, *, shrink_data: bool = False) -> dict[str, Any]:
  """FLOPs of one training step of `config` and of its whole run (module docstring)."""
  num_train = int(config.data.get("num_train", 0))
  if shrink_data and num_train:
    config = config.copy_and_resolve_references()
    config.data.update({k: SHRUNK_EXAMPLES for k in ("num_train", "num_val", "num_test")
                        if k in config.data})
  task = TASKS.get(config.task.name)(config)
  train_set = task.splits["train"]
  batch_size = int(config.train.batch_size)
  examples = num_train if shrink_data and num_train else len(train_set)
  steps_per_epoch = examples // batch_size
  steps = int(config.train.num_steps) or int(config.train.num_epochs) * steps_per_epoch
  step_def = train_state.TrainStep(config, task, MODELS.get(config.model.name),
                                   total_steps=steps, steps_per_epoch=max(steps_per_epoch, 1))
  with nnx.use_eager_sharding(False):
    state = jax.eval_shape(step_def.init_state)
  batch = train_set.get_batch(np.arange(batch_size) % len(train_set))
  compiled = jax.jit(step_def.train_step).lower(state, batch).compile()
  step_flops = machine.compiled_flops(compiled)
  jaxpr = jax.make_jaxpr(step_def.train_step)(state, batch).jaxpr
  return {"undercounted": has_loops_or_kernels(jaxpr),
          "params": sum(x.size for x in jax.tree.leaves(state["params"])),
          "batch": batch_size,
          "example_shapes": {k: tuple(np.shape(v)[1:]) for k, v in sorted(batch.items())},
          "steps": steps, "step_gflop": step_flops / 1e9,
          "run_pflop": step_flops * steps / 1e15}


def main(argv: Sequence[str]) -> None:
  del argv
  print(f"jax {jax.__version__}; XLA cost analysis on {jax.devices()[0].platform}; minutes at "
        + " / ".join(f"{r:.0f}" for r in RATES_TFLOPS) + " TFLOP/s sustained")
  for spec in _CONFIGS.value:
    name, _, arg = spec.removesuffix(".py").partition(".py:")
    row = step_cost(configs.load(name, arg or None), shrink_data=_SHRINK.value)
    minutes = " / ".join(f"{row['run_pflop'] * 1e3 / rate / 60:.1f}" for rate in RATES_TFLOPS)
    shapes = ", ".join(f"{k} {v}" for k, v in row["example_shapes"].items())
    at_least = "at least " if row["undercounted"] else ""
    print(f"{spec}: {row['params'] / 1e6:.2f}M parameters, batch {row['batch']} of {shapes}: "
          f"{at_least}{row['step_gflop']:.1f} GFLOP/step x {row['steps']} steps "
          f"= {row['run_pflop']:.1f} PFLOP -> {minutes} min")


if __name__ == "__main__":
  app.run(main)
