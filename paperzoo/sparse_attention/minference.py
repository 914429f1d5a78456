"""MInference (Jiang et al. 2024, "MInference 1.0: Accelerating Pre-filling
for Long-Context LLMs via Dynamic Sparse Attention"): three block patterns,
each head's chosen offline, the dynamic ones estimated online per input.

Vertical-slash. Many heads of a trained long-context model attend to a few
fixed key positions (vertical lines: the first tokens, separators) and to
fixed relative offsets (slash lines: the local window and periodic offsets).
MInference estimates which, per head and per input, from the last queries
only:

    A = softmax(q_last k^T sm_scale | causal)      q_last: the last `last_q`
                                                   queries, [last_q, T]
    vertical score of key j      = sum_t A_tj
    slash score of offset o >= 0 = sum_t A_t,(t - o)  (over the last queries)
    keep the `vertical_size` best keys and the `slash_size` best offsets, and
    always key 0 and offset 0 (a query's own position), as the paper does.

Its kernel runs the lines themselves; here they become the key blocks they
touch (`line_block_mass`): query block i keeps key block j when a kept key
lies in block j and some query of block i sees it, or a kept offset o puts
some (query t, key t - o) pair of block i in block j. The block-sparse kernel
then attends to every key of those blocks, a superset of the lines, so
attention is at least as exact as the pattern's.

A-shape (static): the first `sink` tokens and a local window of `local`
tokens (key j for query t when j < sink or t - local < j <= t), as blocks.

Block-sparse: the pooled estimate A_ij = softmax_j(<mean q of block i,
mean k of block j> sm_scale) (`selection.pooled_block_attention`); per query
block its `top` best key blocks, plus the diagonal one.

Kernel-aware sparse pattern search (offline, as the paper's; here a
candidate's cost is its share of the block-sparse kernel's blocks): on a
calibration sample, every candidate (pattern, sizes) is applied to every head and scored
by the recall of the exact attention, the fraction of the dense causal
attention probability mass sum_{t,j} P_tj that falls in the kept blocks, at
its cost, the fraction of causally visible blocks kept (the block-sparse
kernel's work). Per head, among the candidates within `budget` the one of the
highest recall wins; candidates within `tolerance` of that recall count as
equal, and of those the cheapest, then the first listed, wins (A-shape needs
no online estimate). `minference_blocks` then builds each head's blocks with
its own pattern. The chosen patterns are per layer, a static argument:

    patterns = calibrate_head_patterns(q, k, budget=0.3)   # one layer's q, k
    layer.block_selector = functools.partial(minference_blocks,
                                             patterns=patterns, block=64)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import BlockList
from paperzoo.sparse_attention.selection import (causal_block_mask,
                                                 check_block,
                                                 check_queries_and_keys,
                                                 diagonal_block_mask,
                                                 pooled_block_attention,
                                                 top_count_selection)


def vertical_slash_scores(q: jax.Array, k: jax.Array, *, last_q: int,
                          sm_scale: float | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """(vertical [B, H, kv_len], slash [B, H, kv_len]): the attention mass the
  last `last_q` queries put on each key and on each offset o = t - j (index o),
  causal with the ends aligned."""
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  sm_scale = dim ** -0.5 if sm_scale is None else sm_scale
  last_q = min(last_q, q_len)
  q_last = q[:, q_len - last_q:].astype(jnp.float32)
  keys = jnp.repeat(k, heads // kv_heads, axis=2).astype(jnp.float32)
  logits = jnp.einsum("bthd,bjhd->bhtj", q_last, keys) * sm_scale
  position = kv_len - last_q + jnp.arange(last_q)      # the queries' key index
  offset = position[:, None] - jnp.arange(kv_len)[None, :]   # [last_q, kv_len]
  logits = jnp.where(offset >= 0, logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  vertical = probs.sum(axis=2)
  # Offsets: scatter each (t, j) into o = t - j (masked entries carry 0 mass).
  slash = jnp.zeros((batch, heads, kv_len), jnp.float32).at[
      :, :, jnp.clip(offset, 0, kv_len - 1)].add(probs)
  return vertical, slash


def line_block_mass(vertical: jax.Array, slash: jax.Array, *, q_len: int,
                    block: int) -> jax.Array:
  """[B, H, num_q_blocks, num_kv_blocks]: the weight of the lines that cross
  each block, causal with the ends aligned: the weights vertical[..., j] of
  the keys j in key block j that some query of query block i sees, plus the
  weights slash[..., o] of the offsets o that put some (query t of block i,
  key t - o) pair in key block j. With 0/1 weights (kept lines), > 0 marks
  the blocks the lines touch; with scores, it ranks blocks.

  vertical, slash: [B, H, kv_len], one weight per key and per offset.
  """
  kv_len = vertical.shape[-1]
  nq, nk = -(-q_len // block), -(-kv_len // block)
  shift = kv_len - q_len
  # Queries as key positions (query t sees keys j <= t + shift).
  first = np.maximum(np.arange(nq) * block + shift, 0)[:, None]
  last = (np.minimum((np.arange(nq) + 1) * block, q_len) - 1 + shift)[:, None]
  start = (np.arange(nk) * block)[None, :]

  def prefix(x):  # prefix[n] = sum of the first n weights
    zero = jnp.zeros(x.shape[:-1] + (1,), x.dtype)
    return jnp.concatenate([zero, jnp.cumsum(x, axis=-1)], axis=-1)

  def span(sums, lo, hi):  # sum of the weights in [lo, hi), per (i, j)
    lo = np.clip(lo, 0, kv_len)
    hi = np.maximum(np.clip(hi, 0, kv_len), lo)
    return sums[..., hi] - sums[..., lo]

  # Vertical: the keys of block j up to the block's last query.
  crossing = span(prefix(vertical), np.broadcast_to(start, (nq, nk)),
                  np.minimum(start + block, last + 1))
  # Slash: offset o pairs block i with block j when some query t in
  # [first, last] has t - o in [start, start + block): o in
  # [first - start - block + 1, last - start].
  crossing = crossing + span(prefix(slash), first - start - block + 1,
                             last - start + 1)
  return crossing


def _line_mask(indices: jax.Array, length: int) -> jax.Array:
  """int32 [B, H, length]: 1 at the given [B, H, count] indices."""
  batch, heads = indices.shape[:2]
  rows = (np.arange(batch)[:, None, None], np.arange(heads)[None, :, None])
  return jnp.zeros((batch, heads, length), jnp.int32).at[rows + (indices,)].set(1)


def vertical_slash_mask(q: jax.Array, k: jax.Array, *, block: int,
                        vertical_size: int, slash_size: int, last_q: int,
                        sm_scale: float | None = None) -> jax.Array:
  """bool [B, H, num_q_blocks, num_kv_blocks]: the key blocks of the
  vertical-slash pattern (module docstring), causal."""
  q_len, kv_len = q.shape[1], k.shape[1]
  vertical, slash = vertical_slash_scores(q, k, last_q=last_q, sm_scale=sm_scale)
  # Key 0 and offset 0 always; then the best of the rest. [B, H, count] indices.
  bonus = jnp.zeros(kv_len).at[0].set(jnp.inf)
  keys = jax.lax.top_k(vertical + bonus, min(vertical_size, kv_len))[1]
  offsets = jax.lax.top_k(slash + bonus, min(slash_size, kv_len))[1]
  crossing = line_block_mass(_line_mask(keys, kv_len), _line_mask(offsets, kv_len),
                             q_len=q_len, block=block)
  return (crossing > 0) & causal_block_mask(q_len, kv_len, block, block)


def vertical_slash_blocks(q: jax.Array, k: jax.Array, *, block: int = 64,
                          vertical_size: int = 64, slash_size: int = 64,
                          last_q: int = 64,
                          sm_scale: float | None = None) -> BlockList:
  """The key blocks of MInference's vertical-slash pattern (module docstring)
  for every (batch, head, query block), causal. Works under `jit` (the list is
  padded to every key block)."""
  check_queries_and_keys(q, k)
  check_block(block)
  for name, size in (("vertical_size", vertical_size), ("slash_size", slash_size),
                     ("last_q", last_q)):
    if size < 1:
      raise ValueError(f"{name}={size} must be >= 1")
  mask = vertical_slash_mask(q, k, block=block, vertical_size=vertical_size,
                             slash_size=slash_size, last_q=last_q,
                             sm_scale=sm_scale)
  return BlockList.from_block_mask(mask, block, block, max_blocks=mask.shape[-1])


def a_shape_mask(q_len: int, kv_len: int, *, block: int, sink: int,
                 local: int) -> np.ndarray:
  """bool [num_q_blocks, num_kv_blocks]: the blocks holding the first `sink`
  keys or a key within `local` of a query of the block (t - local < j <= t),
  causal with the ends aligned. Static: the same for every input."""
  nq, nk = -(-q_len // block), -(-kv_len // block)
  shift = kv_len - q_len
  first = np.arange(nq) * block + shift
  last = np.minimum((np.arange(nq) + 1) * block, q_len) - 1 + shift
  start = np.arange(nk) * block
  sink_blocks = (start < sink)[None, :]
  # Key block j holds a key in [first - local + 1, last].
  local_blocks = ((start[None, :] + block - 1 >= (first - local + 1)[:, None])
                  & (start[None, :] <= last[:, None]))
  return (sink_blocks | local_blocks) & causal_block_mask(q_len, kv_len, block,
                                                         block)


def block_sparse_mask(q: jax.Array, k: jax.Array, *, block: int, top: int,
                      sm_scale: float | None = None) -> jax.Array:
  """bool [B, H, num_q_blocks, num_kv_blocks]: per query block the `top` key
  blocks of the pooled estimate, and the diagonal block, causal."""
  q_len, kv_len = q.shape[1], k.shape[1]
  scores = pooled_block_attention(q, k, block=block, sm_scale=sm_scale)
  allowed = jnp.asarray(causal_block_mask(q_len, kv_len, block, block))
  chosen = top_count_selection(scores, top, allowed)
  return chosen | jnp.asarray(diagonal_block_mask(q_len, kv_len, block, block))


# --------------------------------------------------- per-head patterns --

PATTERN_SIZES = {"a_shape": ("sink", "local"),
                 "vertical_slash": ("vertical_size", "slash_size"),
                 "block_sparse": ("top",)}


@dataclasses.dataclass(frozen=True)
class HeadPattern:
  """One head's pattern and its sizes (hashable: a static argument).

  name "a_shape", sizes (sink, local): the first `sink` tokens (>= 0) and a
    local window of `local` tokens (>= 1);
  name "vertical_slash", sizes (vertical_size, slash_size): the key lines and
    offset lines kept (>= 1 each), estimated from the last queries;
  name "block_sparse", sizes (top,): key blocks per query block (>= 1) from
    the pooled estimate, plus the diagonal.
  """
  name: str
  sizes: tuple[int, ...]

  def __post_init__(self):
    if self.name not in PATTERN_SIZES:
      raise ValueError(f"HeadPattern.name={self.name!r}: unknown pattern; "
                       f"valid: {', '.join(PATTERN_SIZES)}")
    fields = PATTERN_SIZES[self.name]
    sizes = tuple(self.sizes)
    least = {"sink": 0}
    if (len(sizes) != len(fields)
        or not all(isinstance(s, (int, np.integer)) for s in sizes)
        or any(s < least.get(f, 1) for f, s in zip(fields, sizes))):
      bounds = ", ".join(f"{f} >= {least.get(f, 1)}" for f in fields)
      raise ValueError(f"HeadPattern({self.name!r}, sizes={self.sizes!r}): "
                       f"sizes must be ({', '.join(fields)}) integers, {bounds}")
    object.__setattr__(self, "sizes", tuple(int(s) for s in sizes))


# Candidates of the search, in order of preference at equal recall and cost.
DEFAULT_CANDIDATES = (
    *(HeadPattern("a_shape", (64, local)) for local in (64, 128, 256, 512, 1024)),
    *(HeadPattern("vertical_slash", (lines, lines)) for lines in (16, 32, 64, 128, 256)),
    *(HeadPattern("block_sparse", (top,)) for top in (1, 2, 4, 8, 16)),
)


def pattern_mask(q: jax.Array, k: jax.Array, pattern: HeadPattern, *,
                 block: int, last_q: int,
                 sm_scale: float | None = None) -> jax.Array:
  """bool [B, H, num_q_blocks, num_kv_blocks]: `pattern` applied to every
  head of q [B, Tq, H, D], k [B, Tk, Hkv, D]."""
  batch, q_len, heads = q.shape[:3]
  kv_len = k.shape[1]
  if pattern.name == "a_shape":
    sink, local = pattern.sizes
    mask = a_shape_mask(q_len, kv_len, block=block, sink=sink, local=local)
    return jnp.broadcast_to(jnp.asarray(mask), (batch, heads) + mask.shape)
  if pattern.name == "vertical_slash":
    vertical_size, slash_size = pattern.sizes
    return vertical_slash_mask(q, k, block=block, vertical_size=vertical_size,
                               slash_size=slash_size, last_q=last_q,
                               sm_scale=sm_scale)
  return block_sparse_mask(q, k, block=block, top=pattern.sizes[0],
                           sm_scale=sm_scale)


def _check_patterns(patterns, heads: int) -> tuple[HeadPattern, ...]:
  if (not isinstance(patterns, (tuple, list))
      or not all(isinstance(p, HeadPattern) for p in patterns)):
    raise ValueError(f"patterns must be a tuple of HeadPattern, one per query "
                     f"head, got {type(patterns).__name__}")
  if len(patterns) != heads:
    raise ValueError(f"patterns has {len(patterns)} entries; q has {heads} "
                     f"heads (one pattern per query head)")
  return tuple(patterns)


def minference_blocks(q: jax.Array, k: jax.Array,
                      patterns: Sequence[HeadPattern], *, block: int = 64,
                      last_q: int = 64,
                      sm_scale: float | None = None) -> BlockList:
  """The key blocks of every (batch, head, query block), each head with its
  own pattern (`calibrate_head_patterns`), causal. Works under `jit` with
  `patterns` static (the list is padded to every key block)."""
  check_queries_and_keys(q, k)
  check_block(block)
  if last_q < 1:
    raise ValueError(f"last_q={last_q} must be >= 1")
  heads, kv_heads = q.shape[2], k.shape[2]
  patterns = _check_patterns(patterns, heads)
  keys = jnp.repeat(k, heads // kv_heads, axis=2)
  nq, nk = -(-q.shape[1] // block), -(-k.shape[1] // block)
  mask = jnp.zeros((q.shape[0], heads, nq, nk), bool)
  # One pass per distinct pattern, over the heads that use it.
  for pattern in dict.fromkeys(patterns):
    group = np.asarray([h for h, p in enumerate(patterns) if p == pattern])
    mask = mask.at[:, group].set(pattern_mask(
        q[:, :, group], keys[:, :, group], pattern, block=block,
        last_q=last_q, sm_scale=sm_scale))
  return BlockList.from_block_mask(mask, block, block, max_blocks=nk)


def attention_block_mass(q: jax.Array, k: jax.Array, *, block: int,
                         sm_scale: float | None = None) -> jax.Array:
  """float32 [B, H, num_q_blocks, num_kv_blocks]: the dense causal attention
  probability mass in each block (each query row sums to 1). Offline: it
  holds the [B, H, Tq, Tk] probabilities."""
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  sm_scale = dim ** -0.5 if sm_scale is None else sm_scale
  keys = jnp.repeat(k, heads // kv_heads, axis=2).astype(jnp.float32)
  logits = jnp.einsum("bthd,bjhd->bhtj", q.astype(jnp.float32), keys) * sm_scale
  visible = (np.arange(kv_len)[None, :]
             <= np.arange(q_len)[:, None] + (kv_len - q_len))
  probs = jnp.where(visible, jax.nn.softmax(
      jnp.where(visible, logits, -jnp.inf), axis=-1), 0.0)
  nq, nk = -(-q_len // block), -(-kv_len // block)
  probs = jnp.pad(probs, ((0, 0), (0, 0), (0, nq * block - q_len),
                          (0, nk * block - kv_len)))
  return probs.reshape(batch, heads, nq, block, nk, block).sum(axis=(3, 5))


@functools.partial(jax.jit, static_argnames=("candidates", "block", "last_q",
                                             "sm_scale"))
def candidate_scores(q: jax.Array, k: jax.Array,
                     candidates: tuple[HeadPattern, ...], *, block: int,
                     last_q: int = 64, sm_scale: float | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """(recall, density), float32 [num_candidates, H]: per candidate pattern
  applied to every head, over the batch, the fraction of the dense causal
  attention mass in the kept blocks and the fraction of the causally visible
  blocks kept. One compiled pass for all candidates."""
  mass = attention_block_mass(q, k, block=block, sm_scale=sm_scale)
  keys = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
  visible = causal_block_mask(q.shape[1], k.shape[1], block, block).sum()
  recall, density = [], []
  for pattern in candidates:
    mask = pattern_mask(q, keys, pattern, block=block, last_q=last_q,
                        sm_scale=sm_scale)
    recall.append(jnp.sum(mass * mask, axis=(0, 2, 3))
                  / jnp.sum(mass, axis=(0, 2, 3)))
    density.append(jnp.sum(mask, axis=(0, 2, 3)) / (visible * q.shape[0]))
  return jnp.stack(recall), jnp.stack(density)


def calibrate_head_patterns(q: jax.Array, k: jax.Array, *, budget: float,
                            candidates: Sequence[HeadPattern] = DEFAULT_CANDIDATES,
                            block: int = 64, last_q: int = 64,
                            tolerance: float = 0.01,
                            sm_scale: float | None = None
                            ) -> tuple[HeadPattern, ...]:
  """Each query head's pattern, by the kernel-aware search (module
  docstring) on one layer's calibration q [B, Tq, H, D], k [B, Tk, Hkv, D]:
  of the candidates keeping at most `budget` of the causally visible blocks
  (on this sample), the one of the highest recall of the dense attention
  (within `tolerance`: the cheapest, then the first listed). A head that no
  candidate fits takes the cheapest. Offline (not jit-able); the result is a
  static argument of `minference_blocks`."""
  check_queries_and_keys(q, k)
  check_block(block)
  if not 0.0 < budget <= 1.0:
    raise ValueError(f"budget={budget} must be in (0, 1] (the fraction of the "
                     f"causally visible key blocks a head may keep)")
  if not 0.0 <= tolerance < 1.0:
    raise ValueError(f"tolerance={tolerance} must be in [0, 1)")
  candidates = tuple(candidates)
  if not candidates or not all(isinstance(c, HeadPattern) for c in candidates):
    raise ValueError("candidates must be a non-empty sequence of HeadPattern")
  recall, density = (np.asarray(x) for x in candidate_scores(
      q, k, candidates, block=block, last_q=last_q, sm_scale=sm_scale))
  chosen = []
  for h in range(q.shape[2]):
    fits = np.flatnonzero(density[:, h] <= budget + 1e-9)
    if not fits.size:
      chosen.append(candidates[int(np.argmin(density[:, h]))])
      continue
    best = recall[fits, h].max()
    near = fits[recall[fits, h] >= best - tolerance]
    # Cheapest of the near-best, then the first listed (a stable sort).
    chosen.append(candidates[int(near[np.argsort(density[near, h],
                                                 kind="stable")[0]])])
  return tuple(chosen)
