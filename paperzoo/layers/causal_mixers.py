"""Causal token mixers with a parallel (training) form and a recurrent (decoding) form.

A decoder-only language model (`paperzoo.models.decoder_lm`) builds one per block,

    mixer = make_causal_mixer(name, d_model, config.model, layer_index=l, num_layers=L, rngs=rngs)

and every mixer (`name` one of `CAUSAL_MIXERS`; an unknown name is a ValueError listing them)
has the same interface, x [B, T, d_model] the pre-normed block input:

    y = mixer(x, train=..., rngs=...)             parallel form over all T positions, causal
    cache = mixer.init_cache(batch_size, max_length)        fixed-shape zeros (a pytree)
    y, cache = mixer.prefill(x, cache)    positions 0..T-1 (T <= max_length) in one parallel
                                          pass: the same y as mixer(x, train=False), and the
                                          cache after position T-1
    y_t, cache = mixer.step(x_t, cache, position)   x_t [B, 1, d_model], position an int32
                                          scalar (may be traced): the token at that position

so prefill(x[:, :k]) followed by step() on x[:, k], x[:, k+1], ... gives the outputs of
mixer(x, train=False). `step` has fixed shapes and jits once for every position. (Attention with
kv_budget > 0 compresses its cache at the end of the prompt: prefill then returns a smaller
cache, whose shape every step keeps, and the steps attend to the kept entries only.)

Notation: d = d_model, H = num_heads, d_h = d / H, x_t the input at position t; heads are
contiguous blocks of a projection's width. Every linear map runs on the flattened
[B * T, features] array: on this project's CPU XLA's backward of a 3-D [B, T, D] @ W was ~2.7x
slower than the same on the 2-D view.

"attention": causal multi-head softmax self-attention as GPT-2 / nanoGPT write it (Radford et
al. 2019; Vaswani et al. 2017, Eq. 1), one fused [d, 3d] q/k/v map and an output map:
    o_t = sum_{j <= t} softmax_j(q_t . k_j / sqrt(d_h)) v_j,     y = W_o concat_h(o)
  through `paperzoo.layers.attention.dot_product_attention(causal=True, impl=attention_impl)`;
  with attention_dropout > 0 while training, dropout on the probabilities (impl "reference",
  as `MultiHeadAttention`). With positions == "rotary", q and k are rotated by their absolute
  positions (RoFormer, Su et al. 2021, Sec. 3.4.2) in the rotate-half convention of GPT-NeoX /
  LLaMA: channel i pairs with i + d_h/2 (the paper pairs 2i with 2i + 1, the same rotation up
  to a fixed permutation of W_q's and W_k's columns),
    R(x, p) = [x1 cos(p w) - x2 sin(p w), x2 cos(p w) + x1 sin(p w)],  w_i = rope_base^(-2i/d_h)
  (x1, x2 the head's halves, i = 0..d_h/2 - 1); otherwise no positions here (the model adds
  learned ones).
  Cache: k, v [B, max_length, H, d_h] float32; step writes position and attends to j <= position,
  through `_attend_cache(q, cache, num_valid)`, attention over the cache's first num_valid
  entries.
  With kv_budget > 0, SnapKV (Li et al. 2024; `paperzoo.sparse_attention.snapkv`) compresses
  the cache at the end of the prompt: prefill computes the prompt's outputs with full attention
  as before, then keeps per head the min(P, kv_budget) prompt positions that the last
  snapkv_window queries vote for (softmax weights summed over those queries, pooled over
  snapkv_pool neighbours, top-k, and the window itself). Its cache is then k, v [B, S, H, d_h],
  S = min(P, kv_budget) + max_length - P (P the prompt's length): the kept entries (keys
  rotated by their absolute positions before caching, so compressing only gathers), then room
  for the tokens to come, with "length", the int32 count of valid entries; step writes entry
  length and attends to the entries below length + 1. `cache_bytes(batch, max_length, P)` is
  its size.
  Outside training, `sparse_prefill` (`paperzoo.sparse_attention`) can replace the dense causal
  attention of the parallel pass (prefill and evaluation) by block-sparse attention over the
  key blocks a selector keeps (XAttention); each call sows the kept fraction of the causally
  visible blocks as `nnx.Intermediate` "block_density".

"linear": causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", Eq. 4-6
with the causal sums of Sec. 3.3, the RNN of Sec. 3.4), phi(u) = elu(u) + 1:
    S_t = sum_{s <= t} phi(k_s) v_s^T,  z_t = sum_{s <= t} phi(k_s)
    o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps),  eps = 1e-6,   y = W_o concat_h(o)
  Numerator and denominator in one `chunked_linear_attention` pass on [v, 1] (the last output
  column is the denominator). State: [S | z] [B, H, d_h, d_h + 1].

"gla": Gated Linear Attention (Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training", Sec. 4), per head key width d_k = gla_key_ratio d / H (the paper's
d/2 in total) and value width d_v = d / H:
    q = x W_Q, k = x W_K, v = x W_V                   (fused, no bias)
    alpha_t = sigmoid(x_t W_a1 W_a2 + b_a)^(1/tau)    W_a1 [d, r], W_a2 [r, H d_k], r =
                                                      gla_gate_rank, tau = gla_gate_temperature
    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,  o_t = d_k^-0.5 q_t S_t   (per head)
    y = (RMSNorm_head(o) * swish(x W_r + b_r)) W_O
  log alpha = log_sigmoid(.) / tau is the per-key-dimension log decay of
  `chunked_linear_attention`. The q scale d_k^-0.5 and RMSNorm (learned weight [d_v] shared by
  the heads, eps 1e-5) follow the authors' implementation (flash-linear-attention's
  `GatedLinearAttention`); the paper writes a per-head normalization of o before the swish
  output gate. State: S [B, H, d_k, d_v].

"lightning": Lightning Attention inside the TransNormerLLM (TNL) token mixer (Qin et al. 2024,
"Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention", Eq. 3,
9-11 and 14; TransNormerLLM, Qin et al. 2023):
    q = phi(x W_q), k = phi(x W_k), v = x W_v, u = x W_u      phi = SiLU (Swish), fused [d, 4d]
    o = [(q k^T) * M] v,   M_ts = lambda_h^(t - s) for s <= t, else 0       (per head, no scale)
    y = (SRMSNorm(o) * u) W_o,   SRMSNorm(x) = x / sqrt(mean(x^2) + 1e-6)  over all d channels
  i.e. S_t = lambda_h S_{t-1} + k_t^T v_t, o_t = q_t S_t: `chunked_linear_attention` with the
  constant log decay log lambda_h is exactly Lightning Attention's intra-block masked product
  plus inter-block decayed state. SRMSNorm has no learned scale and normalizes the
  concatenated heads, as TNL's code does. The fixed decay of head h in layer l of L
  (`lightning_decay`):
    "alibi" (default): log lambda = -m_h (1 - l / (L - 1) + 1e-5), l = 0..L-1 (l/(L-1) := 0
      when L = 1), m_h = 2^(-8h/H) for h = 1..H (ALiBi's slopes; its interleaving rule when H
      is not a power of two): what TransNormerLLM's released code computes;
    "paper": Eq. 10 as printed, lambda = exp(-(8h/H)(1 - l/L)), h = 1..H, l = 1..L (the h-th
      head of the l-th layer). It looks like the code's slopes with their base 2 dropped: its
      decays per step reach e^-8, so that most heads see only a few tokens back.
  LRPE (the learned relative rotation exp(i theta (t - s)) TNL adds in its first layer) is left
  out: the decay already carries position. State: S [B, H, d / H, d / H].

"mamba": the selective SSM block of Mamba (Gu & Dao 2023, Sec. 3, Algorithm 2), causal over
tokens, `paperzoo.layers.mamba.MambaBlock` (equations and init there):
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   y_t = (C_t . h_t + D u_t) silu(z_t)
  prefill scans with `pallas_kernels.selective_scan(return_last_state=True)`; step does one
  update. State: the conv's last d_conv - 1 inputs [B, d_conv - 1, d_inner] and h
  [B, d_inner, d_state], float32.

Decoding memory, float32 per sequence and layer: attention's cache grows with max_length,
8 d max_length bytes (k and v; 8 d (min(P, kv_budget) + max_length - P) with SnapKV, P the
prompt's length); the others are constant in the sequence length:
linear 4 d (d/H + 1), gla 4 d_k_total d / H (= 2 d^2 / H at key ratio 1/2), lightning 4 d^2 / H,
mamba 4 d_inner (d_conv - 1 + d_state) bytes.

Initialisation (GPT-2 / nanoGPT): kernels normal(0.02), biases zero, each mixer's output map
normal(0.02 / sqrt(2 num_layers)) (the residual-projection scaling); the GLA RMSNorm weight
ones; the Mamba block keeps MambaBlock's own initialisation. Parameters are float32; the
parallel forms take float32 or bfloat16 inputs (projections, softmax and recurrences in
float32) and return x's dtype.

Config keys (read with `config.get(key, default)`):
    num_heads              4        heads of attention, linear, gla, lightning
    bias                   False    biases of attention's, linear's and lightning's q/k/v(/u)
                                    and output maps (nanoGPT's `bias`)
    attention_impl         "xla"    `dot_product_attention` impl of the parallel form
    attention_dropout      0.0      dropout on attention probabilities while training
    positions              "learned"  "rotary": attention rotates q and k (else no positions)
    rope_base              10000.0  RoPE's base
    decode_attention_impl  "dense"  attention's decoding steps over the cache: "dense" (one
                                    masked pass, `dot_product_attention`) | "lean" (split
                                    along the cache, LeanAttention: `pallas_kernels.
                                    decode_attention`, its stream-K kernel on GPU, split-K
                                    jnp elsewhere); both attend to the valid entries only
    kv_budget              0        attention: prompt positions each head keeps in its cache at
                                    the end of the prompt (SnapKV); 0 keeps the whole cache
    snapkv_window          32       SnapKV's observation window (the last prompt queries,
                                    always kept; kv_budget >= snapkv_window)
    snapkv_pool            7        its pooling kernel over positions (odd)
    snapkv_pooling         "avg"    "avg" | "max"
    linear_attention_impl  "auto"   `chunked_linear_attention` impl (linear, gla, lightning)
    chunk_size             64       its chunk length
    gla_key_ratio          0.5      GLA's total key width / d_model
    gla_gate_rank          16       GLA's low-rank gate width
    gla_gate_temperature   16.0     GLA's tau
    lightning_decay        "alibi"  "alibi" | "paper" (above)
    matmul_dtype           "float32"  "bfloat16": every dense layer's product with bfloat16
                                    operands and float32 accumulation (paperzoo.layers.matmul)
    d_state, d_conv, expand, scan_impl, init   16, 4, 2, "auto", "torch": the Mamba block

Names: in-projections ("embed", "heads"), output maps ("heads", "embed"), biases their output
axis; GLA's low-rank gate W_a1 ("embed", None), W_a2 (None, "heads"), its RMSNorm weight (None,)
(per head channel, shared by the heads); the Mamba block's names are in
`paperzoo.layers.mamba`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paperzoo.config import ConfigError
from paperzoo.layers.attention import Dropout, check_attention_impl, dot_product_attention
from paperzoo.layers.initializers import dense, flat_dense
from paperzoo.layers.mamba import MambaBlock
from paperzoo.layers.mixers import LINEAR_ATTENTION_EPS
from paperzoo.sparse_attention import causal_block_mask, make_block_selector
from paperzoo.sparse_attention.snapkv import check_snapkv_arguments, compress_kv, snapkv_keep
from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.chunked_linear_attention import (IMPLS as LINEAR_ATTENTION_IMPLS,
                                                     chunked_linear_attention,
                                                     linear_attention_state,
                                                     linear_attention_step)

CAUSAL_MIXERS: tuple[str, ...] = ("attention", "linear", "gla", "lightning", "mamba")

DECODE_ATTENTION_IMPLS = ("dense", "lean")

LIGHTNING_DECAYS = ("alibi", "paper")

INIT_STD = 0.02

# GLA's per-head RMSNorm epsilon (flash-linear-attention's `norm_eps` default).
GLA_NORM_EPS = 1e-5

# SRMSNorm's epsilon (TransNormerLLM's SimpleRMSNorm).
SRMS_NORM_EPS = 1e-6

Cache = dict[str, jax.Array]


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _dense(in_features: int, out_features: int, *, names: tuple[str | None, str | None],
           std: float, use_bias: bool, matmul: str, rngs: nnx.Rngs) -> nnx.Linear:
  """normal(std) kernel, zero bias ("lecun"'s bias init); products in `matmul`'s precision."""
  return dense(in_features, out_features, names=names, init="lecun", rngs=rngs,
               use_bias=use_bias, kernel_init=nnx.initializers.normal(std), matmul=matmul)


def _out_std(num_layers: int) -> float:
  return INIT_STD / math.sqrt(2 * num_layers)


def _check_tokens(name: str, x: jax.Array) -> None:
  if x.ndim != 3:
    raise ValueError(f"causal mixer {name!r} takes x [B, T, d_model], got shape {x.shape}")


def _check_heads(d_model: int, num_heads: int) -> None:
  if num_heads < 1 or d_model % num_heads:
    raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """RoPE, rotate-half convention: x [B, T, H, D] (D even), positions [T] int -> x's shape and
  dtype. The head's halves x1, x2 are rotated pairwise by the angles p * base^(-2i/D)."""
  half = x.shape[-1] // 2
  inv_freq = jnp.asarray(base ** (-np.arange(half, dtype=np.float64) * 2.0 / x.shape[-1]),
                         jnp.float32)
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]   # [T, D/2]
  cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Softmax attention
