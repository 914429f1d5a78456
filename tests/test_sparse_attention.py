"""Block selectors for sparse prefill: each checked on inputs whose right
answer is known, and end to end through block_sparse_attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.flash_attention import reference_attention
from paperzoo.sparse_attention import (causal_block_mask,
                                       cumulative_mass_selection,
                                       xattention_blocks)
from paperzoo.sparse_attention.minference import (vertical_slash_blocks,
                                                  vertical_slash_scores)
from paperzoo.sparse_attention.xattention import antidiagonal_scores


def test_cumulative_mass_keeps_the_fewest_blocks_reaching_the_threshold():
  scores = jnp.asarray([[0.15, 0.5, 0.05, 0.3]])
  assert cumulative_mass_selection(scores, 0.8).tolist() == [
      [False, True, False, True]]
  assert cumulative_mass_selection(scores, 0.81).tolist() == [
      [True, True, False, True]]
  assert cumulative_mass_selection(scores, 0.0).tolist() == [[False] * 4]
  always = jnp.asarray([[False, False, True, False]])
  allowed = jnp.asarray([[True, False, True, True]])
  # Without block 1 the row's mass is 0.5: 0.3 alone is 60% of it.
  assert cumulative_mass_selection(scores, 0.6, allowed=allowed,
                                   always=always).tolist() == [
                                       [False, False, True, True]]
  with pytest.raises(ValueError, match="threshold=1.5 must be in"):
    cumulative_mass_selection(scores, 1.5)


def test_causal_block_mask_aligns_the_ends():
  assert causal_block_mask(4, 8, 2, 2).astype(int).tolist() == [
      [1, 1, 1, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("q_len,kv_len,causal", [(45, 45, True), (40, 56, True),
                                                 (37, 50, False)])
def test_antidiagonal_scores_match_a_direct_computation(q_len, kv_len, causal):
  block, stride = 16, 4
  rng = np.random.default_rng(q_len + kv_len)
  q = rng.standard_normal((1, q_len, 2, 8)).astype(np.float32)
  k = rng.standard_normal((1, kv_len, 1, 8)).astype(np.float32)
  got = np.asarray(antidiagonal_scores(jnp.asarray(q), jnp.asarray(k),
                                       block=block, stride=stride,
                                       causal=causal))
  nq, nk = -(-q_len // block), -(-kv_len // block)
  rows, cols = nq * block // stride, nk * block // stride
  q_pad = np.zeros((nq * block, 2, 8), np.float32)
  q_pad[:q_len] = q[0]
  k_pad = np.zeros((nk * block, 8), np.float32)
  k_pad[:kv_len] = k[0, :, 0]
  want = np.zeros((2, nq, nk))
  for h in range(2):
    e = np.zeros((rows, cols))
    for a in range(rows):
      for c in range(cols):
        e[a, c] = sum(q_pad[a * stride + stride - 1 - s, h] @
                      k_pad[c * stride + s] for s in range(stride))
    e *= 8 ** -0.5 / stride
    last_query = np.minimum((np.arange(rows) + 1) * stride, q_len) - 1
    visible = (np.arange(cols) * stride < kv_len)[None, :] & (
        ~causal | (np.arange(cols)[None, :] * stride
                   <= last_query[:, None] + kv_len - q_len))
    p = np.where(visible, np.exp(e - np.where(visible, e, -np.inf).max(1,
                                                                      keepdims=True)), 0)
    p /= p.sum(1, keepdims=True)
    per = block // stride
    want[h] = p.reshape(nq, per, nk, per).sum((1, 3)) / per
  np.testing.assert_allclose(got[0], want, atol=1e-5)


def _planted(rng, num_blocks, block, partner):
  """Queries of block i all point at the keys of block partner[i]: one-hot
  directions, scaled so that the partner takes almost all the attention."""
  dim = 32
  keys = np.zeros((num_blocks * block, dim), np.float32)
  queries = np.zeros_like(keys)
  for j in range(num_blocks):
    keys[j * block:(j + 1) * block, j] = 1.0
  for i, j in enumerate(partner):
    queries[i * block:(i + 1) * block, j] = 30.0
  noise = 0.01 * rng.standard_normal((2, num_blocks * block, dim))
  q = jnp.asarray((queries + noise[0])[None, :, None], jnp.float32)
  k = jnp.asarray((keys + noise[1])[None, :, None], jnp.float32)
  return q, k


def test_xattention_finds_a_planted_block_pattern():
  block, num_blocks = 32, 6
  partner = [0, 0, 1, 0, 2, 3]   # each query block's key block (causal)
  q, k = _planted(np.random.default_rng(0), num_blocks, block, partner)
  blocks = xattention_blocks(q, k, block=block, stride=8, threshold=0.9)
  mask = np.asarray(blocks.to_block_mask(num_blocks))[0, 0]
  want = np.zeros((num_blocks, num_blocks), bool)
  want[np.arange(num_blocks), partner] = True
  want[np.arange(num_blocks), np.arange(num_blocks)] = True  # the diagonal
  np.testing.assert_array_equal(mask, want)


def test_xattention_threshold_one_is_dense_and_zero_the_diagonal():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((2, 100, 2, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 100, 1, 16)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 100, 1, 16)), jnp.float32)
  everything = xattention_blocks(q, k, block=16, stride=4, threshold=1.0)
  np.testing.assert_array_equal(
      everything.to_block_mask(7),
      np.broadcast_to(causal_block_mask(100, 100, 16, 16), (2, 2, 7, 7)))
  out = block_sparse_attention(q, k, v, everything, causal=True, impl="xla")
  np.testing.assert_allclose(out, reference_attention(q, k, v, causal=True),
                             atol=2e-5)
  diagonal = xattention_blocks(q, k, block=16, stride=4, threshold=0.0)
  np.testing.assert_array_equal(np.asarray(diagonal.counts), 1)
  np.testing.assert_array_equal(np.asarray(diagonal.indices)[..., 0],
                                np.broadcast_to(np.arange(7), (2, 2, 7)))


def test_xattention_runs_under_jit_and_rejects_a_bad_stride():
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((1, 64, 2, 8)), jnp.float32)
  blocks = jax.jit(lambda q: xattention_blocks(q, q, block=16, stride=4))(q)
  assert blocks.indices.shape == (1, 2, 4, 4)
  with pytest.raises(ValueError, match="block=16 must be a multiple of "
                     "stride=5"):
    xattention_blocks(q, q, block=16, stride=5)


def test_vertical_slash_scores_sum_the_last_queries_attention_by_key_and_offset():
  rng = np.random.default_rng(3)
  q_len, kv_len, last_q = 20, 27, 6
  q = rng.standard_normal((1, q_len, 2, 4)).astype(np.float32)
  k = rng.standard_normal((1, kv_len, 1, 4)).astype(np.float32)
  vertical, slash = vertical_slash_scores(jnp.asarray(q), jnp.asarray(k), last_q=last_q)
  for h in range(2):
    want_v, want_s = np.zeros(kv_len), np.zeros(kv_len)
    for t in range(q_len - last_q, q_len):
      position = t + kv_len - q_len
      logits = k[0, :position + 1, 0] @ q[0, t, h] / 2.0
      probs = np.exp(logits - logits.max())
      probs /= probs.sum()
      want_v[:position + 1] += probs
      want_s[position - np.arange(position + 1)] += probs
    np.testing.assert_allclose(vertical[0, h], want_v, atol=1e-5)
    np.testing.assert_allclose(slash[0, h], want_s, atol=1e-5)


def test_vertical_slash_finds_a_sink_key_and_the_local_diagonal():
  rng = np.random.default_rng(4)
  block, length, sink = 32, 256, 37
  direction = rng.standard_normal(16).astype(np.float32)
  q = np.tile(direction, (length, 1)) + 0.01 * rng.standard_normal((length, 16))
  k = 0.1 * rng.standard_normal((length, 16))
  k[sink] = 10.0 * direction   # every query that sees it attends to it
  q = jnp.asarray(q[None, :, None], jnp.float32)
  k = jnp.asarray(k[None, :, None], jnp.float32)
  blocks = vertical_slash_blocks(q, k, block=block, vertical_size=2, slash_size=1)
  mask = np.asarray(blocks.to_block_mask(8))[0, 0]
  want = np.eye(8, dtype=bool)          # offset 0: each query block's own keys
  want[:, 0] = True                     # key 0, always kept
  want[1:, sink // block] = True        # the sink, for the blocks that see it
  np.testing.assert_array_equal(mask, want)


def test_vertical_slash_keeping_every_line_is_dense_attention():
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 90, 2, 8)), jnp.float32) for _ in range(3))
  blocks = jax.jit(lambda q, k: vertical_slash_blocks(q, k, block=16, vertical_size=90,
                                                      slash_size=90))(q, k)
  np.testing.assert_array_equal(blocks.to_block_mask(6)[0, 0],
                                causal_block_mask(90, 90, 16, 16))
  np.testing.assert_allclose(block_sparse_attention(q, k, v, blocks, causal=True),
                             reference_attention(q, k, v, causal=True), atol=2e-5)
