"""What the benchmarks measure about the machine they run on, in the same run as their timings."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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