# --------------------------------------------------------------------------------------------


class CausalSelfAttention(nnx.Module):
  """"attention": causal softmax attention with a KV cache (module docstring)."""

  def __init__(self, d_model: int, *, num_heads: int, dropout_rate: float, impl: str,
               use_bias: bool, rotary: bool, rope_base: float, num_layers: int,
               matmul: str, rngs: nnx.Rngs,
               block_selector: Callable[..., Any] | None = None, kv_budget: int = 0,
               snapkv_window: int = 32, snapkv_pool: int = 7, snapkv_pooling: str = "avg",
               decode_impl: str = "dense"):
    _check_heads(d_model, num_heads)
    self.block_selector = block_selector
    if decode_impl not in DECODE_ATTENTION_IMPLS:
      raise ValueError(f"unknown decode_attention_impl {decode_impl!r}; valid: "
                       f"{', '.join(DECODE_ATTENTION_IMPLS)}")
    self.decode_impl = decode_impl
    if kv_budget < 0:
      raise ValueError(f"kv_budget={kv_budget} must be >= 0 (0 keeps the whole cache)")
    if kv_budget:
      check_snapkv_arguments(budget=kv_budget, window=snapkv_window, pool_kernel=snapkv_pool,
                             pooling=snapkv_pooling)
    self.kv_budget, self.snapkv_window = int(kv_budget), int(snapkv_window)
    self.snapkv_pool, self.snapkv_pooling = int(snapkv_pool), snapkv_pooling
    check_attention_impl(impl)
    self.num_heads, self.head_dim = num_heads, d_model // num_heads
    if rotary and self.head_dim % 2:
      raise ValueError(f"rotary positions pair a head's channels: head_dim = "
                       f"{self.head_dim} must be even")
    self.impl, self.dropout_rate = impl, dropout_rate
    self.rotary, self.rope_base = rotary, float(rope_base)
    self.qkv_proj = _dense(d_model, 3 * d_model, names=("embed", "heads"), std=INIT_STD,
                           use_bias=use_bias, matmul=matmul, rngs=rngs)
    self.out_proj = _dense(d_model, d_model, names=("heads", "embed"),
                           std=_out_std(num_layers), use_bias=use_bias, matmul=matmul, rngs=rngs)
    self.attention_dropout = Dropout(dropout_rate)

  def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, ...]:
    batch, length, _ = x.shape
    qkv = flat_dense(self.qkv_proj, x).reshape(batch, length, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.rotary:
      q = rotary_embedding(q, positions, self.rope_base)
      k = rotary_embedding(k, positions, self.rope_base)
    return q, k, v

  def _out(self, attended: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return flat_dense(self.out_proj, attended.reshape(attended.shape[:2] + (-1,))).astype(dtype)

  def _parallel(self, x: jax.Array, train: bool, rngs: nnx.Rngs | None
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    _check_tokens("attention", x)
    q, k, v = self._qkv(x, jnp.arange(x.shape[1]))
    if train and self.dropout_rate > 0.0:
      # Probability dropout needs the probabilities, which only the reference path materializes.
      attended = dot_product_attention(
          q, k, v, causal=True, impl="reference",
          probs_dropout=lambda p: self.attention_dropout(p, deterministic=False, rngs=rngs))
    elif not train and self.block_selector is not None:
      blocks = self.block_selector(q, k)
      # The fraction of the causally visible key blocks kept (nnx.Intermediate).
      visible = causal_block_mask(x.shape[1], x.shape[1], blocks.block_q, blocks.block_kv)
      self.sow(nnx.Intermediate, "block_density",
               jnp.sum(blocks.counts) / (visible.sum() * blocks.counts.shape[0]
                                         * blocks.counts.shape[1]))
      attended = block_sparse_attention(q, k, v, blocks, causal=True)
    else:
      attended = dot_product_attention(q, k, v, causal=True, impl=self.impl)
    return self._out(attended, x.dtype), q, k, v

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    return self._parallel(x, train, rngs)[0]

  def init_cache(self, batch_size: int, max_length: int) -> Cache:
    shape = (batch_size, max_length, self.num_heads, self.head_dim)
    return {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)}

  def cache_slots(self, max_length: int, prompt_length: int) -> int:
    """Entries per sequence and head of the cache that `prefill` of `prompt_length` tokens
    returns for sequences of up to `max_length`: max_length, or with kv_budget the kept
    prompt entries plus one per token still to come."""
    if not self.kv_budget:
      return max_length
    return min(prompt_length, self.kv_budget) + max_length - prompt_length

  def cache_bytes(self, batch_size: int, max_length: int, prompt_length: int) -> int:
    """Bytes of this layer's cache after `prefill` of `prompt_length` tokens (the arrays'
    nbytes: k and v float32, and the int32 count of valid entries with kv_budget)."""
    entries = batch_size * self.cache_slots(max_length, prompt_length) * self.num_heads
    return 2 * 4 * entries * self.head_dim + (4 if self.kv_budget else 0)

  def prefill(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    max_length = cache["k"].shape[1]
    if x.shape[1] > max_length:
      raise ValueError(f"prefill of {x.shape[1]} positions into a cache of max_length "
                       f"{max_length}")
    y, q, k, v = self._parallel(x, False, None)
    if not self.kv_budget:
      return y, {name: jax.lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype),
                                                    (0, 0, 0, 0))
                 for name, new in (("k", k), ("v", v))}
    # SnapKV: the outputs above saw every key; the cache keeps each head's selection, then
    # room for the tokens to come (a new, smaller cache: init_cache's is not reused).
    kept = snapkv_keep(q, k, budget=self.kv_budget, window=self.snapkv_window,
                       pool_kernel=self.snapkv_pool, pooling=self.snapkv_pooling)
    slots = self.cache_slots(max_length, x.shape[1])
    compressed = {}
    for name, kept_entries in zip(("k", "v"), compress_kv(k, v, kept)):
      dtype = cache[name].dtype
      compressed[name] = jnp.zeros((x.shape[0], slots) + kept_entries.shape[2:], dtype).at[
          :, :kept.shape[-1]].set(kept_entries.astype(dtype))
    compressed["length"] = jnp.asarray(kept.shape[-1], jnp.int32)
    return y, compressed

  def step(self, x: jax.Array, cache: Cache, position: jax.Array) -> tuple[jax.Array, Cache]:
    position = jnp.asarray(position, jnp.int32)
    q, k, v = self._qkv(x, position[None])  # rotated by the absolute position
    # Dense: entry = position; compressed (kv_budget): the next free entry.
    slot = cache["length"] if "length" in cache else position
    new_cache = {name: jax.lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype),
                                                    (0, slot, 0, 0))
                 for name, new in (("k", k), ("v", v))}
    if "length" in cache:
      new_cache["length"] = slot + 1
    attended = self._attend_cache(q, new_cache, slot + 1)
    return self._out(attended, x.dtype), new_cache

  def _attend_cache(self, q: jax.Array, cache: Cache, num_valid: jax.Array) -> jax.Array:
    """Attention [B, 1, H, d_h] of the new token's q [B, 1, H, d_h] over the first
    `num_valid` entries (int32, a scalar or one per sequence [B]) of cache["k"], cache["v"]
    [B, S, H, d_h]; the new token's own entry is the last valid one."""
    q = q.astype(cache["k"].dtype)
    if self.decode_impl == "lean":
      lengths = jnp.broadcast_to(jnp.asarray(num_valid, jnp.int32), q.shape[:1])
      return decode_attention(q, cache["k"], cache["v"], lengths)
    # Entries from num_valid on are zeros or stale; the mask keeps them out.
    num_valid = jnp.reshape(jnp.asarray(num_valid, jnp.int32), (-1, 1, 1, 1))
    allowed = jnp.arange(cache["k"].shape[1])[None, None, None, :] < num_valid
    return dot_product_attention(
        q, cache["k"], cache["v"], mask=allowed,
        impl="reference" if self.impl == "reference" else "xla")


