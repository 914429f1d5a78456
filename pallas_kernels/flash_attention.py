"""Flash attention: softmax attention without materialising the score matrix.

For every batch b and query head h (served by key/value head h // (H / H_kv)),

    s_ij = sm_scale * <q_i, k_j>           (i < q_len, j < kv_len)
    mask_ij = causal:   j <= i + (kv_len - q_len)   (the ends are aligned)
              segments: q_segment_ids[i] == kv_segment_ids[j]
    o_i = sum_j softmax_j(s_ij | mask_ij) v_j

and a query row whose keys are all masked gets o_i = 0 (and zero gradients),
as in FlashAttention; a plain softmax would give NaN there.

The Pallas kernel (FlashAttention-2) keeps, per block of queries, the running
max m_i, the running normaliser l_i = sum_j exp(s_ij - m_i) and the
unnormalised output acc_i = sum_j exp(s_ij - m_i) v_j while it walks over key
blocks; when m_i grows, l_i and acc_i are rescaled by exp(m_old - m_new). It works in base 2
(s * log2(e), exp2), which is exact algebra and cheaper on GPUs. It saves the
logsumexp L_i = m_i + log l_i, and the backward pass recomputes
p_ij = exp(s_ij - L_i) block by block:

    dv_j = sum_i p_ij do_i           dp_ij = <do_i, v_j>
    ds_ij = p_ij (dp_ij - delta_i)   delta_i = <o_i, do_i>
    dq_i = sm_scale sum_j ds_ij k_j  dk_j = sm_scale sum_i ds_ij q_i

in two kernels, one over query blocks (dq) and one over key blocks (dk, dv,
summed over the query heads sharing a key/value head). Every kernel skips the
tiles causality hides and builds masks only for tiles that need one.

Lengths that are not block multiples are padded with zeros internally and the
padded keys masked; head_dim is padded to a power of two (at least 16), which
Triton's tensor shapes need and which leaves q.k and the output unchanged.

Lowering: `impl="interpret"` runs the kernels through Pallas interpret mode on
any backend (what the CPU test suite checks). `impl="pallas"` lowers the same
kernels through the Triton backend on GPU (compiler params from `compat`); the
kernels follow its rules (power-of-two tiles, 2-D dots of at least 16x16,
loops with dynamic bounds) and lower to Triton IR (checked on CPU through
`jax.export(platforms=["cuda"])`); they are not yet compiled or run on GPU
hardware: the tests check the lowering only. `impl="tpu"` runs separate Mosaic
TPU kernels with the same semantics (`flash_attention_tpu.py`; "auto" on TPU),
and `impl="tpu_interpret"` runs those through TPU interpret mode on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import compat
from pallas_kernels.attention_problem import (MASK_VALUE, AttentionProblem,
                                              check_attention_operands,
                                              check_integer_arrays,
                                              flash_custom_vjp, pad_axis,
                                              round_up)
from pallas_kernels.compat import pl
from pallas_kernels.flash_attention_tpu import (TPUBlockSizes,
                                                flash_attention_tpu)

IMPLS = ("auto", "pallas", "interpret", "reference", "xla", "cudnn", "tpu",
         "tpu_interpret")
_LOG2E = math.log2(math.e)
_MIN_BLOCK = 16  # Triton's tensor-core dots need every dimension >= 16.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two, >= 16) and Triton launch settings.

  Each tile is clamped to the (power-of-two rounded) sequence length, so
  short sequences do not pay for a large tile. num_warps None picks 4 for
  head_dim <= 64, else 8. The defaults are untuned guesses (not yet timed on
  a GPU).
  """
  block_q: int = 128
  block_kv: int = 64
  block_q_dq: int = 64
  block_kv_dq: int = 64
  block_q_dkv: int = 64
  block_kv_dkv: int = 64
  num_warps: int | None = None
  num_stages: int = 2

  def __post_init__(self):
    for field in dataclasses.fields(self):
      if not field.name.startswith("block_"):
        continue
      size = getattr(self, field.name)
      if size < _MIN_BLOCK or size & (size - 1):
        raise ValueError(
            f"BlockSizes.{field.name}={size} must be a power of two >= "
            f"{_MIN_BLOCK}.")


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    causal: bool = False,
                    segment_ids: tuple[jax.Array, jax.Array] | None = None,
                    sm_scale: float | None = None, impl: str = "auto",
                    block_sizes: BlockSizes | None = None,
                    tpu_block_sizes: TPUBlockSizes | None = None
                    ) -> jax.Array:
  """Multi-head attention softmax(sm_scale q k^T + mask) v (see module doc).

  Args:
    q: [batch, q_len, heads, head_dim].
    k, v: [batch, kv_len, kv_heads, head_dim], heads % kv_heads == 0 (MHA,
      GQA, MQA); all three of one dtype (float32, bfloat16 or float16).
    causal: mask keys after the query, with the last query aligned to the
      last key (query i sees keys j <= i + kv_len - q_len).
    segment_ids: None or (q_segment_ids [batch, q_len], kv_segment_ids
      [batch, kv_len]), integers; a query sees only keys of its segment.
    sm_scale: logit scale, default head_dim ** -0.5.
    impl: "auto" (Pallas Triton on GPU, Pallas Mosaic on TPU, reference
      on CPU), "pallas" (Triton, GPU), "interpret" (the Triton-style kernels
      in interpret mode), "tpu" (Mosaic TPU kernels, TPU), "tpu_interpret"
      (the Mosaic TPU kernels in TPU interpret mode, any backend),
      "reference" (pure jnp), "xla" or "cudnn"
      (`jax.nn.dot_product_attention`). The two baselines give fully masked
      query rows the mean of v instead of 0.
    block_sizes: kernel tiles for "pallas" / "interpret".
    tpu_block_sizes: `flash_attention_tpu.TPUBlockSizes` for "tpu" /
      "tpu_interpret" (and "auto" on TPU).

  Returns:
    [batch, q_len, heads, head_dim] in q's dtype.
  """
  _check_inputs(q, k, v, segment_ids, impl)
  head_dim = q.shape[-1]
  sm_scale = float(head_dim ** -0.5 if sm_scale is None else sm_scale)
  if impl == "auto":
    impl = {"gpu": "pallas", "tpu": "tpu"}.get(compat.default_backend(),
                                                 "reference")
  if impl == "reference":
    return reference_attention(q, k, v, causal=causal,
                               segment_ids=segment_ids, sm_scale=sm_scale)
  if impl in ("xla", "cudnn"):
    return _nn_attention(q, k, v, causal, segment_ids, sm_scale, impl)
  if impl in ("tpu", "tpu_interpret"):
    return flash_attention_tpu(
        q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
        block_sizes=tpu_block_sizes, interpret=impl == "tpu_interpret")
  return _pallas_attention(q, k, v, causal, segment_ids, sm_scale,
                           block_sizes or BlockSizes(),
                           interpret=impl == "interpret")


