"""The Mosaic TPU flash attention kernels, checked on CPU.

Numerics go through TPU interpret mode (`impl="tpu_interpret"`, i.e.
`pallas_call(interpret=pltpu.InterpretParams())`: simulated HBM/VMEM, the
grid's block DMAs, scratch filled with NaN until written, out-of-bounds reads
raise). It is slow (every simulated memory access is a host callback, about
3 ms here, and each interpreted kernel costs ~5 s of XLA compile), so each
case packs several features and uses small tiles (sublane tiles of 8/16 rows,
lane tiles of 128) to get several tiles per sequence.

Tolerances, relative to the largest magnitude of the reference array (as in
test_flash_attention.py): float32 forward 2e-5, gradients 1e-4; bfloat16
(same bf16 inputs, reference in float32) forward 2e-2, gradients 5e-2.

The Mosaic lowering itself (Pallas -> Mosaic MLIR, TPU block-shape rules)
is checked through `jax.export(platforms=["tpu"])`; Mosaic's own compile
(layout passes in libtpu) and TPU numerics need a TPU.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels import compat, flash_attention
from pallas_kernels.flash_attention import attention_mask
from pallas_kernels.flash_attention_tpu import TPUBlockSizes

# Every test resets TPU interpret mode's global state after it (conftest).
pytestmark = pytest.mark.usefixtures("tpu_fast_jit")

TOL = {jnp.float32: (2e-5, 1e-4), jnp.bfloat16: (2e-2, 5e-2)}
_TPU_CALL = "tpu_custom_call"


def make_inputs(batch, q_len, kv_len, heads, kv_heads, head_dim, segments,
                dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)

  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

  q = normal(batch, q_len, heads, head_dim)
  k = normal(batch, kv_len, kv_heads, head_dim)
  v = normal(batch, kv_len, kv_heads, head_dim)
  segment_ids = None
  if segments:
    # Packed documents: sorted ids; queries of segment 3 find no key.
    segment_ids = tuple(
        jnp.asarray(np.sort(rng.integers(0, ids, (batch, length)), axis=1),
                    jnp.int32) for ids, length in ((4, q_len), (3, kv_len)))
  return q, k, v, segment_ids


def _value_and_grads(impl, causal, segment_ids, sm_scale, blocks):
  def loss(q, k, v):
    out = flash_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                          sm_scale=sm_scale, impl=impl,
                          tpu_block_sizes=blocks)
    # A fixed random projection, so every output element gets its own weight.
    weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(
        out.shape)
    return jnp.sum(out.astype(jnp.float32) * weights), out

  return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


# (batch, q_len, kv_len, heads, kv_heads, head_dim), causal, segments,
# sm_scale, tiles (block_q, block_kv, block_q_dq, block_kv_dq, block_q_dkv,
# block_kv_dkv). The sublane tiles of 8 against lane tiles of 128 make the
# kernels walk several tiles and skip some; lengths are no tile multiples.
CASES = {
    # MQA; q_len < kv_len (ends aligned); two kv tiles in the forward and dq
    # kernels, the first query tile skipping the second; five kv tiles in
    # dk/dv; sm_scale given.
    "causal_mqa_long_kv": ((1, 37, 150, 2, 1, 24), True, False, 0.3,
                           TPUBlockSizes(8, 128, 16, 128, 128, 32)),
    # GQA (4 heads on 2 kv heads); q_len > kv_len; two query tiles in dk/dv,
    # summed over the group's heads; segment ids with queries that find no
    # key of their segment; padded keys.
    "segments_gqa_long_q": ((1, 150, 45, 4, 2, 16), False, True, None,
                            TPUBlockSizes(64, 128, 64, 128, 128, 16)),
    # Very short sequences, batch 2, causal with q_len > kv_len (the first
    # rows see no key) plus segments; head_dim 72 padded to 128 lanes.
    "short_causal_segments": ((2, 5, 3, 2, 2, 72), True, True, None,
                              TPUBlockSizes(8, 128, 8, 128, 128, 8)),
}


def _check(tpu_fast_jit, close, name, dtype):
  shape, causal, segments, sm_scale, blocks = CASES[name]
  q, k, v, segment_ids = make_inputs(*shape, segments=segments, dtype=dtype)

  def both(q, k, v, segment_ids):
    return [_value_and_grads(impl, causal, segment_ids, sm_scale, blocks)(
        q, k, v) for impl in ("tpu_interpret", "reference")]

  ((_, out), grads), ((_, ref_out), ref_grads) = tpu_fast_jit(both)(
      q, k, v, segment_ids)
  fwd_tol, grad_tol = TOL[dtype]
  chex.assert_shape(out, q.shape)
  chex.assert_type([out, *grads], dtype)
  close(out, ref_out, atol=fwd_tol)
  close(grads, ref_grads, atol=grad_tol)  # (dq, dk, dv)
  return q, k, segment_ids, out, grads


@pytest.mark.parametrize("name", list(CASES))
def test_tpu_interpret_matches_reference_f32(tpu_fast_jit, close, name):
  q, k, segment_ids, out, (dq, _, _) = _check(tpu_fast_jit, close, name,
                                              jnp.float32)
  _, causal, _, _, _ = CASES[name]
  # Rows that see no key are exactly 0, with zero gradient; check there are
  # some where the case promises them.
  mask = attention_mask(q.shape[1], k.shape[1], causal, segment_ids)
  if mask is not None:
    empty = ~np.asarray(jnp.broadcast_to(
        mask, (q.shape[0], 1, q.shape[1], k.shape[1])).any(-1))[:, 0]
    if name != "causal_mqa_long_kv":
      assert empty.any()
    np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)
    np.testing.assert_array_equal(np.asarray(dq)[empty], 0.0)


def test_tpu_interpret_matches_reference_bf16(tpu_fast_jit, close):
  _check(tpu_fast_jit, close, "causal_mqa_long_kv", jnp.bfloat16)


def test_tpu_on_cpu_raises():
  if jax.default_backend() == "tpu":
    pytest.skip("checks the error off TPU")
  q, k, v, _ = make_inputs(1, 8, 8, 1, 1, 16, segments=False)
  with pytest.raises(ValueError, match="interpret"):
    flash_attention(q, k, v, impl="tpu")


def test_auto_on_tpu_is_the_mosaic_kernel():
  if jax.default_backend() != "tpu":
    pytest.skip("needs a TPU")
  q, k, v, _ = make_inputs(2, 256, 256, 4, 2, 128, segments=False,
                           dtype=jnp.bfloat16)
  for causal in (False, True):
    got = flash_attention(q, k, v, causal=causal)
    want = flash_attention(q, k, v, causal=causal, impl="reference")
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(want, np.float32), atol=2e-2)


def test_compat_gives_tpu_interpret_mode():
  params = compat.tpu_interpret_params(random_seed=3)
  assert isinstance(params, compat.pltpu.InterpretParams)
  assert params.random_seed == 3
  compat.reset_tpu_interpret_state()


def test_block_sizes_must_be_tile_aligned():
  with pytest.raises(ValueError, match="multiple of 128"):
    TPUBlockSizes(block_kv=64)
  with pytest.raises(ValueError, match="multiple of 8"):
    TPUBlockSizes(block_q=12)


def _lower_for_tpu(fn, *args) -> str:
  try:
    exported = export.export(jax.jit(fn), platforms=["tpu"])(*args)
  except Exception as err:  # pragma: no cover - depends on the jax build
    if "Unsupported TPU device kind" in str(err) or "platform" in str(err):
      pytest.skip(f"this jax cannot lower Mosaic TPU kernels off TPU: {err}")
    raise
  return exported.mlir_module()


@pytest.mark.parametrize("q_shape,kv_shape,causal,segments,dtype", [
    ((2, 300, 6, 72), (2, 200, 2, 72), True, True, jnp.bfloat16),  # GQA
    ((1, 256, 4, 128), (1, 512, 1, 128), True, False, jnp.float32),  # MQA
    ((2, 100, 4, 64), (2, 130, 4, 64), False, False, jnp.float16),
])
def test_mosaic_lowering_for_tpu(q_shape, kv_shape, causal, segments, dtype):
  """Forward and backward lower to three Mosaic kernels with the default
  (128-aligned) tiles, from a CPU host."""
  q = jnp.zeros(q_shape, dtype)
  kv = jnp.zeros(kv_shape, dtype)
  segment_ids = ((jnp.zeros(q_shape[:2], jnp.int32),
                  jnp.zeros(kv_shape[:2], jnp.int32)) if segments else None)

  def loss(q, k, v):
    out = flash_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                          impl="tpu")
    return jnp.sum(out.astype(jnp.float32))

  module = _lower_for_tpu(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)
  # forward (with the residuals), dq, dk/dv
  assert module.count(f"@{_TPU_CALL}(") == 3
