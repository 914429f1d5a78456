r"""VAR: the next-scale prediction transformer (Tian et al., "Visual Autoregressive Modeling:
Scalable Image Generation via Next-Scale Prediction", NeurIPS 2024, Sec. 3.2-3.3).

An image is K token maps r_1..r_K of sides s_1 < ... < s_K (VAR's multi-scale tokenizer,
`paperzoo.models.var_tokenizer`). VAR factorizes p(r_1, ..., r_K | c) = prod_k p(r_k | r_<k, c)
and predicts all s_k^2 tokens of scale k in parallel from the coarser scales (Eq. 6).

Inputs of the transformer (VAR's `idxBl_to_var_input`): scale 1 is predicted from the class
alone, scale k > 1 from x_k = area(f_hat_{k-1}, s_k) [s_k, s_k, D], the latent reconstructed from
the scales before it, downsampled to the side of the scale being predicted. With
n_k = s_k^2 and L = sum_k n_k:

    e        = E_class[y]                                   class embedding [C] (the condition)
    tokens   = [e repeated n_1 times; W_word x_2; ...; W_word x_K]     [L, C] (W_word: D -> C)
    h_0      = tokens + E_level[level(i)] + E_pos[i]         learned level and position tables
    block:   (g1, g2, a1, a2, b1, b2) = Linear(SiLU(e))     adaLN from the class (AdaLNSelfAttn)
             h = h + g1 * Attn(LN(h) (1 + a1) + b1, mask=M)
             h = h + g2 * FFN(LN(h) (1 + a2) + b2)           FFN: C -> r C -> C, GELU (tanh)
    head:    (a, b) = Linear(SiLU(e));  logits = W_head (LN(h) (1 + a) + b)     [L, V]

LN has no affine parameters (adaLN supplies them), epsilon `norm_eps`. The position i of the
logits predicts token i of r_1..r_K flattened scale by scale (row-major within a scale).

Block-causal mask (VAR's `attn_bias_for_masking`): M[i, j] = level(j) <= level(i): a token sees
every token of its own scale and of all coarser scales, none of a finer one, so one pass over
all L positions is teacher forcing over all scales at once, and the logits of scale k depend
only on the class and x_2..x_k.

Classifier-free guidance: the class table has num_classes + 1 rows; the last is the null class.
While training each label becomes the null class with probability `class_dropout_prob`. When
sampling, each batch runs the conditional and the null-class rows together and mixes

    logits = (1 + t_k) logits_cond - t_k logits_null,      t_k = s * k / (K - 1)

(VAR's `autoregressive_infer_cfg`: the scale ramps linearly from 0 at the first scale to s at the
last, `guidance_schedule="linear"`); `guidance_schedule="constant"` uses t_k = s at every scale.
s = 0 is the conditional model (note: DiT's guidance scale w corresponds to s = w - 1).

Sampling (`sample`), scale by scale with a KV cache: each block keeps the keys and values of
all tokens so far, so scale k computes only its n_k new queries, which attend to the cache and
to each other (exactly the block-causal rows of those tokens). The logits are divided by the
temperature, filtered by top-k then top-p (VAR's `sample_with_top_k_top_p_`, `filter_logits`),
sampled; the tokenizer adds the scale to f_hat (`add_scale`) and downsamples it to the next
input (`next_scale_input`); after K scales the image is `decode_fhat(f_hat)`.

Init (VAR's `init_weights`): with sigma = sqrt(1 / (3 C)), linear kernels, the class, level and
position tables normal with std sigma (VAR's `trunc_normal_` truncates at +-2 absolute, i.e.
not at all at these stds) and zero biases; the attention projections are the attention layer's
lecun-normal kernels (std 1 / sqrt(C)) times 1 / sqrt(3), so also std sigma; the attention
output projection and the FFN's second layer divided by sqrt(2 depth); the adaLN linears' gate
columns times 1e-5 and their shift/scale columns times 0.5 (the head's times 0.5); the head
times 0.02. Differences from VAR, kept simple for small models: plain scaled dot-product
attention (VAR's default normalizes q and k with a learned temperature), no drop-path, and the
start token's own position table (`pos_start`) is folded into E_pos[0:n_1] (both are learned
constants added to the same positions).

Attention goes through `paperzoo.layers.attention` (`MultiHeadAttention` for teacher forcing,
`dot_product_attention` for the cached decode), so `attention_impl` picks the kernel; the
block-causal mask needs an impl that takes masks ("xla", "cudnn", "reference").

Sizes (depth, width, heads): tiny (4, 128, 4) for CPU runs; S (12, 384, 6), DiT-S's shape;
d12 (12, 768, 12) and d16 (16, 1024, 16), VAR's depth rule (width 64 depth, heads = depth).

Config keys (`config.model`):
  size                (str, "tiny")     one of SIZES
  depth, width, heads (int, 0)          override the size's value when > 0
  mlp_ratio           (float, 4.0)      FFN hidden width / C
  class_dropout_prob  (float, 0.1)      label -> null class while training (VAR: 0.1)
  dropout             (float, 0.0)      on the attention and FFN outputs while training
  attention_dropout   (float, 0.0)      on the attention probabilities while training
  attention_impl      (str, "xla")      paperzoo.layers.attention.ATTENTION_IMPLS (with masks)
  norm_eps            (float, 1e-6)     LayerNorm epsilon

Constructor keywords (from the task): num_classes, scales (s_1..s_K), latent_dim (D),
codebook_size (V).
Input of `model(inputs, train=..., rngs=...)`: {"label": int [B] in [0, num_classes]
(num_classes = null), "scale_inputs": float [B, L - n_1, D] (x_2..x_K, each flattened
row-major, concatenated)}. Output: logits float32 [B, L, V].
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paperzoo.generation.decoding import filter_logits
from paperzoo.layers.attention import Dropout, MultiHeadAttention, dot_product_attention
from paperzoo.layers.initializers import dense
from paperzoo.models.dit import drop_labels, modulate
from paperzoo.registry import MODELS

# (depth, width, heads).
SIZES = {"tiny": (4, 128, 4), "S": (12, 384, 6), "d12": (12, 768, 12), "d16": (16, 1024, 16)}
GUIDANCE_SCHEDULES = ("linear", "constant")
MASKED_ATTENTION_IMPLS = ("xla", "cudnn", "reference")
# VAR's init_weights multipliers.
INIT_ADALN = 0.5
INIT_ADALN_GATE = 1e-5
INIT_HEAD = 0.02

# One block's KV cache: keys and values [B, tokens so far, heads, head_dim].
KVCache = tuple[jax.Array, jax.Array]


# --------------------------------------------------------------------------------------------
# Scales and the block-causal mask.
# --------------------------------------------------------------------------------------------
def scale_offsets(scales: Sequence[int]) -> tuple[int, ...]:
  """Start of each scale's tokens in the flattened sequence, and L at the end: (0, n_1, ...)."""
  return tuple(int(x) for x in np.concatenate([[0], np.cumsum([s * s for s in scales])]))


