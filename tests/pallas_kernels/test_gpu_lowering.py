"""The GPU path lowers: Pallas -> Triton IR for CUDA, checked from a CPU host.

`jax.export` with platforms=["cuda"] runs the Pallas Triton lowering (every
kernel becomes a `__gpu$xla.gpu.triton` custom call carrying Triton IR)
without a GPU. It catches what the Triton rules refuse (non-power-of-two
tensors, unsupported primitives, dot shapes); it does not compile to PTX or
run, so numerics and speed on a GPU still need a GPU (see README.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels import (chunked_linear_attention, flash_attention,
                            selective_scan)
from pallas_kernels.block_sparse_attention import (BlockList,
                                                   block_sparse_attention)
from pallas_kernels.decode_attention import decode_attention

_TRITON_CALL = "__gpu$xla.gpu.triton"


def lower_for_cuda(fn, *args) -> str:
  exported = export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(_TRITON_CALL)],
  )(*args)
  return exported.mlir_module()


@pytest.mark.parametrize("heads,kv_heads,head_dim,causal,segments,dtype", [
    (4, 4, 64, False, False, jnp.bfloat16),
    (6, 2, 72, True, True, jnp.bfloat16),     # GQA group 3, head_dim padded
    (4, 1, 128, True, False, jnp.float16),    # MQA
    (2, 2, 32, False, True, jnp.float32),
])
def test_attention_forward_and_backward_lower(heads, kv_heads, head_dim,
                                              causal, segments, dtype):
  q = jnp.zeros((2, 100, heads, head_dim), dtype)
  kv = jnp.zeros((2, 130, kv_heads, head_dim), dtype)
  segment_ids = ((jnp.zeros((2, 100), jnp.int32),
                  jnp.zeros((2, 130), jnp.int32)) if segments else None)

  def loss(q, k, v):
    out = flash_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                          impl="pallas")
    return jnp.sum(out.astype(jnp.float32))

  module = lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)
  # forward (residuals for the backward), dq, dk/dv
  assert module.count(_TRITON_CALL) == 3


@pytest.mark.parametrize("groups,state,with_z,dtype", [
    (None, 16, False, jnp.bfloat16),
    (2, 5, True, jnp.float32),                # state padded to 8
])
def test_selective_scan_forward_and_backward_lower(groups, state, with_z,
                                                   dtype):
  batch, length, channels = 2, 50, 24
  u = jnp.zeros((batch, length, channels), dtype)
  A = jnp.zeros((channels, state))
  bc = jnp.zeros((batch, length, state) if groups is None
                 else (batch, length, groups, state), dtype)
  D = jnp.zeros((channels,))

  def loss(u, delta, A, B, C):
    y, last = selective_scan(u, delta, A, B, C, D=D, z=u if with_z else None,
                             delta_bias=D, delta_softplus=True,
                             return_last_state=True, impl="pallas")
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(last)

  module = lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), u, u, A,
                          bc, bc)
  assert module.count(_TRITON_CALL) == 2   # forward, backward


@pytest.mark.parametrize("decay", [None, "head", "key"])
def test_linear_attention_forward_and_backward_lower(decay):
  q = jnp.zeros((2, 100, 3, 64), jnp.bfloat16)
  v = jnp.zeros((2, 100, 3, 96), jnp.bfloat16)
  log_decay = None if decay is None else jnp.zeros(
      (2, 100, 3) if decay == "head" else (2, 100, 3, 64))

  def loss(q, k, v, log_decay):
    out = chunked_linear_attention(q, k, v, log_decay, impl="pallas")
    return jnp.sum(out.astype(jnp.float32))

  argnums = (0, 1, 2) if decay is None else (0, 1, 2, 3)
  module = lower_for_cuda(jax.grad(loss, argnums=argnums), q, q, v,
                          log_decay)
  assert module.count(_TRITON_CALL) == 2   # forward, backward


@pytest.mark.parametrize("heads,kv_heads,head_dim,causal,dtype", [
    (6, 2, 72, True, jnp.bfloat16),   # GQA, head_dim padded, list width 3 -> 4
    (4, 4, 64, False, jnp.float32),
])
def test_block_sparse_attention_lowers(heads, kv_heads, head_dim, causal,
                                       dtype):
  q = jnp.zeros((2, 100, heads, head_dim), dtype)
  kv = jnp.zeros((2, 130, kv_heads, head_dim), dtype)
  mask = jnp.asarray([[[True, False, True], [True, True, True],
                       [False, True, False], [True, False, False]]])[None]
  blocks = BlockList.from_block_mask(mask, 32, 64)

  def loss(q, k, v):
    out = block_sparse_attention(q, k, v, blocks, causal=causal, impl="pallas")
    return jnp.sum(out.astype(jnp.float32))

  # The value keeps the forward kernel (the gradient alone recomputes through
  # the xla path and would let the kernel be dropped).
  module = lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, kv,
                          kv)
  assert module.count(_TRITON_CALL) == 1


@pytest.mark.parametrize("heads,kv_heads,head_dim,q_len,dtype", [
    (6, 2, 72, 3, jnp.bfloat16),   # GQA, head_dim padded, 9 query rows -> 16
    (4, 4, 64, 1, jnp.float32),
])
def test_decode_attention_lowers(heads, kv_heads, head_dim, q_len, dtype):
  q = jnp.zeros((2, q_len, heads, head_dim), dtype)
  kv = jnp.zeros((2, 100, kv_heads, head_dim), dtype)
  lengths = jnp.asarray([5, 100], jnp.int32)
  module = lower_for_cuda(lambda q, k, v, lengths: decode_attention(
      q, k, v, lengths, num_splits=8, impl="pallas"), q, kv, kv, lengths)
  assert module.count(_TRITON_CALL) == 1   # forward only