# --------------------------------------------------------------------------------------------
# The linear-attention family: one recurrence S_t = diag(exp(w_t)) S_{t-1} + k_t^T v_t
# --------------------------------------------------------------------------------------------


class _DecayedLinearAttention(nnx.Module):
  """Parallel form through `chunked_linear_attention`, decoding through its state functions.

  A subclass gives `_features(x) -> (q, k, v, log_decay or None, extras)` (q, k [B, T, H, dk],
  v [B, T, H, dv], log_decay [B, T, H] or [B, T, H, dk]) and `_readout(o, extras, dtype)`.
  """

  name: str
  scale: float
  num_heads: int
  key_dim: int
  state_value_dim: int

  def _set_kernel(self, impl: str, chunk_size: int) -> None:
    if impl not in LINEAR_ATTENTION_IMPLS:
      raise ValueError(f"unknown linear_attention_impl {impl!r}; valid: "
                       f"{', '.join(LINEAR_ATTENTION_IMPLS)}")
    if chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    self.impl, self.chunk_size = impl, int(chunk_size)

  def _features(self, x: jax.Array) -> tuple[Any, ...]:
    raise NotImplementedError

  def _readout(self, o: jax.Array, extras: Any, dtype: jnp.dtype) -> jax.Array:
    raise NotImplementedError

  def _parallel(self, x: jax.Array) -> tuple[jax.Array, tuple[Any, ...]]:
    _check_tokens(self.name, x)
    features = self._features(x)
    q, k, v, log_decay, extras = features
    o = chunked_linear_attention(q, k, v, log_decay, chunk_size=self.chunk_size,
                                 scale=self.scale, impl=self.impl)
    return self._readout(o, extras, x.dtype), features

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    del train, rngs  # no dropout inside these mixers (the block around them has its own)
    return self._parallel(x)[0]

  def init_cache(self, batch_size: int, max_length: int) -> Cache:
    del max_length  # the state does not grow with the sequence
    return {"state": jnp.zeros((batch_size, self.num_heads, self.key_dim,
                                self.state_value_dim), jnp.float32)}

  def prefill(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    del cache  # a prompt starts at position 0, from the zero state
    y, (_, k, v, log_decay, _) = self._parallel(x)
    return y, {"state": linear_attention_state(k, v, log_decay)}

  def step(self, x: jax.Array, cache: Cache, position: jax.Array) -> tuple[jax.Array, Cache]:
    del position  # the state carries order
    q, k, v, log_decay, extras = self._features(x)
    o, state = linear_attention_step(
        cache["state"], q[:, 0], k[:, 0], v[:, 0],
        None if log_decay is None else log_decay[:, 0], scale=self.scale)
    return self._readout(o[:, None], extras, x.dtype), {"state": state}


class CausalLinearAttention(_DecayedLinearAttention):
  """"linear": Katharopoulos et al.'s causal linear attention, phi = elu + 1."""

  name = "linear"

  def __init__(self, d_model: int, *, num_heads: int, use_bias: bool, impl: str,
               chunk_size: int, num_layers: int, matmul: str, rngs: nnx.Rngs):
    _check_heads(d_model, num_heads)
    self._set_kernel(impl, chunk_size)
    self.num_heads, self.key_dim = num_heads, d_model // num_heads
    self.state_value_dim = self.key_dim + 1  # [S | z]: values and the normalizer's ones
    self.scale = 1.0
    self.qkv_proj = _dense(d_model, 3 * d_model, names=("embed", "heads"), std=INIT_STD,
                           use_bias=use_bias, matmul=matmul, rngs=rngs)
    self.out_proj = _dense(d_model, d_model, names=("heads", "embed"),
                           std=_out_std(num_layers), use_bias=use_bias, matmul=matmul, rngs=rngs)

  def _features(self, x):
    batch, length, _ = x.shape
    qkv = flat_dense(self.qkv_proj, x).reshape(batch, length, 3, self.num_heads, self.key_dim)
    phi_q, phi_k = jax.nn.elu(qkv[:, :, 0]) + 1.0, jax.nn.elu(qkv[:, :, 1]) + 1.0
    v = qkv[:, :, 2]
    # A column of ones makes the last output column phi(q_t)^T z_t, the normalizer.
    v_ones = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
    return phi_q, phi_k, v_ones, None, None

  def _readout(self, o, extras, dtype):
    del extras
    o = o[..., :-1] / (o[..., -1:] + LINEAR_ATTENTION_EPS)
    return flat_dense(self.out_proj, o.reshape(o.shape[:2] + (-1,))).astype(dtype)


class GatedLinearAttention(_DecayedLinearAttention):
  """"gla": Yang et al.'s gated linear attention with its low-rank gate and swish output gate."""

  name = "gla"

  def __init__(self, d_model: int, *, num_heads: int, key_ratio: float, gate_rank: int,
               gate_temperature: float, impl: str, chunk_size: int, num_layers: int,
               matmul: str, rngs: nnx.Rngs):
    _check_heads(d_model, num_heads)
    self._set_kernel(impl, chunk_size)
    key_width = int(round(key_ratio * d_model))
    if key_width < num_heads or key_width % num_heads:
      raise ValueError(f"gla_key_ratio * d_model = {key_ratio} * {d_model} must be a positive "
                       f"multiple of num_heads={num_heads}")
    if gate_rank < 1 or gate_temperature <= 0:
      raise ValueError(f"gla_gate_rank must be >= 1 and gla_gate_temperature > 0, got "
                       f"{gate_rank} and {gate_temperature}")
    self.num_heads = num_heads
    self.key_dim, self.state_value_dim = key_width // num_heads, d_model // num_heads
    self.key_width, self.d_model = key_width, d_model
    self.scale = self.key_dim ** -0.5
    self.gate_temperature = float(gate_temperature)
    self.qkv_proj = _dense(d_model, 2 * key_width + d_model, names=("embed", "heads"),
                           std=INIT_STD, use_bias=False, matmul=matmul, rngs=rngs)
    self.gate_down = _dense(d_model, gate_rank, names=("embed", None), std=INIT_STD,
                            use_bias=False, matmul=matmul, rngs=rngs)
    self.gate_up = _dense(gate_rank, key_width, names=(None, "heads"), std=INIT_STD,
                          use_bias=True, matmul=matmul, rngs=rngs)
    self.output_gate = _dense(d_model, d_model, names=("embed", "heads"), std=INIT_STD,
                              use_bias=True, matmul=matmul, rngs=rngs)
    self.norm_scale = nnx.Param(jnp.ones((self.state_value_dim,), jnp.float32),
                                out_sharding=(None,))
    self.out_proj = _dense(d_model, d_model, names=("heads", "embed"),
                           std=_out_std(num_layers), use_bias=False, matmul=matmul, rngs=rngs)

  def _features(self, x):
    batch, length, _ = x.shape
    heads = (batch, length, self.num_heads)
    qkv = flat_dense(self.qkv_proj, x)
    q, k, v = jnp.split(qkv, [self.key_width, 2 * self.key_width], axis=-1)
    # alpha = sigmoid(.)^(1/tau): log alpha = log_sigmoid(.) / tau <= 0, per key dimension.
    gate_logits = flat_dense(self.gate_up, flat_dense(self.gate_down, x)).astype(jnp.float32)
    log_alpha = jax.nn.log_sigmoid(gate_logits) / self.gate_temperature
    return (q.reshape(heads + (self.key_dim,)), k.reshape(heads + (self.key_dim,)),
            v.reshape(heads + (self.state_value_dim,)),
            log_alpha.reshape(heads + (self.key_dim,)), flat_dense(self.output_gate, x))

  def _readout(self, o, gate, dtype):
    o = o.astype(jnp.float32)
    o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + GLA_NORM_EPS)
    o = (o * self.norm_scale[...]).reshape(o.shape[:2] + (-1,))
    return flat_dense(self.out_proj, o * jax.nn.silu(gate)).astype(dtype)


