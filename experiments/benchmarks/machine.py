"""What the benchmarks measure about the machine they run on, in the same run as their timings,
and the trainer's own training step, timed and profiled."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
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
  built["state"] = state  # the one passed in was donated
  batch_size = int(config.train.batch_size)
  return {
      "batch": batch_size, "num_params": int(built["num_params"]),
      "compile_seconds": compile_seconds, "step_seconds": step_seconds,
      "window_step_seconds": windows, "images_per_second": batch_size / step_seconds,
      "step_gflop": step_flops / 1e9, "achieved_tflops": step_flops / step_seconds / 1e12,
      "losses_finite": bool(all(np.isfinite(float(l)) for l in losses)),
  }


# An instruction of XLA's compiled module and the jax operation it came from:
#   %name = f32[768,128]{1,0} fusion(...), ..., metadata={op_name="jit(f)/transpose(jvp())/dot_general"
_HLO_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\S+) .*?metadata=\{op_name="([^"]+)"',
                              re.MULTILINE)


def _phase(op_name: str) -> str:
  """Where in a training step a jax operation sits, from its op_name: autodiff names the
  backward's operations transpose(jvp(...)) and the forward's jvp(...); the rest is the update
  (clipping, optimizer) and bookkeeping."""
  if "transpose(" in op_name:
    return "backward"
  return "forward" if "jvp(" in op_name else "update"


def profile_step(built: dict[str, Any], *, steps: int = 10) -> dict[str, Any]:
  """Where a compiled training step's time goes: runs `steps` steps under `jax.profiler`, and
  sums the time of each of XLA's executed operations (its thunks, one per fusion, product or
  copy) by phase (forward, backward, update) and by the jax operation it came from
  (dot_general, reduce_sum, mul, transpose, ...). `built` is `build_train_step`'s dict (its
  state is donated and replaced). Returns {"rows": [(phase, operation, ms per step, count per
  step)] largest first, "total_ms", "thunks_per_step"}. On devices whose profiles do not time
  XLA's operations by name the rows come back empty."""
  state, batch = built["state"], built["batch"]
  compiled = built["step"].lower(state, batch).compile()
  names = {m.group(1): m.group(3) for m in _HLO_INSTRUCTION.finditer(compiled.as_text())}
  for _ in range(2):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
    traces = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    events = json.load(gzip.open(traces[0])) if traces else {}
  built["state"] = state
  events = events.get("traceEvents", []) if isinstance(events, dict) else events
  total_us, count = collections.Counter(), collections.Counter()
  for event in events:
    op_name = names.get(event.get("name"))
    if event.get("ph") == "X" and op_name is not None:
      key = (_phase(op_name), op_name.rsplit("/", 1)[-1])
      total_us[key] += float(event.get("dur", 0.0))
      count[key] += 1
  rows = [(phase, op, us / steps / 1e3, count[(phase, op)] / steps)
          for (phase, op), us in total_us.most_common()]
  return {"rows": rows, "total_ms": sum(r[2] for r in rows),
          "thunks_per_step": sum(r[3] for r in rows)}
