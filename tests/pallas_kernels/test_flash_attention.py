"""flash_attention: the Pallas kernels (interpret mode) against the reference.

Tolerances, relative to the largest magnitude of the reference array:
float32 forward 2e-5, gradients 1e-4; bfloat16 (same bf16 inputs, reference
in float32) forward 2e-2, gradients 5e-2; float16 forward 2e-3, gradients
1e-2.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention
from pallas_kernels.flash_attention import BlockSizes, reference_attention

# Small tiles keep the interpreter fast and give several tiles per sequence.
SMALL = BlockSizes(16, 16, 16, 16, 16, 16)
TOL = {jnp.float32: (2e-5, 1e-4), jnp.bfloat16: (2e-2, 5e-2),
       jnp.float16: (2e-3, 1e-2)}


def make_inputs(batch, q_len, kv_len, heads, kv_heads, head_dim, segments,
                dtype=jnp.float32, seed=0):
  # numpy's generator: eager jax.random compiles per shape, seconds each.
  rng = np.random.default_rng(seed)

  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

  q = normal(batch, q_len, heads, head_dim)
  k = normal(batch, kv_len, kv_heads, head_dim)
  v = normal(batch, kv_len, kv_heads, head_dim)
  segment_ids = None
  if segments:
    # Packed documents: sorted ids, some queries may find no key of theirs.
    segment_ids = tuple(
        jnp.asarray(np.sort(rng.integers(0, 3, (batch, length)), axis=1),
                    jnp.int32) for length in (q_len, kv_len))
  return q, k, v, segment_ids


def plain_softmax_attention(q, k, v, causal, segment_ids, sm_scale):
  """The definition, head by head in numpy float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  if segment_ids is not None:
    segment_ids = [np.asarray(ids) for ids in segment_ids]
  batch, q_len, heads, _ = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(heads):
      kv_h = h // (heads // kv_heads)
      logits = q[b, :, h] @ k[b, :, kv_h].T * sm_scale
      allowed = np.ones((q_len, kv_len), bool)
      if causal:
        allowed &= (np.arange(kv_len)[None, :]
                    <= np.arange(q_len)[:, None] + kv_len - q_len)
      if segment_ids is not None:
        allowed &= segment_ids[0][b][:, None] == segment_ids[1][b][None, :]
      for i in range(q_len):
        if allowed[i].any():
          row = logits[i, allowed[i]]
          weights = np.exp(row - row.max())
          out[b, i, h] = (weights / weights.sum()) @ v[b, allowed[i], kv_h]
  return out


@pytest.mark.parametrize("causal,segments,shape", [
    (True, False, (1, 4, 7, 4, 2, 3)),     # q_len < kv_len, GQA
    (True, True, (2, 7, 3, 3, 1, 4)),      # q_len > kv_len: empty rows, MQA
    (False, True, (1, 6, 6, 2, 1, 5)),
])
def test_reference_is_softmax_attention(fast_jit, causal, segments, shape):
  q, k, v, segment_ids = make_inputs(*shape, segments=segments)
  scale = 0.7
  got = fast_jit(lambda q, k, v, segment_ids: reference_attention(
      q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=scale))(
          q, k, v, segment_ids)
  want = plain_softmax_attention(q, k, v, causal, segment_ids, scale)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


# (batch, q_len, kv_len, heads, kv_heads, head_dim), causal, segments, sm_scale
CASES = [
    ((2, 37, 37, 2, 2, 24), False, False, 0.3),  # MHA, not block multiples
    ((1, 40, 40, 2, 2, 16), True, False, None),  # causal self-attention
    ((1, 37, 53, 4, 2, 32), True, False, None),  # GQA, q_len < kv_len
    # MQA, q_len > kv_len (rows without keys)
    ((1, 50, 21, 2, 1, 16), True, False, None),
    ((2, 3, 40, 3, 1, 8), True, True, None),     # very short queries
    ((2, 1, 2, 2, 2, 72), True, False, None),    # length 1, head_dim -> 128
    ((2, 33, 30, 4, 2, 16), False, True, None),  # segments, GQA, not causal
]


def _value_and_grads(impl, causal, segment_ids, sm_scale=None):
  def loss(q, k, v):
    out = flash_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                          sm_scale=sm_scale, impl=impl, block_sizes=SMALL)
    # A fixed random projection, so every output element gets its own weight.
    weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(
        out.shape)
    return jnp.sum(out.astype(jnp.float32) * weights), out

  return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def _check_against_reference(fast_jit, close, shape, causal, segments, dtype,
                             sm_scale=None):
  q, k, v, segment_ids = make_inputs(*shape, segments=segments, dtype=dtype)

  def both(q, k, v, segment_ids):
    return [_value_and_grads(impl, causal, segment_ids, sm_scale)(q, k, v)
            for impl in ("interpret", "reference")]

  (( _, out), grads), ((_, ref_out), ref_grads) = fast_jit(both)(
      q, k, v, segment_ids)
  fwd_tol, grad_tol = TOL[dtype]
  chex.assert_shape(out, q.shape)
  chex.assert_type([out, *grads], dtype)
  close(out, ref_out, atol=fwd_tol)
  close(grads, ref_grads, atol=grad_tol)  # (dq, dk, dv)


