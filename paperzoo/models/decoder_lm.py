"""A decoder-only language model whose causal token mixer is a config key.

GPT-2's pre-norm decoder (Radford et al. 2019), as nanoGPT writes it, with the self-attention
replaced by any mixer of `paperzoo.layers.causal_mixers`:

    h_0    = E[x_t] (+ P_t)                    E [vocab, d]; P [max_length, d] learned positions
                                               ("learned"), or none ("rotary": the attention
                                               mixer rotates q and k; "none": the recurrent
                                               mixers carry order in their state)
    h_l'   = h_{l-1} + Mixer_l(LN(h_{l-1}))    "attention" (softmax), "linear", "gla",
                                               "lightning", "mamba"; causal
    h_l    = h_l' + W_2 GELU(W_1 LN(h_l'))     mlp_ratio d hidden units (mlp_ratio 0: no MLP,
                                               as in Mamba's language model)
    logits = LN(h_L) E^T                       (tie_embeddings) or LN(h_L) W_head

Initialisation as GPT-2 / nanoGPT: every kernel and embedding normal(0.02), biases zero, the
residual output projections (the mixers' and W_2) normal(0.02 / sqrt(2 num_layers)). Dense
layers run on 2-D [batch x time, width] operands: on this project's CPU, XLA's backward of a
3-D [B, T, D] @ W followed by GELU was 2.7x slower than the same on the flattened array.

Decoding (`init_cache`, `prefill`, `step`; `paperzoo.generation.decoding.generate` drives
them): every mixer keeps a cache (keys and values for attention, a recurrent state for the
others); `prefill` runs the prompt in one parallel pass and `step` one token, so step-by-step
logits equal those of the full forward pass.

Config keys (`config.model`):
  d_model (128), num_layers (4), num_heads (4), mixer ("attention"), mlp_ratio (4.0; 0: none),
  positions ("learned" | "rotary" | "none"; "learned"), tie_embeddings (True), bias (False:
  linear maps and LayerNorms without biases, as nanoGPT's `bias=False`), dropout (0.0: after the
  embedding and on each residual branch), attention_dropout (0.0), matmul_dtype ("float32" |
  "bfloat16": the dense layers' and the head's products with bfloat16 operands and float32
  accumulation, `paperzoo.layers.matmul`; parameters, norms, softmax and the loss stay
  float32), and the mixer's own keys (`paperzoo.layers.causal_mixers`).
Input: int32 tokens [B, T], T <= max_length; output: float32 logits [B, T, vocab].
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from paperzoo.config import ConfigError
from paperzoo.layers import causal_mixers
from paperzoo.layers.attention import Dropout
from paperzoo.layers.initializers import dense, flat_dense
from paperzoo.layers.matmul import bf16_matmul, check_matmul_dtype
from paperzoo.layers.transformer import gelu, layer_norm
from paperzoo.registry import MODELS

POSITIONS = ("learned", "rotary", "none")
INIT_STD = 0.02


class MLP(nnx.Module):
  """W_2 GELU(W_1 x) (exact GELU, as nanoGPT's nn.GELU())."""

  def __init__(self, d_model: int, hidden: int, *, use_bias: bool, num_layers: int,
               matmul: str, rngs: nnx.Rngs):
    normal = nnx.initializers.normal
    self.fc = dense(d_model, hidden, names=("embed", "mlp"), init="lecun", rngs=rngs,
                    use_bias=use_bias, kernel_init=normal(INIT_STD), matmul=matmul)
    self.proj = dense(hidden, d_model, names=("mlp", "embed"), init="lecun", rngs=rngs,
                      use_bias=use_bias, kernel_init=normal(INIT_STD / math.sqrt(2 * num_layers)),
                      matmul=matmul)

  def __call__(self, x: jax.Array) -> jax.Array:
    return flat_dense(self.proj, gelu(flat_dense(self.fc, x)))


class Block(nnx.Module):
  """x + Mixer(LN(x)), then x + MLP(LN(x)) (pre-norm)."""

  def __init__(self, config: Any, *, d_model: int, layer_index: int, num_layers: int,
               rngs: nnx.Rngs):
    use_bias = bool(config.get("bias", False))
    self.mixer_norm = layer_norm(d_model, use_bias=use_bias, rngs=rngs)
    self.mixer = causal_mixers.make_causal_mixer(
        config.get("mixer", "attention"), d_model, config, layer_index=layer_index,
        num_layers=num_layers, rngs=rngs)
    hidden = int(round(float(config.get("mlp_ratio", 4.0)) * d_model))
    self.mlp_norm = layer_norm(d_model, use_bias=use_bias, rngs=rngs) if hidden else None
    self.mlp = (MLP(d_model, hidden, use_bias=use_bias, num_layers=num_layers,
                    matmul=config.get("matmul_dtype", "float32"), rngs=rngs)
                if hidden else None)
    self.dropout = Dropout(float(config.get("dropout", 0.0)))

  def _mlp(self, x, train, rngs):
    if self.mlp is None:
      return x
    return x + self.dropout(self.mlp(self.mlp_norm(x)), deterministic=not train, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    mixed = self.mixer(self.mixer_norm(x), train=train, rngs=rngs)
    x = x + self.dropout(mixed, deterministic=not train, rngs=rngs)
    return self._mlp(x, train, rngs)

  def prefill(self, x: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    mixed, cache = self.mixer.prefill(self.mixer_norm(x), cache)
    return self._mlp(x + mixed, False, None), cache

  def step(self, x: jax.Array, cache: Any, position: jax.Array) -> tuple[jax.Array, Any]:
    mixed, cache = self.mixer.step(self.mixer_norm(x), cache, position)
    return self._mlp(x + mixed, False, None), cache


@MODELS.register("decoder_lm")
class DecoderLM(nnx.Module):
  """Token embedding, causal blocks, final norm, head (module docstring)."""

  def __init__(self, config: Any, *, vocab_size: int, max_length: int, rngs: nnx.Rngs):
    d_model = int(config.get("d_model", 128))
    num_layers = int(config.get("num_layers", 4))
    self.positions_kind = config.get("positions", "learned")
    if self.positions_kind not in POSITIONS:
      raise ConfigError(f"model.positions={self.positions_kind!r}: valid: "
                        f"{', '.join(POSITIONS)}")
    if self.positions_kind == "rotary" and config.get("mixer", "attention") != "attention":
      raise ConfigError("model.positions='rotary' rotates attention's queries and keys; the "
                        f"{config.get('mixer')!r} mixer has none (use 'none' or 'learned')")
    self.vocab_size, self.max_length = vocab_size, max_length
    self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs, embedding_init=nnx.with_partitioning(
        nnx.initializers.normal(INIT_STD), ("vocab", "embed")))
    self.positions = (nnx.Param(INIT_STD * jax.random.normal(rngs.params(),
                                                             (max_length, d_model)),
                                out_sharding=(None, "embed"))
                      if self.positions_kind == "learned" else None)
    self.blocks = nnx.List([Block(config, d_model=d_model, layer_index=i,
                                  num_layers=num_layers, rngs=rngs)
                            for i in range(num_layers)])
    self.norm = layer_norm(d_model, use_bias=bool(config.get("bias", False)), rngs=rngs)
    self.matmul = config.get("matmul_dtype", "float32")
    check_matmul_dtype(self.matmul)
    self.head = (None if config.get("tie_embeddings", True) else
                 dense(d_model, vocab_size, names=("embed", "vocab"), init="lecun", rngs=rngs,
                       use_bias=False, kernel_init=nnx.initializers.normal(INIT_STD),
                       matmul=self.matmul))
    self.dropout = Dropout(float(config.get("dropout", 0.0)))

  @property
  def context_limit(self) -> int | None:
    """The longest sequence the model can take (learned positions), None when unbounded."""
    return self.max_length if self.positions is not None else None

  def _embed(self, tokens: jax.Array, start: Any = 0) -> jax.Array:
    x = self.embed(tokens)
    if self.positions is not None:
      length = tokens.shape[1]
      x = x + jax.lax.dynamic_slice_in_dim(self.positions[...], start, length)
    return x

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self.norm(x)
    flat = x.reshape(-1, x.shape[-1])
    if self.head is None and self.matmul == "bfloat16":
      logits = bf16_matmul(flat, self.embed.embedding[...].T)
    elif self.head is None:
      logits = flat @ self.embed.embedding[...].T
    else:
      logits = self.head(flat)
    return logits.reshape(x.shape[:-1] + (self.vocab_size,)).astype(jnp.float32)

  def _check_length(self, length: int) -> None:
    if self.context_limit is not None and length > self.context_limit:
      raise ValueError(f"a sequence of {length} tokens is longer than the model's context of "
                       f"{self.context_limit} (learned positions)")

  def __call__(self, tokens: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    self._check_length(tokens.shape[1])
    x = self.dropout(self._embed(tokens), deterministic=not train, rngs=rngs)
    for block in self.blocks:
      x = block(x, train=train, rngs=rngs)
    return self._logits(x)

  # ------------------------------------------------------------------------------------------
  # Decoding: a cache per block, one parallel pass over the prompt, then one token per step.
  # ------------------------------------------------------------------------------------------
  def init_cache(self, batch_size: int, max_length: int) -> list[Any]:
    """Each block's empty cache for sequences of up to `max_length` tokens."""
    self._check_length(max_length)
    return [block.mixer.init_cache(batch_size, max_length) for block in self.blocks]

  def prefill(self, tokens: jax.Array, cache: list[Any]) -> tuple[jax.Array, list[Any]]:
    """Logits [B, T, vocab] of the prompt `tokens` [B, T] (positions 0..T-1), and the cache
    after it."""
    x = self._embed(tokens)
    new_cache = []
    for block, block_cache in zip(self.blocks, cache):
      x, block_cache = block.prefill(x, block_cache)
      new_cache.append(block_cache)
    return self._logits(x), new_cache

  def step(self, token: jax.Array, cache: list[Any], position: jax.Array
           ) -> tuple[jax.Array, list[Any]]:
    """Logits [B, vocab] of one token [B] at `position` (int32 scalar), and the cache after."""
    x = self._embed(token[:, None], position)
    new_cache = []
    for block, block_cache in zip(self.blocks, cache):
      x, block_cache = block.step(x, block_cache, position)
      new_cache.append(block_cache)
    return self._logits(x)[:, 0], new_cache
