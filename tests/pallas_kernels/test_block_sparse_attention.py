"""Block-sparse attention: every implementation against the dense reference
with the block list expanded into a mask, forward and gradients, float32, fresh
random inputs of odd shapes; the BlockList type and its validation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import (BlockList,
                                                   block_sparse_attention,
                                                   dense_block_list)
from pallas_kernels.flash_attention import reference_attention

FAST_IMPLS = ("xla", "interpret")


def _inputs(rng, batch, q_len, kv_len, heads, kv_heads, dim,
            dtype=jnp.float32):
  q = rng.standard_normal((batch, q_len, heads, dim))
  k = rng.standard_normal((batch, kv_len, kv_heads, dim))
  v = rng.standard_normal((batch, kv_len, kv_heads, dim))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _random_blocks(rng, batch, heads, q_len, kv_len, block_q, block_kv,
                   density=0.4):
  nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
  mask = rng.random((batch, heads, nq, nk)) < density
  return BlockList.from_block_mask(mask, block_q, block_kv), mask


@pytest.mark.parametrize("shape,blocks_shared,causal", [
    # batch, q_len, kv_len, heads, kv_heads, dim, block_q, block_kv
    ((2, 75, 90, 4, 2, 24, 16, 16), False, False),   # GQA, padded lengths
    ((1, 97, 97, 3, 1, 40, 32, 16), True, True),     # MQA, one shared list
    ((2, 50, 83, 2, 2, 16, 16, 32), False, True),    # q_len < kv_len
    ((1, 70, 40, 2, 1, 8, 16, 16), False, True),     # q_len > kv_len: rows see none
])
def test_forward_and_gradients_match_the_dense_reference(shape, blocks_shared,
                                                         causal):
  rng = np.random.default_rng(sum(shape))
  batch, q_len, kv_len, heads, kv_heads, dim, block_q, block_kv = shape
  q, k, v = _inputs(rng, batch, q_len, kv_len, heads, kv_heads, dim)
  blocks, _ = _random_blocks(rng, 1 if blocks_shared else batch,
                             1 if blocks_shared else heads, q_len, kv_len,
                             block_q, block_kv)
  cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  def loss(impl):
    return lambda q, k, v: jnp.sum(block_sparse_attention(
        q, k, v, blocks, causal=causal, impl=impl) * cotangent)

  want = block_sparse_attention(q, k, v, blocks, causal=causal,
                                impl="reference")
  want_grads = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
  for impl in FAST_IMPLS:
    got = block_sparse_attention(q, k, v, blocks, causal=causal, impl=impl)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=impl)
    if impl == "interpret" and q_len != 70:
      continue  # its backward is the xla path's (custom_vjp): the smallest case is enough
    grads = jax.grad(loss(impl), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", grads, want_grads):
      np.testing.assert_allclose(g, w, atol=5e-5, rtol=1e-4,
                                 err_msg=f"{impl} d{name}")


@pytest.mark.parametrize("causal", [False, True])
def test_all_blocks_listed_is_dense_attention(causal):
  rng = np.random.default_rng(7)
  q, k, v = _inputs(rng, 2, 61, 61, 2, 2, 16)
  blocks = dense_block_list(2, 2, 61, 61, 16, 16, causal=causal)
  if causal:  # only blocks on or below the diagonal are listed
    assert blocks.counts[0, 0].tolist() == [1, 2, 3, 4]
  want = reference_attention(q, k, v, causal=causal)
  for impl in FAST_IMPLS:
    got = block_sparse_attention(q, k, v, blocks, causal=causal, impl=impl)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=impl)


def test_query_blocks_that_see_no_key_give_zero_and_zero_gradient():
  rng = np.random.default_rng(3)
  q, k, v = _inputs(rng, 1, 48, 48, 2, 2, 16)
  mask = np.ones((1, 2, 3, 3), bool)
  mask[0, 1, 1] = False  # head 1, query block 1 lists nothing
  blocks = BlockList.from_block_mask(mask, 16, 16)
  for impl in FAST_IMPLS + ("reference",):
    out = block_sparse_attention(q, k, v, blocks, impl=impl)
    np.testing.assert_array_equal(out[0, 16:32, 1], 0.0)
    assert float(jnp.abs(out[0, 16:32, 0]).min()) > 0.0
    if impl != "interpret":
      dq = jax.grad(lambda q: jnp.sum(block_sparse_attention(
          q, k, v, blocks, impl=impl) ** 2))(q)
      np.testing.assert_array_equal(dq[0, 16:32, 1], 0.0)


def test_block_list_round_trip_and_padding():
  mask = np.array([[[[True, False, True, True],
                     [False, False, False, False],
                     [False, True, False, False]]]])
  blocks = BlockList.from_block_mask(mask, 8, 8)
  assert blocks.counts.tolist() == [[[3, 0, 1]]]
  assert blocks.indices.tolist() == [[[[0, 2, 3], [0, 0, 0], [1, 0, 0]]]]
  np.testing.assert_array_equal(blocks.to_block_mask(4), mask)
  np.testing.assert_allclose(blocks.density(4), 4 / 12)
  wide = BlockList.from_block_mask(mask, 8, 8, max_blocks=6)
  assert wide.max_blocks == 6
  np.testing.assert_array_equal(wide.to_block_mask(4), mask)
  assert wide.trimmed().max_blocks == 3
  np.testing.assert_array_equal(wide.trimmed().to_block_mask(4), mask)


def test_traced_block_lists_work_under_jit():
  rng = np.random.default_rng(11)
  q, k, v = _inputs(rng, 1, 64, 64, 2, 2, 16)
  mask = rng.random((1, 2, 4, 4)) < 0.5

  @jax.jit
  def run(q, k, v, mask):
    blocks = BlockList.from_block_mask(mask, 16, 16, max_blocks=4)
    return block_sparse_attention(q, k, v, blocks, causal=True, impl="xla")

  want = block_sparse_attention(q, k, v,
                                BlockList.from_block_mask(mask, 16, 16),
                                causal=True, impl="reference")
  np.testing.assert_allclose(run(q, k, v, mask), want, atol=2e-5, rtol=1e-5)


def test_bfloat16_inputs_stay_close_and_keep_their_dtype():
  rng = np.random.default_rng(5)
  q, k, v = _inputs(rng, 1, 64, 64, 2, 1, 32, jnp.bfloat16)
  blocks, _ = _random_blocks(rng, 1, 2, 64, 64, 16, 16, density=0.6)
  want = block_sparse_attention(q, k, v, blocks, causal=True, impl="reference")
  for impl in FAST_IMPLS:
    got = block_sparse_attention(q, k, v, blocks, causal=True, impl=impl)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32),
                               want.astype(jnp.float32), atol=3e-2)


def _valid():
  rng = np.random.default_rng(0)
  q, k, v = _inputs(rng, 2, 40, 40, 2, 2, 8)
  return q, k, v


@pytest.mark.parametrize("make_blocks,impl,message", [
    (lambda: BlockList(np.array([[[[0, 5]]]]), np.array([[[2]]]), 64, 16),
     "xla", r"blocks.indices\[0, 0, 0, 1\] = 5 is out of range \[0, 3\)"),
    (lambda: BlockList(np.array([[[[2, 1]] * 3]]), np.array([[[2, 2, 2]]]), 16,
                       16), "xla", "not strictly increasing"),
    (lambda: BlockList(np.zeros((1, 1, 3, 2), np.int32),
                       np.array([[[3, 1, 1]]]), 16, 16), "xla",
     r"blocks.counts\[0, 0, 0\] = 3 is outside \[0, max_blocks=2\]"),
    (lambda: BlockList(np.zeros((1, 1, 2, 1), np.int32),
                       np.ones((1, 1, 2), np.int32), 16, 16), "xla",
     "blocks have 2 query blocks; q_len 40 / block_q 16 needs 3"),
    (lambda: BlockList(np.zeros((3, 1, 3, 1), np.int32),
                       np.ones((3, 1, 3), np.int32), 16, 16), "xla",
     "blocks have 3 along batch; expected 1 or 2"),
    (lambda: BlockList(np.zeros((1, 1, 4, 1), np.int32),
                       np.ones((1, 1, 4), np.int32), 12, 16), "interpret",
     "blocks.block_q=12: impl='interpret' needs a power of two"),
    (lambda: dense_block_list(2, 2, 40, 40, 16, 16), "fast",
     "unknown impl 'fast'; valid: auto, xla"),
])
def test_bad_block_lists_name_the_field(make_blocks, impl, message):
  q, k, v = _valid()
  with pytest.raises(ValueError, match=message):
    block_sparse_attention(q, k, v, make_blocks(), impl=impl)
