"""Mamba's selective scan (S6), fused: one pass over the sequence per channel.

For batch b, channel d (in group g = d // (channels / groups)) and state n:

    dt_t    = delta_t + delta_bias               (softplus(.) if delta_softplus)
    h_t     = exp(dt_t A[d]) * h_{t-1} + dt_t u_t B_t[g]     h_0 = 0, h_t in R^N
    y_t     = <C_t[g], h_t> + D[d] u_t
    out_t   = y_t * silu(z_t)                    (when z is given)

The Pallas kernel runs a grid over (batch, group, channel block); each program
walks the sequence with the state block [block_d, N] in float32 registers, so
the inputs are read once and the [length, N] states never reach memory (the
unfused reference materialises all of them). Every `chunk` steps it writes
the state to a small checkpoint buffer.

The backward kernel walks time in reverse with the adjoint g_t = dL/dh_t:

    g_t      = dy_t C_t + exp(dt_{t+1} A) g_{t+1}         (g_L = d last_state)
    du_t     = D dy_t + dt_t <g_t, B_t>
    d dt_t   = <g_t, A exp(dt_t A) h_{t-1} + u_t B_t>
    dA      += g_t exp(dt_t A) h_{t-1} dt_t
    dB_t     = sum_d g_t dt_t u_t,  dC_t = sum_d dy_t h_t,  dD += dy_t u_t

It needs h_{t-1}: per chunk, from the checkpoint, it first recomputes the
chunk's states into a workspace buffer, then runs the reverse steps over them.
(Recovering h_{t-1} by dividing by exp(dt A) would be unstable.) dB, dC, dA,
dD and d delta_bias come out per channel block / batch and are summed in XLA.

Lowering: `impl="interpret"` runs the kernels in interpret mode (the CPU test
suite); `impl="pallas"` lowers them through Triton on GPU: loops are plain
fori_loops over refs (what Triton's `scan` support allows), every loaded
tensor is a power of two (N and the channel block are padded), and a
`debug_barrier` separates the workspace writes from the reads. The GPU path
lowers to Triton IR (checked on CPU through `jax.export(platforms=["cuda"])`)
but is not yet compiled or run on GPU hardware (the tests check the lowering
only). On CPU "auto" uses `sequential_scan` once the states outgrow the cache
(1.2x faster than the associative scan there, forward and backward, at the
UEA Mamba classifier's size) and the reference below that; on TPU the
reference.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels.compat import pl

IMPLS = ("auto", "pallas", "interpret", "reference", "sequential")


@dataclasses.dataclass(frozen=True)
class ScanBlocks:
  """Kernel tiling and Triton launch settings (untuned: not timed on a GPU).

  block_d: channels per program (a power of two); chunk: time steps between
  saved states (the backward pass recomputes one chunk at a time). Software
  pipelining (num_stages > 1) lets Triton prefetch the next step's inputs,
  which do not depend on the state.
  """
  block_d: int = 32
  chunk: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    if self.block_d < 1 or self.block_d & (self.block_d - 1):
      raise ValueError(f"block_d={self.block_d} must be a power of two.")
    if self.chunk < 1:
      raise ValueError(f"chunk={self.chunk} must be positive.")


@dataclasses.dataclass(frozen=True)
class _Config:
  length: int
  chunk: int
  block_d: int
  num_warps: int
  num_stages: int
  delta_softplus: bool
  has_z: bool
  interpret: bool


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, return_last_state=False,
                   impl="auto", blocks: ScanBlocks | None = None):
  """The S6 scan of the module docstring.

  Args:
    u, delta: [batch, length, channels].
    A: [channels, state] (real; Mamba uses A = -exp(A_log) < 0).
    B, C: [batch, length, state] or [batch, length, groups, state], with
      channels % groups == 0; channel d reads group d // (channels / groups).
    D, delta_bias: None or [channels].
    z: None or [batch, length, channels]; the output is gated by silu(z).
    delta_softplus: apply softplus to delta + delta_bias.
    return_last_state: also return h_length, [batch, channels, state] float32.
    impl: "auto" (Pallas on GPU; on CPU sequential for long scans, else the
      reference; the reference on TPU),
      "pallas", "interpret", "reference" (`jax.lax.associative_scan`),
      "sequential" (`jax.lax.scan`, fused and rematerialized).
    blocks: kernel tiling for "pallas" / "interpret".

  Returns:
    y [batch, length, channels] in u's dtype, and the last state if asked.
  """
  B, C, groups = _check_inputs(u, delta, A, B, C, D, z, delta_bias, impl)
  if impl == "auto":
    impl = _auto_impl(u.shape, A.shape[1])
  if impl in ("reference", "sequential"):
    scan = reference_scan if impl == "reference" else sequential_scan
    y, last = scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
  else:
    y, last = _pallas_scan(u, delta, A, B, C, D, z, delta_bias,
                           delta_softplus, groups, blocks or ScanBlocks(),
                           interpret=impl == "interpret")
  return (y, last) if return_last_state else y


# On CPU the associative scan wins while its [batch, length, channels, state]
# float32 tensors stay cache-sized (S-Mamba's 11 variate tokens: 2.4x faster);
# beyond that it is bound by memory traffic and the fused sequential scan wins
# (batch 16, 100 steps, 256 channels, state 16: 1.2x faster).
_CPU_SEQUENTIAL_FROM = 2 ** 20  # elements of one [b, l, d, n] tensor (4 MiB)


def _auto_impl(shape, state):
  backend = compat.default_backend()
  if backend == "gpu":
    return "pallas"
  if backend == "cpu":
    batch, length, channels = shape
    big = batch * length * channels * state >= _CPU_SEQUENTIAL_FROM
    return "sequential" if big else "reference"
  return "reference"


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, impl):
  """Validates shapes; returns B, C as [batch, length, groups, state]."""
  if impl not in IMPLS:
    raise ValueError(f"Unknown impl {impl!r}; valid: {', '.join(IMPLS)}.")
  if jnp.ndim(u) != 3:
    raise ValueError(f"u must be [batch, length, channels], got shape "
                     f"{jnp.shape(u)}.")
  batch, length, channels = u.shape
  if length < 1:
    raise ValueError("length must be at least 1.")
  if jnp.shape(delta) != u.shape:
    raise ValueError(f"delta must have u's shape {u.shape}, got "
                     f"{jnp.shape(delta)}.")
  if z is not None and jnp.shape(z) != u.shape:
    raise ValueError(f"z must have u's shape {u.shape}, got {jnp.shape(z)}.")
  if jnp.ndim(A) != 2 or A.shape[0] != channels:
    raise ValueError(f"A must be [channels={channels}, state], got "
                     f"{jnp.shape(A)}.")
  state = A.shape[1]
  for name, x in (("D", D), ("delta_bias", delta_bias)):
    if x is not None and jnp.shape(x) != (channels,):
      raise ValueError(f"{name} must be [channels] = ({channels},), got "
                       f"{jnp.shape(x)}.")
  if jnp.shape(B) != jnp.shape(C):
    raise ValueError(f"B and C must have the same shape, got {jnp.shape(B)} "
                     f"and {jnp.shape(C)}.")
  if jnp.ndim(B) == 3:
    B, C = B[:, :, None], C[:, :, None]
  if jnp.ndim(B) != 4 or B.shape[:2] != (batch, length) or B.shape[-1] != state:
    raise ValueError(
        f"B and C must be [batch, length, state] or [batch, length, groups, "
        f"state] = ({batch}, {length}, [groups,] {state}), got "
        f"{jnp.shape(B)}.")
  groups = B.shape[2]
  if groups < 1 or channels % groups:
    raise ValueError(f"channels ({channels}) must be a multiple of groups "
                     f"({groups}).")
  for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C),
                  ("D", D), ("z", z), ("delta_bias", delta_bias)):
    if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {x.dtype}.")
  return B, C, groups


def _softplus(x):
  # Mamba's threshold: softplus(x) == x to float32 precision for x > 20.
  return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _discretize(u, delta, A, B, C, D, delta_bias, delta_softplus):
  """Float32 dA = exp(dt A), dt u B ([b, l, d, n] each), C per channel."""
  f32 = jnp.float32
  channels = u.shape[-1]
  groups = B.shape[2]
  dt = delta.astype(f32)
  if delta_bias is not None:
    dt = dt + delta_bias.astype(f32)
  if delta_softplus:
    dt = _softplus(dt)
  # Channel d reads group d // (channels / groups).
  B_d = jnp.repeat(B.astype(f32), channels // groups, axis=2)
  C_d = jnp.repeat(C.astype(f32), channels // groups, axis=2)
  dA = jnp.exp(dt[..., None] * A.astype(f32))
  dBu = (dt * u.astype(f32))[..., None] * B_d
  return dA, dBu, C_d


def _readout(h, C_d, u, D, z):
  """y = <C, h> + D u, gated by silu(z); h [b, l, d, n] float32."""
  y = jnp.einsum("bldn,bldn->bld", h, C_d)
  if D is not None:
    y = y + D.astype(jnp.float32) * u.astype(jnp.float32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(jnp.float32))
  return y.astype(u.dtype)


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False):
  """The recurrence as a parallel `jax.lax.associative_scan` (float32).

  B, C: [batch, length, groups, state]. Returns (y, last_state). Composing
  h -> a1 h + b1 then h -> a2 h + b2 gives h -> a1 a2 h + (a2 b1 + b2).
  """
  dA, dBu, C_d = _discretize(u, delta, A, B, C, D, delta_bias, delta_softplus)

  def combine(first, second):
    a1, b1 = first
    a2, b2 = second
    return a1 * a2, a2 * b1 + b2

  _, h = jax.lax.associative_scan(combine, (dA, dBu), axis=1)
  return _readout(h, C_d, u, D, z), h[:, -1]


def sequential_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                    delta_softplus=False):
  """The recurrence one step at a time with `jax.lax.scan`, fused (float32).

  Same arguments and results as `reference_scan`. Each step discretizes its
  own time step and reads out y_t, so only the [batch, channels, state] carry
  is live; the step is rematerialized (`jax.checkpoint`), so the backward pass
  stores one state per step instead of every intermediate. Nothing of size
  [batch, length, channels, state] besides those states is formed, which is
  what makes this the fast path on CPU, where the associative scan is bound by
  memory traffic (`impl="auto"` picks it there).
  """
  f32 = jnp.float32
  batch, _, channels = u.shape
  groups, state = B.shape[2], B.shape[3]
  dt = delta.astype(f32)
  if delta_bias is not None:
    dt = dt + delta_bias.astype(f32)
  if delta_softplus:
    dt = _softplus(dt)
  A = A.astype(f32)

  def per_channel(x_t):
    """[b, groups, n] -> [b, channels, n]: channel d reads group d // (channels / groups)."""
    return (x_t if groups == 1 else jnp.repeat(x_t, channels // groups, axis=1))

  @jax.checkpoint
  def step(h, inputs):
    dt_t, u_t, B_t, C_t = inputs  # [b, channels] x 2, [b, groups, n] x 2
    h = jnp.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * per_channel(B_t)
    return h, jnp.sum(h * per_channel(C_t), axis=-1)

  def time_major(x):
    return jnp.moveaxis(x, 1, 0)

  h0 = jnp.zeros((batch, channels, state), f32)
  last, y = jax.lax.scan(step, h0, (time_major(dt), time_major(u.astype(f32)),
                                    time_major(B.astype(f32)),
                                    time_major(C.astype(f32))))
  y = jnp.moveaxis(y, 0, 1)
  if D is not None:
    y = y + D.astype(f32) * u.astype(f32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(f32))
  return y.astype(u.dtype), last


# ------------------------------------------------------------------ Pallas --


def _pad_last(x, size):
  pad = size - x.shape[-1]
  if pad == 0:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def _pallas_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, groups,
                 blocks: ScanBlocks, interpret: bool):
  batch, length, channels = u.shape
  state = A.shape[1]
  per_group = channels // groups
  block_d = min(blocks.block_d, pl.next_power_of_2(per_group))
  per_group_pad = pl.cdiv(per_group, block_d) * block_d
  state_pad = pl.next_power_of_2(state)
  config = _Config(length=length, chunk=min(blocks.chunk, length),
                   block_d=block_d, num_warps=blocks.num_warps,
                   num_stages=blocks.num_stages,
                   delta_softplus=bool(delta_softplus),
                   has_z=z is not None, interpret=interpret)

  # Channels as [groups, per_group], per_group padded to the block; padded
  # channels (u = 0, A = 0, B = C = 0 in padded states) stay exactly zero.
  def channels_4d(x):
    return _pad_last(x.reshape(batch, length, groups, per_group),
                     per_group_pad)

  def per_channel(x):
    return _pad_last(x.reshape(groups, per_group), per_group_pad)

  f32 = jnp.float32
  A_g = jnp.pad(A.reshape(groups, per_group, state),
                [(0, 0), (0, per_group_pad - per_group),
                 (0, state_pad - state)])
  D_g = per_channel(jnp.zeros((channels,), f32) if D is None else D)
  bias_g = per_channel(jnp.zeros((channels,), f32) if delta_bias is None
                       else delta_bias)
  z_g = None if z is None else channels_4d(z)
  y, last = _scan(channels_4d(u), channels_4d(delta), A_g,
                  _pad_last(B, state_pad), _pad_last(C, state_pad), D_g, z_g,
                  bias_g, config)
  y = y[..., :per_group].reshape(batch, length, channels)
  last = last[:, :, :per_group, :state].reshape(batch, channels, state)
  return y, last


def _compiler_params(config: _Config):
  if config.interpret:
    return None
  return compat.triton_compiler_params(num_warps=config.num_warps,
                                       num_stages=config.num_stages)


class _Step:
  """The per-step quantities of one time step t, for one channel block."""

  def __init__(self, t, u_ref, delta_ref, B_ref, C_ref, A, D, bias, config):
    self.u = u_ref[t, :].astype(jnp.float32)                  # [block_d]
    self.dt_raw = delta_ref[t, :].astype(jnp.float32) + bias  # [block_d]
    self.dt = (_softplus(self.dt_raw) if config.delta_softplus
               else self.dt_raw)
    self.B = B_ref[t, :].astype(jnp.float32)                  # [state]
    self.C = C_ref[t, :].astype(jnp.float32)                  # [state]
    self.dA = jnp.exp(self.dt[:, None] * A)                   # [block_d, n]
    self.D = D

  def advance(self, h):
    return self.dA * h + (self.dt * self.u)[:, None] * self.B[None, :]

  def readout(self, h):
    return jnp.sum(h * self.C[None, :], axis=1) + self.D * self.u


def _chunk_bounds(config: _Config, chunk_index):
  start = chunk_index * config.chunk
  return start, jnp.minimum(config.chunk, config.length - start)


def _forward_kernel(*refs, config: _Config):
  if config.has_z:
    (u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref, z_ref,
     y_ref, last_ref, ckpt_ref) = refs
  else:
    (u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref,
     y_ref, last_ref, ckpt_ref) = refs
    z_ref = None
  A = A_ref[...].astype(jnp.float32)
  D = D_ref[...].astype(jnp.float32)
  bias = bias_ref[...].astype(jnp.float32)

  def chunk_body(chunk_index, h):
    # The state entering the chunk: where the backward pass restarts.
    ckpt_ref[chunk_index] = h
    start, steps = _chunk_bounds(config, chunk_index)

    def step_body(offset, h):
      t = start + offset
      step = _Step(t, u_ref, delta_ref, B_ref, C_ref, A, D, bias, config)
      h = step.advance(h)
      y = step.readout(h)
      if z_ref is not None:
        z = z_ref[t, :].astype(jnp.float32)
        y = y * z * jax.nn.sigmoid(z)   # silu(z) gate
      y_ref[t, :] = y.astype(y_ref.dtype)
      return h

    return jax.lax.fori_loop(0, steps, step_body, h)

  num_chunks = ckpt_ref.shape[0]
  h = jax.lax.fori_loop(0, num_chunks, chunk_body,
                        jnp.zeros(A.shape, jnp.float32))
  last_ref[...] = h


def _specs(batch, length, groups, per_group_pad, state_pad, block_d,
           num_chunks):
  """BlockSpecs on the (batch, group, channel block) grid, by array kind."""
  sq = compat.SQUEEZED
  return dict(
      seq=pl.BlockSpec((sq, length, sq, block_d),
                       lambda b, g, c: (b, 0, g, c)),
      bc=pl.BlockSpec((sq, length, sq, state_pad),
                      lambda b, g, c: (b, 0, g, 0)),
      A=pl.BlockSpec((sq, block_d, state_pad), lambda b, g, c: (g, c, 0)),
      vec=pl.BlockSpec((sq, block_d), lambda b, g, c: (g, c)),
      state=pl.BlockSpec((sq, sq, block_d, state_pad),
                         lambda b, g, c: (b, g, c, 0)),
      ckpt=pl.BlockSpec((sq, num_chunks, sq, block_d, state_pad),
                        lambda b, g, c: (b, 0, g, c, 0)),
      # Per-channel-block partial sums of dB and dC.
      bc_partial=pl.BlockSpec((sq, length, sq, sq, state_pad),
                              lambda b, g, c: (b, 0, g, c, 0)),
      batch_vec=pl.BlockSpec((sq, sq, block_d), lambda b, g, c: (b, g, c)),
  )


def _forward_call(u, delta, A, B, C, D, z, bias, config: _Config):
  batch, length, groups, per_group_pad = u.shape
  state_pad = A.shape[-1]
  block_d = config.block_d
  num_chunks = pl.cdiv(length, config.chunk)
  specs = _specs(batch, length, groups, per_group_pad, state_pad, block_d,
                 num_chunks)
  operands = [u, delta, A, B, C, D, bias] + ([z] if config.has_z else [])
  in_specs = [specs["seq"], specs["seq"], specs["A"], specs["bc"], specs["bc"],
              specs["vec"], specs["vec"]] + (
                  [specs["seq"]] if config.has_z else [])
  f32 = jnp.float32
  return pl.pallas_call(
      functools.partial(_forward_kernel, config=config),
      grid=(batch, groups, per_group_pad // block_d),
      in_specs=in_specs,
      out_specs=[specs["seq"], specs["state"], specs["ckpt"]],
      out_shape=[
          jax.ShapeDtypeStruct(u.shape, u.dtype),
          jax.ShapeDtypeStruct((batch, groups, per_group_pad, state_pad), f32),
          jax.ShapeDtypeStruct(
              (batch, num_chunks, groups, per_group_pad, state_pad), f32),
      ],
      compiler_params=_compiler_params(config),
      interpret=config.interpret,
      name="selective_scan_fwd",
  )(*operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _scan(u, delta, A, B, C, D, z, bias, config):
  y, last, _ = _forward_call(u, delta, A, B, C, D, z, bias, config)
  return y, last


def _scan_fwd_rule(u, delta, A, B, C, D, z, bias, config):
  y, last, ckpt = _forward_call(u, delta, A, B, C, D, z, bias, config)
  return (y, last), (u, delta, A, B, C, D, z, bias, ckpt)


def _backward_kernel(*refs, config: _Config):
  if config.has_z:
    (u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref, z_ref, ckpt_ref,
     dy_ref, dlast_ref,
     du_ref, ddelta_ref, dz_ref, dA_ref, dB_ref, dC_ref, dD_ref, dbias_ref,
     work_ref) = refs
  else:
    (u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref, ckpt_ref,
     dy_ref, dlast_ref,
     du_ref, ddelta_ref, dA_ref, dB_ref, dC_ref, dD_ref, dbias_ref,
     work_ref) = refs
    z_ref = dz_ref = None
  f32 = jnp.float32
  A = A_ref[...].astype(f32)
  D = D_ref[...].astype(f32)
  bias = bias_ref[...].astype(f32)
  num_chunks = ckpt_ref.shape[0]

  def chunk_body(reverse_index, carry):
    chunk_index = num_chunks - 1 - reverse_index
    start, steps = _chunk_bounds(config, chunk_index)
    h_start = ckpt_ref[chunk_index]

    # Phase 1: the chunk's states h_t, t = start .. start + steps - 1.
    def recompute(offset, h):
      step = _Step(start + offset, u_ref, delta_ref, B_ref, C_ref, A, D, bias,
                   config)
      h = step.advance(h)
      work_ref[offset] = h
      return h

    jax.lax.fori_loop(0, steps, recompute, h_start)
    if not config.interpret:
      # Threads read states other threads wrote.
      compat.triton_debug_barrier()

    # Phase 2: reverse steps; g is dL/dh_t without the step-t readout yet.
    def reverse_step(reverse_offset, carry):
      g, dA_acc, dD_acc, dbias_acc = carry
      offset = steps - 1 - reverse_offset
      t = start + offset
      step = _Step(t, u_ref, delta_ref, B_ref, C_ref, A, D, bias, config)
      h = work_ref[offset]
      h_prev = jnp.where(offset == 0, h_start,
                         work_ref[jnp.maximum(offset - 1, 0)])
      d_out = dy_ref[t, :].astype(f32)
      if z_ref is not None:
        z = z_ref[t, :].astype(f32)
        gate = jax.nn.sigmoid(z)
        y = step.readout(h)
        # d silu(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z))).
        dz_ref[t, :] = (d_out * y * gate * (1.0 + z * (1.0 - gate))
                        ).astype(dz_ref.dtype)
        dy = d_out * z * gate
      else:
        dy = d_out
      g = g + dy[:, None] * step.C[None, :]
      dC_ref[t, :] = jnp.sum(dy[:, None] * h, axis=0)
      dB_ref[t, :] = jnp.sum(g * (step.dt * step.u)[:, None], axis=0)
      du_ref[t, :] = (D * dy + step.dt * jnp.sum(g * step.B[None, :], axis=1)
                      ).astype(du_ref.dtype)
      g_dA_h = g * step.dA * h_prev
      d_dt = jnp.sum(g_dA_h * A + g * step.u[:, None] * step.B[None, :],
                     axis=1)
      if config.delta_softplus:
        d_dt = d_dt * jax.nn.sigmoid(step.dt_raw)
      ddelta_ref[t, :] = d_dt.astype(ddelta_ref.dtype)
      dA_acc = dA_acc + g_dA_h * step.dt[:, None]
      return (g * step.dA, dA_acc, dD_acc + dy * step.u, dbias_acc + d_dt)

    carry = jax.lax.fori_loop(0, steps, reverse_step, carry)
    if not config.interpret:
      # The next chunk overwrites the workspace others may still read.
      compat.triton_debug_barrier()
    return carry

  zeros_state = jnp.zeros(A.shape, f32)
  zeros_vec = jnp.zeros(D.shape, f32)
  init = (dlast_ref[...], zeros_state, zeros_vec, zeros_vec)
  _, dA_acc, dD_acc, dbias_acc = jax.lax.fori_loop(0, num_chunks, chunk_body,
                                                   init)
  dA_ref[...] = dA_acc
  dD_ref[...] = dD_acc
  dbias_ref[...] = dbias_acc


def _scan_bwd_rule(config: _Config, residuals, cotangents):
  u, delta, A, B, C, D, z, bias, ckpt = residuals
  dy, dlast = cotangents
  batch, length, groups, per_group_pad = u.shape
  state_pad = A.shape[-1]
  block_d = config.block_d
  num_blocks = per_group_pad // block_d
  num_chunks = ckpt.shape[1]
  specs = _specs(batch, length, groups, per_group_pad, state_pad, block_d,
                 num_chunks)
  sq = compat.SQUEEZED
  f32 = jnp.float32
  has_z = config.has_z
  operands = [u, delta, A, B, C, D, bias] + ([z] if has_z else []) + [
      ckpt, dy, dlast.astype(f32)]
  in_specs = ([specs["seq"], specs["seq"], specs["A"], specs["bc"],
               specs["bc"], specs["vec"], specs["vec"]]
              + ([specs["seq"]] if has_z else [])
              + [specs["ckpt"], specs["seq"], specs["state"]])
  seq_shape = jax.ShapeDtypeStruct(u.shape, u.dtype)
  partial_bc = jax.ShapeDtypeStruct(
      (batch, length, groups, num_blocks, state_pad), f32)
  batch_vec = jax.ShapeDtypeStruct((batch, groups, per_group_pad), f32)
  out_shape = ([seq_shape, jax.ShapeDtypeStruct(delta.shape, delta.dtype)]
               + ([jax.ShapeDtypeStruct(z.shape, z.dtype)] if has_z else [])
               + [jax.ShapeDtypeStruct((batch,) + A.shape, f32), partial_bc,
                  partial_bc, batch_vec, batch_vec,
                  # Workspace: one chunk of states per program.
                  jax.ShapeDtypeStruct((batch, groups, num_blocks, config.chunk,
                                        block_d, state_pad), f32)])
  out_specs = ([specs["seq"], specs["seq"]] + ([specs["seq"]] if has_z else [])
               + [pl.BlockSpec((sq, sq, block_d, state_pad),
                               lambda b, g, c: (b, g, c, 0)),
                  specs["bc_partial"], specs["bc_partial"], specs["batch_vec"],
                  specs["batch_vec"],
                  pl.BlockSpec((sq, sq, sq, config.chunk, block_d, state_pad),
                               lambda b, g, c: (b, g, c, 0, 0, 0))])
  outs = pl.pallas_call(
      functools.partial(_backward_kernel, config=config),
      grid=(batch, groups, num_blocks),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compiler_params(config),
      interpret=config.interpret,
      name="selective_scan_bwd",
  )(*operands)
  if has_z:
    du, ddelta, dz, dA, dB, dC, dD, dbias, _ = outs
  else:
    du, ddelta, dA, dB, dC, dD, dbias, _ = outs
    dz = None
  return (du, ddelta, dA.sum(0).astype(A.dtype),
          dB.sum(3).astype(B.dtype), dC.sum(3).astype(C.dtype),
          dD.sum(0).astype(D.dtype), dz, dbias.sum(0).astype(bias.dtype))


_scan.defvjp(_scan_fwd_rule, _scan_bwd_rule)