def token_levels(scales: Sequence[int]) -> np.ndarray:
  """int32 [L]: the (0-based) scale of each position."""
  return np.concatenate([np.full(s * s, k, np.int32) for k, s in enumerate(scales)])


@functools.lru_cache(maxsize=None)
def block_causal_mask(scales: tuple[int, ...]) -> np.ndarray:
  """bool [L, L]: mask[i, j] = level(j) <= level(i) (module docstring)."""
  levels = token_levels(scales)
  return levels[None, :] <= levels[:, None]


# --------------------------------------------------------------------------------------------
# Guidance (filtering: paperzoo.generation.decoding.filter_logits).
# --------------------------------------------------------------------------------------------
def guidance_at(scale_index: int, num_scales: int, guidance_scale: Any,
                schedule: str = "linear") -> Any:
  """t_k of the module docstring: s k / (K - 1) ("linear", VAR's ramp) or s ("constant")."""
  if schedule not in GUIDANCE_SCHEDULES:
    raise ValueError(f"unknown guidance_schedule {schedule!r}; valid: "
                     f"{', '.join(GUIDANCE_SCHEDULES)}")
  if schedule == "constant" or num_scales == 1:
    return guidance_scale
  return guidance_scale * scale_index / (num_scales - 1)


def guided_logits(cond: jax.Array, uncond: jax.Array, scale: Any) -> jax.Array:
  """(1 + t) cond - t uncond: t = 0 is the conditional model."""
  return (1.0 + scale) * cond - scale * uncond


