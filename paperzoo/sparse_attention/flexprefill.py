"""FlexPrefill (Lai et al. 2025, "FlexPrefill: A Context-Aware Sparse
Attention Mechanism for Efficient Long-Sequence Inference"): per head and per
input, a query-aware or a vertical-slash pattern, each keeping the fewest
indices whose estimated attention mass reaches gamma.

Pattern choice (its Query-Aware Sparse Pattern Determination), from the last
`block` queries q_last of each head:

    a_bar_j = sum over the keys of block j of mean_t softmax(q_t k^T sm_scale |
              causal)                         true block distribution, t in q_last
    a_hat   = softmax_j(<mean_t q_t, k_bar_j> sm_scale)
                                              pooled estimate, k_bar_j the mean
                                              key of block j
    d = sqrt(JSD(a_bar, a_hat)),  JSD(p, q) = (KL(p || m) + KL(q || m)) / 2,
        m = (p + q) / 2 (natural log, so d <= sqrt(ln 2))

d < tau: the pooled estimate describes the head: query-aware; else the head
keeps the vertical-slash pattern (the release's square root of the
divergence and its defaults, tau 0.1, gamma 0.9, block 128, minimum budget
512 tokens).

Query-aware (Cumulative-Attention Based Index Selection on the pooled map):
A_ij = softmax_j(<q_bar_i, k_bar_j> sm_scale | causal) for all query blocks
(`selection.pooled_block_attention`); the map is flattened and normalized
(each row carries mass 1, the map nq) and the fewest blocks, largest first,
whose mass reaches gamma of it are kept, so rows with spread attention get
more blocks than focused ones.

Vertical-slash: with the vertical (per key) and slash (per offset) attention
mass of the last queries (`minference.vertical_slash_scores`), the fewest keys
and the fewest offsets, largest first, that reach gamma of their total, plus
key 0 and offset 0, become the blocks they cross (`minference.line_block_mass`).

Minimum budget: every query block keeps at least ceil(min_budget / block) key
blocks (all it sees, when fewer), the best by the head's own estimate: the
pooled map for query-aware heads, the line mass crossing each block for
vertical-slash heads. The diagonal block is always kept, so no query row that
causality lets see a key is left with none.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import BlockList
from paperzoo.sparse_attention.minference import (line_block_mass,
                                                  vertical_slash_scores)
from paperzoo.sparse_attention.selection import (block_means, causal_block_mask,
                                                 check_block,
                                                 check_queries_and_keys,
                                                 cumulative_mass_selection,
                                                 diagonal_block_mask,
                                                 pooled_block_attention,
                                                 top_count_selection)


def js_distance(p: jax.Array, q: jax.Array) -> jax.Array:
  """sqrt(JSD(p, q)) over the last axis (natural log; p, q distributions;
  0 log 0 = 0)."""
  m = 0.5 * (p + q)

  def kl(a):
    return jnp.sum(jnp.where(a > 0, a * (jnp.log(jnp.where(a > 0, a, 1.0))
                                         - jnp.log(jnp.where(a > 0, m, 1.0))),
                             0.0), axis=-1)

  return jnp.sqrt(jnp.maximum(0.5 * kl(p) + 0.5 * kl(q), 0.0))


def pattern_divergence(q: jax.Array, k: jax.Array, *, block: int = 128,
                       sm_scale: float | None = None) -> jax.Array:
  """d: float32 [batch, heads], the Jensen-Shannon distance between the true
  and the pooled block distribution of the last `block` queries (module
  docstring)."""
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  sm_scale = dim ** -0.5 if sm_scale is None else sm_scale
  last_q = min(block, q_len)
  nk = -(-kv_len // block)
  vertical, _ = vertical_slash_scores(q, k, last_q=last_q, sm_scale=sm_scale)
  vertical = jnp.pad(vertical, ((0, 0), (0, 0), (0, nk * block - kv_len)))
  true = vertical.reshape(batch, heads, nk, block).sum(-1)
  true = true / jnp.sum(true, axis=-1, keepdims=True)
  q_mean = jnp.mean(q[:, q_len - last_q:].astype(jnp.float32), axis=1)
  k_bar = jnp.repeat(block_means(k, block), heads // kv_heads, axis=1)
  pooled = jax.nn.softmax(jnp.einsum("bhd,bhjd->bhj", q_mean, k_bar) * sm_scale,
                          axis=-1)
  return js_distance(true, pooled)


def flexprefill_patterns(q: jax.Array, k: jax.Array, *, block: int = 128,
                         tau: float = 0.1,
                         sm_scale: float | None = None) -> jax.Array:
  """bool [batch, heads]: True where the head takes the query-aware pattern
  (divergence < tau), False where it keeps vertical-slash."""
  return pattern_divergence(q, k, block=block, sm_scale=sm_scale) < tau


def _check(q, k, block, gamma, tau, min_budget) -> None:
  check_queries_and_keys(q, k)
  check_block(block)
  if not 0.0 < gamma <= 1.0:
    raise ValueError(f"gamma={gamma} must be in (0, 1]")
  if not tau >= 0.0:
    raise ValueError(f"tau={tau} must be >= 0")
  if not isinstance(min_budget, (int, np.integer)) or min_budget < 0:
    raise ValueError(f"min_budget={min_budget!r} must be an integer >= 0 "
                     f"(tokens)")


def flexprefill_blocks(q: jax.Array, k: jax.Array, *, block: int = 128,
                       gamma: float = 0.9, tau: float = 0.1,
                       min_budget: int = 512,
                       sm_scale: float | None = None) -> BlockList:
  """The key blocks FlexPrefill keeps for every (batch, head, query block)
  (module docstring), causal with the ends aligned. Works under `jit` (the
  list is padded to every key block)."""
  _check(q, k, block, gamma, tau, min_budget)
  batch, q_len, heads, _ = q.shape
  kv_len = k.shape[1]
  nq, nk = -(-q_len // block), -(-kv_len // block)
  allowed = jnp.asarray(causal_block_mask(q_len, kv_len, block, block))
  budget = math.ceil(min_budget / block)

  # Query-aware: the flattened pooled map, to gamma of its mass.
  pooled = pooled_block_attention(q, k, block=block, sm_scale=sm_scale)
  query_aware = cumulative_mass_selection(
      pooled.reshape(batch, heads, nq * nk), gamma,
      allowed=allowed.reshape(nq * nk)).reshape(pooled.shape)
  query_aware = query_aware | top_count_selection(pooled, budget, allowed)

  # Vertical-slash: the lines reaching gamma of the last queries' mass.
  vertical, slash = vertical_slash_scores(q, k, last_q=min(block, q_len),
                                          sm_scale=sm_scale)
  first = jnp.arange(kv_len) == 0          # key 0 and offset 0, always
  keys = cumulative_mass_selection(vertical, gamma) | first
  offsets = cumulative_mass_selection(slash, gamma) | first
  lines = line_block_mass(keys.astype(jnp.int32), offsets.astype(jnp.int32),
                          q_len=q_len, block=block) > 0
  line_scores = line_block_mass(vertical, slash, q_len=q_len, block=block)
  lines = lines | top_count_selection(line_scores, budget, allowed)

  aware = flexprefill_patterns(q, k, block=block, tau=tau, sm_scale=sm_scale)
  chosen = jnp.where(aware[:, :, None, None], query_aware, lines) & allowed
  chosen = chosen | jnp.asarray(diagonal_block_mask(q_len, kv_len, block, block))
  return BlockList.from_block_mask(chosen, block, block, max_blocks=nk)
