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

Implementations: "pallas" (Triton on GPU) and "interpret" run a Pallas
kernel of the chunked form; "chunked" is that form in `jnp` (a `lax.scan`
over chunks with a rematerialised step, so its autodiff memory is one
chunk's intermediates plus the chunk states); "reference" is the sequential
recurrence. "auto" picks "pallas" on GPU and "chunked" elsewhere.

For decoding, `linear_attention_state` gives the state S_T after a prompt
(one parallel sum) and `linear_attention_step` advances the recurrence one
step from it (both pure jnp, float32).

The Pallas kernel runs a grid over (batch, head, value block): the state's
value columns evolve independently, so each program owns S[:, block] in
float32 registers and walks the chunks, writing the state entering each
chunk to a buffer the backward pass reads. Its `custom_vjp` backward is one
Pallas kernel walking the chunks in reverse with dS = dL/dS (the gradient
leaving the chunk):

    P_rs    = <do_r, v_s> (s <= r),  E_rs = exp(b_r - b_s),  do = scale * d out
    dq_r    = sum_s P_rs E_rs k_s + (do_r S_in^T) exp(b_r)
    dk_s    = sum_r P_rs E_rs q_r + exp(b_c - b_s) (dS v_s)
    dv_s    = sum_r <q_r, E_rs k_s> do_r + (k_s exp(b_c - b_s)) dS
    dS_in   = exp(b_c) dS + sum_r (q_r exp(b_r))^T do_r

(dq and dk are per value block and summed in XLA.) The decay gradient needs
no kernel: with B_t the cumulative log decay from the sequence start, the
loss depends on it only through q_t exp(B_t) and k_t exp(-B_t), so
dL/dB_t = q_t dq_t - k_t dk_t and d log_decay_t = sum_{t' >= t} dL/dB_t'
(summed over key_dim for a per-head decay). For a per-key decay the kernel
forms the [chunk, chunk, key_dim] pairwise decays in registers and uses
chunks of 16 whatever chunk_size says (the result does not depend on it).
The Triton path lowers to Triton IR (checked on CPU through
`jax.export(platforms=["cuda"])`); it is not yet compiled or run on GPU
hardware: the tests check the lowering only.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels.compat import pl

IMPLS = ("auto", "pallas", "interpret", "chunked", "reference")


def chunked_linear_attention(q, k, v, log_decay=None, *, chunk_size=64,
                             scale=None, impl="auto", block_v=64):
  """Causal (decayed) linear attention, see the module docstring.

  Args:
    q, k: [batch, length, heads, key_dim].
    v: [batch, length, heads, value_dim].
    log_decay: None, [batch, length, heads] (one decay per head and step) or
      [batch, length, heads, key_dim]; log of the decay, normally <= 0.
    chunk_size: steps per chunk of the chunked form (length need not be a
      multiple: the tail chunk is zero-padded, which leaves outputs unchanged).
    scale: output scale, default key_dim ** -0.5 (pass 1.0 for SSD/RetNet).
    impl: "auto" ("pallas" on GPU, "chunked" elsewhere), "pallas",
      "interpret" (the Pallas kernel in interpret mode), "chunked" (jnp) or
      "reference" (sequential scan).
    block_v: value columns per Pallas program (a power of two >= 16).

  Returns:
    [batch, length, heads, value_dim] in q's dtype. Computation is float32.
  """
  _check_inputs(q, k, v, log_decay, chunk_size, impl)
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  if impl == "auto":
    impl = "pallas" if compat.default_backend() == "gpu" else "chunked"
  if impl == "reference":
    return reference_linear_attention(q, k, v, log_decay, scale=scale)
  if impl == "chunked":
    return _chunked(q, k, v, log_decay, chunk_size, scale)
  if block_v < _MIN_BLOCK or block_v & (block_v - 1):
    raise ValueError(f"block_v={block_v} must be a power of two >= "
                     f"{_MIN_BLOCK}.")
  return _pallas_linear_attention(q, k, v, log_decay, chunk_size, scale,
                                  block_v, interpret=impl == "interpret")


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


def linear_attention_state(k, v, log_decay=None):
  """The state after the last step, S_T, as one parallel sum (float32).

  S_T = sum_s (k_s * exp(B_T - B_s))^T v_s, with B the cumulative log decay.
  B_T - B_s is summed directly over the steps after s (a reverse cumulative
  sum of w, never a difference of two large cumulative sums), so every
  exponent is <= 0 for decays <= 1: it never overflows and keeps its
  precision for long sequences.

  Args:
    k: [batch, length, heads, key_dim].
    v: [batch, length, heads, value_dim].
    log_decay: None, [batch, length, heads] or [batch, length, heads,
      key_dim], as for `chunked_linear_attention`.

  Returns:
    [batch, heads, key_dim, value_dim] float32, the state that
    `linear_attention_step` continues from.
  """
  f32 = jnp.float32
  k, v = k.astype(f32), v.astype(f32)
  if log_decay is not None:
    w = _decay_4d(log_decay, k.shape)                 # [b, l, h, d or 1]
    # sum_{r > s} w_r: the inclusive reverse cumsum shifted by one step.
    after = jnp.pad(jax.lax.cumsum(w, axis=1, reverse=True)[:, 1:],
                    [(0, 0), (0, 1), (0, 0), (0, 0)])
    k = k * jnp.exp(after)
  return jnp.einsum("blhk,blhv->bhkv", k, v,
                    precision=jax.lax.Precision.HIGHEST)


def linear_attention_step(state, q, k, v, log_decay=None, *, scale):
  """One step of the recurrence: S_t = diag(exp(w_t)) S_{t-1} + k_t^T v_t,
  o_t = scale q_t S_t.

  Args:
    state: [batch, heads, key_dim, value_dim], S_{t-1} (zeros before the
      first step).
    q, k: [batch, heads, key_dim].
    v: [batch, heads, value_dim].
    log_decay: None, [batch, heads] or [batch, heads, key_dim]: w_t.
    scale: output scale (`chunked_linear_attention`'s default is
      key_dim ** -0.5).

  Returns:
    (o_t [batch, heads, value_dim] in q's dtype, S_t float32).
  """
  f32 = jnp.float32
  state = state.astype(f32)
  if log_decay is not None:
    w = log_decay.astype(f32)
    w = w[..., None] if w.ndim == 2 else w           # [b, h, key_dim or 1]
    state = jnp.exp(w)[..., None] * state
  state = state + (k.astype(f32)[..., :, None] * v.astype(f32)[..., None, :])
  out = jnp.einsum("bhk,bhkv->bhv", q.astype(f32), state,
                   precision=jax.lax.Precision.HIGHEST)
  return (scale * out).astype(q.dtype), state


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


# ------------------------------------------------------------------ Pallas --

_MIN_BLOCK = 16  # Triton's dots need every dimension >= 16.
_PER_KEY_CHUNK = 16  # [chunk, chunk, key_dim] pairwise decays in registers


@dataclasses.dataclass(frozen=True)
class _Config:
  chunk: int
  scale: float
  decay: str          # "none", "head" (scalar per head) or "key"
  interpret: bool


def _pad_to(x, axis, size):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _pallas_linear_attention(q, k, v, log_decay, chunk_size, scale, block_v,
                             interpret):
  batch, length, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  if log_decay is None:
    decay = "none"
  else:
    decay = "head" if log_decay.ndim == 3 else "key"
  # Tiles must be powers of two >= 16; the chunk size changes no result.
  chunk = (_PER_KEY_CHUNK if decay == "key" else max(
      _MIN_BLOCK, min(pl.next_power_of_2(chunk_size),
                      pl.next_power_of_2(length))))
  length_pad = pl.cdiv(length, chunk) * chunk
  key_pad = max(_MIN_BLOCK, pl.next_power_of_2(key_dim))
  block_v = min(block_v, max(_MIN_BLOCK, pl.next_power_of_2(value_dim)))
  value_pad = pl.cdiv(value_dim, block_v) * block_v
  config = _Config(chunk=chunk, scale=scale, decay=decay, interpret=interpret)
  # Zero padding: padded steps come after every real one, padded key dims
  # have q = k = 0, padded value columns are sliced off.
  q_p = _pad_to(_pad_to(q, 1, length_pad), 3, key_pad)
  k_p = _pad_to(_pad_to(k, 1, length_pad), 3, key_pad)
  v_p = _pad_to(_pad_to(v, 1, length_pad), 3, value_pad)
  w_p = None
  if log_decay is not None:
    w_p = _pad_to(log_decay.astype(jnp.float32), 1, length_pad)
    if decay == "key":
      w_p = _pad_to(w_p, 3, key_pad)
  out = _linear_attention(q_p, k_p, v_p, w_p, block_v, config)
  return out[:, :length, :, :value_dim]


def _compiler_params(config: _Config):
  if config.interpret:
    return None
  return compat.triton_compiler_params(num_warps=4, num_stages=2)


def _dot(a, b, contract_a: int, contract_b: int):
  """2-D dot contracting a's `contract_a` with b's `contract_b`, f32 result."""
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


class _ChunkDecay:
  """The decays of one chunk: b_r (inclusive cumsum of w), b_c = sum w."""

  def __init__(self, w_ref, rows, config: _Config):
    c = config.chunk
    self.kind = config.decay
    self.causal = (jnp.arange(c)[:, None] >= jnp.arange(c)[None, :])
    if self.kind == "none":
      return
    w = w_ref[rows, :] if self.kind == "key" else w_ref[rows]
    b = jax.lax.cumsum(w, axis=0)           # [c, key] or [c]
    b_last = jnp.sum(w, axis=0)             # [key] or scalar
    if self.kind == "head":
      b, b_last = b[:, None], jnp.reshape(b_last, (1,))
    self.b = b                              # [c, key or 1]
    self.b_last = b_last                    # [key or 1]

  def pairwise(self):
    """exp(b_r - b_s) for s <= r, else 0: [c, c] or [c, c, key]."""
    if self.kind == "none":
      return self.causal.astype(jnp.float32)
    if self.kind == "head":
      diff = self.b[:, 0][:, None] - self.b[:, 0][None, :]
      return jnp.exp(jnp.where(self.causal, diff, -jnp.inf))
    diff = self.b[:, None, :] - self.b[None, :, :]
    return jnp.exp(jnp.where(self.causal[:, :, None], diff, -jnp.inf))

  def to_chunk_start(self, x):
    """x_r * exp(b_r): rows seen from the state entering the chunk."""
    return x if self.kind == "none" else x * jnp.exp(self.b)

  def to_chunk_end(self, x):
    """x_s * exp(b_c - b_s): rows carried to the state leaving the chunk."""
    return x if self.kind == "none" else x * jnp.exp(self.b_last[None, :]
                                                     - self.b)

  def decay_state(self, state):
    """exp(b_c) S (rows of S are key dims)."""
    return state if self.kind == "none" else jnp.exp(self.b_last)[:, None] * (
        state)

  def scores(self, q, k, pairwise):
    """A_rs = sum_d q_rd k_sd exp(b_rd - b_sd), s <= r: [c, c]."""
    if self.kind == "key":
      return jnp.sum(q[:, None, :] * k[None, :, :] * pairwise, axis=2)
    return _dot(q, k, 1, 1) * pairwise


def _forward_kernel(*refs, config: _Config):
  if config.decay == "none":
    q_ref, k_ref, v_ref, o_ref, states_ref = refs
    w_ref = None
  else:
    q_ref, k_ref, v_ref, w_ref, o_ref, states_ref = refs
  c = config.chunk
  f32 = jnp.float32

  def chunk_body(chunk_index, state):   # state: [key, block_v] float32
    states_ref[chunk_index] = state     # S entering the chunk
    rows = pl.ds(chunk_index * c, c)
    q = q_ref[rows, :].astype(f32)
    k = k_ref[rows, :].astype(f32)
    v = v_ref[rows, :].astype(f32)
    decay = _ChunkDecay(w_ref, rows, config)
    scores = decay.scores(q, k, decay.pairwise())
    out = _dot(scores, v, 1, 0) + _dot(decay.to_chunk_start(q), state, 1, 0)
    o_ref[rows, :] = (config.scale * out).astype(o_ref.dtype)
    return decay.decay_state(state) + _dot(decay.to_chunk_end(k), v, 0, 0)

  num_chunks = states_ref.shape[0]
  jax.lax.fori_loop(0, num_chunks, chunk_body,
                    jnp.zeros((q_ref.shape[-1], v_ref.shape[-1]), f32))


def _specs(length_pad, key_pad, block_v, num_chunks, decay):
  sq = compat.SQUEEZED
  specs = dict(
      qk=pl.BlockSpec((sq, length_pad, sq, key_pad),
                      lambda b, h, j: (b, 0, h, 0)),
      v=pl.BlockSpec((sq, length_pad, sq, block_v),
                     lambda b, h, j: (b, 0, h, j)),
      states=pl.BlockSpec((sq, sq, num_chunks, key_pad, block_v),
                          lambda b, h, j: (b, h, 0, 0, j)),
      # Per value block partial sums of dq and dk.
      partial=pl.BlockSpec((sq, sq, length_pad, sq, key_pad),
                           lambda b, h, j: (j, b, 0, h, 0)),
  )
  if decay == "head":
    specs["w"] = [pl.BlockSpec((sq, length_pad, sq), lambda b, h, j: (b, 0, h))]
  elif decay == "key":
    specs["w"] = [specs["qk"]]
  else:
    specs["w"] = []
  return specs


def _forward_call(q, k, v, w, block_v, config: _Config):
  batch, length_pad, heads, key_pad = q.shape
  value_pad = v.shape[-1]
  num_chunks = length_pad // config.chunk
  specs = _specs(length_pad, key_pad, block_v, num_chunks, config.decay)
  return pl.pallas_call(
      functools.partial(_forward_kernel, config=config),
      grid=(batch, heads, value_pad // block_v),
      in_specs=[specs["qk"], specs["qk"], specs["v"]] + specs["w"],
      out_specs=[specs["v"], specs["states"]],
      out_shape=[
          jax.ShapeDtypeStruct(v.shape, q.dtype),
          jax.ShapeDtypeStruct((batch, heads, num_chunks, key_pad, value_pad),
                               jnp.float32),
      ],
      compiler_params=_compiler_params(config),
      interpret=config.interpret,
      name="chunked_linear_attention_fwd",
  )(q, k, v, *([] if w is None else [w]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _linear_attention(q, k, v, w, block_v, config):
  return _forward_call(q, k, v, w, block_v, config)[0]


def _linear_attention_fwd(q, k, v, w, block_v, config):
  out, states = _forward_call(q, k, v, w, block_v, config)
  return out, (q, k, v, w, states)


def _backward_kernel(*refs, config: _Config):
  if config.decay == "none":
    q_ref, k_ref, v_ref, states_ref, do_ref, dq_ref, dk_ref, dv_ref = refs
    w_ref = None
  else:
    (q_ref, k_ref, v_ref, w_ref, states_ref, do_ref, dq_ref, dk_ref,
     dv_ref) = refs
  c = config.chunk
  f32 = jnp.float32
  num_chunks = states_ref.shape[0]

  def chunk_body(reverse_index, d_state):   # dL/dS leaving the chunk
    chunk_index = num_chunks - 1 - reverse_index
    rows = pl.ds(chunk_index * c, c)
    q = q_ref[rows, :].astype(f32)
    k = k_ref[rows, :].astype(f32)
    v = v_ref[rows, :].astype(f32)
    d_out = config.scale * do_ref[rows, :].astype(f32)
    state = states_ref[chunk_index]
    decay = _ChunkDecay(w_ref, rows, config)
    pairwise = decay.pairwise()
    p = _dot(d_out, v, 1, 1)                      # P_rs = <do_r, v_s>
    if config.decay == "key":
      p = p[:, :, None] * pairwise
      dq = jnp.sum(p * k[None, :, :], axis=1)
      dk = jnp.sum(p * q[:, None, :], axis=0)
    else:
      p = p * pairwise
      dq = _dot(p, k, 1, 0)
      dk = _dot(p, q, 0, 0)
    dq = dq + decay.to_chunk_start(_dot(d_out, state, 1, 1))
    dk = dk + decay.to_chunk_end(_dot(v, d_state, 1, 1))
    dv = (_dot(decay.scores(q, k, pairwise), d_out, 0, 0)
          + _dot(decay.to_chunk_end(k), d_state, 1, 0))
    dq_ref[rows, :] = dq
    dk_ref[rows, :] = dk
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    return (decay.decay_state(d_state)
            + _dot(decay.to_chunk_start(q), d_out, 0, 0))

  jax.lax.fori_loop(0, num_chunks, chunk_body,
                    jnp.zeros((q_ref.shape[-1], v_ref.shape[-1]), f32))


def _linear_attention_bwd(block_v, config: _Config, residuals, d_out):
  q, k, v, w, states = residuals
  batch, length_pad, heads, key_pad = q.shape
  value_pad = v.shape[-1]
  num_blocks = value_pad // block_v
  num_chunks = states.shape[2]
  specs = _specs(length_pad, key_pad, block_v, num_chunks, config.decay)
  partial = jax.ShapeDtypeStruct((num_blocks,) + q.shape, jnp.float32)
  dq, dk, dv = pl.pallas_call(
      functools.partial(_backward_kernel, config=config),
      grid=(batch, heads, num_blocks),
      in_specs=([specs["qk"], specs["qk"], specs["v"]] + specs["w"]
                + [specs["states"], specs["v"]]),
      out_specs=[specs["partial"], specs["partial"], specs["v"]],
      out_shape=[partial, partial, jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(config),
      interpret=config.interpret,
      name="chunked_linear_attention_bwd",
  )(q, k, v, *([] if w is None else [w]), states, d_out)
  dq, dk = dq.sum(0), dk.sum(0)
  dw = None
  if w is not None:
    # dL/dB_t = q_t dq_t - k_t dk_t; d w_t = sum over t' >= t (see docstring).
    d_cumulative = q.astype(jnp.float32) * dq - k.astype(jnp.float32) * dk
    if config.decay == "head":
      d_cumulative = jnp.sum(d_cumulative, axis=-1)
    dw = jax.lax.cumsum(d_cumulative, axis=1, reverse=True)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv, dw


_linear_attention.defvjp(_linear_attention_fwd, _linear_attention_bwd)
