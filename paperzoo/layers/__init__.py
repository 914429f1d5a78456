"""Shared building blocks: initializers, attention, the Transformer encoder.

Logical axis names
------------------
Every weight carries logical axis names (via `nnx.with_partitioning`), one per array axis, drawn
from this vocabulary (`LOGICAL_AXIS_NAMES`); the trainer maps them to mesh axes with rules such as
`(("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("batch", ("data", "fsdp")))`:

  * "embed"    -- the model width d_model;
  * "mlp"      -- the feed-forward hidden width d_ff;
  * "heads"    -- attention heads; the fused q/k/v/output projection axis of size
                  num_heads * head_dim is named "heads" (heads are contiguous blocks of it);
  * "head_dim" -- the per-head feature axis, for weights that keep it separate;
  * "time"     -- a length axis (seq_len or pred_len) of a linear map over time;
  * "variates" -- the channel axis of per-variate weights (DLinear with individual=True);
  * "vocab"    -- a token vocabulary;
  * None       -- replicated.

These are logical names, not mesh axis names, so models are built with flax's eager sharding
off: `import paperzoo` turns it off (`nnx.use_eager_sharding(False)`), and the trainer resolves
the names through its rules (`paperzoo.sharding`). With eager sharding on and no mesh, flax
refuses to create an annotated variable.
"""

from __future__ import annotations

from paperzoo.layers.attention import (ATTENTION_IMPLS, Dropout, MultiHeadAttention,
                                       dot_product_attention, reference_attention)
from paperzoo.layers.initializers import (INIT_SCHEMES, dense, torch_linear_bias_init,
                                          torch_linear_kernel_init)
from paperzoo.layers.normalization import denormalize_series, normalize_series
from paperzoo.layers.transformer import ACTIVATIONS, Encoder, EncoderLayer
from paperzoo.sharding import LOGICAL_AXIS_NAMES

__all__ = [
    "ACTIVATIONS",
    "ATTENTION_IMPLS",
    "Dropout",
    "Encoder",
    "EncoderLayer",
    "INIT_SCHEMES",
    "LOGICAL_AXIS_NAMES",
    "MultiHeadAttention",
    "dense",
    "denormalize_series",
    "normalize_series",
    "dot_product_attention",
    "reference_attention",
    "torch_linear_bias_init",
    "torch_linear_kernel_init",
]