# --------------------------------------------------------------------------------------------
# Layers.
# --------------------------------------------------------------------------------------------
def _normal(std: float):
  return jax.nn.initializers.normal(std)


def _adaln_init(std: float, width: int, num_gates: int, chunks: int):
  """Kernel [C, chunks C]: normal with std `std`, the first `num_gates` chunks (the gates) times
  INIT_ADALN_GATE, the rest times INIT_ADALN."""
  def init(key, shape, dtype=jnp.float32):
    kernel = _normal(std)(key, shape, dtype)
    factors = jnp.concatenate([jnp.full((num_gates * width,), INIT_ADALN_GATE, dtype),
                               jnp.full(((chunks - num_gates) * width,), INIT_ADALN, dtype)])
    return kernel * factors
  return init


def _plain_layer_norm(width: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(width, epsilon=eps, use_bias=False, use_scale=False, rngs=rngs)


def _split_heads(x: jax.Array, heads: int) -> jax.Array:
  return x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))


class VARBlock(nnx.Module):
  """One adaLN self-attention block (VAR's AdaLNSelfAttn, module docstring)."""

  def __init__(self, width: int, heads: int, *, depth: int, mlp_ratio: float, dropout: float,
               attention_dropout: float, attention_impl: str, norm_eps: float, rngs: nnx.Rngs):
    std = math.sqrt(1.0 / (3.0 * width))
    residual_std = std / math.sqrt(2.0 * depth)
    hidden = int(round(mlp_ratio * width))
    self.heads = heads
    self.norm = _plain_layer_norm(width, norm_eps, rngs)
    self.attention = MultiHeadAttention(width, heads, dropout_rate=attention_dropout,
                                        impl=attention_impl, init="lecun", rngs=rngs)
    # The attention layer's lecun-normal kernels have std 1 / sqrt(C): rescale them to VAR's.
    for projection, factor in ((self.attention.q_proj, 1.0), (self.attention.k_proj, 1.0),
                               (self.attention.v_proj, 1.0),
                               (self.attention.out_proj, 1.0 / math.sqrt(2.0 * depth))):
      projection.kernel[...] = projection.kernel[...] * (factor / math.sqrt(3.0))
    self.mlp_in = dense(width, hidden, names=("embed", "mlp"), init="lecun", rngs=rngs,
                        kernel_init=_normal(std))
    self.mlp_out = dense(hidden, width, names=("mlp", "embed"), init="lecun", rngs=rngs,
                         kernel_init=_normal(residual_std))
    self.modulation = dense(width, 6 * width, names=("embed", "mlp"), init="lecun", rngs=rngs,
                            kernel_init=_adaln_init(std, width, num_gates=2, chunks=6))
    self.dropout = Dropout(dropout)

  def _residuals(self, x: jax.Array, cond: jax.Array, attend, *, train: bool,
                 rngs: nnx.Rngs | None) -> jax.Array:
    gate1, gate2, scale1, scale2, shift1, shift2 = jnp.split(
        self.modulation(jax.nn.silu(cond)), 6, axis=-1)
    attended = attend(modulate(self.norm(x), shift1, scale1))
    x = x + gate1[:, None] * self.dropout(attended, deterministic=not train, rngs=rngs)
    h = jax.nn.gelu(self.mlp_in(modulate(self.norm(x), shift2, scale2)), approximate=True)
    h = self.dropout(self.mlp_out(h), deterministic=not train, rngs=rngs)
    return x + gate2[:, None] * h

  def __call__(self, x: jax.Array, cond: jax.Array, *, mask: jax.Array, train: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    """Teacher forcing: x [B, L, C] under the block-causal `mask` [L, L]."""
    return self._residuals(
        x, cond, lambda h: self.attention(h, h, mask=mask, train=train, rngs=rngs),
        train=train, rngs=rngs)

  def decode(self, x: jax.Array, cond: jax.Array, cache: KVCache | None
             ) -> tuple[jax.Array, KVCache]:
    """The tokens of one new scale x [B, n, C], attending to the cached keys and values of all
    coarser scales and to each other; returns the outputs and the cache extended by them."""
    attention = self.attention
    new_cache = []

    def attend(h):
      q = _split_heads(attention.q_proj(h), self.heads)
      k = _split_heads(attention.k_proj(h), self.heads)
      v = _split_heads(attention.v_proj(h), self.heads)
      if cache is not None:
        k = jnp.concatenate([cache[0], k], axis=1)
        v = jnp.concatenate([cache[1], v], axis=1)
      new_cache.append((k, v))
      attended = dot_product_attention(q, k, v, mask=None, impl=attention.impl)
      return attention.out_proj(attended.reshape(attended.shape[:-2] + (-1,)))

    out = self._residuals(x, cond, attend, train=False, rngs=None)
    return out, new_cache[0]


@MODELS.register("var")
class VAR(nnx.Module):
  """Class-conditional next-scale prediction transformer (module docstring)."""

  def __init__(self, config: Any, *, num_classes: int, scales: Sequence[int], latent_dim: int,
               codebook_size: int, rngs: nnx.Rngs, **unused: Any):
    del unused  # other tasks' shape information
    size = config.get("size", "tiny")
    if size not in SIZES:
      raise ValueError(f"unknown VAR size {size!r}; valid: {', '.join(SIZES)}")
    depth, width, heads = SIZES[size]
    depth = int(config.get("depth", 0)) or depth
    width = int(config.get("width", 0)) or width
    heads = int(config.get("heads", 0)) or heads
    if width % heads:
      raise ValueError(f"width={width} is not divisible by heads={heads}")
    self.scales = tuple(int(s) for s in scales)
    if not self.scales or any(s < 1 for s in self.scales) or any(
        b <= a for a, b in zip(self.scales, self.scales[1:])):
      raise ValueError(f"scales={self.scales} must be positive and strictly increasing")
    if num_classes < 1 or latent_dim < 1 or codebook_size < 2:
      raise ValueError(f"need num_classes >= 1, latent_dim >= 1, codebook_size >= 2; got "
                       f"{num_classes}, {latent_dim}, {codebook_size}")
    self.class_dropout_prob = float(config.get("class_dropout_prob", 0.1))
    if not 0.0 <= self.class_dropout_prob < 1.0:
      raise ValueError(f"class_dropout_prob={self.class_dropout_prob} must be in [0, 1)")
    attention_impl = config.get("attention_impl", "xla")
    if attention_impl not in MASKED_ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={attention_impl!r} takes no block-causal mask; valid: "
                       f"{', '.join(MASKED_ATTENTION_IMPLS)}")
    self.num_classes = int(num_classes)
    self.null_label = self.num_classes
    self.latent_dim = int(latent_dim)
    self.codebook_size = int(codebook_size)
    self.width = width
    self.offsets = scale_offsets(self.scales)
    self.seq_len = self.offsets[-1]
    norm_eps = float(config.get("norm_eps", 1e-6))

    std = math.sqrt(1.0 / (3.0 * width))
    table = _normal(std)
    self.class_table = nnx.Param(table(rngs.params(), (num_classes + 1, width), jnp.float32),
                                 out_sharding=(None, "embed"))
    self.level_table = nnx.Param(table(rngs.params(), (len(self.scales), width), jnp.float32),
                                 out_sharding=(None, "embed"))
    self.position_table = nnx.Param(table(rngs.params(), (self.seq_len, width), jnp.float32),
                                    out_sharding=(None, "embed"))
    self.word_embed = dense(latent_dim, width, names=(None, "embed"), init="lecun", rngs=rngs,
                            kernel_init=table)
    self.blocks = nnx.List([
        VARBlock(width, heads, depth=depth, mlp_ratio=float(config.get("mlp_ratio", 4.0)),
                 dropout=float(config.get("dropout", 0.0)),
                 attention_dropout=float(config.get("attention_dropout", 0.0)),
                 attention_impl=attention_impl, norm_eps=norm_eps, rngs=rngs)
        for _ in range(depth)])
    self.head_norm = _plain_layer_norm(width, norm_eps, rngs)
    self.head_modulation = dense(width, 2 * width, names=("embed", "mlp"), init="lecun",
                                 rngs=rngs, kernel_init=_adaln_init(std, width, num_gates=0,
                                                                     chunks=2))
    self.head = dense(width, codebook_size, names=("embed", "vocab"), init="lecun", rngs=rngs,
                      kernel_init=_normal(std * INIT_HEAD))

  # ------------------------------------------------------------------------------------------
  # Pieces shared by teacher forcing and decoding.
  # ------------------------------------------------------------------------------------------
  def condition(self, labels: jax.Array) -> jax.Array:
    """e = E_class[labels] [B, C]; labels == num_classes is the null class."""
    return self.class_table[...][labels]

  def _scale_tokens(self, scale: int, cond: jax.Array, scale_input: jax.Array | None
                    ) -> jax.Array:
    """h_0 of scale `scale`'s positions [B, n_k, C]: the class for scale 0, else
    W_word x_k; plus the level and position embeddings."""
    start, stop = self.offsets[scale], self.offsets[scale + 1]
    if scale == 0:
      tokens = jnp.broadcast_to(cond[:, None], (cond.shape[0], stop - start, self.width))
    else:
      tokens = self.word_embed(scale_input.reshape(scale_input.shape[0], stop - start, -1))
    return tokens + self.level_table[...][scale] + self.position_table[...][start:stop]

  def _head(self, h: jax.Array, cond: jax.Array) -> jax.Array:
    scale, shift = jnp.split(self.head_modulation(jax.nn.silu(cond)), 2, axis=-1)
    return self.head(modulate(self.head_norm(h), shift, scale)).astype(jnp.float32)

  def _check_labels(self, labels: jax.Array) -> None:
    if labels.ndim != 1:
      raise ValueError(f"labels must be int [B], got shape {labels.shape}")

  # ------------------------------------------------------------------------------------------
  # Teacher forcing over all scales.
  # ------------------------------------------------------------------------------------------
  def __call__(self, inputs: dict[str, jax.Array], *, train: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    labels, scale_inputs = inputs["label"], inputs["scale_inputs"]
    self._check_labels(labels)
    expected = (labels.shape[0], self.seq_len - self.offsets[1], self.latent_dim)
    if tuple(scale_inputs.shape) != expected:
      raise ValueError(f"scale_inputs must be [B, L - n_1, D] = {list(expected)} for scales "
                       f"{self.scales}, got {list(scale_inputs.shape)}")
    if train and self.class_dropout_prob > 0:
      if rngs is None:
        raise ValueError("training with class_dropout_prob > 0 needs rngs with a dropout stream")
      labels = drop_labels(labels, self.class_dropout_prob, self.null_label, rngs.dropout())
    cond = self.condition(labels)
    start = self._scale_tokens(0, cond, None)
    words = self.word_embed(scale_inputs.astype(jnp.float32))
    levels = jnp.asarray(token_levels(self.scales))
    h = jnp.concatenate([start, words + self.level_table[...][levels[self.offsets[1]:]]
                         + self.position_table[...][self.offsets[1]:]], axis=1)
    mask = jnp.asarray(block_causal_mask(self.scales))
    for block in self.blocks:
      h = block(h, cond, mask=mask, train=train, rngs=rngs)
    return self._head(h, cond)

  # ------------------------------------------------------------------------------------------
  # Scale-by-scale decoding with a KV cache.
  # ------------------------------------------------------------------------------------------
  def decode_scale(self, scale: int, scale_input: jax.Array | None, labels: jax.Array,
                   cache: list[KVCache] | None) -> tuple[jax.Array, list[KVCache]]:
    """Logits [B, n_k, V] of scale `scale` (0-based) and the extended cache.

    `scale_input`: None for scale 0, else x_k [B, s_k, s_k, D] (the tokenizer's
    `next_scale_input`); `cache`: None for scale 0, else what the previous call returned.
    Equal to the teacher-forced logits at those positions (module docstring)."""
    self._check_labels(labels)
    if not 0 <= scale < len(self.scales):
      raise ValueError(f"scale must be in [0, {len(self.scales) - 1}], got {scale}")
    if (scale == 0) != (cache is None) or (scale == 0) != (scale_input is None):
      raise ValueError("scale 0 takes no scale_input and no cache; later scales need both")
    if scale_input is not None:
      side = self.scales[scale]
      if tuple(scale_input.shape) != (labels.shape[0], side, side, self.latent_dim):
        raise ValueError(f"the input of scale {scale} must be [B, {side}, {side}, "
                         f"{self.latent_dim}], got {list(scale_input.shape)}")
    cond = self.condition(labels)
    h = self._scale_tokens(scale, cond, scale_input)
    new_cache = []
    for i, block in enumerate(self.blocks):
      h, block_cache = block.decode(h, cond, None if cache is None else cache[i])
      new_cache.append(block_cache)
    return self._head(h, cond), new_cache


def sample(model: VAR, tokenizer: Any, labels: jax.Array, key: jax.Array, *,
           guidance_scale: Any = 0.0, guidance_schedule: str = "linear", top_k: int = 0,
           top_p: float = 0.0, temperature: float = 1.0
           ) -> tuple[jax.Array, list[jax.Array]]:
  """Class-conditional images of `labels` [B]: (images [B, H, W, C] in ~[-1, 1], the token maps
  [r_1 .. r_K] int32 [B, s_k, s_k]), scale by scale with the KV cache (module docstring).

  `tokenizer` is a trained `paperzoo.models.var_tokenizer.VARTokenizer` with the model's scales,
  latent dim and codebook size. A Python 0 for `guidance_scale` runs the conditional rows only;
  any other value (or a traced one) runs the null-class rows too. Jit it whole (the scale loop
  unrolls; each scale has its own shapes)."""
  if tuple(tokenizer.scales) != model.scales:
    raise ValueError(f"the tokenizer's scales {tuple(tokenizer.scales)} differ from the model's "
                     f"{model.scales}")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0 (use top_k=1 for greedy)")
  guided = not (isinstance(guidance_scale, (int, float)) and guidance_scale == 0)
  batch = labels.shape[0]
  rows = labels.astype(jnp.int32)
  if guided:
    rows = jnp.concatenate([rows, jnp.full_like(rows, model.null_label)])
  num_scales = len(model.scales)
  side = model.scales[-1]
  f_hat = jnp.zeros((batch, side, side, model.latent_dim), jnp.float32)
  scale_input, cache, token_maps = None, None, []
  for k, size in enumerate(model.scales):
    logits, cache = model.decode_scale(k, scale_input, rows, cache)
    if guided:
      t = guidance_at(k, num_scales, guidance_scale, guidance_schedule)
      logits = guided_logits(logits[:batch], logits[batch:], t)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    tokens = jax.random.categorical(jax.random.fold_in(key, k), logits, axis=-1)
    token_map = tokens.reshape(batch, size, size).astype(jnp.int32)
    token_maps.append(token_map)
    f_hat = tokenizer.add_scale(f_hat, k, token_map)
    if k + 1 < num_scales:
      scale_input = tokenizer.next_scale_input(f_hat, k)
      if guided:
        scale_input = jnp.concatenate([scale_input, scale_input])
  return tokenizer.decode_fhat(f_hat), token_maps
