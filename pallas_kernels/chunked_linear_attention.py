"""Causal linear attention with data-dependent decay, in chunks.

The shared form of Gated Linear Attention, Mamba-2's SSD, RetNet and
Lightning Attention, per batch and head, with state S_t in R^{key_dim x
value_dim}:

    S_t = diag(exp(w_t)) S_{t-1} + k_t^T v_t       S_0 = 0
    o_t = scale * q_t S_t

where w_t = log_decay_t is a scalar per head (broadcast over key_dim) or a
vector over key_dim, and w = 0 when log_decay is None (plain causal linear
attention).

The chunked form splits the sequence into chunks of c steps. With the
in-chunk cumulative log decay b_r = w_1 + ... + w_r (r = 1..c) and S the
state entering the chunk:

    o_r   = scale * [ (q_r * exp(b_r)) S
                      + sum_{s <= r} <q_r, k_s * exp(b_r - b_s)> v_s ]
    S_out = exp(b_c)[:, None] * S + sum_s (k_s * exp(b_c - b_s))^T v_s

i.e. a small quadratic (attention-like) product inside each chunk plus
state passing between chunks: length / c sequential steps instead of length.
Every exponent used is a sum of log decays over a forward time interval, so
it is <= 0 whenever the decays are <= 1 (never overflows); the pairwise
exp(b_r - b_s) is formed explicitly (masked to s <= r) rather than factored
into exp(b_r) * exp(-b_s), which would overflow for strong decay.

Implementations: "chunked" is that form in `jnp` (a `lax.scan` over chunks
with a rematerialised step, so its autodiff memory is one chunk's
intermediates plus the chunk states); "reference" is the sequential
recurrence. There is no Pallas kernel for this op yet: "auto" selects
"chunked" on every backend, and gradients come from JAX autodiff of the
chunked form (not a custom_vjp).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "chunked", "reference")


def chunked_linear_attention(q, k, v, log_decay=None, *, chunk_size=64,
                             scale=None, impl="auto"):
  """Causal (decayed) linear attention, see the module docstring.

  Args:
    q, k: [batch, length, heads, key_dim].
    v: [batch, length, heads, value_dim].
    log_decay: None, [batch, length, heads] (one decay per head and step) or
      [batch, length, heads, key_dim]; log of the decay, normally <= 0.
    chunk_size: steps per chunk of the chunked form (length need not be a
      multiple: the tail chunk is zero-padded, which leaves outputs unchanged).
    scale: output scale, default key_dim ** -0.5 (pass 1.0 for SSD/RetNet).
    impl: "auto" (= "chunked"), "chunked" or "reference" (sequential scan).

  Returns:
    [batch, length, heads, value_dim] in q's dtype. Computation is float32.
  """
  _check_inputs(q, k, v, log_decay, chunk_size, impl)
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  if impl == "reference":
    return reference_linear_attention(q, k, v, log_decay, scale=scale)
  return _chunked(q, k, v, log_decay, chunk_size, scale)


def _check_inputs(q, k, v, log_decay, chunk_size, impl):
  if impl not in IMPLS:
    raise ValueError(f"Unknown impl {impl!r}; valid: {', '.join(IMPLS)}.")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if jnp.ndim(x) != 4:
      raise ValueError(f"{name} must have rank 4 [batch, length, heads, dim], "
                       f"got shape {jnp.shape(x)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {x.dtype}.")
  if q.shape != k.shape:
    raise ValueError(f"q and k must have the same shape, got {q.shape} and "
                     f"{k.shape}.")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must be [batch, length, heads, value_dim] with q's "
                     f"{q.shape[:3]}, got {v.shape}.")
  if q.shape[1] < 1:
    raise ValueError("length must be at least 1.")
  if log_decay is not None:
    if jnp.shape(log_decay) not in (q.shape[:3], q.shape):
      raise ValueError(
          f"log_decay must be None, [batch, length, heads] = {q.shape[:3]} or "
          f"[batch, length, heads, key_dim] = {q.shape}, got "
          f"{jnp.shape(log_decay)}.")
    if not jnp.issubdtype(log_decay.dtype, jnp.floating):
      raise ValueError(f"log_decay must be floating point, got "
                       f"{log_decay.dtype}.")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")


def _decay_4d(log_decay, shape):
  """log_decay as float32 [batch, length, heads, key_dim or 1]."""
  if log_decay is None:
    return jnp.zeros(shape[:3] + (1,), jnp.float32)
  log_decay = log_decay.astype(jnp.float32)
  return log_decay[..., None] if log_decay.ndim == 3 else log_decay


def reference_linear_attention(q, k, v, log_decay=None, *, scale=None):
  """The recurrence, one step at a time with `jax.lax.scan` (float32)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  f32 = jnp.float32
  w = _decay_4d(log_decay, q.shape)
  hi = jax.lax.Precision.HIGHEST

  def step(state, inputs):  # state [batch, heads, key_dim, value_dim]
    q_t, k_t, v_t, w_t = inputs
    state = (jnp.exp(w_t)[..., None] * state
             + k_t[..., :, None] * v_t[..., None, :])
    return state, jnp.einsum("bhk,bhkv->bhv", q_t, state, precision=hi)

  batch, _, heads, key_dim = q.shape
  state0 = jnp.zeros((batch, heads, key_dim, v.shape[-1]), f32)
  time_major = [jnp.moveaxis(x.astype(f32), 1, 0) for x in (q, k, v, w)]
  _, out = jax.lax.scan(step, state0, time_major)
  return (scale * jnp.moveaxis(out, 0, 1)).astype(q.dtype)