def _check_inputs(q, k, v, segment_ids, impl) -> None:
  if impl not in IMPLS:
    raise ValueError(f"Unknown impl {impl!r}; valid: {', '.join(IMPLS)}.")
  check_attention_operands(q, k, v)
  if segment_ids is not None:
    if not (isinstance(segment_ids, (tuple, list)) and len(segment_ids) == 2):
      raise ValueError("segment_ids must be None or a pair (q_segment_ids, "
                       "kv_segment_ids).")
    q_seg, kv_seg = segment_ids
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
    if jnp.shape(q_seg) != (batch, q_len):
      raise ValueError(f"q_segment_ids must have shape [batch, q_len] = "
                       f"{(batch, q_len)}, got {jnp.shape(q_seg)}.")
    if jnp.shape(kv_seg) != (batch, kv_len):
      raise ValueError(f"kv_segment_ids must have shape [batch, kv_len] = "
                       f"{(batch, kv_len)}, got {jnp.shape(kv_seg)}.")
    check_integer_arrays({"q_segment_ids": q_seg, "kv_segment_ids": kv_seg})


def attention_mask(q_len: int, kv_len: int, causal: bool,
                   segment_ids: tuple[jax.Array, jax.Array] | None
                   ) -> jax.Array | None:
  """Boolean [batch or 1, 1, q_len, kv_len] mask (True = attend), or None."""
  mask = None
  if causal:
    rows = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    mask = (jnp.arange(kv_len)[None, :] <= rows)[None, None]
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids
    same = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]
    mask = same if mask is None else jnp.logical_and(mask, same)
  return mask


