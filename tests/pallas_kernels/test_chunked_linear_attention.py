"""chunked_linear_attention: the Pallas kernel (interpret mode) and the jnp
chunked form against the sequential reference.

Tolerances, relative to the largest magnitude of the reference array:
float32 outputs 1e-5, gradients 1e-4; bfloat16 inputs outputs 2e-2,
gradients 5e-2.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import chunked_linear_attention
from pallas_kernels.chunked_linear_attention import (
    linear_attention_state, linear_attention_step, reference_linear_attention)

TOL = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (2e-2, 5e-2)}


def make_inputs(batch, length, heads, key_dim, value_dim, decay,
                dtype=jnp.float32, seed=0):
  # numpy's generator: eager jax.random compiles per shape, seconds each.
  rng = np.random.default_rng(seed)

  def normal(*shape):
    return rng.standard_normal(shape, np.float32)

  q = jnp.asarray(normal(batch, length, heads, key_dim), dtype)
  k = jnp.asarray(normal(batch, length, heads, key_dim), dtype)
  v = jnp.asarray(normal(batch, length, heads, value_dim), dtype)
  log_decay = None
  if decay is not None:
    shape = (batch, length, heads) + ((key_dim,) if decay == "key" else ())
    # log sigmoid(x + 2): decays mostly near 1, some strong.
    log_decay = jnp.asarray(-np.log1p(np.exp(-(normal(*shape) + 2.0))))
  return q, k, v, log_decay


@pytest.mark.parametrize("decay", ["head", "key"])
def test_reference_is_the_recurrence(fast_jit, decay):
  q, k, v, log_decay = make_inputs(2, 7, 2, 3, 4, decay)
  got = fast_jit(lambda q, k, v, w: reference_linear_attention(
      q, k, v, w, scale=0.5))(q, k, v, log_decay)
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  w = (np.zeros(q.shape[:3]) if log_decay is None
       else np.asarray(log_decay, np.float64))
  if w.ndim == 3:
    w = np.broadcast_to(w[..., None], q.shape)
  state = np.zeros((2, 2, 3, 4))
  want = np.zeros(v.shape)
  for t in range(7):
    state = (np.exp(w[:, t])[..., None] * state
             + k[:, t, :, :, None] * v[:, t, :, None, :])
    want[:, t] = 0.5 * np.einsum("bhk,bhkv->bhv", q[:, t], state)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# (batch, length, heads, key_dim, value_dim), decay, chunk_size
CASES = [
    ((2, 37, 3, 8, 5), None, 16),      # length not a chunk multiple
    ((1, 40, 2, 4, 20), "head", 16),   # scalar decay, two value blocks
    ((2, 29, 2, 8, 4), "key", 16),     # decay per key dimension
    ((1, 1, 2, 4, 4), "key", 64),      # length 1, chunk longer than it
]


def _check(fast_jit, close, case, dtype, impl):
  shape, decay, chunk_size = case
  q, k, v, log_decay = make_inputs(*shape, decay, dtype=dtype)

  def value_and_grads(impl):
    def loss(q, k, v, w):
      out = chunked_linear_attention(q, k, v, w, chunk_size=chunk_size,
                                     impl=impl, block_v=16)
      weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(
          out.shape)
      return jnp.sum(out.astype(jnp.float32) * weights), out
    argnums = (0, 1, 2) if decay is None else (0, 1, 2, 3)
    return jax.value_and_grad(loss, argnums=argnums, has_aux=True)

  def both(q, k, v, w):
    return [value_and_grads(impl)(q, k, v, w)
            for impl in (impl, "reference")]

  ((_, out), grads), ((_, ref_out), ref_grads) = fast_jit(both)(
      q, k, v, log_decay)
  out_tol, grad_tol = TOL[dtype]
  chex.assert_shape(out, v.shape)
  chex.assert_type(out, dtype)
  close(out, ref_out, atol=out_tol)
  close(grads, ref_grads, atol=grad_tol)  # (dq, dk, dv[, dlog_decay])


@pytest.mark.parametrize("impl", ["interpret", "chunked"])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_f32(fast_jit, close, case, impl):
  _check(fast_jit, close, case, jnp.float32, impl)


@pytest.mark.parametrize("impl", ["interpret", "chunked"])
def test_matches_reference_bf16(fast_jit, close, impl):
  _check(fast_jit, close, CASES[2], jnp.bfloat16, impl)


@pytest.mark.parametrize("impl", ["interpret", "chunked"])
def test_strong_decay_stays_finite(fast_jit, impl):
  # Cumulative decay far beyond float32's exp range within one chunk.
  q, k, v, _ = make_inputs(1, 64, 1, 4, 4, None)
  log_decay = jnp.asarray(np.full((1, 64, 1, 4), -30.0, np.float32))
  out = fast_jit(lambda q, k, v, w: chunked_linear_attention(
      q, k, v, w, chunk_size=64, impl=impl))(q, k, v, log_decay)
  # With decay exp(-30) the state is (almost exactly) the last k^T v.
  q, k, v = (np.asarray(x) for x in (q, k, v))
  want = 0.5 * np.einsum("blhk,blhk,blhv->blhv", q, k, v)
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("decay", [None, "head", "key"])
def test_gpu_kernel_matches_reference(close, decay):
  q, k, v, log_decay = make_inputs(2, 300, 4, 64, 64, decay)

  def value_and_grads(impl):
    def loss(q, k, v, w):
      out = chunked_linear_attention(q, k, v, w, impl=impl)
      return jnp.sum(jnp.sin(out)), out
    argnums = (0, 1, 2) if decay is None else (0, 1, 2, 3)
    return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(
        q, k, v, log_decay)

  ((_, out), grads), ((_, ref_out), ref_grads) = (
      value_and_grads("pallas"), value_and_grads("reference"))
  close(out, ref_out, atol=1e-4)
  close(grads, ref_grads, atol=1e-3)


@pytest.mark.parametrize("change,message", [
    (dict(q=jnp.zeros((1, 4, 2))), "rank 4"),
    (dict(k=jnp.zeros((1, 4, 2, 3))), "same shape"),
    (dict(v=jnp.zeros((1, 5, 2, 4))), "v must be"),
    (dict(log_decay=jnp.zeros((1, 4))), "log_decay must be"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(impl="triton"), "valid: auto, pallas, interpret, chunked, "),
    (dict(impl="interpret", block_v=24), "power of two"),
])
def test_bad_inputs_raise(change, message):
  args = dict(q=jnp.zeros((1, 4, 2, 4)), k=jnp.zeros((1, 4, 2, 4)),
              v=jnp.zeros((1, 4, 2, 4)), log_decay=None, impl="reference")
  args.update(change)
  with pytest.raises(ValueError, match=message):
    chunked_linear_attention(args.pop("q"), args.pop("k"), args.pop("v"),
                             args.pop("log_decay"), **args)


# ---------------------------------------------- decoding: state and step --


@pytest.mark.parametrize("decay", [None, "head", "key"])
def test_state_and_steps_continue_the_reference(fast_jit, close, decay):
  """linear_attention_state of a prefix, then linear_attention_step per
  token, gives the reference's outputs; the final state is the state of the
  whole sequence and the recurrence's, written out in numpy."""
  batch, length, heads, key_dim, value_dim, prefix = 2, 11, 2, 3, 4, 4
  q, k, v, log_decay = make_inputs(batch, length, heads, key_dim, value_dim,
                                   decay)

  def run(q, k, v, w):
    ref = reference_linear_attention(q, k, v, w, scale=0.5)
    upto = lambda x: None if x is None else x[:, :prefix]
    state = linear_attention_state(k[:, :prefix], v[:, :prefix], upto(w))
    outs = []
    for t in range(prefix, length):
      out, state = linear_attention_step(
          state, q[:, t], k[:, t], v[:, t], None if w is None else w[:, t],
          scale=0.5)
      outs.append(out)
    return ref, jnp.stack(outs, axis=1), state, linear_attention_state(k, v, w)

  ref, stepped, state, whole = fast_jit(run)(q, k, v, log_decay)
  chex.assert_type([stepped, state], [jnp.float32, jnp.float32])
  close(stepped, ref[:, prefix:], atol=1e-5)
  close(state, whole, atol=1e-5)
  k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
  w = (np.zeros(k.shape[:3]) if log_decay is None
       else np.asarray(log_decay, np.float64))
  if w.ndim == 3:
    w = np.broadcast_to(w[..., None], k.shape)
  want = np.zeros((batch, heads, key_dim, value_dim))
  for t in range(length):
    want = (np.exp(w[:, t])[..., None] * want
            + k[:, t, :, :, None] * v[:, t, :, None, :])
  close(whole, want, atol=1e-5)


def test_state_with_strong_decay_stays_finite(fast_jit):
  # Cumulative decay far beyond float32's exp range: S_T is the last k^T v.
  _, k, v, _ = make_inputs(1, 64, 1, 4, 4, None)
  log_decay = jnp.asarray(np.full((1, 64, 1, 4), -30.0, np.float32))
  state = fast_jit(linear_attention_state)(k, v, log_decay)
  want = np.einsum("bhk,bhv->bhkv", np.asarray(k)[:, -1], np.asarray(v)[:, -1])
  np.testing.assert_allclose(np.asarray(state), want, atol=1e-6)