def _chunked(q, k, v, log_decay, chunk_size, scale):
  f32 = jnp.float32
  batch, length, heads, _ = q.shape
  chunk = min(chunk_size, length)
  num_chunks = -(-length // chunk)
  padded = num_chunks * chunk
  w = _decay_4d(log_decay, q.shape)

  def to_chunks(x):
    # [b, l, h, d] -> [num_chunks, b, h, chunk, d]; zero padding at the end
    # comes after every real step, so it cannot change a real output.
    x = jnp.pad(x.astype(f32), [(0, 0), (0, padded - length), (0, 0), (0, 0)])
    x = x.reshape(batch, num_chunks, chunk, heads, x.shape[-1])
    return jnp.transpose(x, (1, 0, 3, 2, 4))

  hi = jax.lax.Precision.HIGHEST
  causal = jnp.tril(jnp.ones((chunk, chunk), bool))

  @jax.checkpoint
  def chunk_step(state, inputs):
    q_c, k_c, v_c, w_c = inputs         # [b, h, c, d]; w_c's d may be 1
    b = jnp.cumsum(w_c, axis=2)         # b_r, inclusive
    b_last = b[:, :, -1:, :]            # b_c
    # exp(b_r - b_s) for s <= r; -inf above the diagonal gives exactly 0.
    pair = b[:, :, :, None, :] - b[:, :, None, :, :]   # [b, h, r, s, d]
    pair = jnp.where(causal[:, :, None], pair, -jnp.inf)
    if w_c.shape[-1] == 1:
      scores = jnp.einsum("bhrd,bhsd->bhrs", q_c, k_c, precision=hi) * (
          jnp.exp(pair[..., 0]))
    else:
      scores = jnp.einsum("bhrd,bhsd,bhrsd->bhrs", q_c, k_c, jnp.exp(pair),
                          precision=hi)
    out = (jnp.einsum("bhrs,bhsv->bhrv", scores, v_c, precision=hi)
           + jnp.einsum("bhrd,bhdv->bhrv", q_c * jnp.exp(b), state,
                        precision=hi))
    state = (jnp.exp(b_last[:, :, 0, :])[..., None] * state
             + jnp.einsum("bhsd,bhsv->bhdv", k_c * jnp.exp(b_last - b), v_c,
                          precision=hi))
    return state, out

  state0 = jnp.zeros((batch, heads, q.shape[-1], v.shape[-1]), f32)
  _, out = jax.lax.scan(chunk_step, state0,
                        [to_chunks(x) for x in (q, k, v, w)])
  # [num_chunks, b, h, chunk, dv] -> [b, length, h, dv]
  out = jnp.transpose(out, (1, 0, 3, 2, 4)).reshape(batch, padded, heads, -1)
  return (scale * out[:, :length]).astype(q.dtype)
