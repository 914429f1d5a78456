"""Block-sparse attention's forward as a Mosaic TPU kernel (`custom_vjp`).

Same semantics as `block_sparse_attention` (that module's docstring): for
query t in query block i of batch b and head h, and key j,

    s_tj = sm_scale * <q_t, k_j>
    mask_tj = block(j) listed for (b, h, i)  and  j < kv_len
              and (not causal or j <= t + kv_len - q_len)   (ends aligned)
    o_t = sum_j softmax_j(s_tj | mask_tj) v_j,   o_t = 0 if no key is visible

Reached through `block_sparse_attention(..., impl="tpu")` (compiled by
Mosaic, TPU only; what "auto" picks on TPU when the blocks fit the tiles) or
`impl="tpu_interpret"` (TPU interpret mode, on CPU). The backward is the
`xla` path's VJP (recomputing the forward), as for `impl="pallas"`.

The kernel is the TPU flash forward (`flash_attention_tpu.py`) with the key
loop running over list slots instead of key blocks, splash attention's way:

* Layout [batch, heads, len, head_dim] inside (the wrapper transposes and
  pads head_dim to a multiple of 128 lanes); one tile is one list block, so
  block_kv (lanes) must be a multiple of 128 and block_q (sublanes) of 8 (16
  for bfloat16). Lengths are padded to whole blocks; padded keys are masked
  and padded query rows sliced off.
* Grid (batch, heads, query block, slot), slot in [0, max_blocks), the last
  dimension "arbitrary". The per-slot key-block ids and the per-row counts
  are scalar-prefetched into SMEM (flattened, with shared size-1 batch/head
  axes kept unbroadcast), and the k/v index maps read them to choose which
  block to DMA. Slots at or past a row's count repeat its last real block,
  so Pallas issues no new DMA, and run no compute (`pl.when`).
* Causal: listed blocks entirely above the diagonal are dropped from the
  count in XLA beforehand (a list is sorted, so they form its tail), so they
  cost neither DMA nor compute; blocks on the diagonal and the block holding
  the last key (when kv_len is not a block multiple) build their mask, the
  rest skip it.
* Online softmax (natural base) in VMEM scratch across the slots: running
  max m and normaliser l replicated over 128 lanes, the float32 accumulator
  [block_q, head_dim]; the output is written on the last slot, rows that saw
  no key (l = 0) as 0.
* GQA/MQA: query head h reads key/value head h // (heads / kv_heads) in the
  index map, so k and v are never repeated.

float16 is computed in float32 (Mosaic's dot has no float16); bfloat16 feeds
the MXU with float32 accumulation. SMEM holds the id table (4 bytes per
(list batch, list head, query block, slot)) and the counts, so very long
lists with per-head blocks need int16 ids (as splash attention downcasts) or
a grid split over heads; not done.

Verified on CPU through TPU interpret mode and lowered to Mosaic through
`jax.export(platforms=["tpu"])`; not yet compiled or run on a TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import compat
from pallas_kernels.attention_problem import MASK_VALUE, pad_axis
from pallas_kernels.compat import pl
from pallas_kernels.flash_attention_tpu import (_NT, _SEMANTICS, NUM_LANES,
                                                NUM_SUBLANES, _lanes,
                                                _positions, _run_step,
                                                online_softmax_update)


def _sublanes(dtype) -> int:
  """Rows of one sublane tile of the dtype the kernel computes in (float16
  runs as float32; 16-bit tiles hold 16 rows)."""
  if jnp.dtype(dtype) == jnp.float16:
    return NUM_SUBLANES
  return NUM_SUBLANES * max(1, 4 // jnp.dtype(dtype).itemsize)


def unsupported_blocks(block_q: int, block_kv: int, dtype) -> str | None:
  """Why the kernel cannot take these list blocks (its tiles), or None."""
  rows = _sublanes(dtype)
  if block_q % rows:
    return (f"blocks.block_q={block_q}: the TPU kernel needs a multiple of "
            f"{rows} ({jnp.dtype(dtype).name} sublane tiles)")
  if block_kv % NUM_LANES:
    return (f"blocks.block_kv={block_kv}: the TPU kernel needs a multiple of "
            f"{NUM_LANES} (lanes)")
  return None


def _kv_block_table(indices, counts, problem):
  """(ids, counts) the kernel reads: ids [.., nq, width] the key block to
  DMA at each slot (slots past the count repeat the last real block, so no
  new DMA; clipped into range), counts [.., nq] the slots to compute
  (causal: without the listed tail above the diagonal)."""
  bq, bk = problem.block_q, problem.block_kv
  num_kv_blocks = -(-problem.kv_len // bk)
  width = indices.shape[-1]
  slot = jnp.arange(width, dtype=jnp.int32)
  if problem.causal:
    num_q_blocks = indices.shape[2]
    last_key = ((jnp.arange(num_q_blocks, dtype=jnp.int32) + 1) * bq - 1
                + problem.offset)                           # [nq]
    visible = ((slot < counts[..., None])
               & (indices * bk <= last_key[:, None]))
    # One past the last visible slot (sorted lists: the visible prefix).
    counts = jnp.max(jnp.where(visible, slot + 1, 0), axis=-1)
  last = jnp.maximum(counts - 1, 0)[..., None]
  ids = jnp.take_along_axis(indices, jnp.minimum(slot, last), axis=-1)
  return jnp.clip(ids, 0, num_kv_blocks - 1), counts.astype(jnp.int32)


def _forward_kernel(ids_ref, counts_ref, q_ref, k_ref, v_ref, o_ref,
                    m_scratch, l_scratch, acc_scratch, *, problem, list_row,
                    width: int):
  bq, bk = problem.block_q, problem.block_kv
  dim = acc_scratch.shape[-1]
  b, h, i, slot = (pl.program_id(axis) for axis in range(4))
  row = list_row(b, h, i)
  q_start = i * bq
  kv_start = ids_ref[row * width + slot] * bk

  @pl.when(slot == 0)
  def _init():
    m_scratch[...] = jnp.full(m_scratch.shape, MASK_VALUE, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  def step(masked: bool):
    s = lax.dot_general(q_ref[...], k_ref[...], _NT,
                        preferred_element_type=jnp.float32) * problem.sm_scale
    mask = None
    if masked:
      shape = (bq, bk)
      kv_pos = _positions(kv_start, 1, shape)
      mask = kv_pos < problem.kv_len                # padded keys
      if problem.causal:
        mask = mask & (kv_pos <= _positions(q_start, 0, shape)
                       + problem.offset)
      s = jnp.where(mask, s, MASK_VALUE)
    online_softmax_update(s, mask, v_ref, m_scratch, l_scratch, acc_scratch)

  run = slot < counts_ref[row]
  full = kv_start + bk <= problem.kv_len
  if problem.causal:  # the first query row sees the block's last key
    full = full & (kv_start + bk - 1 <= q_start + problem.offset)
  _run_step(run, full, step)

  @pl.when(slot == width - 1)
  def _finish():
    l = l_scratch[...]
    l = jnp.where(l == 0.0, 1.0, l)   # rows that saw no key: 0 / 1
    o_ref[...] = (acc_scratch[...] * _lanes(1.0 / l, dim)).astype(
        o_ref.dtype)


def _forward(q, k, v, indices, counts, problem):
  """The kernel on [batch, len, heads, head_dim] operands; indices
  [batch or 1, heads or 1, nq, width], counts [batch or 1, heads or 1, nq]."""
  dtype = q.dtype
  if dtype == jnp.float16:  # Mosaic's matmul has no float16
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  bq, bk = problem.block_q, problem.block_kv
  list_batch, list_heads, num_q_blocks, width = indices.shape
  if width == 0:  # a grid needs a slot; count 0 computes nothing
    indices = pad_axis(indices, 3, 1)
    width = 1
  num_kv_blocks = -(-problem.kv_len // bk)
  dim = -(-head_dim // NUM_LANES) * NUM_LANES

  def to_kernel_layout(x, length):  # [b, s, h, d] -> [b, h, length, dim]
    return pad_axis(pad_axis(jnp.swapaxes(x, 1, 2), 2, length), 3, dim)

  q = to_kernel_layout(q, num_q_blocks * bq)
  k = to_kernel_layout(k, num_kv_blocks * bk)
  v = to_kernel_layout(v, num_kv_blocks * bk)
  ids, counts = _kv_block_table(indices.astype(jnp.int32),
                                counts.astype(jnp.int32), problem)

  def list_row(b, h, i):  # the flat row of (b, h, i) in the shared tables
    b = b if list_batch > 1 else 0
    h = h if list_heads > 1 else 0
    return (b * list_heads + h) * num_q_blocks + i

  def kv_index(b, h, i, slot, ids_ref, counts_ref):
    del counts_ref
    # lax.div: exact for non-negative ints, and `//` would lower through sign.
    return (b, lax.div(h, group), ids_ref[list_row(b, h, i) * width + slot], 0)

  sq = compat.SQUEEZED
  q_spec = pl.BlockSpec((sq, sq, bq, dim),
                        lambda b, h, i, slot, *tables: (b, h, i, 0))
  kv_spec = pl.BlockSpec((sq, sq, bk, dim), kv_index)
  kernel = functools.partial(_forward_kernel, problem=problem,
                             list_row=list_row, width=width)
  out = pl.pallas_call(
      kernel,
      grid_spec=compat.pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(batch, heads, num_q_blocks, width),
          in_specs=[q_spec, kv_spec, kv_spec],
          out_specs=q_spec,
          scratch_shapes=[
              compat.pltpu.VMEM((bq, NUM_LANES), jnp.float32),  # m
              compat.pltpu.VMEM((bq, NUM_LANES), jnp.float32),  # l
              compat.pltpu.VMEM((bq, dim), jnp.float32),        # acc
          ]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=compat.tpu_compiler_params(
          dimension_semantics=_SEMANTICS),
      interpret=(compat.tpu_interpret_params() if problem.interpret
                 else False),
      name="block_sparse_attention_tpu_fwd",
  )(ids.reshape(-1), counts.reshape(-1), q, k, v)
  return jnp.swapaxes(out[:, :, :q_len, :head_dim], 1, 2).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def block_sparse_attention_tpu(q, k, v, indices, counts, problem):
  """The TPU kernel on checked inputs (call `block_sparse_attention`).

  q [batch, q_len, heads, head_dim], k/v [batch, kv_len, kv_heads,
  head_dim]; indices / counts a `BlockList`'s (size-1 batch or head axes
  shared); problem the block-sparse module's static `_Problem` (its
  `interpret` selects TPU interpret mode). Differentiable in q, k, v through
  the `xla` path.
  """
  return _forward(q, k, v, indices, counts, problem)


def _attention_fwd(q, k, v, indices, counts, problem):
  out = _forward(q, k, v, indices, counts, problem)
  return out, (q, k, v, indices, counts)


def _attention_bwd(problem, residuals, d_out):
  # Imported here: that module imports this one.
  from pallas_kernels.block_sparse_attention import _gathered_backward
  q, k, v, indices, counts = residuals
  shape = (q.shape[0], q.shape[2]) + tuple(counts.shape[2:])
  full = (jnp.broadcast_to(indices.astype(jnp.int32),
                           shape + indices.shape[-1:]),
          jnp.broadcast_to(counts.astype(jnp.int32), shape))
  return _gathered_backward(problem, (q, k, v, *full), d_out)


block_sparse_attention_tpu.defvjp(_attention_fwd, _attention_bwd)
