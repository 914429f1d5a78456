"""Decode attention: a few new queries against a long KV cache (LeanAttention).

In the decode phase of a language model each sequence b adds Tq (usually 1)
tokens whose queries attend to a cache of capacity S, of which the first
kv_lengths[b] entries are valid; the new tokens are the last Tq of them. For
query t < Tq and query head h (served by key/value head h // (H / H_kv)):

    s_tj = sm_scale * <q_t, k_j>
    visible_tj = j < kv_lengths[b] - (Tq - 1 - t)      (the ends are aligned)
    o_t = sum_j softmax_j(s_tj | visible_tj) v_j,      o_t = 0 if none visible

With one query row per head there is little parallelism in the queries, so
the work is split along the context. A set P of keys gives the partial

    m_P = max_{j in P} s_j,   l_P = sum_{j in P} exp(s_j - m_P),
    o_P = sum_{j in P} exp(s_j - m_P) v_j            (unnormalised)

and two partials of disjoint sets merge exactly (LeanAttention's softmax
re-scaling operator, associative and commutative, so any split and any
merge order give the same attention up to rounding):

    m = max(m_1, m_2),   l = e^(m_1 - m) l_1 + e^(m_2 - m) l_2,
    o = e^(m_1 - m) o_1 + e^(m_2 - m) o_2,   and finally o / l.

An empty set has m = MASK_VALUE (finite), l = 0, o = 0: the merge's identity.

Implementations (`impl=`), forward only (decoding does not differentiate):
- `xla`: split-K in jnp (FlashDecoding's form): the cache is cut into
  `num_splits` equal chunks, every chunk's partial is computed at once
  (masked by the lengths, float32 inside), then merged. The path off GPU
  ("auto" on CPU and TPU).
- `pallas`: a Pallas (Triton-style) kernel with LeanAttention's stream-K
  schedule. The work units are (batch, kv head, key tile of `block_kv`
  valid keys): sum_b H_kv ceil(kv_lengths[b] / block_kv) of them, numbered
  sequence by sequence, so a shorter sequence brings fewer tiles. They are cut
  into `num_splits` equal contiguous ranges, one per program (the "workers",
  by default the GPU's SM count), so every program does the same work
  whatever the lengths, and a range may span several heads and sequences.
  A program walks its range head by head with an online softmax over the
  tiles; the query rows of a kv head (its GQA group times Tq) form one tile
  of queries, so k and v are read once per kv head. A head whose tiles all
  lie in one program is normalised and written there; a head cut by range
  boundaries leaves at most two partials per program (its first and last
  head), which a small merge in jnp combines with the rule above (segment
  max and sums over the partials). The schedule (prefix sums of tiles per
  head) is computed from kv_lengths in jnp, so lengths may change between
  calls without recompiling. block_kv must be a power of two >= 16 (Triton).
  GPU only; lowering checked with `jax.export(platforms=["cuda"])`.
- `interpret`: the same kernel in Pallas interpret mode, on any backend.
- `reference`: dense masked softmax in float32
  (`flash_attention.reference_attention` with the visibility mask).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import compat
from pallas_kernels.attention_problem import (MASK_VALUE,
                                              check_attention_operands,
                                              check_integer_arrays, pad_axis)
from pallas_kernels.compat import pl
from pallas_kernels.flash_attention import reference_attention

IMPLS = ("auto", "xla", "pallas", "interpret", "reference")
_MIN_KERNEL_BLOCK = 16  # Triton's dots need every dimension >= 16.
# Keys per chunk of the xla path when num_splits is not given: long enough
# to amortise each chunk's reductions, short enough to split a 4K cache.
_XLA_CHUNK = 1024
_DEFAULT_WORKERS = 132  # an H100's SM count, when the device does not say


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     kv_lengths: jax.Array, *, sm_scale: float | None = None,
                     num_splits: int | None = None, block_kv: int = 64,
                     impl: str = "auto") -> jax.Array:
  """Attention of the newest Tq tokens over a KV cache (module docstring).

  Args:
    q: [batch, Tq, heads, head_dim], the queries of each sequence's last Tq
      valid cache positions.
    k, v: [batch, S, kv_heads, head_dim], the cache (capacity S), heads %
      kv_heads == 0; q, k, v of one dtype (float32, bfloat16 or float16).
    kv_lengths: int [batch], valid cache entries per sequence, 1..S; query t
      sees positions j < kv_lengths[b] - (Tq - 1 - t).
    sm_scale: logit scale, default head_dim ** -0.5.
    num_splits: "xla": chunks of the cache (1..S, default S / 1024 rounded
      up); "pallas" / "interpret": stream-K programs (default the GPU's SM
      count, 132 elsewhere).
    block_kv: keys per tile of the kernel, a power of two >= 16.
    impl: "auto" (pallas on GPU, xla elsewhere), "xla", "pallas",
      "interpret" or "reference".

  Returns:
    [batch, Tq, heads, head_dim] in q's dtype; a query that sees no key
    (kv_lengths[b] < Tq) gets 0. Forward only: no gradient rule is defined
    for the kernel.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is unknown; valid: {', '.join(IMPLS)}")
  if impl == "auto":
    impl = "pallas" if compat.default_backend() == "gpu" else "xla"
  _check_inputs(q, k, v, kv_lengths, num_splits, block_kv, impl)
  sm_scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
  kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
  if impl == "reference":
    return reference_attention(q, k, v, sm_scale=sm_scale,
                               mask=visible_mask(kv_lengths, q.shape[1],
                                                 k.shape[1])[:, None])
  if impl == "xla":
    splits = num_splits or -(-k.shape[1] // _XLA_CHUNK)
    return _split_k_attention(q, k, v, kv_lengths, sm_scale, splits)
  return _stream_k_attention(q, k, v, kv_lengths, sm_scale,
                             num_splits or _num_workers(), block_kv,
                             interpret=impl == "interpret")


def visible_mask(kv_lengths: jax.Array, q_len: int, capacity: int
                 ) -> jax.Array:
  """Boolean [batch, q_len, capacity]: query t of sequence b sees cache
  position j iff j < kv_lengths[b] - (q_len - 1 - t)."""
  limit = kv_lengths[:, None] - (q_len - 1 - jnp.arange(q_len))
  return jnp.arange(capacity) < limit[:, :, None]


def merge_partials(o: jax.Array, m: jax.Array, l: jax.Array, axis: int = 0
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Merges softmax partials along `axis` exactly (module docstring).

  o: [..., head_dim] unnormalised outputs; m, l: the running max and sum,
  o's shape without head_dim; `axis` counts in m's dimensions. Returns the
  merged (o, m, l) without that axis.
  """
  m_all = jnp.max(m, axis=axis, keepdims=True)
  # Empty partials (m = MASK_VALUE) get weight exp(MASK_VALUE - m_all) = 0,
  # or exp(0) = 1 times l = 0 and o = 0 when every partial is empty.
  weight = jnp.exp(m - m_all)
  merged_o = jnp.sum(weight[..., None] * o, axis=axis)
  merged_l = jnp.sum(weight * l, axis=axis)
  return merged_o, jnp.squeeze(m_all, axis), merged_l


def normalize(o: jax.Array, l: jax.Array) -> jax.Array:
  """o / l, and 0 where no key was visible (l == 0)."""
  return o / jnp.where(l > 0, l, 1.0)[..., None]


# --------------------------------------------------------------- checking --


def _kernel_block(size: int) -> bool:
  return size >= _MIN_KERNEL_BLOCK and not size & (size - 1)


def _num_workers() -> int:
  """The stream-K program count: one per SM of the GPU."""
  return int(getattr(jax.devices()[0], "core_count", 0) or _DEFAULT_WORKERS)


def _check_inputs(q, k, v, kv_lengths, num_splits, block_kv, impl) -> None:
  check_attention_operands(q, k, v)
  batch, capacity = q.shape[0], k.shape[1]
  check_integer_arrays({"kv_lengths": kv_lengths})
  if jnp.shape(kv_lengths) != (batch,):
    raise ValueError(f"kv_lengths must have shape [batch] = ({batch},), got "
                     f"{jnp.shape(kv_lengths)}")
  if not isinstance(kv_lengths, jax.core.Tracer):
    lengths = np.asarray(kv_lengths)
    bad = (lengths < 1) | (lengths > capacity)
    if bad.any():
      index = int(np.argmax(bad))
      raise ValueError(f"kv_lengths[{index}] = {lengths[index]} is outside "
                       f"[1, S={capacity}]")
  if num_splits is not None and not (
      isinstance(num_splits, (int, np.integer)) and num_splits >= 1
      and (impl != "xla" or num_splits <= capacity)):
    limit = f"1..S={capacity}" if impl == "xla" else "a positive integer"
    raise ValueError(f"num_splits={num_splits!r} must be {limit}")
  if not isinstance(block_kv, (int, np.integer)) or block_kv < 1:
    raise ValueError(f"block_kv={block_kv!r} must be a positive integer")
  if impl in ("pallas", "interpret") and not _kernel_block(block_kv):
    raise ValueError(f"block_kv={block_kv}: impl={impl!r} needs a power of "
                     f"two >= {_MIN_KERNEL_BLOCK}")


# -------------------------------------------------------------------- xla --


def _split_k_attention(q, k, v, kv_lengths, sm_scale, num_splits):
  """Every chunk's partial at once (two batched products over [batch,
  chunk, kv head]), then the exact merge over chunks."""
  batch, q_len, heads, dim = q.shape
  capacity, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  rows = q_len * group
  chunk = -(-capacity // num_splits)

  def chunked(x):  # [B, n, chunk, H_kv, D]
    x = pad_axis(x, 1, num_splits * chunk)
    return x.reshape(batch, num_splits, chunk, kv_heads, dim)

  # Rows (query t, head g of the group) of one kv head share its keys.
  q_rows = q.reshape(batch, q_len, kv_heads, group, dim).transpose(
      0, 2, 1, 3, 4).reshape(batch, kv_heads, rows, dim)
  logits = jnp.einsum("bkrd,bnckd->bnkrc", q_rows, chunked(k),
                      preferred_element_type=jnp.float32) * sm_scale
  position = jnp.arange(num_splits * chunk).reshape(num_splits, chunk)
  limit = jnp.repeat(kv_lengths[:, None] - (q_len - 1 - jnp.arange(q_len)),
                     group, axis=1)                     # [B, R]
  visible = (position[None, :, None, None, :]
             < limit[:, None, None, :, None])           # [B, n, 1, R, c]
  logits = jnp.where(visible, logits, MASK_VALUE)
  m = jnp.max(logits, axis=-1)                          # [B, n, H_kv, R]
  p = jnp.where(visible, jnp.exp(logits - m[..., None]), 0.0)
  l = jnp.sum(p, axis=-1)
  o = jnp.einsum("bnkrc,bnckd->bnkrd", p.astype(v.dtype), chunked(v),
                 preferred_element_type=jnp.float32)    # [B, n, H_kv, R, D]
  o, _, l = merge_partials(o, m, l, axis=1)
  out = normalize(o, l).reshape(batch, kv_heads, q_len, group, dim)
  return out.transpose(0, 2, 1, 3, 4).reshape(batch, q_len, heads,
                                              dim).astype(q.dtype)


# ----------------------------------------------------------------- Pallas --


def _stream_k_schedule(kv_lengths, kv_heads, block_kv, num_workers):
  """The stream-K split of the (sequence, kv head, key tile) work units.

  Head g = b * kv_heads + i owns units head_start[g] .. head_start[g + 1]
  (ceil(kv_lengths[b] / block_kv) of them); worker w takes units
  work_start[w] .. work_end[w], an equal share of the total, starting in
  head first_head[w]. Returns int32 arrays.
  """
  tiles = jnp.repeat(-(-kv_lengths // block_kv), kv_heads)        # [G]
  head_start = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                jnp.cumsum(tiles, dtype=jnp.int32)])
  total = head_start[-1]
  share = -(-total // num_workers)
  worker = jnp.arange(num_workers, dtype=jnp.int32)
  work_start = jnp.minimum(worker * share, total)
  work_end = jnp.minimum(work_start + share, total)
  last = tiles.shape[0] - 1
  first_head = jnp.minimum(
      jnp.searchsorted(head_start, work_start, side="right") - 1, last)
  last_head = jnp.clip(
      jnp.searchsorted(head_start, work_end - 1, side="right") - 1, 0, last)
  return (head_start, work_start, work_end, first_head.astype(jnp.int32),
          last_head.astype(jnp.int32))


def _stream_k_kernel(head_start_ref, kv_len_ref, work_start_ref,
                     work_end_ref, first_head_ref, q_ref, k_ref, v_ref,
                     out_ref, part_o_ref, part_m_ref, part_l_ref, *,
                     sm_scale: float, kv_heads: int, group: int, q_len: int,
                     block_kv: int):
  worker = pl.program_id(0)
  start, end = work_start_ref[worker], work_end_ref[worker]
  rows, dim = q_ref.shape[1], q_ref.shape[2]
  # Row r is query r // group (rows past q_len * group are padding).
  lag = q_len - 1 - jnp.minimum(jnp.arange(rows) // group, q_len - 1)

  def head_piece(carry):
    head, unit = carry
    head_lo, head_hi = head_start_ref[head], head_start_ref[head + 1]
    piece_end = jnp.minimum(end, head_hi)
    batch, kv_head = head // kv_heads, head % kv_heads
    q = q_ref[head]
    limit = (kv_len_ref[head] - lag)[:, None]               # [rows, 1]

    def tile(t, state):
      acc, row_max, row_sum = state
      kv_start = t * block_kv
      k = k_ref[batch, pl.ds(kv_start, block_kv), kv_head, :]
      v = v_ref[batch, pl.ds(kv_start, block_kv), kv_head, :]
      s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32) * sm_scale
      visible = kv_start + jnp.arange(block_kv)[None, :] < limit
      s = jnp.where(visible, s, MASK_VALUE)
      new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
      p = jnp.where(visible, jnp.exp(s - new_max[:, None]), 0.0)
      rescale = jnp.exp(row_max - new_max)
      row_sum = rescale * row_sum + jnp.sum(p, axis=1)
      acc = rescale[:, None] * acc + jax.lax.dot_general(
          p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
          preferred_element_type=jnp.float32)
      return acc, new_max, row_sum

    state = (jnp.zeros((rows, dim), jnp.float32),
             jnp.full((rows,), MASK_VALUE, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    acc, row_max, row_sum = jax.lax.fori_loop(unit - head_lo,
                                              piece_end - head_lo, tile, state)
    whole = jnp.logical_and(unit == head_lo, piece_end == head_hi)

    @pl.when(whole)
    def _():
      norm = jnp.where(row_sum > 0.0, row_sum, 1.0)
      out_ref[head] = (acc / norm[:, None]).astype(out_ref.dtype)

    @pl.when(jnp.logical_not(whole))
    def _():
      # A cut head is this worker's first piece or its last one.
      slot = jnp.where(unit == start, 0, 1)
      part_o_ref[worker, slot] = acc
      part_m_ref[worker, slot] = row_max
      part_l_ref[worker, slot] = row_sum

    return head + 1, piece_end

  jax.lax.while_loop(lambda carry: carry[1] < end, head_piece,
                     (first_head_ref[worker], start))


def _stream_k_attention(q, k, v, kv_lengths, sm_scale, num_workers, block_kv,
                        interpret):
  batch, q_len, heads, dim = q.shape
  capacity, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  num_heads = batch * kv_heads
  rows = max(_MIN_KERNEL_BLOCK, pl.next_power_of_2(q_len * group))
  dim_pad = max(_MIN_KERNEL_BLOCK, pl.next_power_of_2(dim))
  # One tile of queries per kv head: [B * H_kv, (t, g) rows, head_dim].
  q_rows = q.reshape(batch, q_len, kv_heads, group, dim).transpose(
      0, 2, 1, 3, 4).reshape(num_heads, q_len * group, dim)
  q_rows = pad_axis(pad_axis(q_rows, 1, rows), 2, dim_pad)
  # No copy of the cache when S is a multiple of block_kv and head_dim a
  # power of two >= 16 (the usual case); else the padding is masked.
  kv_pad = -(-capacity // block_kv) * block_kv
  k = pad_axis(pad_axis(k, 1, kv_pad), 3, dim_pad)
  v = pad_axis(pad_axis(v, 1, kv_pad), 3, dim_pad)
  head_start, work_start, work_end, first_head, last_head = (
      _stream_k_schedule(kv_lengths, kv_heads, block_kv, num_workers))
  head_lengths = jnp.repeat(kv_lengths, kv_heads)
  # Triton loads whole power-of-two vectors: pad the scalar tables.
  tables = [pad_axis(x, 0, pl.next_power_of_2(x.shape[0]))
            for x in (head_start, head_lengths, work_start, work_end,
                      first_head)]
  out, part_o, part_m, part_l = pl.pallas_call(
      functools.partial(_stream_k_kernel, sm_scale=sm_scale,
                        kv_heads=kv_heads, group=group, q_len=q_len,
                        block_kv=block_kv),
      grid=(num_workers,),
      out_shape=[
          jax.ShapeDtypeStruct((num_heads, rows, dim_pad), jnp.float32),
          jax.ShapeDtypeStruct((num_workers, 2, rows, dim_pad), jnp.float32),
          jax.ShapeDtypeStruct((num_workers, 2, rows), jnp.float32),
          jax.ShapeDtypeStruct((num_workers, 2, rows), jnp.float32),
      ],
      compiler_params=(None if interpret else compat.triton_compiler_params(
          num_warps=4, num_stages=2)),
      interpret=interpret,
      name="decode_attention_stream_k",
  )(*tables, q_rows, k, v)

  # The fix-up: merge each cut head's partials (slot 0: the worker's first
  # head, slot 1: its last), by segment max and sums over the slots.
  nonempty = work_start < work_end
  first_cut = nonempty & ((work_start > head_start[first_head])
                          | (work_end < head_start[first_head + 1]))
  last_cut = nonempty & (last_head != first_head) & (
      work_end < head_start[last_head + 1])
  # Unused slots (never written) go to a dropped segment, num_heads.
  slot_head = jnp.stack([jnp.where(first_cut, first_head, num_heads),
                         jnp.where(last_cut, last_head, num_heads)],
                        axis=1).reshape(-1)
  part_o = part_o.reshape(num_workers * 2, rows, dim_pad)
  part_m = part_m.reshape(num_workers * 2, rows)
  part_l = part_l.reshape(num_workers * 2, rows)
  segments = num_heads + 1
  head_max = jax.ops.segment_max(part_m, slot_head, segments)
  weight = jnp.exp(part_m - head_max[slot_head])
  merged_o = jax.ops.segment_sum(weight[..., None] * part_o, slot_head,
                                 segments)[:num_heads]
  merged_l = jax.ops.segment_sum(weight * part_l, slot_head,
                                 segments)[:num_heads]
  cut = jax.ops.segment_sum(jnp.ones_like(slot_head), slot_head,
                            segments)[:num_heads] > 0
  out = jnp.where(cut[:, None, None], normalize(merged_o, merged_l), out)
  out = out[:, :q_len * group, :dim].reshape(
      batch, kv_heads, q_len, group, dim).transpose(0, 2, 1, 3, 4)
  return out.reshape(batch, q_len, heads, dim).astype(q.dtype)
