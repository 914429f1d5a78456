"""The Mosaic TPU block-sparse attention forward, checked on CPU.

Numerics through TPU interpret mode (`impl="tpu_interpret"`: simulated
HBM/VMEM and the grid's DMAs, scratch NaN until written, out-of-bounds reads
raise) against the `reference` impl (the list expanded into a dense mask),
float32: forward within 1e-5 and gradients (the `xla` path's VJP behind the
`custom_vjp`) within 5e-5 of the reference's largest magnitude. Interpret
mode is slow (each simulated memory access is a host callback), so the cases
are tiny, with the smallest tiles TPU tiling allows (8 query rows, 128 keys).

The Mosaic lowering (Pallas -> Mosaic MLIR, TPU block-shape rules) is
checked through `jax.export(platforms=["tpu"])`; Mosaic's own compile and TPU
numerics need a TPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.block_sparse_attention import (_Problem, BlockList,
                                                   block_sparse_attention)
from pallas_kernels.block_sparse_attention_tpu import _kv_block_table

# Every test resets TPU interpret mode's global state after it (conftest).
pytestmark = pytest.mark.usefixtures("tpu_fast_jit")

FWD_TOL, GRAD_TOL = 1e-5, 5e-5

# One compile per call rather than one per eager op.
_kv_block_table = jax.jit(_kv_block_table, static_argnums=2)


def _inputs(rng, batch, q_len, kv_len, heads, kv_heads, dim,
            dtype=jnp.float32):
  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape), dtype)

  return (normal(batch, q_len, heads, dim), normal(batch, kv_len, kv_heads, dim),
          normal(batch, kv_len, kv_heads, dim))


# (batch, q_len, kv_len, heads, kv_heads, head_dim), causal, sm_scale,
# (list batch, list heads), block_q. Keys in blocks of 128.
CASES = {
    # GQA 4/2; per (batch, head) lists of different lengths, one of them
    # empty; q_len 20 and kv_len 200 pad the last query and key blocks.
    "gqa_per_head_lists": ((2, 20, 200, 4, 2, 24), False, 0.3, (2, 4), 8),
    # MQA, one list shared by batch and heads, one row of it empty; causal
    # with q_len < kv_len (ends aligned): query block 0 (keys <= 243) lists
    # key block 2 (keys 256..299), above the diagonal (dropped: no DMA or
    # compute); the diagonal blocks are masked.
    "causal_mqa_shared_list": ((1, 72, 300, 2, 1, 16), True, None, (1, 1),
                               16),
    # Causal with q_len > kv_len: the first 10 rows see no key, inside a
    # listed, running block too.
    "causal_long_q": ((1, 24, 14, 1, 1, 8), True, None, (1, 1), 8),
}


def _case(name):
  shape, causal, sm_scale, (list_batch, list_heads), block_q = CASES[name]
  batch, q_len, kv_len, heads, kv_heads, dim = shape
  rng = np.random.default_rng(len(name))
  nq, nk = -(-q_len // block_q), -(-kv_len // 128)
  block_mask = rng.random((list_batch, list_heads, nq, nk)) < 0.6
  block_mask[..., -1, :] = True      # the longest row: every block
  if name == "causal_long_q":
    block_mask[...] = True           # rows see no key by causality alone
  else:
    block_mask[..., 0, :] |= causal  # lists the block above the diagonal
    block_mask[0, 0, 1, :] = False   # a row with count 0
  blocks = BlockList.from_block_mask(block_mask, block_q, 128)
  return (_inputs(rng, *shape), blocks,
          dict(causal=causal, sm_scale=sm_scale))


@pytest.mark.parametrize("name", list(CASES))
def test_tpu_interpret_matches_reference(tpu_fast_jit, close, name):
  (q, k, v), blocks, options = _case(name)
  weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

  def value_and_grads(impl):
    def loss(q, k, v):
      out = block_sparse_attention(q, k, v, blocks, impl=impl, **options)
      return jnp.sum(out * weights), out

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  ((_, out), grads), ((_, want), want_grads) = tpu_fast_jit(
      lambda q, k, v: [value_and_grads(impl)
                       for impl in ("tpu_interpret", "reference")])(q, k, v)
  close(out, want, atol=FWD_TOL)
  close(grads, want_grads, atol=GRAD_TOL)  # (dq, dk, dv)
  out, bq = np.asarray(out), blocks.block_q
  if name == "causal_long_q":  # rows before q_len - kv_len see no key
    np.testing.assert_array_equal(out[:, :10], 0.0)
    assert np.all(np.abs(out[:, 10:]).max(-1) > 0)
  else:  # the empty row (query block 1 of batch 0, head 0) is exactly 0
    assert int(blocks.counts[0, 0, 1]) == 0
    np.testing.assert_array_equal(out[0, bq:2 * bq, 0], 0.0)


def test_kv_block_table_repeats_the_last_block_and_drops_hidden_ones():
  # Query blocks of 8 rows, key blocks of 128; q_len 16, kv_len 400: query
  # block 0 sees keys <= 391 (block 3 holds 384..399), block 1 all of them.
  problem = _Problem(causal=True, sm_scale=1.0, q_len=16, kv_len=400,
                     block_q=8, block_kv=128, interpret=True)
  indices = jnp.asarray([[[[0, 2, 3, 9], [1, 3, 7, 7]]]], jnp.int32)
  counts = jnp.asarray([[[3, 2]]], jnp.int32)
  ids, run = _kv_block_table(indices, counts, problem)
  # Slots past the count repeat the last real block (padding ignored).
  np.testing.assert_array_equal(ids[0, 0], [[0, 2, 3, 3], [1, 3, 3, 3]])
  np.testing.assert_array_equal(run[0, 0], [3, 2])
  # Two query blocks of 128 rows at q_len 256, kv_len 256: block 0 sees
  # keys <= 127 only, so its listed block 1 is dropped.
  problem = _Problem(causal=True, sm_scale=1.0, q_len=256, kv_len=256,
                     block_q=128, block_kv=128, interpret=True)
  indices = jnp.asarray([[[[0, 1], [0, 1]]]], jnp.int32)
  ids, run = _kv_block_table(indices, jnp.asarray([[[2, 2]]]), problem)
  np.testing.assert_array_equal(run[0, 0], [1, 2])
  np.testing.assert_array_equal(ids[0, 0], [[0, 0], [0, 1]])
  # Count 0: every slot DMAs one in-range block and none computes.
  ids, run = _kv_block_table(jnp.full((1, 1, 2, 2), 5, jnp.int32),
                             jnp.zeros((1, 1, 2), jnp.int32), problem)
  np.testing.assert_array_equal(ids[0, 0], [[1, 1], [1, 1]])
  np.testing.assert_array_equal(run[0, 0], [0, 0])


@pytest.mark.parametrize("block_q,block_kv,dtype,message", [
    (8, 64, jnp.float32, "block_kv=64: .*multiple of 128"),
    (12, 128, jnp.float32, "block_q=12: .*multiple of 8"),
    (8, 128, jnp.bfloat16, "block_q=8: .*multiple of 16"),
])
def test_blocks_that_do_not_fit_the_tiles_raise(block_q, block_kv, dtype,
                                                message):
  q, k, v = _inputs(np.random.default_rng(0), 1, 16, 128, 1, 1, 8, dtype)
  blocks = BlockList.from_block_mask(
      np.ones((1, 1, -(-16 // block_q), -(-128 // block_kv)), bool), block_q,
      block_kv)
  with pytest.raises(ValueError, match=message):
    block_sparse_attention(q, k, v, blocks, impl="tpu_interpret")


def test_tpu_on_cpu_raises():
  if jax.default_backend() == "tpu":
    pytest.skip("checks the error off TPU")
  q, k, v = _inputs(np.random.default_rng(0), 1, 8, 128, 1, 1, 8)
  blocks = BlockList.from_block_mask(np.ones((1, 1, 1, 1), bool), 8, 128)
  with pytest.raises(ValueError, match="interpret"):
    block_sparse_attention(q, k, v, blocks, impl="tpu")


def test_auto_on_tpu_is_the_mosaic_kernel():
  if jax.default_backend() != "tpu":
    pytest.skip("needs a TPU")
  rng = np.random.default_rng(1)
  q, k, v = _inputs(rng, 2, 512, 512, 4, 2, 128, jnp.bfloat16)
  blocks = BlockList.from_block_mask(rng.random((2, 4, 4, 4)) < 0.5, 128, 128)
  for causal in (False, True):
    got = block_sparse_attention(q, k, v, blocks, causal=causal)
    want = block_sparse_attention(q, k, v, blocks, causal=causal,
                                  impl="reference")
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(want, np.float32), atol=2e-2)


@pytest.mark.parametrize(
    "q_shape,kv_shape,list_axes,block_q,causal,dtype,grad", [
        # GQA 6/2, head_dim 72 padded to 128 lanes, per-head lists, bf16
        # tiles of 16 rows; with the backward.
        ((2, 100, 6, 72), (2, 300, 2, 72), (1, 6), 16, True, jnp.bfloat16,
         True),
        # MQA, one shared list, float16 (computed in float32).
        ((1, 256, 4, 128), (1, 512, 1, 128), (1, 1), 128, False,
         jnp.float16, False),
        # float32 tiles of 8 rows, per (batch, head) lists.
        ((2, 40, 2, 64), (2, 130, 2, 64), (2, 2), 8, True, jnp.float32,
         False),
    ])
def test_mosaic_lowering_for_tpu(q_shape, kv_shape, list_axes, block_q, causal,
                                 dtype, grad):
  """The forward lowers to one Mosaic kernel from a CPU host (the backward
  is the xla path's)."""
  q, kv = jnp.zeros(q_shape, dtype), jnp.zeros(kv_shape, dtype)
  nq, nk = -(-q_shape[1] // block_q), -(-kv_shape[1] // 128)
  block_mask = np.ones((*list_axes, nq, nk), bool)
  block_mask[..., ::2, 0] = False
  blocks = BlockList.from_block_mask(block_mask, block_q, 128)

  def loss(q, k, v):
    out = block_sparse_attention(q, k, v, blocks, causal=causal, impl="tpu")
    return jnp.sum(out.astype(jnp.float32))

  # The value keeps the forward kernel (the gradient alone recomputes
  # through the xla path).
  fn = jax.value_and_grad(loss, argnums=(0, 1, 2)) if grad else loss
  try:
    exported = export.export(jax.jit(fn), platforms=["tpu"])(q, kv, kv)
  except Exception as err:  # pragma: no cover - depends on the jax build
    if "Unsupported TPU device kind" in str(err) or "platform" in str(err):
      pytest.skip(f"this jax cannot lower Mosaic TPU kernels off TPU: {err}")
    raise
  assert exported.mlir_module().count("@tpu_custom_call(") == 1
