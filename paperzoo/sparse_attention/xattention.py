"""XAttention (Xu et al. 2025, "XAttention: Block Sparse Attention with
Antidiagonal Scoring"): block importance from strided antidiagonal sums of the
attention logits, then the fewest blocks reaching a cumulative threshold.

Within every stride x stride tile of the logit matrix, the antidiagonal (lower
left to upper right: query row S-1-s with key column s, s = 0..S-1) touches
each row and each column of the tile once, so its sum sees every query and
every key at 1/S of the cost; a vertical or a slash (diagonal) pattern that a
block holds crosses every antidiagonal and is not missed, as a strided
diagonal or a row sample could miss it. Computed for all tiles at once as one
product of reshaped operands:

    q'_a = concat_s q[a S + (S-1-s)]     a = 0 .. Tq/S - 1,  [S D]
    k'_c = concat_s k[c S + s]           c = 0 .. Tk/S - 1,  [S D]
    e_ac = sm_scale <q'_a, k'_c> / S     the tile's mean antidiagonal logit
    p_a  = softmax_c(e_ac | causal)      attention estimate at 1/S resolution
    A_ij = sum of p_ac over tile rows a in query block i, columns c in key
           block j, divided by block / S (each row of p sums to 1)

Per query block i the key blocks are ranked by A_ij and the fewest whose sum
reaches `threshold` (XAttention's tau; 0.9 by default in its release) are
kept (`selection.cumulative_mass_selection`), plus the diagonal block (causal),
so every query row keeps a visible key.

The paper's defaults are block 128 and stride 8 or 16 on 8B-parameter models;
this framework's long-context character model uses block 64 (its heads are 32
wide).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import BlockList
from paperzoo.sparse_attention.selection import (causal_block_mask,
                                                 cumulative_mass_selection,
                                                 diagonal_block_mask)


def antidiagonal_scores(q: jax.Array, k: jax.Array, *, block: int, stride: int,
                        causal: bool = True,
                        sm_scale: float | None = None) -> jax.Array:
  """A: float32 [batch, heads, num_q_blocks, num_kv_blocks] (module
  docstring), each row summing to 1 over the blocks causality allows.

  q [batch, q_len, heads, head_dim], k [batch, kv_len, kv_heads, head_dim];
  lengths are padded to block multiples (padded keys get no mass).
  """
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if block % stride:
    raise ValueError(f"block={block} must be a multiple of stride={stride}")
  sm_scale = dim ** -0.5 if sm_scale is None else sm_scale
  nq, nk = -(-q_len // block), -(-kv_len // block)
  per_block = block // stride
  q_pad = jnp.pad(q, ((0, 0), (0, nq * block - q_len), (0, 0), (0, 0)))
  k_pad = jnp.pad(k, ((0, 0), (0, nk * block - kv_len), (0, 0), (0, 0)))
  # [B, T/S, S, H, D] -> [B, H, T/S, S D], the query rows of each tile reversed.
  q_r = q_pad.reshape(batch, nq * per_block, stride, heads, dim)[:, :, ::-1]
  q_r = q_r.transpose(0, 3, 1, 2, 4).reshape(batch, heads, -1, stride * dim)
  k_r = k_pad.reshape(batch, nk * per_block, stride, kv_heads, dim)
  k_r = k_r.transpose(0, 3, 1, 2, 4).reshape(batch, kv_heads, -1, stride * dim)
  k_r = jnp.repeat(k_r, heads // kv_heads, axis=1)
  logits = jnp.einsum("bhad,bhcd->bhac", q_r.astype(jnp.float32),
                      k_r.astype(jnp.float32)) * (sm_scale / stride)
  # A tile column counts when it holds a real key; causal: when the tile row's
  # last query sees the column's first key (ends aligned).
  col = jnp.arange(nk * per_block)
  visible = (col * stride < kv_len)[None, :]
  if causal:
    row_last = jnp.minimum((jnp.arange(nq * per_block) + 1) * stride, q_len) - 1
    visible = visible & (col[None, :] * stride <=
                         row_last[:, None] + (kv_len - q_len))
  logits = jnp.where(visible, logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(visible, probs, 0.0)  # rows that see nothing: 0, not NaN
  tiles = probs.reshape(batch, heads, nq, per_block, nk, per_block)
  return tiles.sum(axis=(3, 5)) / per_block


def xattention_blocks(q: jax.Array, k: jax.Array, *, block: int = 64,
                      stride: int = 8, threshold: float = 0.9,
                      causal: bool = True,
                      sm_scale: float | None = None) -> BlockList:
  """The key blocks XAttention keeps for every (batch, head, query block):
  the fewest reaching `threshold` of the antidiagonal block scores, plus the
  diagonal block when causal. Works under `jit` (the list is padded to all
  key blocks)."""
  q_len, kv_len = q.shape[1], k.shape[1]
  scores = antidiagonal_scores(q, k, block=block, stride=stride, causal=causal,
                               sm_scale=sm_scale)
  allowed = always = None
  if causal:
    allowed = jnp.asarray(causal_block_mask(q_len, kv_len, block, block))
    always = jnp.asarray(diagonal_block_mask(q_len, kv_len, block, block))
  chosen = cumulative_mass_selection(scores, threshold, allowed=allowed,
                                     always=always)
  return BlockList.from_block_mask(chosen, block, block,
                                   max_blocks=scores.shape[-1])
