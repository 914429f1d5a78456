"""What the block selectors share: which key blocks causality lets a query
block see, the cumulative-mass rule (XAttention's threshold, FlexPrefill's
gamma): per query block, the fewest key blocks whose estimated attention mass
reaches a fraction of the row's total, the top-count rule (a fixed number of
key blocks per query block), and the pooled block estimate of attention
(FlexPrefill's query-aware pattern, MInference's block-sparse pattern):

    q_bar_i = mean of the queries of block i,  k_bar_j = mean of the keys of
    block j (real tokens only)
    A_ij = softmax_j(sm_scale <q_bar_i, k_bar_j> | key block j visible to i)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention_problem import check_attention_operands


def check_queries_and_keys(q: jax.Array, k: jax.Array) -> None:
  """ValueError unless q [batch, q_len, heads, head_dim] and k [batch, kv_len,
  kv_heads, head_dim] fit one attention problem."""
  check_attention_operands(q, k, k)


def check_block(block: int) -> None:
  if not isinstance(block, (int, np.integer)) or block < 1:
    raise ValueError(f"block={block!r} must be a positive integer")


def causal_block_mask(q_len: int, kv_len: int, block_q: int,
                      block_kv: int) -> np.ndarray:
  """bool [num_q_blocks, num_kv_blocks]: key blocks holding a key that some
  query of the block sees (query t sees keys j <= t + kv_len - q_len)."""
  nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
  last_query = np.minimum((np.arange(nq) + 1) * block_q, q_len) - 1
  last_key = last_query + (kv_len - q_len)
  return np.arange(nk)[None, :] * block_kv <= last_key[:, None]


def diagonal_block_mask(q_len: int, kv_len: int, block_q: int,
                        block_kv: int) -> np.ndarray:
  """bool [num_q_blocks, num_kv_blocks]: the key block holding the last key
  each query block's last query sees (causal, ends aligned); every row that
  sees a key keeps it, so no query row that causality lets see a key is left
  with none."""
  nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
  last_query = np.minimum((np.arange(nq) + 1) * block_q, q_len) - 1
  last_key = last_query + (kv_len - q_len)
  mask = np.zeros((nq, nk), bool)
  rows = np.flatnonzero(last_key >= 0)
  mask[rows, last_key[rows] // block_kv] = True
  return mask


def cumulative_mass_selection(scores: jax.Array, threshold: float,
                              allowed: jax.Array | None = None,
                              always: jax.Array | None = None) -> jax.Array:
  """bool mask of scores' shape [..., num_kv_blocks]: per row, the fewest
  blocks, largest first, whose scores sum to at least `threshold` times the
  row's allowed total (scores >= 0); then the `always` blocks. Blocks outside
  `allowed` are never chosen. threshold 0 keeps only `always`, 1 keeps every
  allowed block with a positive score."""
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"threshold={threshold} must be in [0, 1]")
  scores = jnp.asarray(scores, jnp.float32)
  if allowed is not None:
    scores = jnp.where(allowed, scores, 0.0)
  order = jnp.argsort(-scores, axis=-1, stable=True)
  ranked = jnp.take_along_axis(scores, order, axis=-1)
  total = ranked.sum(axis=-1, keepdims=True)
  before = jnp.cumsum(ranked, axis=-1) - ranked   # mass of the larger ones
  # A block is needed while the larger ones have not reached the threshold.
  needed = (before < threshold * total) & (ranked > 0.0)
  chosen = jnp.zeros_like(needed).at[
      tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(needed)
  if always is not None:
    always = always if allowed is None else always & allowed
    chosen = chosen | always
  return chosen


def top_count_selection(scores: jax.Array, count: int,
                        allowed: jax.Array | None = None) -> jax.Array:
  """bool mask of scores' shape [..., num_kv_blocks]: per row, the `count`
  allowed blocks with the largest scores (ties: the lower index), or every
  allowed block when fewer; blocks outside `allowed` are never chosen."""
  if count < 0:
    raise ValueError(f"count={count} must be >= 0")
  scores = jnp.asarray(scores, jnp.float32)
  if allowed is not None:
    scores = jnp.where(allowed, scores, -jnp.inf)
  order = jnp.argsort(-scores, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)  # each block's place
  chosen = rank < count
  if allowed is not None:
    chosen = chosen & allowed
  return chosen


def block_means(x: jax.Array, block: int) -> jax.Array:
  """[batch, heads, num_blocks, head_dim] float32: the mean of each block of
  x [batch, length, heads, head_dim] over its real tokens (the last block may
  be partial)."""
  batch, length, heads, dim = x.shape
  num_blocks = -(-length // block)
  padded = jnp.pad(x.astype(jnp.float32),
                   ((0, 0), (0, num_blocks * block - length), (0, 0), (0, 0)))
  sums = padded.reshape(batch, num_blocks, block, heads, dim).sum(axis=2)
  sizes = np.minimum(block, length - np.arange(num_blocks) * block)
  return (sums / sizes[None, :, None, None]).transpose(0, 2, 1, 3)


def pooled_block_attention(q: jax.Array, k: jax.Array, *, block: int,
                           sm_scale: float | None = None) -> jax.Array:
  """A: float32 [batch, heads, num_q_blocks, num_kv_blocks] (module
  docstring), causal with the ends aligned: each row sums to 1 over the key
  blocks its query block sees (0 for a block that sees none)."""
  heads, kv_heads, dim = q.shape[2], k.shape[2], q.shape[3]
  sm_scale = dim ** -0.5 if sm_scale is None else sm_scale
  q_bar = block_means(q, block)
  k_bar = jnp.repeat(block_means(k, block), heads // kv_heads, axis=1)
  logits = jnp.einsum("bhid,bhjd->bhij", q_bar, k_bar) * sm_scale
  visible = jnp.asarray(causal_block_mask(q.shape[1], k.shape[1], block, block))
  logits = jnp.where(visible, logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.where(visible, probs, 0.0)