@pytest.mark.parametrize("shape,causal,segments,sm_scale", CASES)
def test_interpret_matches_reference_f32(fast_jit, close, shape, causal,
                                         segments, sm_scale):
  _check_against_reference(fast_jit, close, shape, causal, segments,
                           jnp.float32, sm_scale)


@pytest.mark.parametrize("case,dtype", [(1, jnp.bfloat16),
                                        (3, jnp.bfloat16),
                                        (4, jnp.float16)])
def test_interpret_matches_reference_low_precision(fast_jit, close, case,
                                                   dtype):
  shape, causal, segments, sm_scale = CASES[case]
  _check_against_reference(fast_jit, close, shape, causal, segments, dtype,
                           sm_scale)


def test_fully_masked_rows_are_zero(fast_jit):
  # causal with q_len > kv_len: the first q_len - kv_len queries see nothing.
  q, k, v, _ = make_inputs(1, 20, 5, 2, 2, 16, segments=False)
  out = fast_jit(lambda q, k, v: flash_attention(
      q, k, v, causal=True, impl="interpret", block_sizes=SMALL))(q, k, v)
  np.testing.assert_array_equal(np.asarray(out[:, :15]), 0.0)
  assert np.all(np.abs(np.asarray(out[:, 15:])) > 0)


@pytest.mark.parametrize("causal,segments,shape", [
    (True, False, (1, 5, 9, 4, 2, 8)),     # q_len < kv_len: ends aligned
    (False, True, (2, 9, 9, 2, 1, 8)),
])
def test_xla_baseline_matches_reference(fast_jit, causal, segments, shape):
  q, k, v, segment_ids = make_inputs(*shape, segments=segments)
  if segments:  # the baseline averages empty rows; give every query a key
    segment_ids = (segment_ids[0], segment_ids[0])

  def both(q, k, v, segment_ids):
    return [flash_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                            impl=impl) for impl in ("xla", "reference")]

  got, want = fast_jit(both)(q, k, v, segment_ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5,
                             rtol=1e-5)


def test_auto_on_cpu_is_reference(fast_jit):
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU choice of impl='auto'")
  q, k, v, _ = make_inputs(1, 6, 6, 2, 2, 8, segments=False)
  auto, reference = fast_jit(lambda q, k, v: [
      flash_attention(q, k, v, causal=True, impl=impl)
      for impl in ("auto", "reference")])(q, k, v)
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(reference))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("impl", ["pallas", "cudnn"])
def test_gpu_impls_match_reference(impl):
  q, k, v, _ = make_inputs(2, 256, 256, 4, 2, 64, segments=False,
                           dtype=jnp.bfloat16)
  for causal in (False, True):
    got = flash_attention(q, k, v, causal=causal, impl=impl)
    want = flash_attention(q, k, v, causal=causal, impl="reference")
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(want, np.float32), atol=2e-2)


def test_pallas_without_gpu_raises():
  if jax.default_backend() == "gpu":
    pytest.skip("checks the error off GPU")
  q, k, v, _ = make_inputs(1, 4, 4, 1, 1, 16, segments=False)
  with pytest.raises(ValueError, match="interpret"):
    flash_attention(q, k, v, impl="pallas")


@pytest.mark.parametrize("change,message", [
    (dict(q=jnp.zeros((2, 4, 8))), "rank 4"),
    (dict(k=jnp.zeros((1, 4, 3, 8)), v=jnp.zeros((1, 4, 3, 8))),
     "multiple of kv_heads"),
    (dict(k=jnp.zeros((1, 4, 2, 4)), v=jnp.zeros((1, 4, 2, 4))),
     "head_dim mismatch"),
    (dict(v=jnp.zeros((1, 5, 2, 8))), "same shape"),
    (dict(q=jnp.zeros((1, 4, 4, 8), jnp.int32)), "share a dtype"),
    (dict(segment_ids=(jnp.zeros((1, 3), jnp.int32),
                       jnp.zeros((1, 4), jnp.int32))), r"\[batch, q_len\]"),
    (dict(segment_ids=(jnp.zeros((1, 4)), jnp.zeros((1, 4)))), "integers"),
    (dict(segment_ids=jnp.zeros((1, 4), jnp.int32)), "pair"),
    (dict(impl="triton"), "valid: auto, pallas, interpret, reference, xla"),
])
def test_bad_inputs_raise(change, message):
  args = dict(q=jnp.zeros((1, 4, 4, 8)), k=jnp.zeros((1, 4, 2, 8)),
              v=jnp.zeros((1, 4, 2, 8)), segment_ids=None, impl="reference")
  args.update(change)
  with pytest.raises(ValueError, match=message):
    flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_block_sizes_must_be_powers_of_two():
  with pytest.raises(ValueError, match="power of two"):
    BlockSizes(block_q=24)