def alibi_slopes(num_heads: int) -> list[float]:
  """ALiBi's head slopes (Press et al. 2022): 2^(-8h/H), h = 1..H, for H a power of two;
  otherwise those of the power of two below H and every other one of the next power's."""
  def power_of_two(n: int) -> list[float]:
    return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
  if math.log2(num_heads).is_integer():
    return power_of_two(num_heads)
  closest = 2 ** math.floor(math.log2(num_heads))
  return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][:num_heads - closest]


def lightning_log_decays(num_heads: int, layer_index: int, num_layers: int,
                         kind: str = "alibi") -> np.ndarray:
  """log lambda per head [H] float32 for layer `layer_index` of `num_layers` (module docstring)."""
  if kind not in LIGHTNING_DECAYS:
    raise ValueError(f"unknown lightning_decay {kind!r}; valid: {', '.join(LIGHTNING_DECAYS)}")
  if not 0 <= layer_index < num_layers:
    raise ValueError(f"layer_index={layer_index} is not in [0, num_layers={num_layers})")
  if kind == "alibi":
    depth = layer_index / (num_layers - 1) if num_layers > 1 else 0.0
    rates = np.asarray(alibi_slopes(num_heads)) * (1.0 - depth + 1e-5)
  else:
    heads = np.arange(1, num_heads + 1)
    rates = 8.0 * heads / num_heads * (1.0 - (layer_index + 1) / num_layers)
  return (-rates).astype(np.float32)


