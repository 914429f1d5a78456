"""Batches over a whole split, none dropped: the one loop behind evaluation, prediction,
sampling and feature extraction.

A jitted function compiles once per input shape, so every batch has the same size, a multiple
of `multiple_of` (the batch shards of a mesh): the last partial batch is padded by repeating
its last index, and the padding is cut from the outputs (or masked, for sums). With
`shrink=True` a split smaller than `batch_size` gets one batch of its own size (rounded up
likewise): 15 UEA test series are not padded to 500, whose attention scores alone once took
20 GB.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import numpy as np


def batch_indices(num_examples: int, batch_size: int, *, shrink: bool = False,
                  multiple_of: int = 1) -> Iterator[tuple[np.ndarray, int]]:
  """Yields (indices, count): `count` real indices, padded by the last one to the batch size."""
  if num_examples <= 0 or batch_size <= 0:
    raise ValueError(f"need at least one example and a positive batch size, got "
                     f"{num_examples} examples and batch size {batch_size}")
  if shrink:
    batch_size = min(batch_size, num_examples)
  batch_size = -(-batch_size // multiple_of) * multiple_of
  for start in range(0, num_examples, batch_size):
    indices = np.arange(start, min(start + batch_size, num_examples))
    yield np.pad(indices, (0, batch_size - len(indices)), mode="edge"), len(indices)


def map_batches(fn: Callable[[np.ndarray], Any], num_examples: int, batch_size: int, *,
                shrink: bool = False, multiple_of: int = 1) -> Any:
  """`fn(indices)` over padded batches (`batch_indices`), its outputs (a pytree of arrays with
  the batch first) moved to the host, cut to the real examples and concatenated."""
  outputs = []
  for indices, count in batch_indices(num_examples, batch_size, shrink=shrink,
                                      multiple_of=multiple_of):
    outputs.append(jax.tree.map(lambda x, n=count: np.asarray(x)[:n],
                                jax.device_get(fn(indices))))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)
