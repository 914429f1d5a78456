"""Block-sparse attention: softmax attention over listed key/value blocks only.

Queries are cut into blocks of `block_q` rows and keys into blocks of
`block_kv` columns. For every batch b, query head h (served by key/value head
h // (H / H_kv)) and query block i, a `BlockList` names the key blocks that
block may see; every other key is masked:

    s_tj = sm_scale * <q_t, k_j>                 t in query block i
    mask_tj = block(j) in blocks[b, h, i]
              and j < kv_len
              and (not causal or j <= t + kv_len - q_len)   (ends aligned)
    o_t = sum_j softmax_j(s_tj | mask_tj) v_j,   o_t = 0 if no key is visible

Listing a block above the causal diagonal costs work but changes nothing; a
block on the diagonal is masked inside (causal only), as in FlashAttention.

`BlockList` is the small explicit type the long-context selectors (MInference,
XAttention, FlexPrefill, SALE) produce and the kernels consume, in the spirit
of splash attention's mask info: per query block the sorted key-block indices
padded to a fixed width, and how many of them are real.

Implementations (`impl=`):
- `xla`: in jnp, work and memory following the listed blocks, not
  q_len * kv_len. Forward: the query blocks of all batches and heads sorted by
  their counts and cut into groups of 32; each group loops over list slots up
  to its own longest list, gathering one key/value block per row and slot into
  an online softmax, so rows of few blocks do not pay for the longest. The
  backward (`custom_vjp`) differentiates the gathered form: each query block's
  listed blocks gathered at once ([.., max_blocks * block_kv, head_dim]) and
  dense attention on them (the gather's transpose is a scatter-add). The path
  off GPU ("auto" on CPU, and on TPU where the blocks do not fit `tpu`).
- `pallas`: a Pallas (Triton-style) forward kernel, one program per (query
  block, batch, head), looping over its `counts` listed blocks with an online
  softmax in base 2, the flash kernel's loop with the block index read from
  the list. Its backward recomputes through the `xla` path (`custom_vjp`), so
  models can train with it; block sizes must be powers of two >= 16 (Triton).
  GPU only; lowering checked with `jax.export(platforms=["cuda"])`.
- `interpret`: the same Pallas kernel in interpret mode, on any backend.
- `tpu`: a Mosaic TPU forward kernel (`block_sparse_attention_tpu.py`), grid
  (batch, head, query block, list slot) with the list scalar-prefetched and
  read by the key/value index maps; backward through the `xla` path
  (`custom_vjp`). block_kv must be a multiple of 128 and block_q of 8 (16
  for bfloat16). TPU only; "auto" on TPU when the blocks fit.
- `tpu_interpret`: that kernel through TPU interpret mode, on CPU.
- `reference`: the block list expanded into a dense [q_len, kv_len] mask and
  `flash_attention.reference_attention` (float32 inside).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import compat
from pallas_kernels.attention_problem import (MASK_VALUE,
                                              check_attention_operands,
                                              check_integer_arrays, pad_axis,
                                              round_up)
from pallas_kernels.block_sparse_attention_tpu import (
    block_sparse_attention_tpu, unsupported_blocks)
from pallas_kernels.compat import pl
from pallas_kernels.flash_attention import reference_attention

IMPLS = ("auto", "xla", "pallas", "interpret", "tpu", "tpu_interpret",
         "reference")
_LOG2E = math.log2(math.e)
_MIN_KERNEL_BLOCK = 16  # Triton's dots need every dimension >= 16.


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["indices", "counts"],
                   meta_fields=["block_q", "block_kv"])
@dataclasses.dataclass(frozen=True)
class BlockList:
  """Which key blocks each query block attends to.

  indices: int32 [batch or 1, heads or 1, num_q_blocks, max_blocks]; per query
    block the key-block indices in increasing order, then padding (any value;
    entries at positions >= counts are ignored). A leading axis of size 1 is
    shared by every batch element / head.
  counts: int32 [batch or 1, heads or 1, num_q_blocks], how many entries of
    `indices` are real (0 .. max_blocks).
  block_q, block_kv: the block sizes, in tokens.
  """
  indices: Any
  counts: Any
  block_q: int
  block_kv: int

  @property
  def max_blocks(self) -> int:
    return int(self.indices.shape[-1])

  @classmethod
  def from_block_mask(cls, block_mask: Any, block_q: int, block_kv: int,
                      max_blocks: int | None = None) -> "BlockList":
    """From a boolean [batch or 1, heads or 1, num_q_blocks, num_kv_blocks]
    mask (True: the query block sees the key block). `max_blocks`, the padded
    width, defaults to the largest count (which needs a concrete mask; pass
    it under `jit`)."""
    block_mask = jnp.asarray(block_mask, bool)
    if block_mask.ndim != 4:
      raise ValueError(f"block_mask must be [batch, heads, num_q_blocks, "
                       f"num_kv_blocks], got shape {block_mask.shape}")
    counts = block_mask.sum(-1, dtype=jnp.int32)
    if max_blocks is None:
      max_blocks = max(int(jnp.max(counts)), 1)
    # Each visible block goes to its rank among the visible ones (a running
    # count, so in increasing order); the others to a spare last slot. A
    # scatter, several times faster than sorting on a CPU.
    num_kv_blocks = block_mask.shape[-1]
    rank = jnp.cumsum(block_mask, axis=-1, dtype=jnp.int32) - 1
    slot = jnp.where(block_mask, rank, num_kv_blocks)
    lists = jnp.zeros(block_mask.shape[:3] + (num_kv_blocks + 1,), jnp.int32)
    lists = lists.at[tuple(jnp.indices(slot.shape)[:3]) + (slot,)].set(
        jnp.broadcast_to(jnp.arange(num_kv_blocks, dtype=jnp.int32),
                         slot.shape))
    indices = lists[..., :min(max_blocks, num_kv_blocks)]
    if max_blocks > num_kv_blocks:
      indices = pad_axis(indices, 3, max_blocks)
    return cls(indices, jnp.minimum(counts, max_blocks), block_q, block_kv)

  def trimmed(self) -> "BlockList":
    """The same list padded only to its longest row (concrete lists only):
    selectors that run under `jit` pad to every key block, and the `xla`
    path's work follows the padded width."""
    width = max(int(np.max(np.asarray(self.counts))), 1)
    return dataclasses.replace(self, indices=self.indices[..., :width])

  def to_block_mask(self, num_kv_blocks: int) -> jax.Array:
    """The boolean [batch or 1, heads or 1, num_q_blocks, num_kv_blocks]
    mask this list describes."""
    real = jnp.arange(self.max_blocks) < self.counts[..., None]
    hits = jax.nn.one_hot(jnp.where(real, self.indices, num_kv_blocks),
                          num_kv_blocks + 1, dtype=jnp.int32)
    return hits.sum(-2)[..., :num_kv_blocks] > 0

  def density(self, num_kv_blocks: int) -> jax.Array:
    """The fraction of (query block, key block) pairs listed."""
    return jnp.mean(self.counts / num_kv_blocks)