class LightningAttention(_DecayedLinearAttention):
  """"lightning": TransNormerLLM's token mixer, Lightning Attention with fixed decays."""

  name = "lightning"

  def __init__(self, d_model: int, *, num_heads: int, use_bias: bool, impl: str,
               chunk_size: int, decay: str, layer_index: int, num_layers: int,
               matmul: str, rngs: nnx.Rngs):
    _check_heads(d_model, num_heads)
    self._set_kernel(impl, chunk_size)
    self.num_heads = num_heads
    self.key_dim = self.state_value_dim = d_model // num_heads
    self.scale = 1.0  # NormAttention has no scale: SRMSNorm follows
    # A constant of the architecture, not a parameter (TNL found learned decays unstable),
    # kept as static Python floats so that it is no part of the model's state.
    self.log_decay = tuple(float(w) for w in lightning_log_decays(num_heads, layer_index,
                                                                   num_layers, decay))
    self.qkvu_proj = _dense(d_model, 4 * d_model, names=("embed", "heads"), std=INIT_STD,
                            use_bias=use_bias, matmul=matmul, rngs=rngs)
    self.out_proj = _dense(d_model, d_model, names=("heads", "embed"),
                           std=_out_std(num_layers), use_bias=use_bias, matmul=matmul, rngs=rngs)

  def _features(self, x):
    batch, length, _ = x.shape
    q, k, v, u = jnp.split(flat_dense(self.qkvu_proj, x), 4, axis=-1)
    heads = (batch, length, self.num_heads, self.key_dim)
    log_decay = jnp.broadcast_to(jnp.asarray(self.log_decay, jnp.float32),
                                 (batch, length, self.num_heads))
    return (jax.nn.silu(q).reshape(heads), jax.nn.silu(k).reshape(heads), v.reshape(heads),
            log_decay, u)

  def _readout(self, o, u, dtype):
    o = o.astype(jnp.float32).reshape(o.shape[:2] + (-1,))
    o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + SRMS_NORM_EPS)
    return flat_dense(self.out_proj, o * u).astype(dtype)


