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
                    (its vertical-slash pattern) | "flexprefill" | "sale";
                    used by the attention mixer's parallel pass outside
                    training (prefill and evaluation), never while training
  sparse_block      block size, queries and keys (64)
  sparse_stride     XAttention's antidiagonal stride (8)
  sparse_threshold  XAttention's cumulative-mass threshold (0.9)
  sparse_vertical   MInference: keys kept as vertical lines (64)
  sparse_slash      MInference: offsets kept as slash lines (64)
  sparse_last_q     MInference: the last queries that estimate them (64)
  sparse_gamma      FlexPrefill: cumulative attention mass kept (0.9)
  sparse_tau        FlexPrefill: Jensen-Shannon distance below which a head
                    is query-aware, else vertical-slash (0.1)
  sparse_min_budget FlexPrefill: tokens each query block keeps at least,
                    as whole blocks (512)
  sparse_sale_threshold  SALE: Relative Attention Score threshold (0.004)
  sparse_sale_local SALE: local window in tokens, always kept with the sink
                    block (128)

MInference's per-head pattern choice (`calibrate_head_patterns`, A-shape /
vertical-slash / block-sparse) is per layer, not a config key: calibrate a
layer, then set its `block_selector` to
`functools.partial(minference_blocks, patterns=..., block=...)`.

KV-cache compression for decoding (`snapkv`: SnapKV, per-head top-k prompt
positions voted by the last queries), read by the attention mixer
(`paperzoo.layers.causal_mixers`) at the end of the prompt:

  kv_budget         prompt positions each head keeps in its cache (0: the
                    whole cache, no compression)
  snapkv_window     the observation window: the last prompt queries, which
                    vote and are always kept (32; <= kv_budget)
  snapkv_pool       the votes' pooling kernel along positions, odd (7)
  snapkv_pooling    "avg" | "max" ("avg")
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from paperzoo.config import ConfigError
from paperzoo.sparse_attention.flexprefill import (flexprefill_blocks,
                                                   flexprefill_patterns)
from paperzoo.sparse_attention.minference import (HeadPattern,
                                                  calibrate_head_patterns,
                                                  minference_blocks,
                                                  vertical_slash_blocks)
from paperzoo.sparse_attention.sale import quantize_int4, sale_blocks
from paperzoo.sparse_attention.selection import (causal_block_mask,
                                                 cumulative_mass_selection)
from paperzoo.sparse_attention.snapkv import compress_kv, snapkv_keep
from paperzoo.sparse_attention.xattention import xattention_blocks

SPARSE_PREFILL = ("none", "xattention", "minference", "flexprefill", "sale")


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
  if name == "flexprefill":
    return functools.partial(
        flexprefill_blocks, block=int(get("sparse_block", 64)),
        gamma=float(get("sparse_gamma", 0.9)), tau=float(get("sparse_tau", 0.1)),
        min_budget=int(get("sparse_min_budget", 512)))
  if name == "sale":
    return functools.partial(
        sale_blocks, block=int(get("sparse_block", 64)),
        threshold=float(get("sparse_sale_threshold", 0.004)),
        local=int(get("sparse_sale_local", 128)))
  return functools.partial(
      xattention_blocks, block=int(get("sparse_block", 64)),
      stride=int(get("sparse_stride", 8)),
      threshold=float(get("sparse_threshold", 0.9)), causal=True)


__all__ = ["HeadPattern", "SPARSE_PREFILL", "calibrate_head_patterns",
           "causal_block_mask", "compress_kv", "cumulative_mass_selection",
           "flexprefill_blocks", "flexprefill_patterns", "make_block_selector",
           "minference_blocks", "quantize_int4", "sale_blocks", "snapkv_keep",
           "vertical_slash_blocks", "xattention_blocks"]