def reference_attention(q, k, v, *, causal=False, segment_ids=None,
                        sm_scale=None, mask=None):
  """Pure-jnp attention in float32, differentiable by autodiff. `mask`
  (boolean, True = attend, broadcastable to [batch, heads, q_len, kv_len]) is
  combined with the causal and segment masks."""
  heads, kv_heads = q.shape[2], k.shape[2]
  sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
  group = heads // kv_heads
  k = jnp.repeat(k, group, axis=2).astype(jnp.float32)
  v = jnp.repeat(v, group, axis=2).astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k,
                      precision=hi) * sm_scale
  extra_mask = mask
  mask = attention_mask(q.shape[1], k.shape[1], causal, segment_ids)
  if extra_mask is not None:
    mask = extra_mask if mask is None else jnp.logical_and(mask, extra_mask)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(logits - row_max)
  if mask is not None:
    weights = jnp.where(mask, weights, 0.0)
  normaliser = jnp.sum(weights, axis=-1, keepdims=True)
  # Fully masked rows: 0 / 1 = 0 rather than 0 / 0.
  weights = weights / jnp.where(normaliser == 0, 1.0, normaliser)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=hi)
  return out.astype(q.dtype)


def _nn_attention(q, k, v, causal, segment_ids, sm_scale, implementation):
  """`jax.nn.dot_product_attention`, whose own causal mask is top-left.

  The ends-aligned causal mask and segment masks are passed as an explicit
  mask when they differ from what `is_causal` means there.
  """
  q_len, kv_len = q.shape[1], k.shape[1]
  if segment_ids is None and (not causal or q_len == kv_len):
    return jax.nn.dot_product_attention(q, k, v, scale=sm_scale,
                                        is_causal=causal,
                                        implementation=implementation)
  mask = attention_mask(q_len, kv_len, causal, segment_ids)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=sm_scale,
                                      implementation=implementation)


# ------------------------------------------------------------------ Pallas --


def _round_block(block: int, length: int) -> int:
  """The tile: `block`, shrunk to the power of two covering `length`."""
  return max(_MIN_BLOCK, min(block, pl.next_power_of_2(length)))


def _pallas_attention(q, k, v, causal, segment_ids, sm_scale, blocks,
                      interpret):
  q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[-1]
  block_q = _round_block(blocks.block_q, q_len)
  block_kv = _round_block(blocks.block_kv, kv_len)
  block_q_dq = _round_block(blocks.block_q_dq, q_len)
  block_kv_dq = _round_block(blocks.block_kv_dq, kv_len)
  block_q_dkv = _round_block(blocks.block_q_dkv, q_len)
  block_kv_dkv = _round_block(blocks.block_kv_dkv, kv_len)
  # One padded length serves all three kernels: a multiple of every tile
  # (tiles are powers of two, so the largest is a multiple of the others).
  q_pad = round_up(q_len, max(block_q, block_q_dq, block_q_dkv))
  kv_pad = round_up(kv_len, max(block_kv, block_kv_dq, block_kv_dkv))
  dim_pad = max(_MIN_BLOCK, pl.next_power_of_2(head_dim))
  config = AttentionProblem(
      causal=bool(causal), sm_scale=sm_scale, q_len=q_len, kv_len=kv_len,
      block_q=block_q, block_kv=block_kv, block_q_dq=block_q_dq,
      block_kv_dq=block_kv_dq, block_q_dkv=block_q_dkv,
      block_kv_dkv=block_kv_dkv, interpret=interpret,
      num_warps=blocks.num_warps, num_stages=blocks.num_stages)
  q_p = pad_axis(pad_axis(q, 1, q_pad), 3, dim_pad)
  k_p = pad_axis(pad_axis(k, 1, kv_pad), 3, dim_pad)
  v_p = pad_axis(pad_axis(v, 1, kv_pad), 3, dim_pad)
  segments = None
  if segment_ids is not None:
    # Padded keys are masked by position anyway; distinct pad ids keep padded
    # queries off every real key too.
    segments = (pad_axis(segment_ids[0].astype(jnp.int32), 1, q_pad, -1),
                pad_axis(segment_ids[1].astype(jnp.int32), 1, kv_pad, -2))
  out = _flash(q_p, k_p, v_p, segments, config)  # custom_vjp, at the end
  return out[:, :q_len, :, :head_dim]