# --------------------------------------------------------------------------------------------
# Mamba
# --------------------------------------------------------------------------------------------


class CausalMamba(nnx.Module):
  """"mamba": one MambaBlock; its state is the conv window and the SSM state."""

  def __init__(self, d_model: int, *, d_state: int, d_conv: int, expand: int, init: str,
               scan_impl: str, matmul: str, rngs: nnx.Rngs):
    self.block = MambaBlock(d_model, d_state=d_state, d_conv=d_conv, expand=expand, init=init,
                            scan_impl=scan_impl, matmul=matmul, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    del train, rngs  # no dropout inside the mixer
    _check_tokens("mamba", x)
    return self.block(x).astype(x.dtype)

  def init_cache(self, batch_size: int, max_length: int) -> Cache:
    del max_length  # the state does not grow with the sequence
    return self.block.init_state(batch_size)

  def prefill(self, x: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    del cache  # a prompt starts at position 0, from the zero state
    _check_tokens("mamba", x)
    y, state = self.block.prefill(x)
    return y.astype(x.dtype), state

  def step(self, x: jax.Array, cache: Cache, position: jax.Array) -> tuple[jax.Array, Cache]:
    del position  # the state carries order
    y, state = self.block.step(x[:, 0], cache)
    return y[:, None].astype(x.dtype), state


# --------------------------------------------------------------------------------------------
# The factory
# --------------------------------------------------------------------------------------------


def _check_snapkv_config(*, kv_budget: int, snapkv_window: int, snapkv_pool: int,
                         snapkv_pooling: str) -> None:
  """A one-line ConfigError naming the keys unless they make a valid SnapKV setting."""
  if kv_budget < 0:
    raise ConfigError(f"model.kv_budget={kv_budget} must be >= 0 (0 keeps the whole cache)")
  if kv_budget:
    try:
      check_snapkv_arguments(budget=kv_budget, window=snapkv_window, pool_kernel=snapkv_pool,
                             pooling=snapkv_pooling)
    except ValueError as error:
      raise ConfigError(f"model.kv_budget={kv_budget}, snapkv_window={snapkv_window}, "
                        f"snapkv_pool={snapkv_pool}, snapkv_pooling={snapkv_pooling!r}: "
                        f"{error}") from None


def make_causal_mixer(name: str, d_model: int, config: Any, *, layer_index: int,
                      num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
  """The causal mixer `name` (one of CAUSAL_MIXERS) of layer `layer_index` of `num_layers`,
  its keys read from `config` (a ConfigDict or dict; keys and defaults in the module
  docstring)."""
  if name not in CAUSAL_MIXERS:  # the config's to fix: a ConfigError is one line at the CLI
    raise ConfigError(f"model.mixer={name!r}: unknown mixer {name!r}; valid: "
                      f"{', '.join(CAUSAL_MIXERS)}")
  if num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}")
  get = config.get
  num_heads = int(get("num_heads", 4))
  use_bias = bool(get("bias", False))
  kernel = dict(impl=get("linear_attention_impl", "auto"), chunk_size=int(get("chunk_size", 64)))
  matmul = get("matmul_dtype", "float32")
  if name == "attention":
    snapkv = dict(kv_budget=int(get("kv_budget", 0)), snapkv_window=int(get("snapkv_window", 32)),
                  snapkv_pool=int(get("snapkv_pool", 7)),
                  snapkv_pooling=get("snapkv_pooling", "avg"))
    _check_snapkv_config(**snapkv)
    if get("decode_attention_impl", "dense") not in DECODE_ATTENTION_IMPLS:
      raise ConfigError(f"model.decode_attention_impl={get('decode_attention_impl')!r}: "
                        f"unknown; valid: {', '.join(DECODE_ATTENTION_IMPLS)}")
    return CausalSelfAttention(
        d_model, num_heads=num_heads, dropout_rate=float(get("attention_dropout", 0.0)),
        impl=get("attention_impl", "xla"), use_bias=use_bias,
        rotary=get("positions", "learned") == "rotary",
        rope_base=float(get("rope_base", 10000.0)), num_layers=num_layers, matmul=matmul,
        rngs=rngs, block_selector=make_block_selector(config),
        decode_impl=get("decode_attention_impl", "dense"), **snapkv)
  if name == "linear":
    return CausalLinearAttention(d_model, num_heads=num_heads, use_bias=use_bias,
                                 num_layers=num_layers, matmul=matmul, rngs=rngs, **kernel)
  if name == "gla":
    return GatedLinearAttention(
        d_model, num_heads=num_heads, key_ratio=float(get("gla_key_ratio", 0.5)),
        gate_rank=int(get("gla_gate_rank", 16)),
        gate_temperature=float(get("gla_gate_temperature", 16.0)), num_layers=num_layers,
        matmul=matmul, rngs=rngs, **kernel)
  if name == "lightning":
    return LightningAttention(d_model, num_heads=num_heads, use_bias=use_bias,
                              decay=get("lightning_decay", "alibi"), layer_index=layer_index,
                              num_layers=num_layers, matmul=matmul, rngs=rngs, **kernel)
  return CausalMamba(d_model, d_state=int(get("d_state", 16)), d_conv=int(get("d_conv", 4)),
                     expand=int(get("expand", 2)), init=get("init", "torch"),
                     scan_impl=get("scan_impl", "auto"), matmul=matmul, rngs=rngs)
