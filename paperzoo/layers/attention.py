"""Scaled dot-product attention and multi-head attention (Vaswani et al., 2017, Sec. 3.2).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V                       (Eq. 1)
    MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,
        head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)                        (Sec. 3.2.2)

Layout is [batch, sequence, heads, head_dim] ("BSHD") throughout, the layout of
`jax.nn.dot_product_attention`. Masks are boolean, True = may attend, broadcastable to
[batch, heads, q_len, kv_len].

`dot_product_attention` is the single dispatch point over implementations (`ATTENTION_IMPLS`).
With `causal=True` query i sees keys j <= i + (kv_len - q_len): the causal mask with the last
query aligned to the last key (the usual one when q_len == kv_len), as `pallas_kernels`'
flash kernel defines it; every impl applies that same mask, combined with `mask` when both are
given:
  * "xla", "cudnn": `jax.nn.dot_product_attention(..., implementation=impl)`;
  * "flash": `pallas_kernels.flash_attention(impl="auto")`: the Pallas kernel on GPU, XLA on
    TPU, its jnp reference on CPU; "flash_interpret": the same Pallas kernel through interpret
    mode on any backend (slow; for checking the kernel inside a model on CPU). The flash paths
    take no arbitrary mask (the kernel supports causal masks and segment ids only);
  * "reference": the definition written out with einsums and an explicit softmax. It is the only
    path that exposes the attention probabilities, so it is the only one that can apply dropout to
    them, which the PyTorch reference code (TSLib's `FullAttention`) does:
    `A = dropout(softmax(scale * QK^T))`. `MultiHeadAttention` therefore switches to "reference"
    whenever it trains with dropout_rate > 0, whatever impl it was configured with; at eval time,
    or without dropout, it uses the configured impl;
  * "blocked": causal self-attention only (`blocked_causal_attention`): the reference's math by
    blocks of 256 queries, each over the keys it can see, so the masked half of the scores is
    never computed. Training at 2,048 tokens on the project's 2-core CPU it was 3x faster than
    "xla" (`jax.nn.dot_product_attention` with is_causal, which computes and masks every
    score; experiments/results/lm_speed.md).

`Dropout` (used by every paperzoo layer) is `nnx.Dropout` with a cheaper mask, see its docstring.

Parameter names: the four projections are `nnx.Linear` maps over the flattened heads * head_dim
axis, which is named "heads" (the heads are contiguous blocks of it, so splitting it over a
"tensor" mesh axis splits whole heads when num_heads divides by the mesh size):
q/k/v kernels ("embed", "heads"), biases ("heads",); output kernel ("heads", "embed"),
bias ("embed",).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from paperzoo.layers.initializers import check_init_scheme, dense

ATTENTION_IMPLS = ("xla", "cudnn", "reference", "flash", "flash_interpret", "blocked")
# Query rows per block of the "blocked" causal attention.
BLOCKED_ATTENTION_BLOCK = 256

# Dropout draws 16-bit uniforms: two per 32-bit word of the key's generator.
_MASK_BITS = 16
_MASK_LEVELS = 1 << _MASK_BITS


class Dropout(nnx.Dropout):
  """`nnx.Dropout` (same constructor and call) that draws half as many random words, faster.

  `nnx.Dropout` compares a float uniform per element, one 32-bit word of the generator each; on
  CPU the generator (threefry) dominates the cost of dropout, about a fifth of an iTransformer
  training step. Here each 32-bit word of `jax.random.bits(key)` gives two independent 16-bit
  uniforms u, and an element is dropped when
  u < round(rate * 2^16): the realized rate is within 2^-17 of `rate`, and kept values are
  scaled by the realized keep probability, so E[dropout(x)] = x exactly. Masks with
  `broadcast_dims` fall back to `nnx.Dropout`.
  """

  def __call__(self, inputs, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None) -> jax.Array:
    deterministic = self.deterministic if deterministic is None else deterministic
    if self.broadcast_dims or deterministic is None:
      return super().__call__(inputs, deterministic=deterministic, rngs=rngs)
    drop_threshold = min(round(self.rate * _MASK_LEVELS), _MASK_LEVELS - 1)
    if deterministic or drop_threshold == 0:
      return inputs
    if self.rate >= 1.0:
      return jnp.zeros_like(inputs)
    rngs = self.rngs if rngs is None else rngs
    if isinstance(rngs, nnx.Rngs):
      key = rngs[self.rng_collection]()
    elif isinstance(rngs, nnx.RngStream):
      key = rngs()
    elif isinstance(rngs, jax.Array):
      key = rngs
    else:
      raise TypeError(f"Dropout needs rngs (Rngs, RngStream or a key) when training, "
                      f"got {type(rngs)}")
    size = inputs.size
    words = jax.random.bits(key, (-(-size // 2),), jnp.uint32)
    uniforms = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:size]
    keep = uniforms.reshape(inputs.shape) >= drop_threshold
    scale = _MASK_LEVELS / (_MASK_LEVELS - drop_threshold)
    return jnp.where(keep, inputs * jnp.asarray(scale, inputs.dtype), jnp.zeros_like(inputs))


def check_attention_impl(impl: str) -> None:
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; valid: {', '.join(ATTENTION_IMPLS)}")


def _as_4d_mask(mask: jax.Array | None) -> jax.Array | None:
  """Left-pads a mask's shape with ones up to [B, H, Sq, Skv] (the fused kernels want rank 4)."""
  if mask is None:
    return None
  mask = jnp.asarray(mask, dtype=jnp.bool_)
  if mask.ndim > 4:
    raise ValueError(f"an attention mask has at most 4 axes [B, H, Sq, Skv], got {mask.shape}")
  return mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def causal_attention_mask(q_len: int, kv_len: int) -> jax.Array:
  """[1, 1, q_len, kv_len] bool, True where key j <= query i + (kv_len - q_len) (ends aligned)."""
  rows = jnp.arange(q_len)[:, None] + (kv_len - q_len)
  return (jnp.arange(kv_len)[None, :] <= rows)[None, None]


