"""SALE (Ji et al. 2025, "SALE: Low-bit Estimation for Efficient Sparse
Attention in Long-context LLM Prefilling"): every attention logit estimated
from 4-bit queries and keys, each key block kept when some estimated weight
in it is large relative to the attention a query already pays to its sink and
local window.

Quantization (symmetric, 4-bit, one scale per token or per group of `group`
consecutive tokens of a head, after the smoothing of the release):

    K' = K - mean_t K            (a constant per query row: softmax unchanged)
    Q' = Q - mean_t Q,  q_mean = mean_t Q
    x_int = clip(round(x / s), -8, 7),  s = max|x| / 7 over the group
    s_hat_tj = sm_scale (s_q,t s_k,j <q_int,t, k_int,j> + <q_mean, k'_j>)

The integer product is an int8 x int8 -> int32 matmul; <q_mean, k'_j> is one
exact vector per head. The round-trip error of an entry is at most s / 2.

Relative Attention Score. The sink (key block 0) and the local window (the
ceil(local / block) key blocks ending at the diagonal one) are always computed,
exactly, so each query t knows its partial softmax normalizer over them,

    Z_t = sum_{j in sink and local, j <= t} exp(s_tj),  s_tj = sm_scale <q_t, k'_j>

and the score of a key outside them is its estimated weight relative to it:

    RAS_tj = exp(s_hat_tj) / Z_t

Key block j of query block i is kept when RAS_tj > threshold for some query t
of block i and visible key j of block j (the release compares the block's
row maxima in the logit domain: max s_hat > log(threshold Z)). The paper
calibrates a threshold per head (0.004 in its example); `threshold` takes one
value or one per query head.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import BlockList
from paperzoo.sparse_attention.selection import (causal_block_mask,
                                                 check_block,
                                                 check_queries_and_keys)

INT4_MIN, INT4_MAX = -8, 7


def quantize_int4(x: jax.Array, *, group: int = 1) -> tuple[jax.Array, jax.Array]:
  """(values int8 [B, T, H, D] in [-8, 7], scales float32 [B, T, H, 1]) with
  x ~= values * scales: symmetric, one scale per `group` consecutive tokens of
  each head (group 1: per token), s = max|x| / 7 (1 for an all-zero group)."""
  if not isinstance(group, (int, np.integer)) or group < 1:
    raise ValueError(f"group={group!r} must be a positive integer (tokens per "
                     f"scale)")
  batch, length, heads, dim = x.shape
  x = x.astype(jnp.float32)
  groups = -(-length // group)
  padded = jnp.pad(x, ((0, 0), (0, groups * group - length), (0, 0), (0, 0)))
  peak = jnp.max(jnp.abs(padded.reshape(batch, groups, group, heads, dim)),
                 axis=(2, 4), keepdims=True)
  scale = jnp.where(peak > 0, peak / INT4_MAX, 1.0)
  scale = jnp.broadcast_to(scale, (batch, groups, group, heads, 1)).reshape(
      batch, groups * group, heads, 1)[:, :length]
  values = jnp.clip(jnp.round(x / scale), INT4_MIN, INT4_MAX).astype(jnp.int8)
  return values, scale


def estimated_logits(q: jax.Array, k: jax.Array, *, group: int = 1,
                     sm_scale: float | None = None) -> jax.Array:
  """s_hat: float32 [B, H, Tq, Tk], the 4-bit estimate of sm_scale q k'^T
  (module docstring; k' = k - mean_t k), unmasked."""
  heads, kv_heads, dim = q.shape[2], k.shape[2], q.shape[3]
  sm_scale = dim ** -0.5 if sm_scale is None else sm_scale
  q = q.astype(jnp.float32)
  k_smooth = k.astype(jnp.float32) - jnp.mean(k.astype(jnp.float32), axis=1,
                                              keepdims=True)
  q_mean = jnp.mean(q, axis=1, keepdims=True)
  q_int, q_scale = quantize_int4(q - q_mean, group=group)
  k_int, k_scale = quantize_int4(k_smooth, group=group)
  repeat = heads // kv_heads
  k_int, k_scale = (jnp.repeat(x, repeat, axis=2) for x in (k_int, k_scale))
  k_smooth = jnp.repeat(k_smooth, repeat, axis=2)
  products = jnp.einsum("bthd,bjhd->bhtj", q_int, k_int,
                        preferred_element_type=jnp.int32).astype(jnp.float32)
  products = (products * q_scale[..., 0].transpose(0, 2, 1)[..., None]
              * k_scale[..., 0].transpose(0, 2, 1)[:, :, None, :])
  mean_term = jnp.einsum("bhd,bjhd->bhj", q_mean[:, 0], k_smooth)
  return (products + mean_term[:, :, None, :]) * sm_scale


def always_blocks(q_len: int, kv_len: int, *, block: int,
                  local: int) -> np.ndarray:
  """bool [num_q_blocks, num_kv_blocks]: the sink (key block 0) and the
  ceil(local / block) key blocks ending at each query block's diagonal block,
  causal: the blocks SALE computes exactly for every query block."""
  nq, nk = -(-q_len // block), -(-kv_len // block)
  last_key = np.minimum((np.arange(nq) + 1) * block, q_len) - 1 + (kv_len - q_len)
  diagonal = np.where(last_key >= 0, last_key // block, -1)[:, None]
  columns = np.arange(nk)[None, :]
  num_local = max(1, math.ceil(local / block))
  local_blocks = (columns <= diagonal) & (columns > diagonal - num_local)
  return (local_blocks | (columns == 0)) & causal_block_mask(q_len, kv_len,
                                                             block, block)


def relative_attention_scores(q: jax.Array, k: jax.Array, *, block: int = 64,
                              local: int = 128, group: int = 1,
                              sm_scale: float | None = None) -> jax.Array:
  """log RAS: float32 [B, H, Tq, Tk] (module docstring), -inf where the key is
  not visible (causal, ends aligned). Z_t sums over the visible keys of the
  query's always-kept blocks (`always_blocks`), whose exact logits are
  computed on those blocks only (gathered per query block)."""
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  sm_scale = dim ** -0.5 if sm_scale is None else sm_scale
  estimate = estimated_logits(q, k, group=group, sm_scale=sm_scale)
  nq, nk = -(-q_len // block), -(-kv_len // block)
  shift = kv_len - q_len
  # Each query block's window: its local blocks down from the diagonal one,
  # then the sink block 0 unless the local ones already hold it.
  last_key = np.minimum((np.arange(nq) + 1) * block, q_len) - 1 + shift
  diagonal = np.where(last_key >= 0, last_key // block, -1)
  num_local = max(1, math.ceil(local / block))
  local_ids = diagonal[:, None] - np.arange(num_local)[None, :]
  ids = np.concatenate([local_ids, np.zeros((nq, 1), int)], axis=1)   # [nq, W]
  valid = np.concatenate([local_ids >= 0, (local_ids[:, -1:] > 0)], axis=1)
  # Exact logits on the window, with the smoothed keys of the estimate
  # (softmax is shift-invariant, so Z_t's ratio to exp(s_hat) is unchanged).
  k_smooth = k.astype(jnp.float32) - jnp.mean(k.astype(jnp.float32), axis=1,
                                              keepdims=True)
  k_smooth = jnp.repeat(k_smooth, heads // kv_heads, axis=2)
  k_blocks = jnp.pad(k_smooth, ((0, 0), (0, nk * block - kv_len), (0, 0), (0, 0)))
  k_blocks = k_blocks.reshape(batch, nk, block, heads, dim).transpose(0, 3, 1, 2, 4)
  q_blocks = jnp.pad(q.astype(jnp.float32),
                     ((0, 0), (0, nq * block - q_len), (0, 0), (0, 0)))
  q_blocks = q_blocks.reshape(batch, nq, block, heads, dim).transpose(0, 3, 1, 2, 4)
  window = k_blocks[:, :, np.clip(ids, 0, nk - 1)]          # [B, H, nq, W, bk, D]
  exact = jnp.einsum("bhitd,bhiwsd->bhitws", q_blocks, window) * sm_scale
  key_pos = ids[:, :, None] * block + np.arange(block)       # [nq, W, bk]
  query_pos = np.arange(nq)[:, None] * block + np.arange(block)   # [nq, bq]
  in_window = (valid[:, None, :, None]
               & (key_pos[:, None] <= query_pos[:, :, None, None] + shift)
               & (key_pos < kv_len)[:, None])
  log_z = jax.nn.logsumexp(jnp.where(in_window, exact, -jnp.inf), axis=(-2, -1))
  log_z = log_z.reshape(batch, heads, nq * block)[:, :, :q_len, None]
  log_z = jnp.where(jnp.isfinite(log_z), log_z, 0.0)  # rows that see nothing
  visible = (np.arange(kv_len)[None, :]
             <= np.arange(q_len)[:, None] + (kv_len - q_len))
  return jnp.where(visible, estimate - log_z, -jnp.inf)


def _check_threshold(threshold, heads: int) -> jax.Array:
  values = np.asarray(threshold, np.float64)
  if values.ndim > 1 or (values.ndim == 1 and values.shape[0] != heads):
    raise ValueError(f"threshold must be one number or one per query head "
                     f"({heads}), got shape {values.shape}")
  if not np.all(values >= 0.0) or not np.all(np.isfinite(values)):
    raise ValueError(f"threshold={threshold!r} must be finite and >= 0")
  return jnp.asarray(values, jnp.float32).reshape(-1, 1, 1)


def sale_blocks(q: jax.Array, k: jax.Array, *, block: int = 64,
                threshold: float | Sequence[float] = 0.004, local: int = 128,
                group: int = 1, sm_scale: float | None = None) -> BlockList:
  """The key blocks SALE keeps for every (batch, head, query block): the
  sink and local blocks, and every visible block holding a key whose Relative
  Attention Score exceeds `threshold` for some query of the block (module
  docstring). Works under `jit` (the list is padded to every key block)."""
  check_queries_and_keys(q, k)
  check_block(block)
  if not isinstance(local, (int, np.integer)) or local < 1:
    raise ValueError(f"local={local!r} must be a positive integer (tokens)")
  batch, q_len, heads, _ = q.shape
  kv_len = k.shape[1]
  log_threshold = jnp.log(_check_threshold(threshold, heads))
  nq, nk = -(-q_len // block), -(-kv_len // block)
  scores = relative_attention_scores(q, k, block=block, local=local,
                                     group=group, sm_scale=sm_scale)
  scores = jnp.pad(scores, ((0, 0), (0, 0), (0, nq * block - q_len),
                            (0, nk * block - kv_len)), constant_values=-jnp.inf)
  block_max = scores.reshape(batch, heads, nq, block, nk, block).max(axis=(3, 5))
  chosen = (block_max > log_threshold) | always_blocks(q_len, kv_len,
                                                       block=block, local=local)
  chosen = chosen & causal_block_mask(q_len, kv_len, block, block)
  return BlockList.from_block_mask(chosen, block, block, max_blocks=nk)
