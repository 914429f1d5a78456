"""SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before
Generation"): KV-cache compression at the end of the prompt, per head, voted
by an observation window.

The heads of a trained model keep attending, while they generate, to the
prompt positions that the last prompt queries already attend to. SnapKV
therefore keeps, per head, only those positions' keys and values, and decodes
on the compressed cache. For a prompt of T positions, an observation window of
the last W queries (positions T - W .. T - 1) and the prefix 0 .. T - W - 1,
per query head h:

    A      = softmax(q_win k^T sm_scale | causal)   [W, T]: the window's
                                                    attention over all T keys,
                                                    as the model computes it
                                                    (query t sees keys j <= t)
    vote_j = sum_{i in window} A_ij                 j = 0 .. T - W - 1
    score  = pool1d(vote, kernel, stride 1, padding kernel // 2)
    kept   = top_{budget - W}(score) U {T - W, ..., T - 1}

so each head keeps `budget` positions: the `budget - W` best-voted prefix
positions and the window itself. Pooling (max, or average counting the zero
padding as torch's `avg_pool1d` does in the authors' code) spreads a vote to
the neighbours of a voted position, so that clusters of positions are kept
rather than isolated tokens. A prompt of T <= budget positions keeps
everything. Kept positions are returned sorted ascending (ties in the top-k
go to the lower position). The authors' defaults: window 32, kernel 5 (7 in
some of their runs), average pooling.

GQA (H query heads sharing Hkv KV heads, query head h reading KV head
h // (H / Hkv)): the cache is stored per KV head, so by default the votes of
the H / Hkv query heads of a group are summed (after pooling, as NVIDIA's
kvpress does; for average pooling the order does not matter) and one
selection is made per KV head: [B, Hkv, budget], the cache's size unchanged by
the grouping. `per_query_head=True` selects per query head instead, as the
authors' code does after repeating the KV heads: [B, H, budget], a cache H / Hkv
times larger that `compress_kv` builds by repeating the KV heads.

Keys are cached after the rotary rotation by their absolute positions, so
compressing only gathers: positions stay absolute.

Shapes: q [B, Tq, H, D] (only the last `window` rows are read, the rows of
positions T - W .. T - 1), k, v [B, T, Hkv, D]; positions int32
[B, Hkv | H, min(T, budget)]. Every function jits with budget, window,
pool_kernel and pooling static.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

POOLINGS = ("avg", "max")


def check_snapkv_arguments(*, budget: int, window: int, pool_kernel: int,
                           pooling: str) -> None:
  """One-line ValueError unless 1 <= window <= budget, pool_kernel is odd and
  >= 1, and pooling is one of POOLINGS."""
  if window < 1:
    raise ValueError(f"SnapKV window={window} must be >= 1")
  if budget < window:
    raise ValueError(f"SnapKV budget={budget} must be >= window={window} (the "
                     "observation window is always kept)")
  if pool_kernel < 1 or pool_kernel % 2 == 0:
    raise ValueError(f"SnapKV pool_kernel={pool_kernel} must be odd and >= 1 "
                     "(a centred window keeps the length)")
  if pooling not in POOLINGS:
    raise ValueError(f"SnapKV pooling={pooling!r}: valid: "
                     f"{', '.join(POOLINGS)}")


def _check_qk(q: jax.Array, k: jax.Array) -> None:
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(f"q must be [B, Tq, H, D] and k [B, T, Hkv, D], got "
                     f"shapes {q.shape} and {k.shape}")
  if (q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]
      or q.shape[2] % k.shape[2]):
    raise ValueError(f"q {q.shape} and k {k.shape} must share batch and "
                     "head_dim, with heads a multiple of kv_heads")


def pool_votes(votes: jax.Array, *, kernel: int,
               pooling: str = "avg") -> jax.Array:
  """votes [..., N] pooled along the last axis with a centred window of odd
  `kernel`, stride 1, same length: the max, or the sum / kernel (zero
  padding counted, as torch's avg_pool1d)."""
  if votes.shape[-1] == 0 or kernel == 1:
    return votes
  pad = kernel // 2
  dims = (1,) * (votes.ndim - 1) + (kernel,)
  strides = (1,) * votes.ndim
  padding = ((0, 0),) * (votes.ndim - 1) + ((pad, pad),)
  if pooling == "max":
    return jax.lax.reduce_window(votes, -jnp.inf, jax.lax.max, dims, strides,
                                 padding)
  summed = jax.lax.reduce_window(votes, 0.0, jax.lax.add, dims, strides,
                                 padding)
  return summed / kernel


def snapkv_scores(q_window: jax.Array, k: jax.Array, *, pool_kernel: int = 7,
                  pooling: str = "avg",
                  sm_scale: float | None = None) -> jax.Array:
  """float32 [B, H, T - W]: each query head's pooled votes for the prefix
  positions, from the window queries q_window [B, W, H, D] (positions
  T - W .. T - 1) over k [B, T, Hkv, D] (module docstring)."""
  _check_qk(q_window, k)
  batch, window, heads, dim = q_window.shape
  length, kv_heads = k.shape[1], k.shape[2]
  if window > length:
    raise ValueError(f"the window's {window} queries are more than the "
                     f"{length} keys")
  sm_scale = dim ** -0.5 if sm_scale is None else sm_scale
  group = heads // kv_heads
  # Grouped einsum: query head h = kv * group + g reads KV head kv, without
  # materializing repeated keys.
  q_grouped = q_window.astype(jnp.float32).reshape(
      batch, window, kv_heads, group, dim)
  logits = jnp.einsum("bwkgd,btkd->bkgwt", q_grouped,
                      k.astype(jnp.float32)) * sm_scale
  logits = logits.reshape(batch, heads, window, length)
  query_position = length - window + jnp.arange(window)
  visible = jnp.arange(length)[None, :] <= query_position[:, None]
  probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
  votes = probs[..., :length - window].sum(axis=2)
  return pool_votes(votes, kernel=pool_kernel, pooling=pooling)


def snapkv_keep(q: jax.Array, k: jax.Array, *, budget: int, window: int = 32,
                pool_kernel: int = 7, pooling: str = "avg",
                sm_scale: float | None = None,
                per_query_head: bool = False) -> jax.Array:
  """int32 [B, Hkv (or H with per_query_head), min(T, budget)]: the prompt
  positions each KV head keeps, sorted, the last `window` always among them;
  q [B, Tq, H, D] the prompt's queries (its last `window` rows are the
  observation window), k [B, T, Hkv, D] its keys (module docstring)."""
  check_snapkv_arguments(budget=budget, window=window,
                         pool_kernel=pool_kernel, pooling=pooling)
  _check_qk(q, k)
  batch, length = k.shape[0], k.shape[1]
  heads, kv_heads = q.shape[2], k.shape[2]
  selected_heads = heads if per_query_head else kv_heads
  if length <= budget:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                            (batch, selected_heads, length))
  if q.shape[1] < window:
    raise ValueError(f"q holds {q.shape[1]} queries, fewer than the "
                     f"window={window}")
  scores = snapkv_scores(q[:, q.shape[1] - window:], k,
                         pool_kernel=pool_kernel, pooling=pooling,
                         sm_scale=sm_scale)
  if not per_query_head:
    scores = scores.reshape(batch, kv_heads, heads // kv_heads, -1).sum(2)
  window_positions = jnp.broadcast_to(
      jnp.arange(length - window, length, dtype=jnp.int32),
      (batch, selected_heads, window))
  if budget == window:
    return window_positions
  prefix = jnp.sort(jax.lax.top_k(scores, budget - window)[1], axis=-1)
  return jnp.concatenate([prefix.astype(jnp.int32), window_positions], -1)


def compress_kv(k: jax.Array, v: jax.Array,
                positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(k, v) [B, n, Hp, D] at `positions` int32 [B, Hp, n] of k, v
  [B, T, Hkv, D]; Hp = Hkv gathers per KV head, Hp a multiple of Hkv
  (per-query-head selections) repeats the KV heads first."""
  if k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"k and v must share one shape [B, T, Hkv, D], got "
                     f"{k.shape} and {v.shape}")
  kv_heads = k.shape[2]
  if (positions.ndim != 3 or positions.shape[0] != k.shape[0]
      or positions.shape[1] % kv_heads):
    raise ValueError(f"positions must be [B, Hp, n] with B={k.shape[0]} and "
                     f"Hp a multiple of kv_heads={kv_heads}, got shape "
                     f"{positions.shape}")
  group = positions.shape[1] // kv_heads
  if group > 1:
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  index = positions.astype(jnp.int32).transpose(0, 2, 1)[..., None]
  return (jnp.take_along_axis(k, index, axis=1),
          jnp.take_along_axis(v, index, axis=1))
