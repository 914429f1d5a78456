"""Block selectors for block-sparse prefill: each a pure function from the
queries and keys (and values) of one attention layer to the `BlockList` that
`pallas_kernels.block_sparse_attention` runs on.

    from paperzoo.sparse_attention import xattention_blocks
    blocks = xattention_blocks(q, k, block=64, stride=8, threshold=0.9)
    out = block_sparse_attention(q, k, v, blocks, causal=True)

One module per method, each from its paper; `selection` holds what they share
(the cumulative-mass rule, causal block visibility). A model picks its method
by name (`make_block_selector`, the keys of `config.model`):

  sparse_prefill    "none" (dense attention) | "xattention" | "minference"
                    (its vertical-slash pattern); used by the attention
                    mixer's parallel pass outside training (prefill and
                    evaluation), never while training
  sparse_block      block size, queries and keys (64)
  sparse_stride     XAttention's antidiagonal stride (8)
  sparse_threshold  XAttention's cumulative-mass threshold (0.9)
  sparse_vertical   MInference: keys kept as vertical lines (64)
  sparse_slash      MInference: offsets kept as slash lines (64)
  sparse_last_q     MInference: the last queries that estimate them (64)
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from paperzoo.config import ConfigError
from paperzoo.sparse_attention.minference import vertical_slash_blocks
from paperzoo.sparse_attention.selection import (causal_block_mask,
                                                 cumulative_mass_selection)
from paperzoo.sparse_attention.xattention import xattention_blocks

SPARSE_PREFILL = ("none", "xattention", "minference")


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
  if name == "minference":
    return functools.partial(
        vertical_slash_blocks, block=int(get("sparse_block", 64)),
        vertical_size=int(get("sparse_vertical", 64)),
        slash_size=int(get("sparse_slash", 64)), last_q=int(get("sparse_last_q", 64)))
  return functools.partial(
      xattention_blocks, block=int(get("sparse_block", 64)),
      stride=int(get("sparse_stride", 8)),
      threshold=float(get("sparse_threshold", 0.9)), causal=True)


__all__ = ["SPARSE_PREFILL", "causal_block_mask", "cumulative_mass_selection",
           "make_block_selector", "vertical_slash_blocks", "xattention_blocks"]
