"""Flash attention as Mosaic TPU kernels (forward, dq, dk/dv; `custom_vjp`).

Same semantics as `flash_attention` (see that module's docstring: [batch, len,
heads, head_dim] inputs, causal mask with the ends aligned, segment ids,
GQA/MQA, sm_scale, q_len != kv_len, fully masked rows -> 0 with zero
gradients). Reached through `flash_attention(..., impl="tpu")` (compiled by
Mosaic, TPU only; what `impl="auto"` picks on TPU) or `impl="tpu_interpret"`
(the same kernels through Pallas' TPU interpret mode, on CPU).

Written for the TPU's rules rather than Triton's:

* Layout [batch, heads, len, head_dim] inside the kernels (the wrapper
  transposes), so every block is a 2-D [rows, head_dim] tile whose last two
  dimensions are multiples of (8, 128): head_dim is zero-padded to a multiple
  of 128 lanes; each kernel pads the lengths to multiples of its own tiles
  (padded keys are masked, padded query rows sliced off).
* The key/value loop is the last grid dimension ("arbitrary"; the others are
  "parallel"), so Pallas' pipeline double-buffers the k/v tiles into VMEM.
  The online-softmax state (running max m, normaliser l, both replicated over
  128 lanes, and the float32 accumulator) lives in VMEM scratch across those
  grid steps; the output and the logsumexp are written on the last step.
* Grid steps whose tile causality hides do no work, and their index maps
  repeat a neighbouring step's block index, so Pallas skips their DMA too.
  Steps whose tile is entirely visible skip building the mask.
* Rows that see no key (fully masked, or padding) get output 0 and
  lse = +inf, so the backward's p = exp(s - lse) is exactly 0 for them on
  every tile, masked or not: zero gradients, never inf * 0.
* Per-row statistics (logsumexp, delta = rowsum(o * do)) are fed as
  lane-replicated [rows, 128] tiles where a query row is on sublanes
  (forward, dq) and as [1, cols] rows where it is on lanes (dk/dv); segment
  ids as [rows, 128] / [8, cols] tiles (the layouts of upstream's TPU flash
  and splash attention): broadcasts in the kernel are then plain tiling.

Kernels (s = sm_scale q k^T, natural base; the TPU's exp is native):

* forward, grid (batch, heads, q blocks, kv blocks): FlashAttention-2's
  online softmax; saves lse = m + log l.
* dq, grid (batch, heads, q blocks, kv blocks): recomputes p = exp(s - lse),
  dp = do v^T, ds = p (dp - delta), accumulates dq += ds k in scratch.
* dk/dv, grid (batch, kv heads, kv blocks, group * q blocks): works on the
  transposed tile s^T = k q^T ([kv rows, q cols], the layout splash
  attention's dkv kernel uses, so no in-kernel transposes): dv += p^T do,
  dk += ds^T q. The last grid dimension walks the `group` query heads that
  share the kv head and their query blocks, so GQA/MQA gradients are summed
  in the VMEM accumulators, never in HBM.

Tiles: the dimensions that sit on lanes (kv in the forward and dq kernels, q
in the dk/dv kernel) are multiples of 128; those on sublanes multiples of 8
(16 for 16-bit dtypes). float16 inputs are computed in float32 (the Mosaic
dot lowering has no float16 case); bfloat16 feeds the MXU with float32
accumulation.

Verified on CPU through TPU interpret mode (`pltpu.InterpretParams`, which
simulates VMEM/HBM, the grid's DMAs and fills uninitialised memory with NaN)
and lowered to Mosaic through `jax.export(platforms=["tpu"])`; not yet
compiled or run on a TPU (see README.md).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import compat
from pallas_kernels.attention_problem import (MASK_VALUE, AttentionProblem,
                                              flash_custom_vjp, pad_axis,
                                              round_up)
from pallas_kernels.compat import pl

NUM_LANES = 128
NUM_SUBLANES = 8
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class TPUBlockSizes:
  """Tiles of the Mosaic TPU kernels.

  block_q / block_q_dq: query rows per tile in the forward / dq kernels
  (sublanes: a multiple of 8). block_kv / block_kv_dq: keys per tile there
  (lanes: a multiple of 128). block_q_dkv: query columns per tile in the
  dk/dv kernel (lanes: a multiple of 128); block_kv_dkv: key rows there
  (sublanes: a multiple of 8). Each is shrunk to the (aligned) sequence
  length, and sublane tiles are rounded up to 16 rows for 16-bit dtypes.
  The defaults are untuned (not yet timed on a TPU).
  """
  block_q: int = 128
  block_kv: int = 128
  block_q_dq: int = 128
  block_kv_dq: int = 128
  block_q_dkv: int = 128
  block_kv_dkv: int = 128

  def __post_init__(self):
    lanes = ("block_kv", "block_kv_dq", "block_q_dkv")
    for field in dataclasses.fields(self):
      size = getattr(self, field.name)
      multiple = NUM_LANES if field.name in lanes else NUM_SUBLANES
      if size < multiple or size % multiple:
        raise ValueError(
            f"TPUBlockSizes.{field.name}={size} must be a positive multiple "
            f"of {multiple} ({'lanes' if multiple == NUM_LANES else 'sublanes'}"
            ").")


def _pad_rows(x, axis: int, block: int, value: Any = 0):
  """Pads `axis` of x to a multiple of `block` with `value`."""
  return pad_axis(x, axis, round_up(x.shape[axis], block), value)


def _pad_segments(segments, q_block: int, kv_block: int):
  """Segment ids padded to the tiles. Padded keys are masked by position
  anyway; distinct pad ids keep padded queries off every real key too."""
  if segments is None:
    return None
  return (_pad_rows(segments[0], 1, q_block, -1),
          _pad_rows(segments[1], 1, kv_block, -2))


def flash_attention_tpu(q, k, v, *, causal: bool, segment_ids, sm_scale: float,
                        block_sizes: TPUBlockSizes | None = None,
                        interpret: bool = False) -> jax.Array:
  """The Mosaic TPU kernels on checked inputs (call `flash_attention`).

  q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads,
  head_dim]; `interpret=True` runs them through TPU interpret mode (any
  backend; `compat.tpu_interpret_params`).
  """
  blocks = block_sizes or TPUBlockSizes()
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  dtype = q.dtype
  if dtype == jnp.float16:  # Mosaic's matmul has no float16
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  # Sublane tiles of 16-bit arrays hold 16 rows.
  sub = NUM_SUBLANES * max(1, 4 // jnp.dtype(q.dtype).itemsize)

  def fit(block: int, length: int, multiple: int) -> int:
    return min(round_up(block, multiple), round_up(length, multiple))

  dim_pad = round_up(head_dim, NUM_LANES)
  config = AttentionProblem(
      causal=bool(causal), sm_scale=float(sm_scale), q_len=q_len,
      kv_len=kv_len,
      block_q=fit(blocks.block_q, q_len, sub),
      block_kv=fit(blocks.block_kv, kv_len, NUM_LANES),
      block_q_dq=fit(blocks.block_q_dq, q_len, sub),
      block_kv_dq=fit(blocks.block_kv_dq, kv_len, NUM_LANES),
      block_q_dkv=fit(blocks.block_q_dkv, q_len, NUM_LANES),
      block_kv_dkv=fit(blocks.block_kv_dkv, kv_len, sub),
      interpret=compat.tpu_interpret_params() if interpret else False)

  def to_kernel_layout(x):  # [b, s, h, d] -> [b, h, s, d_pad]
    return pad_axis(jnp.swapaxes(x, 1, 2), 3, dim_pad)

  segments = None
  if segment_ids is not None:
    segments = tuple(ids.astype(jnp.int32) for ids in segment_ids)
  # _flash: the custom_vjp at the end of this module.
  out = _flash(to_kernel_layout(q), to_kernel_layout(k), to_kernel_layout(v),
               segments, config)
  return jnp.swapaxes(out[..., :head_dim], 1, 2).astype(dtype)


# ------------------------------------------------------------ block logic --


def _tile_flags(config: AttentionProblem, q_start, block_q: int, kv_start,
                block_kv: int, has_segments: bool):
  """(run, full) for one (query tile, key tile) pair of scalars.

  run: some query of the tile may see some key of it (True unless causal:
  tiles above the diagonal do not run; rows that then see nothing get 0 and
  zero gradients). full: every pair in the tile is visible, so no mask is
  built; None with segment ids (every tile is masked). Each kernel pads the
  lengths to its own tiles, so no tile is all padding.
  """
  run = True
  full = kv_start + block_kv <= config.kv_len
  if config.causal:
    # Last query row of the tile sees the tile's first key.
    run = run & (kv_start <= q_start + block_q - 1 + config.offset)
    # First query row sees the tile's last key.
    full = full & (kv_start + block_kv - 1 <= q_start + config.offset)
  return run, (None if has_segments else full)


def _run_step(run, full, step) -> None:
  """step(masked=False) on full tiles, step(masked=True) on the others."""
  if full is None:   # segment ids: every tile needs its mask
    if run is True:
      step(True)
    else:
      pl.when(run)(functools.partial(step, True))
    return
  pl.when(run & full)(functools.partial(step, False))
  pl.when(run & jnp.logical_not(full))(functools.partial(step, True))


def _last_kv_block(config: AttentionProblem, q_block, block_q: int,
                   block_kv: int):
  """Index of the last key tile a query tile runs (>= 0), for index maps."""
  last_key = config.kv_len - 1
  if config.causal:
    last_key = jnp.minimum(
        last_key, (q_block + 1) * block_q - 1 + config.offset)
  return lax.div(jnp.maximum(last_key, 0), block_kv)


def _q_block_range(config: AttentionProblem, kv_block, block_q: int,
                   block_kv: int):
  """(first, last) query tiles a key tile runs with, for index maps."""
  last = (config.q_len - 1) // block_q
  if not config.causal:
    return 0, last
  first_query = jnp.maximum(kv_block * block_kv - config.offset, 0)
  return jnp.minimum(lax.div(first_query, block_q), last), last


def _mask(config: AttentionProblem, rows, cols, q_on_rows: bool, q_seg, kv_seg):
  """Visibility ([r, c] bool) of a tile from the positions of its elements'
  rows and columns (`rows`, `cols`: [r, c] iotas).

  q_on_rows: rows are query positions (forward, dq), else key positions
  (dk/dv). q_seg / kv_seg: segment ids broadcastable to the tile, or None.
  Padded query positions need no mask: they are sliced off, and their
  lse = +inf zeroes them in the backward.
  """
  q_pos, kv_pos = (rows, cols) if q_on_rows else (cols, rows)
  mask = kv_pos < config.kv_len   # padded keys
  if config.causal:
    mask = mask & (kv_pos <= q_pos + config.offset)
  if q_seg is not None:
    mask = mask & (q_seg == kv_seg)
  return mask


def _lanes(x, width: int):
  """A lane-replicated [rows, 128] tile widened to [rows, width]."""
  return x if width == NUM_LANES else jnp.tile(x, (1, width // NUM_LANES))


def _positions(start, axis: int, shape):
  return start + lax.broadcasted_iota(jnp.int32, shape, axis)


_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


# ---------------------------------------------------------------- forward --


def online_softmax_update(s, mask, v_ref, m_scratch, l_scratch, acc_scratch
                          ) -> None:
  """One key tile of a forward kernel's online softmax: logits s
  [block_q, block_kv] (masked entries at MASK_VALUE, `mask` None when none
  is), the running max and sum [block_q, 128] (lane-replicated) and output
  accumulator [block_q, dim] in VMEM scratch, updated in place."""
  m_prev = m_scratch[...]
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  p = jnp.exp(s - _lanes(m_next, s.shape[1]))
  if mask is not None:
    # A row with no visible key so far has m_next == MASK_VALUE and
    # exp(0) == 1 here; zeroing keeps its normaliser at 0, its output 0.
    p = jnp.where(mask, p, 0.0)
  alpha = jnp.exp(m_prev - m_next)
  l_scratch[...] = alpha * l_scratch[...] + jnp.sum(p, axis=1, keepdims=True)
  m_scratch[...] = m_next
  pv = lax.dot_general(p.astype(v_ref.dtype), v_ref[...], _NN,
                       preferred_element_type=jnp.float32)
  acc_scratch[...] = (_lanes(alpha, acc_scratch.shape[-1]) * acc_scratch[...]
                      + pv)


def _forward_kernel(*refs, config: AttentionProblem, has_segments: bool):
  if has_segments:
    (q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, m_scratch,
     l_scratch, acc_scratch) = refs
  else:
    (q_ref, k_ref, v_ref, o_ref, lse_ref, m_scratch, l_scratch,
     acc_scratch) = refs
  block_q, block_kv = config.block_q, config.block_kv
  dim = acc_scratch.shape[-1]
  q_block, kv_block = pl.program_id(2), pl.program_id(3)
  q_start, kv_start = q_block * block_q, kv_block * block_kv

  @pl.when(kv_block == 0)
  def _init():
    m_scratch[...] = jnp.full(m_scratch.shape, MASK_VALUE, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  def step(masked: bool):
    s = lax.dot_general(q_ref[...], k_ref[...], _NT,
                        preferred_element_type=jnp.float32) * config.sm_scale
    mask = None
    if masked:
      shape = (block_q, block_kv)
      q_seg = kv_seg = None
      if has_segments:
        q_seg = _lanes(q_seg_ref[...], block_kv)
        kv_seg = kv_seg_ref[:1, :]
      mask = _mask(config, _positions(q_start, 0, shape),
                   _positions(kv_start, 1, shape), True, q_seg,
                   kv_seg)
      s = jnp.where(mask, s, MASK_VALUE)
    online_softmax_update(s, mask, v_ref, m_scratch, l_scratch, acc_scratch)

  run, full = _tile_flags(config, q_start, block_q, kv_start, block_kv,
                          has_segments)
  _run_step(run, full, step)

  @pl.when(kv_block == pl.num_programs(3) - 1)
  def _finish():
    l = l_scratch[...]
    empty = l == 0.0                  # rows that saw no key
    l = jnp.where(empty, 1.0, l)      # their output: 0 / 1
    o_ref[...] = (acc_scratch[...] * _lanes(1.0 / l, dim)).astype(o_ref.dtype)
    # Their lse is +inf, so the backward's p = exp(s - lse) is 0 for them on
    # every tile, masked or not: fully masked rows, and padded rows of query
    # tiles that did not run (the dk/dv kernel's wider query tiles include
    # them).
    lse_ref[...] = jnp.where(empty, jnp.inf, m_scratch[...] + jnp.log(l))


def _segment_operands(segments, q_block: int, kv_block: int, q_on_rows: bool,
                      q_index, kv_index):
  """Segment ids in the kernel's tile layout, and their BlockSpecs.

  The id of a row position is lane-replicated ([len, 128], tile [rows,
  128]), the id of a column position sublane-replicated ([8, len], tile [8,
  cols]). q_index / kv_index map the grid to (batch, q block) / (batch, kv
  block).
  """
  if segments is None:
    return [], []
  q_seg, kv_seg = segments
  sq = compat.SQUEEZED

  def as_rows(ids, block, index):
    batch, length = ids.shape
    arr = lax.broadcast_in_dim(ids, (batch, length, NUM_LANES), (0, 1))
    return arr, pl.BlockSpec((sq, block, NUM_LANES),
                             lambda *g: (*index(*g), 0))

  def as_cols(ids, block, index):
    batch, length = ids.shape
    arr = lax.broadcast_in_dim(ids, (batch, NUM_SUBLANES, length), (0, 2))
    return arr, pl.BlockSpec((sq, NUM_SUBLANES, block),
                             lambda *g: (index(*g)[0], 0, index(*g)[1]))

  if q_on_rows:
    pairs = [as_rows(q_seg, q_block, q_index),
             as_cols(kv_seg, kv_block, kv_index)]
  else:
    pairs = [as_cols(q_seg, q_block, q_index),
             as_rows(kv_seg, kv_block, kv_index)]
  return [a for a, _ in pairs], [s for _, s in pairs]


def _forward(q, k, v, segments, config: AttentionProblem):
  """(out [b, h, q_len, d], lse [b, h, q_len]) on unpadded lengths."""
  block_q, block_kv = config.block_q, config.block_kv
  q_len = q.shape[2]
  q = _pad_rows(q, 2, block_q)
  k, v = _pad_rows(k, 2, block_kv), _pad_rows(v, 2, block_kv)
  segments = _pad_segments(segments, block_q, block_kv)
  batch, heads, q_pad, dim = q.shape
  kv_heads, kv_pad = k.shape[1], k.shape[2]
  group = heads // kv_heads
  sq = compat.SQUEEZED

  def kv_block_of(i, j):  # hidden steps re-use the last block: no DMA
    return jnp.minimum(j, _last_kv_block(config, i, block_q, block_kv))

  q_spec = pl.BlockSpec((sq, sq, block_q, dim),
                        lambda b, h, i, j: (b, h, i, 0))
  # GQA/MQA: query head h reads kv head h // group (lax.div: exact for
  # non-negative ints, and `//` would lower through `sign`).
  kv_spec = pl.BlockSpec(
      (sq, sq, block_kv, dim),
      lambda b, h, i, j: (b, lax.div(h, group), kv_block_of(i, j), 0))
  stat_spec = pl.BlockSpec((sq, sq, block_q, NUM_LANES),
                           lambda b, h, i, j: (b, h, i, 0))
  seg_args, seg_specs = _segment_operands(
      segments, block_q, block_kv, True, lambda b, h, i, j: (b, i),
      lambda b, h, i, j: (b, kv_block_of(i, j)))
  kernel = functools.partial(_forward_kernel, config=config,
                             has_segments=segments is not None)
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=compat.pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0,
          grid=(batch, heads, q_pad // block_q, kv_pad // block_kv),
          in_specs=[q_spec, kv_spec, kv_spec] + seg_specs,
          out_specs=[q_spec, stat_spec],
          scratch_shapes=[
              compat.pltpu.VMEM((block_q, NUM_LANES), jnp.float32),  # m
              compat.pltpu.VMEM((block_q, NUM_LANES), jnp.float32),  # l
              compat.pltpu.VMEM((block_q, dim), jnp.float32),        # acc
          ]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_pad, NUM_LANES),
                                      jnp.float32)],
      compiler_params=compat.tpu_compiler_params(
          dimension_semantics=_SEMANTICS),
      interpret=config.interpret,
      name="flash_attention_tpu_fwd",
  )(q, k, v, *seg_args)
  return out[:, :, :q_len], lse[:, :, :q_len, 0]


# --------------------------------------------------------------------- dq --


def _dq_kernel(*refs, config: AttentionProblem, has_segments: bool):
  if has_segments:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
     dq_ref, dq_scratch) = refs
  else:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
     dq_scratch) = refs
  block_q, block_kv = config.block_q_dq, config.block_kv_dq
  q_block, kv_block = pl.program_id(2), pl.program_id(3)
  q_start, kv_start = q_block * block_q, kv_block * block_kv

  @pl.when(kv_block == 0)
  def _init():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

  def step(masked: bool):
    k = k_ref[...]
    s = lax.dot_general(q_ref[...], k, _NT,
                        preferred_element_type=jnp.float32) * config.sm_scale
    p = jnp.exp(s - _lanes(lse_ref[...], block_kv))
    if masked:
      shape = (block_q, block_kv)
      q_seg = kv_seg = None
      if has_segments:
        q_seg = _lanes(q_seg_ref[...], block_kv)
        kv_seg = kv_seg_ref[:1, :]
      mask = _mask(config, _positions(q_start, 0, shape),
                   _positions(kv_start, 1, shape), True, q_seg,
                   kv_seg)
      p = jnp.where(mask, p, 0.0)
    dp = lax.dot_general(do_ref[...], v_ref[...], _NT,
                         preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(delta_ref[...], block_kv))
    dq_scratch[...] += lax.dot_general(ds.astype(k.dtype), k, _NN,
                                       preferred_element_type=jnp.float32)

  run, full = _tile_flags(config, q_start, block_q, kv_start, block_kv,
                          has_segments)
  _run_step(run, full, step)

  @pl.when(kv_block == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_scratch[...] * config.sm_scale).astype(dq_ref.dtype)


def _pad_backward_operands(q, k, v, segments, d_out, lse, delta,
                           block_q: int, block_kv: int):
  """Backward operands padded to one kernel's tiles. Padded query rows get
  lse = +inf (so p = 0 there) and zero do and delta."""
  return (_pad_rows(q, 2, block_q), _pad_rows(k, 2, block_kv),
          _pad_rows(v, 2, block_kv), _pad_segments(segments, block_q,
                                                   block_kv),
          _pad_rows(d_out, 2, block_q), _pad_rows(lse, 2, block_q, jnp.inf),
          _pad_rows(delta, 2, block_q))


def _dq(q, k, v, segments, d_out, lse, delta, config: AttentionProblem):
  block_q, block_kv = config.block_q_dq, config.block_kv_dq
  q_len = q.shape[2]
  q, k, v, segments, d_out, lse, delta = _pad_backward_operands(
      q, k, v, segments, d_out, lse, delta, block_q, block_kv)
  batch, heads, q_pad, dim = q.shape
  kv_heads, kv_pad = k.shape[1], k.shape[2]
  group = heads // kv_heads
  sq = compat.SQUEEZED

  def kv_block_of(i, j):
    return jnp.minimum(j, _last_kv_block(config, i, block_q, block_kv))

  def lane_stat(x):  # [b, h, q_pad] -> lane-replicated [b, h, q_pad, 128]
    return jnp.broadcast_to(x[..., None], (*x.shape, NUM_LANES))

  q_spec = pl.BlockSpec((sq, sq, block_q, dim),
                        lambda b, h, i, j: (b, h, i, 0))
  # GQA/MQA: query head h reads kv head h // group (lax.div: exact for
  # non-negative ints, and `//` would lower through `sign`).
  kv_spec = pl.BlockSpec(
      (sq, sq, block_kv, dim),
      lambda b, h, i, j: (b, lax.div(h, group), kv_block_of(i, j), 0))
  stat_spec = pl.BlockSpec((sq, sq, block_q, NUM_LANES),
                           lambda b, h, i, j: (b, h, i, 0))
  seg_args, seg_specs = _segment_operands(
      segments, block_q, block_kv, True, lambda b, h, i, j: (b, i),
      lambda b, h, i, j: (b, kv_block_of(i, j)))
  kernel = functools.partial(_dq_kernel, config=config,
                             has_segments=segments is not None)
  dq = pl.pallas_call(
      kernel,
      grid_spec=compat.pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0,
          grid=(batch, heads, q_pad // block_q, kv_pad // block_kv),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec,
                    stat_spec] + seg_specs,
          out_specs=q_spec,
          scratch_shapes=[compat.pltpu.VMEM((block_q, dim), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=compat.tpu_compiler_params(
          dimension_semantics=_SEMANTICS),
      interpret=config.interpret,
      name="flash_attention_tpu_dq",
  )(q, k, v, d_out, lane_stat(lse), lane_stat(delta), *seg_args)
  return dq[:, :, :q_len]


# ------------------------------------------------------------------ dk/dv --


def _dkv_kernel(*refs, config: AttentionProblem, has_segments: bool,
                num_q_blocks: int):
  if has_segments:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
     dk_ref, dv_ref, dk_scratch, dv_scratch) = refs
  else:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
     dk_scratch, dv_scratch) = refs
  block_q, block_kv = config.block_q_dkv, config.block_kv_dkv
  kv_block, step_index = pl.program_id(2), pl.program_id(3)
  # The last grid dimension walks (query head in the group, query block).
  q_start = lax.rem(step_index, num_q_blocks) * block_q
  kv_start = kv_block * block_kv

  @pl.when(step_index == 0)
  def _init():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  def step(masked: bool):
    q, d_out = q_ref[...], do_ref[...]
    # The transposed tile: keys on sublanes, queries on lanes.
    s_t = lax.dot_general(k_ref[...], q, _NT,
                          preferred_element_type=jnp.float32) * config.sm_scale
    p_t = jnp.exp(s_t - lse_ref[...])            # [block_kv, block_q]
    if masked:
      shape = (block_kv, block_q)
      q_seg = kv_seg = None
      if has_segments:
        q_seg = q_seg_ref[:1, :]
        kv_seg = _lanes(kv_seg_ref[...], block_q)
      mask = _mask(config, _positions(kv_start, 0, shape),
                   _positions(q_start, 1, shape), False, q_seg,
                   kv_seg)
      p_t = jnp.where(mask, p_t, 0.0)
    dv_scratch[...] += lax.dot_general(p_t.astype(d_out.dtype), d_out, _NN,
                                       preferred_element_type=jnp.float32)
    dp_t = lax.dot_general(v_ref[...], d_out, _NT,
                           preferred_element_type=jnp.float32)
    ds_t = p_t * (dp_t - delta_ref[...])
    dk_scratch[...] += lax.dot_general(ds_t.astype(q.dtype), q, _NN,
                                       preferred_element_type=jnp.float32)

  run, full = _tile_flags(config, q_start, block_q, kv_start, block_kv,
                          has_segments)
  _run_step(run, full, step)

  @pl.when(step_index == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_scratch[...] * config.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _dkv(q, k, v, segments, d_out, lse, delta, config: AttentionProblem):
  block_q, block_kv = config.block_q_dkv, config.block_kv_dkv
  kv_len = k.shape[2]
  q, k, v, segments, d_out, lse, delta = _pad_backward_operands(
      q, k, v, segments, d_out, lse, delta, block_q, block_kv)
  batch, heads, q_pad, dim = q.shape
  kv_heads, kv_pad = k.shape[1], k.shape[2]
  group = heads // kv_heads
  num_q_blocks = q_pad // block_q
  sq = compat.SQUEEZED

  def head_of(g, t):
    return g * group + lax.div(t, num_q_blocks)

  def q_block_of(j, t):  # steps outside the visible range re-use a block
    first, last = _q_block_range(config, j, block_q, block_kv)
    return jnp.clip(lax.rem(t, num_q_blocks), first, last)

  def row_stat(x):  # [b, h, q_pad] -> [b, h, 1, q_pad]: queries on lanes
    return x[:, :, None, :]

  q_spec = pl.BlockSpec((sq, sq, block_q, dim),
                        lambda b, g, j, t: (b, head_of(g, t), q_block_of(j, t),
                                            0))
  kv_spec = pl.BlockSpec((sq, sq, block_kv, dim),
                         lambda b, g, j, t: (b, g, j, 0))
  stat_spec = pl.BlockSpec((sq, sq, 1, block_q),
                           lambda b, g, j, t: (b, head_of(g, t), 0,
                                               q_block_of(j, t)))
  seg_args, seg_specs = _segment_operands(
      segments, block_q, block_kv, False,
      lambda b, g, j, t: (b, q_block_of(j, t)), lambda b, g, j, t: (b, j))
  kernel = functools.partial(_dkv_kernel, config=config,
                             has_segments=segments is not None,
                             num_q_blocks=num_q_blocks)
  dk, dv = pl.pallas_call(
      kernel,
      grid_spec=compat.pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0,
          grid=(batch, kv_heads, kv_pad // block_kv, group * num_q_blocks),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec,
                    stat_spec] + seg_specs,
          out_specs=[kv_spec, kv_spec],
          scratch_shapes=[compat.pltpu.VMEM((block_kv, dim), jnp.float32),
                          compat.pltpu.VMEM((block_kv, dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=compat.tpu_compiler_params(
          dimension_semantics=_SEMANTICS),
      interpret=config.interpret,
      name="flash_attention_tpu_dkv",
  )(q, k, v, d_out, row_stat(lse), row_stat(delta), *seg_args)
  return dk[:, :, :kv_len], dv[:, :, :kv_len]


# delta_i = <o_i, do_i> for o, do [batch, heads, q_len, dim], in lse's layout
# [batch, heads, q_len].
_flash = flash_custom_vjp(_forward, _dq, _dkv,
                          lambda out, d_out: jnp.sum(out * d_out, axis=-1))
