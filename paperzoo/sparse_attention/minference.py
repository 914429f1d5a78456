"""MInference's vertical-slash pattern (Jiang et al. 2024, "MInference 1.0:
Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention"),
with its online index estimation, converted to key blocks.

Many heads of a trained long-context model attend to a few fixed key positions
(vertical lines: the first tokens, separators) and to fixed relative offsets
(slash lines: the local window and periodic offsets). MInference estimates
which, per head and per input, from the last queries only:

    A = softmax(q_last k^T sm_scale | causal)      q_last: the last `last_q`
                                                   queries, [last_q, T]
    vertical score of key j      = sum_t A_tj
    slash score of offset o >= 0 = sum_t A_t,(t - o)  (over the last queries)
    keep the `vertical_size` best keys and the `slash_size` best offsets, and
    always key 0 and offset 0 (a query's own position), as the paper does.

Its kernel runs the lines themselves; here they become the key blocks they
touch: query block i keeps key block j when a kept key lies in block j and
some query of block i sees it, or a kept offset o puts some (query t, key
t - o) pair of block i in block j. The block-sparse kernel then attends to
every key of those blocks, a superset of the lines, so attention is at least
as exact as the pattern's. The paper also assigns each head one of three
patterns offline (A-shape, vertical-slash, block-sparse) from a calibration
sample; this module is the vertical-slash pattern, the one most of its heads
take.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import BlockList
from paperzoo.sparse_attention.selection import causal_block_mask


def vertical_slash_scores(q: jax.Array, k: jax.Array, *, last_q: int,
                          sm_scale: float | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """(vertical [B, H, kv_len], slash [B, H, kv_len]): the attention mass the
  last `last_q` queries put on each key and on each offset o = t - j (index o),
  causal with the ends aligned."""
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  sm_scale = dim ** -0.5 if sm_scale is None else sm_scale
  last_q = min(last_q, q_len)
  q_last = q[:, q_len - last_q:].astype(jnp.float32)
  keys = jnp.repeat(k, heads // kv_heads, axis=2).astype(jnp.float32)
  logits = jnp.einsum("bthd,bjhd->bhtj", q_last, keys) * sm_scale
  position = kv_len - last_q + jnp.arange(last_q)      # the queries' key index
  offset = position[:, None] - jnp.arange(kv_len)[None, :]   # [last_q, kv_len]
  logits = jnp.where(offset >= 0, logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  vertical = probs.sum(axis=2)
  # Offsets: scatter each (t, j) into o = t - j (masked entries carry 0 mass).
  slash = jnp.zeros((batch, heads, kv_len), jnp.float32).at[
      :, :, jnp.clip(offset, 0, kv_len - 1)].add(probs)
  return vertical, slash


def vertical_slash_blocks(q: jax.Array, k: jax.Array, *, block: int = 64,
                          vertical_size: int = 64, slash_size: int = 64,
                          last_q: int = 64,
                          sm_scale: float | None = None) -> BlockList:
  """The key blocks of MInference's vertical-slash pattern (module docstring)
  for every (batch, head, query block), causal. Works under `jit` (the list is
  padded to every key block)."""
  q_len, kv_len = q.shape[1], k.shape[1]
  vertical, slash = vertical_slash_scores(q, k, last_q=last_q, sm_scale=sm_scale)
  # Key 0 and offset 0 always; then the best of the rest. [B, H, count] indices.
  bonus = jnp.zeros(kv_len).at[0].set(jnp.inf)
  keys = jax.lax.top_k(vertical + bonus, min(vertical_size, kv_len))[1]
  offsets = jax.lax.top_k(slash + bonus, min(slash_size, kv_len))[1]
  nq, nk = -(-q_len // block), -(-kv_len // block)
  shift = kv_len - q_len
  first_query = jnp.arange(nq) * block + shift          # as key positions
  last_query = jnp.minimum((jnp.arange(nq) + 1) * block, q_len) - 1 + shift
  # Vertical: key j's block, for the query blocks whose last query sees j.
  seen = keys[:, :, None, :] <= last_query[None, None, :, None]     # [B, H, nq, V]
  vertical_block = jnp.where(seen, keys[:, :, None, :] // block, nk)
  # Slash: offset o pairs the queries of block i with the keys first_query - o ..
  # last_query - o, which lie in at most two key blocks.
  lo = first_query[None, None, :, None] - offsets[:, :, None, :]    # [B, H, nq, S]
  hi = last_query[None, None, :, None] - offsets[:, :, None, :]
  lo_block = jnp.where(hi >= 0, jnp.maximum(lo, 0) // block, nk)
  hi_block = jnp.where(hi >= 0, hi // block, nk)
  hits = jnp.concatenate([vertical_block, lo_block, hi_block], axis=-1)
  rows = jnp.indices(hits.shape)[:-1]
  chosen = jnp.zeros(hits.shape[:-1] + (nk + 1,), bool).at[(*rows, hits)].set(True)
  allowed = jnp.asarray(causal_block_mask(q_len, kv_len, block, block))
  return BlockList.from_block_mask(chosen[..., :nk] & allowed, block, block,
                                   max_blocks=nk)
