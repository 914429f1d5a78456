"""Block selectors for block-sparse prefill: each a pure function from the
queries and keys (and values) of one attention layer to the `BlockList` that
`pallas_kernels.block_sparse_attention` runs on.

    from paperzoo.sparse_attention import xattention_blocks
    blocks = xattention_blocks(q, k, block=64, stride=8, threshold=0.9)
    out = block_sparse_attention(q, k, v, blocks, causal=True)

One module per method, each from its paper; `selection` holds what they share
(the cumulative-mass rule, causal block visibility). A model picks its method
by name (`make_block_selector`, the keys of `config.model`):

  sparse_prefill    "none" (dense attention) | "xattention"; used by the
                    attention mixer's parallel pass outside training (prefill
                    and evaluation), never while training
  sparse_block      block size, queries and keys (64)
  sparse_stride     XAttention's antidiagonal stride (8)
  sparse_threshold  the cumulative-mass threshold (0.9)
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from paperzoo.config import ConfigError
from paperzoo.sparse_attention.selection import (causal_block_mask,
                                                 cumulative_mass_selection)
from paperzoo.sparse_attention.xattention import xattention_blocks

SPARSE_PREFILL = ("none", "xattention")


def make_block_selector(config: Any) -> Callable[..., Any] | None:
  """selector(q, k) -> BlockList (causal) for `config.sparse_prefill`, or None
  for dense attention; an unknown name is a ConfigError listing the valid
  ones."""
  get = config.get
  name = get("sparse_prefill", "none")
  if name not in SPARSE_PREFILL:
    raise ConfigError(f"model.sparse_prefill={name!r}: unknown method; valid: "
                      f"{', '.join(SPARSE_PREFILL)}")
  if name == "none":
    return None
  return functools.partial(
      xattention_blocks, block=int(get("sparse_block", 64)),
      stride=int(get("sparse_stride", 8)),
      threshold=float(get("sparse_threshold", 0.9)), causal=True)


__all__ = ["SPARSE_PREFILL", "causal_block_mask", "cumulative_mass_selection",
           "make_block_selector", "xattention_blocks"]