def dense_block_list(batch: int, heads: int, q_len: int, kv_len: int,
                     block_q: int, block_kv: int, *,
                     causal: bool = False) -> BlockList:
  """Every key block for every query block (causal: those on or below the
  diagonal, ends aligned): the block list of dense attention."""
  nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
  mask = np.ones((nq, nk), bool)
  if causal:
    last_key = np.minimum((np.arange(nq) + 1) * block_q, q_len) - 1 + (
        kv_len - q_len)
    mask = np.arange(nk)[None, :] * block_kv <= last_key[:, None]
  mask = np.broadcast_to(mask, (batch, heads, nq, nk))
  return BlockList.from_block_mask(mask, block_q, block_kv)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                           blocks: BlockList, *, causal: bool = False,
                           sm_scale: float | None = None,
                           impl: str = "auto") -> jax.Array:
  """Attention restricted to the key blocks in `blocks` (module docstring).

  Args:
    q: [batch, q_len, heads, head_dim].
    k, v: [batch, kv_len, kv_heads, head_dim], heads % kv_heads == 0 (MHA,
      GQA, MQA); q, k, v of one dtype (float32, bfloat16 or float16).
    blocks: a `BlockList` with ceil(q_len / block_q) query blocks.
    causal: also mask keys after the query (query t sees keys
      j <= t + kv_len - q_len).
    sm_scale: logit scale, default head_dim ** -0.5.
    impl: "auto" (pallas on GPU, tpu on TPU, when the blocks suit the
      kernel; xla otherwise), "xla", "pallas", "interpret", "tpu",
      "tpu_interpret" or "reference".

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype; query rows that see no key
    are 0.
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
  if impl == "auto":
    kernel_blocks = isinstance(blocks, BlockList) and all(
        _kernel_block(size) for size in (blocks.block_q, blocks.block_kv))
    impl = ("pallas" if compat.default_backend() == "gpu" and kernel_blocks
            else "xla")
    if compat.default_backend() == "tpu" and isinstance(blocks, BlockList):
      impl = ("tpu" if unsupported_blocks(blocks.block_q, blocks.block_kv,
                                          jnp.result_type(q)) is None
              else "xla")
  _check_inputs(q, k, v, blocks, impl)
  sm_scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
  if impl == "reference":
    nk = -(-k.shape[1] // blocks.block_kv)
    mask = _dense_mask(blocks, nk, q.shape[1], k.shape[1])
    return reference_attention(q, k, v, causal=causal, sm_scale=sm_scale,
                               mask=mask)
  problem = _Problem(causal=bool(causal), sm_scale=sm_scale,
                     q_len=q.shape[1], kv_len=k.shape[1],
                     block_q=blocks.block_q, block_kv=blocks.block_kv,
                     interpret=impl in ("interpret", "tpu_interpret"))
  if impl in ("tpu", "tpu_interpret"):  # shared list axes stay unbroadcast
    return block_sparse_attention_tpu(q, k, v, blocks.indices, blocks.counts,
                                      problem)
  indices, counts = _full_lists(blocks, q.shape[0], q.shape[2])
  if impl == "xla":
    return _looped_attention(q, k, v, indices, counts, problem)
  return _kernel_attention(q, k, v, indices, counts, problem)


# --------------------------------------------------------------- checking --


def _kernel_block(size: int) -> bool:
  """Whether the Pallas kernel takes this block size (Triton's tile rules)."""
  return size >= _MIN_KERNEL_BLOCK and not size & (size - 1)


def _check_inputs(q, k, v, blocks, impl) -> None:
  check_attention_operands(q, k, v)
  if not isinstance(blocks, BlockList):
    raise ValueError(f"blocks must be a BlockList, got {type(blocks).__name__}")
  check_block_list(blocks, batch=q.shape[0], heads=q.shape[2],
                   q_len=q.shape[1], kv_len=k.shape[1])
  if impl in ("pallas", "interpret"):
    for name in ("block_q", "block_kv"):
      size = getattr(blocks, name)
      if not _kernel_block(size):
        raise ValueError(f"blocks.{name}={size}: impl={impl!r} needs a power "
                         f"of two >= {_MIN_KERNEL_BLOCK} (use impl='xla' for "
                         f"other block sizes)")
  if impl in ("tpu", "tpu_interpret"):
    error = unsupported_blocks(blocks.block_q, blocks.block_kv, q.dtype)
    if error:
      raise ValueError(f"{error} (impl={impl!r}; use impl='xla' for other "
                       f"block sizes)")


def check_block_list(blocks: BlockList, *, batch: int, heads: int, q_len: int,
                     kv_len: int) -> None:
  """Raises ValueError naming the field when `blocks` does not fit the
  problem. Shapes are always checked; values (ranges, order, counts) when the
  arrays are concrete (not traced inside `jit`)."""
  for name in ("block_q", "block_kv"):
    size = getattr(blocks, name)
    if not isinstance(size, (int, np.integer)) or size < 1:
      raise ValueError(f"blocks.{name}={size!r} must be a positive integer")
  nq, nk = -(-q_len // blocks.block_q), -(-kv_len // blocks.block_kv)
  indices, counts = blocks.indices, blocks.counts
  if jnp.ndim(indices) != 4 or jnp.ndim(counts) != 3:
    raise ValueError(f"blocks.indices must be [batch, heads, num_q_blocks, "
                     f"max_blocks] and blocks.counts [batch, heads, "
                     f"num_q_blocks]; got shapes {jnp.shape(indices)} and "
                     f"{jnp.shape(counts)}")
  if tuple(indices.shape[:3]) != tuple(counts.shape):
    raise ValueError(f"blocks.indices {indices.shape} and blocks.counts "
                     f"{counts.shape} must agree on [batch, heads, "
                     f"num_q_blocks]")
  for axis, (name, size) in enumerate((("batch", batch), ("heads", heads))):
    if counts.shape[axis] not in (1, size):
      raise ValueError(f"blocks have {counts.shape[axis]} along {name}; "
                       f"expected 1 or {size}")
  if counts.shape[2] != nq:
    raise ValueError(f"blocks have {counts.shape[2]} query blocks; q_len "
                     f"{q_len} / block_q {blocks.block_q} needs {nq}")
  check_integer_arrays({"blocks.indices": indices, "blocks.counts": counts})
  if isinstance(indices, jax.core.Tracer) or isinstance(counts, jax.core.Tracer):
    return
  indices, counts = np.asarray(indices), np.asarray(counts)
  width = indices.shape[-1]
  bad = (counts < 0) | (counts > width)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"blocks.counts{list(where)} = {counts[where]} is outside "
                     f"[0, max_blocks={width}]")
  real = np.arange(width) < counts[..., None]
  out_of_range = real & ((indices < 0) | (indices >= nk))
  if out_of_range.any():
    where = tuple(int(i) for i in np.argwhere(out_of_range)[0])
    raise ValueError(f"blocks.indices{list(where)} = {indices[where]} is out "
                     f"of range [0, {nk}) (kv_len {kv_len} / block_kv "
                     f"{blocks.block_kv})")
  unsorted = real[..., 1:] & (np.diff(indices, axis=-1) <= 0)
  if unsorted.any():
    where = tuple(int(i) for i in np.argwhere(unsorted)[0])
    raise ValueError(f"blocks.indices{list(where[:3])} are not strictly "
                     f"increasing at position {where[3] + 1}: "
                     f"{indices[where[:3]][:counts[where[:3]]].tolist()}")


# ----------------------------------------------------------- shared pieces --


@dataclasses.dataclass(frozen=True)
class _Problem:
  """Static description of one call (hashable: a custom_vjp argument)."""
  causal: bool
  sm_scale: float
  q_len: int
  kv_len: int
  block_q: int
  block_kv: int
  interpret: bool

  @property
  def offset(self) -> int:
    """Query t sees key j iff j <= t + offset (causal, ends aligned)."""
    return self.kv_len - self.q_len


def _full_lists(blocks: BlockList, batch: int, heads: int):
  """indices [batch, heads, nq, max_blocks] and counts [batch, heads, nq],
  int32, the shared (size-1) axes broadcast."""
  shape = (batch, heads) + tuple(blocks.counts.shape[2:])
  counts = jnp.broadcast_to(jnp.asarray(blocks.counts, jnp.int32), shape)
  indices = jnp.broadcast_to(jnp.asarray(blocks.indices, jnp.int32),
                             shape + (blocks.max_blocks,))
  return indices, counts


def _dense_mask(blocks: BlockList, num_kv_blocks: int, q_len: int,
                kv_len: int) -> jax.Array:
  """[batch or 1, heads or 1, q_len, kv_len]: the block list, expanded."""
  block_mask = blocks.to_block_mask(num_kv_blocks)
  mask = jnp.repeat(jnp.repeat(block_mask, blocks.block_q, axis=2),
                    blocks.block_kv, axis=3)
  return mask[:, :, :q_len, :kv_len]


# -------------------------------------------------------------------- xla --


def _gather_attention(q, k, v, indices, counts, problem: _Problem):
  """Dense attention over each query block's gathered key/value blocks.

  Laid out for XLA's CPU backend: one gather of whole contiguous blocks
  (flat block ids), both products as plain batched matmuls over
  [batch, heads, query block], and the normalisation applied to the output
  rather than to the [block_q, max_blocks * block_kv] weights.
  """
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  bq, bk = problem.block_q, problem.block_kv
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  width = indices.shape[-1]

  def blocked(x, num_blocks, block):
    # [B, T, H, D] -> [B, H, num_blocks, block, D]
    x = pad_axis(x, 1, num_blocks * block)
    x = x.reshape(x.shape[0], num_blocks, block, x.shape[2], x.shape[3])
    return x.transpose(0, 3, 1, 2, 4)

  q_blocks = blocked(q, nq, bq)                            # [B, H, nq, bq, D]
  safe = jnp.clip(indices, 0, nk - 1)
  kv_head = jnp.arange(heads) // (heads // kv_heads)
  flat_ids = ((jnp.arange(batch)[:, None, None, None] * kv_heads
               + kv_head[None, :, None, None]) * nk + safe)  # [B, H, nq, m]

  def listed(x):
    # [B, H, nq, m * bk, D]: each query block's listed blocks, in order.
    flat = blocked(x, nk, bk).reshape(batch * kv_heads * nk, bk, dim)
    return flat[flat_ids].reshape(batch, heads, nq, width * bk, dim)

  k_listed, v_listed = listed(k), listed(v)
  logits = jnp.einsum("bhqtd,bhqsd->bhqts", q_blocks, k_listed,
                      preferred_element_type=jnp.float32) * problem.sm_scale
  key_pos = (safe[..., None] * bk + jnp.arange(bk)).reshape(
      batch, heads, nq, 1, width * bk)
  real = jnp.repeat(jnp.arange(width) < counts[..., None], bk, axis=-1)
  visible = real[:, :, :, None] & (key_pos < kv_len)       # [B,H,nq,1,m bk]
  if problem.causal:
    q_pos = jnp.arange(nq)[:, None] * bq + jnp.arange(bq)   # [nq, bq]
    visible = visible & (key_pos <= (q_pos + problem.offset)[..., None])
  logits = jnp.where(visible, logits, MASK_VALUE)
  row_max = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
  # Masked logits sit at MASK_VALUE, so exp() gives them 0 wherever the row
  # sees any key; a row that sees none (row_max == MASK_VALUE) is zeroed.
  weights = jnp.exp(logits - row_max)
  normaliser = weights.sum(axis=-1, keepdims=True)
  out = jnp.einsum("bhqts,bhqsd->bhqtd", weights.astype(v.dtype), v_listed,
                   preferred_element_type=jnp.float32)
  sees_any = row_max > 0.5 * MASK_VALUE
  out = jnp.where(sees_any, out / jnp.where(sees_any, normaliser, 1.0), 0.0)
  out = out.transpose(0, 2, 3, 1, 4).reshape(batch, nq * bq, heads, dim)
  return out[:, :q_len].astype(q.dtype)


# Query blocks per group of the `xla` forward: each group loops to its own
# longest list, so rows sorted by count waste little on padding. 32 was the
# fastest of 16, 32 and 64 on a 2-core CPU at 2K and 8K tokens (4 heads of 32).
_ROWS_PER_GROUP = 32


def _looped_forward(q, k, v, indices, counts, problem: _Problem):
  """The `xla` forward: query blocks sorted by their counts, in groups of
  `_ROWS_PER_GROUP`; each group loops over list slots up to its own longest
  list, gathering one key/value block per row and slot, with an online
  softmax. Work follows the listed blocks rather than rows * max_blocks, and
  the working set is one [rows, block_q, block_kv] tile, not every listed
  block at once."""
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  bq, bk = problem.block_q, problem.block_kv
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  width = indices.shape[-1]
  rows = batch * heads * nq
  group = min(_ROWS_PER_GROUP, rows)
  num_groups = -(-rows // group)

  def blocked(x, num_blocks, block):
    # [B, T, H, D] -> [B, H, num_blocks, block, D]
    x = pad_axis(x, 1, num_blocks * block)
    x = x.reshape(x.shape[0], num_blocks, block, x.shape[2], x.shape[3])
    return x.transpose(0, 3, 1, 2, 4)

  kv_head = jnp.arange(heads) // (heads // kv_heads)
  first_block = (jnp.arange(batch)[:, None] * kv_heads + kv_head[None, :]) * nk
  flat_ids = (first_block[:, :, None, None]
              + jnp.clip(indices, 0, nk - 1)).reshape(rows, width)
  counts = counts.reshape(rows)
  q_block = jnp.broadcast_to(jnp.arange(nq), (batch, heads, nq)).reshape(rows)
  order = jnp.argsort(-counts, stable=True)

  def grouped(x):  # rows sorted by count, padded with empty rows, grouped
    x = pad_axis(x[order], 0, num_groups * group)
    return x.reshape((num_groups, group) + x.shape[1:])

  q_rows = grouped(blocked(q, nq, bq).reshape(rows, bq, dim))
  k_flat = blocked(k, nk, bk).reshape(-1, bk, dim)
  v_flat = blocked(v, nk, bk).reshape(-1, bk, dim)
  offsets = jnp.arange(bk)

  def attend(args):
    q_g, ids_g, counts_g, q_block_g = args
    q_pos = q_block_g[:, None] * bq + jnp.arange(bq)           # [rows, bq]

    def slot(s, carry):
      row_max, row_sum, acc = carry
      ids = ids_g[:, s]
      logits = jnp.einsum("rtd,rsd->rts", q_g, k_flat[ids],
                          preferred_element_type=jnp.float32) * problem.sm_scale
      key_pos = (ids % nk)[:, None] * bk + offsets                # [rows, bk]
      visible = (s < counts_g)[:, None, None] & (key_pos < kv_len)[:, None, :]
      if problem.causal:
        visible &= key_pos[:, None, :] <= (q_pos + problem.offset)[:, :, None]
      logits = jnp.where(visible, logits, MASK_VALUE)
      new_max = jnp.maximum(row_max, logits.max(axis=-1))
      weights = jnp.exp(logits - new_max[..., None])
      rescale = jnp.exp(row_max - new_max)
      acc = acc * rescale[..., None] + jnp.einsum(
          "rts,rsd->rtd", weights.astype(v.dtype), v_flat[ids],
          preferred_element_type=jnp.float32)
      return new_max, row_sum * rescale + weights.sum(axis=-1), acc

    init = (jnp.full((group, bq), MASK_VALUE, jnp.float32),
            jnp.zeros((group, bq), jnp.float32),
            jnp.zeros((group, bq, dim), jnp.float32))
    row_max, row_sum, acc = jax.lax.fori_loop(0, jnp.max(counts_g), slot, init)
    # A row that saw no key keeps row_max == MASK_VALUE: it is zeroed.
    sees_any = row_max > 0.5 * MASK_VALUE
    return jnp.where(sees_any[..., None],
                     acc / jnp.where(sees_any, row_sum, 1.0)[..., None], 0.0)

  out = jax.lax.map(attend, (q_rows, grouped(flat_ids), grouped(counts),
                             grouped(q_block)))
  out = out.reshape(num_groups * group, bq, dim)[:rows]
  out = jnp.zeros_like(out).at[order].set(out)            # back to row order
  out = out.reshape(batch, heads, nq * bq, dim).transpose(0, 2, 1, 3)
  return out[:, :q_len].astype(q.dtype)


# ----------------------------------------------------------------- Pallas --


def _forward_kernel(indices_ref, counts_ref, q_ref, k_ref, v_ref, o_ref, *,
                    problem: _Problem):
  bq, bk = problem.block_q, problem.block_kv
  q_start = pl.program_id(0) * bq
  q = q_ref[...]
  scale = problem.sm_scale * _LOG2E  # base 2: exp2(s log2 e) == exp(s)
  q_pos = q_start + jnp.arange(bq)[:, None]

  def body(slot, carry):
    acc, row_max, row_sum = carry
    kv_start = indices_ref[slot] * bk
    k = k_ref[pl.ds(kv_start, bk), :]
    v = v_ref[pl.ds(kv_start, bk), :]
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale
    kv_pos = kv_start + jnp.arange(bk)[None, :]
    mask = jnp.broadcast_to(kv_pos < problem.kv_len, (bq, bk))
    if problem.causal:
      mask = jnp.logical_and(mask, kv_pos <= q_pos + problem.offset)
    s = jnp.where(mask, s, MASK_VALUE)
    new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
    # A row with nothing visible yet has new_max == MASK_VALUE and exp2(0)
    # == 1: zeroing keeps its normaliser at 0, so its output becomes 0.
    p = jnp.where(mask, jnp.exp2(s - new_max[:, None]), 0.0)
    rescale = jnp.exp2(row_max - new_max)
    row_sum = rescale * row_sum + jnp.sum(p, axis=1)
    acc = rescale[:, None] * acc + jax.lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32)
    return acc, new_max, row_sum

  carry = (jnp.zeros((bq, q.shape[-1]), jnp.float32),
           jnp.full((bq,), MASK_VALUE, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  acc, _, row_sum = jax.lax.fori_loop(0, counts_ref[0], body, carry)
  row_sum = jnp.where(row_sum == 0.0, 1.0, row_sum)
  o_ref[...] = (acc / row_sum[:, None]).astype(o_ref.dtype)


def _kernel_forward(q, k, v, indices, counts, problem: _Problem):
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  bq, bk = problem.block_q, problem.block_kv
  q_pad, kv_pad = round_up(q_len, bq), round_up(kv_len, bk)
  dim_pad = max(_MIN_KERNEL_BLOCK, pl.next_power_of_2(dim))
  # Triton tensors have power-of-two shapes: pad the list width (ignored
  # entries, past counts) and head_dim (zeros leave q.k and o unchanged).
  width = pl.next_power_of_2(indices.shape[-1])
  indices = pad_axis(indices, 3, width)
  q_p = pad_axis(pad_axis(q, 1, q_pad), 3, dim_pad)
  k_p = pad_axis(pad_axis(k, 1, kv_pad), 3, dim_pad)
  v_p = pad_axis(pad_axis(v, 1, kv_pad), 3, dim_pad)
  group = heads // kv_heads
  sq = compat.SQUEEZED
  out = pl.pallas_call(
      functools.partial(_forward_kernel, problem=problem),
      grid=(q_pad // bq, batch, heads),
      in_specs=[
          pl.BlockSpec((sq, sq, sq, width), lambda i, b, h: (b, h, i, 0)),
          pl.BlockSpec((sq, sq, sq, 1), lambda i, b, h: (b, h, i, 0)),
          pl.BlockSpec((sq, bq, sq, dim_pad), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((sq, kv_pad, sq, dim_pad),
                       lambda i, b, h: (b, 0, h // group, 0)),
          pl.BlockSpec((sq, kv_pad, sq, dim_pad),
                       lambda i, b, h: (b, 0, h // group, 0)),
      ],
      out_specs=pl.BlockSpec((sq, bq, sq, dim_pad),
                             lambda i, b, h: (b, i, h, 0)),
      out_shape=jax.ShapeDtypeStruct(q_p.shape, q.dtype),
      compiler_params=(None if problem.interpret else
                       compat.triton_compiler_params(
                           num_warps=4 if dim_pad <= 64 else 8, num_stages=2)),
      interpret=problem.interpret,
      name="block_sparse_attention_fwd",
  )(indices, counts[..., None], q_p, k_p, v_p)
  return out[:, :q_len, :, :dim]


def _gathered_backward(problem, residuals, d_out):
  """The VJP of the gathered `xla` form: the backward of every forward here."""
  q, k, v, indices, counts = residuals
  _, vjp = jax.vjp(
      lambda q, k, v: _gather_attention(q, k, v, indices, counts, problem),
      q, k, v)
  return (*vjp(d_out), None, None)


def _with_gathered_backward(forward):
  """forward(q, k, v, indices, counts, problem) as a custom_vjp whose backward
  is `_gathered_backward` (the forward's own loop has no reverse mode)."""
  attention = jax.custom_vjp(forward, nondiff_argnums=(5,))
  attention.defvjp(
      lambda q, k, v, indices, counts, problem: (
          forward(q, k, v, indices, counts, problem), (q, k, v, indices, counts)),
      _gathered_backward)
  return attention


_looped_attention = _with_gathered_backward(_looped_forward)
_kernel_attention = _with_gathered_backward(_kernel_forward)
