"""What the benchmarks measure about the machine they run on, in the same run as their timings,
and the trainer's own training step, timed."""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paperzoo import train_state
from paperzoo.registry import MODELS, TASKS


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
  """float32 matmul throughput of the default device, the best of `repeats` timed products."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size), np.float32))
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e9


def compiled_flops(compiled: Any) -> float:
  """FLOPs of a compiled computation from XLA's cost analysis (elementwise work included)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list on older jax versions
  return float(cost["flops"])


def build_train_step(config: Any) -> dict[str, Any]:
  """The trainer's training step (`paperzoo.train_state.TrainStep`) on one device: returns the
  jitted step (state donated), an initial state, a device batch of the first training
  examples, and the task."""
  task = TASKS.get(config.task.name)(config)
  batch_size = int(config.train.batch_size)
  train_set = task.splits["train"]
  step_def = train_state.TrainStep(config, task, MODELS.get(config.model.name),
                                   total_steps=int(config.train.num_steps),
                                   steps_per_epoch=max(1, len(train_set) // batch_size))
  with nnx.use_eager_sharding(False):
    state = jax.jit(step_def.init_state)()
  indices = np.arange(batch_size) % len(train_set)
  batch = jax.device_put(train_set.get_batch(indices))
  return {"step": jax.jit(step_def.train_step, donate_argnums=0), "state": state,
          "batch": batch, "num_params": sum(x.size for x in jax.tree.leaves(state["params"])),
          "task": task, "step_def": step_def}


def time_train_step(config: Any, *, steps: int, repeats: int, warmup: int,
                    built: dict[str, Any] | None = None) -> dict[str, Any]:
  """Compiles and times the trainer's step on one batch already on the device: after `warmup`
  steps, `repeats` windows of `steps` steps (each ends when the last step's outputs are
  ready); the median window's seconds per step. FLOPs from XLA's cost analysis (forward,
  backward, optimizer). `built`: from `build_train_step(config)`, when the caller needs it too.
  """
  built = build_train_step(config) if built is None else built
  state, batch = built["state"], built["batch"]
  start = time.perf_counter()
  compiled = built["step"].lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start
  step_flops = compiled_flops(compiled)
  losses = []
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
    losses.append(metrics["loss"])
  jax.block_until_ready(state)
  windows = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    windows.append((time.perf_counter() - start) / steps)
    losses.append(metrics["loss"])
  step_seconds = statistics.median(windows)
  batch_size = int(config.train.batch_size)
  return {
      "batch": batch_size, "num_params": int(built["num_params"]),
      "compile_seconds": compile_seconds, "step_seconds": step_seconds,
      "window_step_seconds": windows, "images_per_second": batch_size / step_seconds,
      "step_gflop": step_flops / 1e9, "achieved_tflops": step_flops / step_seconds / 1e12,
      "losses_finite": bool(all(np.isfinite(float(l)) for l in losses)),
  }