def _compiler_params(config: AttentionProblem, head_dim: int):
  if config.interpret:
    return None
  num_warps = config.num_warps or (4 if head_dim <= 64 else 8)
  return compat.triton_compiler_params(num_warps=num_warps,
                                       num_stages=config.num_stages)


def _block_mask(config: AttentionProblem, q_start, kv_start, block_q: int,
                block_kv: int, q_seg, kv_seg):
  """[block_q, block_kv] bool mask for one tile, or None when all-true."""
  q_pos = q_start + jnp.arange(block_q)[:, None]
  kv_pos = kv_start + jnp.arange(block_kv)[None, :]
  mask = None
  if config.causal:
    mask = kv_pos <= q_pos + config.offset
  if kv_seg is not None:
    same = q_seg[:, None] == kv_seg[None, :]
    mask = same if mask is None else jnp.logical_and(mask, same)
  # Keys beyond kv_len are padding. (With causal, they are already masked for
  # real queries; padded queries are sliced off, so their rows do not matter.)
  if not config.causal:
    real = jnp.broadcast_to(kv_pos < config.kv_len, (block_q, block_kv))
    mask = real if mask is None else jnp.logical_and(mask, real)
  return mask


def _dot_nt(a, b):
  """a @ b.T with a float32 accumulator ([m, k] x [n, k] -> [m, n])."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _dot_nn(a, b):
  """a @ b with a float32 accumulator."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a.T @ b with a float32 accumulator ([k, m] x [k, n] -> [m, n])."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _kv_tile_ranges(config: AttentionProblem, q_start, block_q: int,
                    block_kv: int, num_kv_blocks: int, has_segments: bool):
  """(unmasked_end, end): a query tile's kv tiles [0, end) with any visible
  key, of which [0, unmasked_end) need no mask at all.

  A tile needs no mask when it holds no padded key, no segment ids apply and,
  if causal, the tile's first query already sees its last key.
  """
  offset = config.offset
  end = num_kv_blocks
  unmasked_end = 0 if has_segments else config.kv_len // block_kv
  if config.causal:
    last_key = q_start + block_q - 1 + offset
    end = jnp.clip((last_key + block_kv) // block_kv, 0, num_kv_blocks)
    first_query_keys = q_start + offset + 1   # keys the first query sees
    unmasked_end = jnp.minimum(
        unmasked_end, jnp.maximum(first_query_keys, 0) // block_kv)
  return jnp.minimum(unmasked_end, end), end


def _q_tile_ranges(config: AttentionProblem, kv_start, block_q: int,
                   block_kv: int, num_q_blocks: int, has_segments: bool):
  """(begin, unmasked_begin): a kv tile's query tiles [begin, num_q_blocks)
  that see any of its keys, of which [unmasked_begin, num_q_blocks) need no
  mask (the transpose of `_kv_tile_ranges`).
  """
  offset = config.offset
  if has_segments:
    unmasked_begin = num_q_blocks
  elif config.causal:
    # Padded keys come last, so a tile whose first query sees the tile's last
    # key holds only padded queries when that key is padding: harmless.
    last_key = kv_start + block_kv - 1
    unmasked_begin = jnp.clip((last_key - offset + block_q - 1) // block_q,
                              0, num_q_blocks)
  else:
    # All masked if the tile holds padded keys (integer arithmetic: Triton
    # cannot select between scalars with a traced bool here).
    has_padding = jnp.clip(kv_start + block_kv - config.kv_len, 0, 1)
    unmasked_begin = has_padding * num_q_blocks
  if config.causal:
    # Query i sees key kv_start only if i >= kv_start - offset.
    begin = jnp.clip((kv_start - offset) // block_q, 0, num_q_blocks)
  else:
    begin = 0
  return begin, jnp.maximum(unmasked_begin, begin)


def _forward_kernel(*refs, config: AttentionProblem, has_segments: bool):
  if has_segments:
    q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref = refs
    q_seg = q_seg_ref[...]
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    q_seg = kv_seg_ref = None
  block_q, block_kv = config.block_q, config.block_kv
  kv_pad = k_ref.shape[0]
  num_kv_blocks = kv_pad // block_kv
  q_start = pl.program_id(0) * block_q
  q = q_ref[...]
  # Logits in base 2: exp2(s * log2 e) == exp(s).
  scale = config.sm_scale * _LOG2E

  def body(kv_block, carry, masked: bool):
    acc, row_max, row_sum = carry
    kv_start = kv_block * block_kv
    k = k_ref[pl.ds(kv_start, block_kv), :]
    v = v_ref[pl.ds(kv_start, block_kv), :]
    s = _dot_nt(q, k) * scale
    mask = None
    if masked:
      kv_seg = (None if kv_seg_ref is None
                else kv_seg_ref[pl.ds(kv_start, block_kv)])
      mask = _block_mask(config, q_start, kv_start, block_q, block_kv, q_seg,
                         kv_seg)
      s = jnp.where(mask, s, MASK_VALUE)
    new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
    p = jnp.exp2(s - new_max[:, None])
    if mask is not None:
      # A fully masked row has new_max == MASK_VALUE and exp2(0) == 1 here;
      # zeroing keeps its normaliser at 0 so its output becomes 0.
      p = jnp.where(mask, p, 0.0)
    rescale = jnp.exp2(row_max - new_max)
    row_sum = rescale * row_sum + jnp.sum(p, axis=1)
    acc = rescale[:, None] * acc + _dot_nn(p.astype(v.dtype), v)
    return acc, new_max, row_sum

  unmasked_end, kv_end = _kv_tile_ranges(config, q_start, block_q, block_kv,
                                         num_kv_blocks, has_segments)
  carry = (jnp.zeros((block_q, q.shape[-1]), jnp.float32),
           jnp.full((block_q,), MASK_VALUE, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  # Two loops so that the common tiles skip building and applying masks.
  carry = jax.lax.fori_loop(0, unmasked_end,
                            functools.partial(body, masked=False), carry)
  acc, row_max, row_sum = jax.lax.fori_loop(
      unmasked_end, kv_end, functools.partial(body, masked=True), carry)
  row_sum = jnp.where(row_sum == 0.0, 1.0, row_sum)
  o_ref[...] = (acc / row_sum[:, None]).astype(o_ref.dtype)
  lse_ref[...] = row_max + jnp.log2(row_sum)  # base-2 logsumexp


def _seg_args_specs(segments, q_block: int | None, kv_block: int | None,
                    q_index, kv_index):
  """Segment-id operands and BlockSpecs (a whole row when block is None)."""
  if segments is None:
    return [], []
  q_seg, kv_seg = segments
  sq = compat.SQUEEZED
  specs = [pl.BlockSpec((sq, q_block or q_seg.shape[1]), q_index),
           pl.BlockSpec((sq, kv_block or kv_seg.shape[1]), kv_index)]
  return [q_seg, kv_seg], specs


def _flash_forward(q, k, v, segments, config: AttentionProblem):
  batch, q_pad, heads, dim = q.shape
  kv_pad, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  block_q = config.block_q
  sq = compat.SQUEEZED
  grid = (q_pad // block_q, batch, heads)
  seg_args, seg_specs = _seg_args_specs(
      segments, block_q, None, lambda i, b, h: (b, i), lambda i, b, h: (b, 0))
  kernel = functools.partial(_forward_kernel, config=config,
                             has_segments=segments is not None)
  out, lse = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[
          pl.BlockSpec((sq, block_q, sq, dim), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((sq, kv_pad, sq, dim),
                       lambda i, b, h: (b, 0, h // group, 0)),
          pl.BlockSpec((sq, kv_pad, sq, dim),
                       lambda i, b, h: (b, 0, h // group, 0)),
      ] + seg_specs,
      out_specs=[
          pl.BlockSpec((sq, block_q, sq, dim), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((sq, sq, block_q), lambda i, b, h: (b, h, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_pad), jnp.float32)],
      compiler_params=_compiler_params(config, dim),
      interpret=config.interpret,
      name="flash_attention_fwd",
  )(q, k, v, *seg_args)
  return out, lse


def _dq_kernel(*refs, config: AttentionProblem, has_segments: bool):
  if has_segments:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
     dq_ref) = refs
    q_seg = q_seg_ref[...]
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    q_seg = kv_seg_ref = None
  block_q, block_kv = config.block_q_dq, config.block_kv_dq
  kv_pad = k_ref.shape[0]
  num_kv_blocks = kv_pad // block_kv
  q_start = pl.program_id(0) * block_q
  q = q_ref[...]
  d_out = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  scale = config.sm_scale * _LOG2E

  def body(kv_block, dq, masked: bool):
    kv_start = kv_block * block_kv
    k = k_ref[pl.ds(kv_start, block_kv), :]
    v = v_ref[pl.ds(kv_start, block_kv), :]
    p = jnp.exp2(_dot_nt(q, k) * scale - lse[:, None])
    if masked:
      kv_seg = (None if kv_seg_ref is None
                else kv_seg_ref[pl.ds(kv_start, block_kv)])
      mask = _block_mask(config, q_start, kv_start, block_q, block_kv, q_seg,
                         kv_seg)
      p = jnp.where(mask, p, 0.0)
    dp = _dot_nt(d_out, v)
    ds = p * (dp - delta[:, None])
    return dq + _dot_nn(ds.astype(k.dtype), k)

  unmasked_end, kv_end = _kv_tile_ranges(config, q_start, block_q, block_kv,
                                         num_kv_blocks, has_segments)
  dq = jnp.zeros((block_q, q.shape[-1]), jnp.float32)
  dq = jax.lax.fori_loop(0, unmasked_end,
                         functools.partial(body, masked=False), dq)
  dq = jax.lax.fori_loop(unmasked_end, kv_end,
                         functools.partial(body, masked=True), dq)
  dq_ref[...] = (dq * config.sm_scale).astype(dq_ref.dtype)


def _flash_dq(q, k, v, segments, d_out, lse, delta, config: AttentionProblem):
  batch, q_pad, heads, dim = q.shape
  kv_pad, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  block_q = config.block_q_dq
  sq = compat.SQUEEZED
  seg_args, seg_specs = _seg_args_specs(
      segments, block_q, None, lambda i, b, h: (b, i), lambda i, b, h: (b, 0))
  row_spec = pl.BlockSpec((sq, block_q, sq, dim), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((sq, kv_pad, sq, dim),
                         lambda i, b, h: (b, 0, h // group, 0))
  stat_spec = pl.BlockSpec((sq, sq, block_q), lambda i, b, h: (b, h, i))
  kernel = functools.partial(_dq_kernel, config=config,
                             has_segments=segments is not None)
  return pl.pallas_call(
      kernel,
      grid=(q_pad // block_q, batch, heads),
      in_specs=[row_spec, kv_spec, kv_spec, row_spec, stat_spec,
                stat_spec] + seg_specs,
      out_specs=row_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(config, dim),
      interpret=config.interpret,
      name="flash_attention_dq",
  )(q, k, v, d_out, lse, delta, *seg_args)


def _dkv_kernel(*refs, config: AttentionProblem, has_segments: bool,
                group: int):
  if has_segments:
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref,
     dk_ref, dv_ref) = refs
    kv_seg = kv_seg_ref[...]
  else:
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    q_seg_ref = kv_seg = None
  block_q, block_kv = config.block_q_dkv, config.block_kv_dkv
  q_pad = q_ref.shape[0]
  num_q_blocks = q_pad // block_q
  kv_start = pl.program_id(0) * block_kv
  k = k_ref[...]
  v = v_ref[...]
  scale = config.sm_scale * _LOG2E
  q_begin, unmasked_begin = _q_tile_ranges(config, kv_start, block_q,
                                           block_kv, num_q_blocks,
                                           has_segments)

  def head_body(head_in_group, carry):
    def q_body(q_block, carry, masked: bool):
      dk, dv = carry
      q_start = q_block * block_q
      rows = pl.ds(q_start, block_q)
      q = q_ref[rows, head_in_group, :]
      d_out = do_ref[rows, head_in_group, :]
      lse = lse_ref[head_in_group, rows]
      delta = delta_ref[head_in_group, rows]
      p = jnp.exp2(_dot_nt(q, k) * scale - lse[:, None])
      if masked:
        q_seg = None if q_seg_ref is None else q_seg_ref[rows]
        mask = _block_mask(config, q_start, kv_start, block_q, block_kv,
                           q_seg, kv_seg)
        p = jnp.where(mask, p, 0.0)
      dv = dv + _dot_tn(p.astype(d_out.dtype), d_out)
      ds = p * (_dot_nt(d_out, v) - delta[:, None])
      dk = dk + _dot_tn(ds.astype(q.dtype), q)
      return dk, dv

    carry = jax.lax.fori_loop(q_begin, unmasked_begin,
                              functools.partial(q_body, masked=True), carry)
    return jax.lax.fori_loop(unmasked_begin, num_q_blocks,
                             functools.partial(q_body, masked=False), carry)

  zeros = jnp.zeros((block_kv, k.shape[-1]), jnp.float32)
  dk, dv = jax.lax.fori_loop(0, group, head_body, (zeros, zeros))
  dk_ref[...] = (dk * config.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _flash_dkv(q, k, v, segments, d_out, lse, delta, config: AttentionProblem):
  batch, q_pad, heads, dim = q.shape
  kv_pad, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  block_kv = config.block_kv_dkv
  sq = compat.SQUEEZED
  seg_args, seg_specs = _seg_args_specs(
      segments, None, block_kv, lambda j, b, g: (b, 0), lambda j, b, g: (b, j))
  # The query heads of one kv head are contiguous: block `g` of size `group`.
  q_spec = pl.BlockSpec((sq, q_pad, group, dim), lambda j, b, g: (b, 0, g, 0))
  stat_spec = pl.BlockSpec((sq, group, q_pad), lambda j, b, g: (b, g, 0))
  kv_spec = pl.BlockSpec((sq, block_kv, sq, dim), lambda j, b, g: (b, j, g, 0))
  kernel = functools.partial(_dkv_kernel, config=config,
                             has_segments=segments is not None, group=group)
  return pl.pallas_call(
      kernel,
      grid=(kv_pad // block_kv, batch, kv_heads),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec,
                stat_spec] + seg_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(config, dim),
      interpret=config.interpret,
      name="flash_attention_dkv",
  )(q, k, v, d_out, lse, delta, *seg_args)


# delta_i = <o_i, do_i> for o, do [batch, q_len, heads, dim], in lse's layout
# [batch, heads, q_len].
_flash = flash_custom_vjp(
    _flash_forward, _flash_dq, _flash_dkv,
    lambda out, d_out: jnp.einsum("bqhd,bqhd->bhq", out, d_out))
