"""What the block selectors share: which key blocks causality lets a query
block see, and the cumulative-mass rule (XAttention's threshold, FlexPrefill's
gamma): per query block, the fewest key blocks whose estimated attention mass
reaches a fraction of the row's total."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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