def _with_causal(mask: jax.Array | None, q_len: int, kv_len: int) -> jax.Array:
  causal = causal_attention_mask(q_len, kv_len)
  return causal if mask is None else jnp.logical_and(mask, causal)


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    probs_dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """softmax(q k^T / sqrt(d) [masked]) v with einsums; `probs_dropout` acts on the softmax."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  # Logits and softmax in float32 so low-precision inputs do not lose the normalization.
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    # A large finite negative (as jax.nn.dot_product_attention uses) rather than -inf, so a fully
    # masked row gives a uniform distribution instead of NaNs.
    logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)
  probs = jax.nn.softmax(logits, axis=-1)
  if probs_dropout is not None:
    probs = probs_dropout(probs)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                             block: int = BLOCKED_ATTENTION_BLOCK) -> jax.Array:
  """Causal self-attention (q_len == kv_len) by blocks of `block` query rows, each attending to
  the keys up to its last row only: the masked upper triangle of key blocks is never computed
  (about half the work of the full product at long lengths), and each block's scores stay small
  enough for the cache. The definition's math per block, float32 softmax; autodiff gives the
  backward."""
  length = q.shape[1]
  if k.shape[1] != length:
    raise ValueError(f"blocked causal attention needs q_len == kv_len, got {length} and "
                     f"{k.shape[1]}")
  if length <= block:
    return reference_attention(q, k, v, mask=causal_attention_mask(length, length))
  outputs = []
  for start in range(0, length, block):
    stop = min(start + block, length)
    visible = causal_attention_mask(stop - start, stop)  # rows start..stop-1, keys 0..stop-1
    outputs.append(reference_attention(q[:, start:stop], k[:, :stop], v[:, :stop],
                                       mask=visible))
  return jnp.concatenate(outputs, axis=1)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    causal: bool = False,
    impl: str = "xla",
    probs_dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """Scaled dot-product attention, q [B, Sq, H, D], k and v [B, Skv, H, D] -> [B, Sq, H, D].

  `mask`: boolean, True = attend, broadcastable to [B, H, Sq, Skv]. `causal`: also mask keys
  after the query, ends aligned (module docstring). `probs_dropout` (a function applied to the
  [B, H, Sq, Skv] attention probabilities) needs impl="reference": the fused implementations
  never materialize the probabilities.
  """
  check_attention_impl(impl)
  mask = _as_4d_mask(mask)
  q_len, kv_len = q.shape[1], k.shape[1]
  if impl == "reference":
    if causal:
      mask = _with_causal(mask, q_len, kv_len)
    return reference_attention(q, k, v, mask=mask, probs_dropout=probs_dropout)
  if probs_dropout is not None:
    raise ValueError(f"dropout on attention probabilities needs impl='reference', not {impl!r}")
  if impl == "blocked":
    if not causal or mask is not None or q_len != kv_len:
      raise ValueError("impl='blocked' is causal self-attention without a mask (q_len == "
                       f"kv_len); got causal={causal}, a mask: {mask is not None}, lengths "
                       f"{q_len} and {kv_len}")
    return blocked_causal_attention(q, k, v)
  if impl in ("flash", "flash_interpret"):
    if mask is not None:
      raise ValueError(f"impl={impl!r} takes no attention mask (the flash kernel supports causal "
                       "masks and segment ids); use impl='xla' or 'reference' with a mask")
    import pallas_kernels  # pylint: disable=g-import-not-at-top  (only models that use it pay)
    return pallas_kernels.flash_attention(
        q, k, v, causal=causal, impl="auto" if impl == "flash" else "interpret")
  if causal and (mask is not None or q_len != kv_len):
    # jax.nn's is_causal is the top-left mask and cannot be combined with another: spell it out.
    return jax.nn.dot_product_attention(q, k, v, mask=_with_causal(mask, q_len, kv_len),
                                        implementation=impl)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                      implementation=impl)


class MultiHeadAttention(nnx.Module):
  """Multi-head self/cross attention with q/k/v/output projections (Sec. 3.2.2), as TSLib's
  `AttentionLayer` + `FullAttention`: head_dim = d_model // num_heads, scale 1/sqrt(head_dim),
  dropout (rate `dropout_rate`) on the attention probabilities while training.
  """

  def __init__(
      self,
      d_model: int,
      num_heads: int,
      *,
      dropout_rate: float,
      impl: str = "xla",
      init: str = "torch",
      rngs: nnx.Rngs,
  ):
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    check_attention_impl(impl)
    check_init_scheme(init)
    self.num_heads = num_heads
    self.head_dim = d_model // num_heads
    self.impl = impl
    self.dropout_rate = dropout_rate
    self.q_proj = dense(d_model, d_model, names=("embed", "heads"), init=init, rngs=rngs)
    self.k_proj = dense(d_model, d_model, names=("embed", "heads"), init=init, rngs=rngs)
    self.v_proj = dense(d_model, d_model, names=("embed", "heads"), init=init, rngs=rngs)
    self.out_proj = dense(d_model, d_model, names=("heads", "embed"), init=init, rngs=rngs)
    self.attention_dropout = Dropout(dropout_rate)

  def _split_heads(self, h: jax.Array) -> jax.Array:
    return h.reshape(h.shape[:-1] + (self.num_heads, self.head_dim))

  def __call__(
      self,
      q_in: jax.Array,
      kv_in: jax.Array,
      *,
      mask: jax.Array | None = None,
      train: bool,
      rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """q_in [B, Sq, d_model], kv_in [B, Skv, d_model] -> [B, Sq, d_model]."""
    q = self._split_heads(self.q_proj(q_in))
    k = self._split_heads(self.k_proj(kv_in))
    v = self._split_heads(self.v_proj(kv_in))
    if train and self.dropout_rate > 0.0:
      # Probability dropout needs the probabilities, which only the reference path materializes.
      attended = dot_product_attention(
          q, k, v, mask=mask, impl="reference",
          probs_dropout=lambda p: self.attention_dropout(p, deterministic=False, rngs=rngs))
    else:
      attended = dot_product_attention(q, k, v, mask=mask, impl=self.impl)
    return self.out_proj(attended.reshape(attended.shape[:-2] + (-1,)))
