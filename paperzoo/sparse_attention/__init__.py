"""Block selectors for block-sparse prefill: each a pure function from the
queries and keys (and values) of one attention layer to the `BlockList` that
`pallas_kernels.block_sparse_attention` runs on.

    from paperzoo.sparse_attention import xattention_blocks
    blocks = xattention_blocks(q, k, block=64, stride=8, threshold=0.9)
    out = block_sparse_attention(q, k, v, blocks, causal=True)

One module per method, each from its paper; `selection` holds what they share
(the cumulative-mass rule, causal block visibility).
"""
from paperzoo.sparse_attention.selection import (causal_block_mask,
                                                 cumulative_mass_selection)
from paperzoo.sparse_attention.xattention import xattention_blocks

__all__ = ["causal_block_mask", "cumulative_mass_selection",
           "xattention_blocks"]
