"""The vanilla (post-norm) Transformer encoder (Vaswani et al., 2017, Sec. 3.1), in the form
iTransformer (Liu et al., ICLR 2024, Sec. 3.2) uses it via TSLib's `EncoderLayer`/`Encoder`:

    x   = LayerNorm(x + Dropout(MultiHeadAttention(x, x)))
    y   = Dropout(act(Linear_{d_model -> d_ff}(x)))
    y   = Dropout(Linear_{d_ff -> d_model}(y))
    out = LayerNorm(x + y)

and `Encoder` = the layers followed by a final LayerNorm. LayerNorm epsilon is 1e-5 (PyTorch's
default) and its variance is computed as E[(x - mean)^2] (not E[x^2] - mean^2) to stay close to
PyTorch numerically. `act` is "gelu" (exact erf form, as PyTorch's F.gelu) or "relu".

`norm_first=True` gives the pre-norm layer (PyTorch's `nn.TransformerEncoderLayer(norm_first=True)`,
used e.g. by Gateformer):

    x   = x + Dropout(MultiHeadAttention(LN_1(x), LN_1(x)))
    out = x + Dropout(Linear_{d_ff -> d_model}(Dropout(act(Linear_{d_model -> d_ff}(LN_2(x))))))

and `Encoder(final_norm=False)` drops the final LayerNorm (`nn.TransformerEncoder(norm=None)`).

The decoder (Vaswani et al. Sec. 3.1, in TSLib's post-norm `DecoderLayer`/`Decoder` form, as the
vanilla Transformer, Informer and other encoder-decoder forecasters use it), for decoder tokens x
[B, T, d] and encoder output m [B, S, d]:

    x   = LayerNorm(x + Dropout(MultiHeadAttention(x, x, mask=causal)))     masked self-attention
    x   = LayerNorm(x + Dropout(MultiHeadAttention(x, m)))                  cross-attention
    y   = Dropout(Linear_{d_ff -> d_model}(Dropout(act(Linear_{d_model -> d_ff}(x)))))
    out = LayerNorm(x + y)

`Decoder` = the layers followed by a final LayerNorm. `causal_mask(T)`[i, j] = (j <= i): position
i attends to positions up to itself only, so the decoder's output at i never depends on its inputs
after i. `sinusoidal_positions` is the fixed positional encoding of Sec. 3.5,
PE[t, 2i] = sin(t / 10000^(2i/d)), PE[t, 2i+1] = cos(t / 10000^(2i/d)).

Names: LayerNorm scale and bias ("embed",); feed-forward kernels ("embed", "mlp") and
("mlp", "embed"); the attention's names are in `paperzoo.layers.attention`.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paperzoo.layers.attention import Dropout, MultiHeadAttention
from paperzoo.layers.initializers import dense

LAYER_NORM_EPS = 1e-5


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU in PyTorch's form, x/2 (1 + erf(x/sqrt 2)); `jax.nn.gelu(approximate=False)`
  uses erfc, which XLA expands into a larger and slower computation."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "relu": jax.nn.relu,
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}") from None


def layer_norm(d_model: int, *, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      d_model,
      epsilon=LAYER_NORM_EPS,
      use_bias=use_bias,
      use_fast_variance=False,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
      rngs=rngs,
  )


class EncoderLayer(nnx.Module):
  """One post-norm (or, with `norm_first`, pre-norm) encoder layer (equations in the module
  docstring)."""

  def __init__(
      self,
      d_model: int,
      num_heads: int,
      d_ff: int,
      *,
      dropout_rate: float,
      activation: str = "gelu",
      attention_impl: str = "xla",
      init: str = "torch",
      norm_first: bool = False,
      rngs: nnx.Rngs,
  ):
    activation_fn(activation)  # fail at construction on an unknown name
    self.activation = activation
    self.norm_first = norm_first
    self.attention = MultiHeadAttention(
        d_model, num_heads, dropout_rate=dropout_rate, impl=attention_impl, init=init,
        rngs=rngs)
    self.norm1 = layer_norm(d_model, rngs=rngs)
    self.ff_in = dense(d_model, d_ff, names=("embed", "mlp"), init=init, rngs=rngs)
    self.ff_out = dense(d_ff, d_model, names=("mlp", "embed"), init=init, rngs=rngs)
    self.norm2 = layer_norm(d_model, rngs=rngs)
    # One stateless module used at the three sites, like TSLib's single `self.dropout`.
    self.dropout = Dropout(dropout_rate)

  def __call__(
      self,
      x: jax.Array,
      *,
      mask: jax.Array | None = None,
      train: bool,
      rngs: nnx.Rngs | None = None,
      num_queries: int | None = None,
  ) -> jax.Array:
    """x [B, S, d_model] -> [B, S, d_model], or [B, num_queries, d_model] with `num_queries`.

    `num_queries`: compute the outputs of the first `num_queries` tokens only. Every token still
    serves as a key and value, so these outputs equal `layer(x)[:, :num_queries]`; the queries,
    output projection, norms and feed-forward of the other tokens are skipped. A model that reads
    only some tokens after its last layer (iTransformer reads the variate tokens, not the
    time-feature ones) saves that work.
    """
    deterministic = not train
    act = activation_fn(self.activation)
    if num_queries is not None and mask is not None and mask.ndim >= 2 and mask.shape[-2] > 1:
      mask = mask[..., :num_queries, :]

    def feed_forward(h: jax.Array) -> jax.Array:
      h = self.dropout(act(self.ff_in(h)), deterministic=deterministic, rngs=rngs)
      return self.dropout(self.ff_out(h), deterministic=deterministic, rngs=rngs)

    if self.norm_first:
      h = self.norm1(x)
      attended = self.attention(h[:, :num_queries], h, mask=mask, train=train, rngs=rngs)
      x = x[:, :num_queries] + self.dropout(attended, deterministic=deterministic, rngs=rngs)
      return x + feed_forward(self.norm2(x))
    attended = self.attention(x[:, :num_queries], x, mask=mask, train=train, rngs=rngs)
    x = self.norm1(x[:, :num_queries]
                   + self.dropout(attended, deterministic=deterministic, rngs=rngs))
    return self.norm2(x + feed_forward(x))


class Encoder(nnx.Module):
  """`num_layers` EncoderLayers, then a final LayerNorm (TSLib's `Encoder(norm_layer=...)`);
  `final_norm=False` leaves the last LayerNorm out, `norm_first=True` uses pre-norm layers."""

  def __init__(
      self,
      num_layers: int,
      d_model: int,
      num_heads: int,
      d_ff: int,
      *,
      dropout_rate: float,
      activation: str = "gelu",
      attention_impl: str = "xla",
      init: str = "torch",
      norm_first: bool = False,
      final_norm: bool = True,
      rngs: nnx.Rngs,
  ):
    self.layers = nnx.List([
        EncoderLayer(d_model, num_heads, d_ff, dropout_rate=dropout_rate, activation=activation,
                     attention_impl=attention_impl, init=init, norm_first=norm_first,
                     rngs=rngs)
        for _ in range(num_layers)
    ])
    self.norm = layer_norm(d_model, rngs=rngs) if final_norm else None

  def __call__(
      self,
      x: jax.Array,
      *,
      mask: jax.Array | None = None,
      train: bool,
      rngs: nnx.Rngs | None = None,
      num_outputs: int | None = None,
  ) -> jax.Array:
    """x [B, S, d_model] -> [B, S, d_model]; with `num_outputs`, only the first `num_outputs`
    tokens' outputs, [B, num_outputs, d_model] (the last layer computes no others, see
    `EncoderLayer`)."""
    for i, layer in enumerate(self.layers):
      last = i == len(self.layers) - 1
      x = layer(x, mask=mask, train=train, rngs=rngs, num_queries=num_outputs if last else None)
    if not len(self.layers):
      x = x[:, :num_outputs]
    return x if self.norm is None else self.norm(x)


def causal_mask(length: int) -> jax.Array:
  """[length, length] boolean, True where query i may attend to key j, i.e. j <= i (TSLib's
  `TriangularCausalMask`, inverted to paperzoo's True = attend convention)."""
  return jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))


def sinusoidal_positions(length: int, d_model: int) -> np.ndarray:
  """The fixed positional encoding of Vaswani et al. (Sec. 3.5), [length, d_model] float32:
  PE[t, 2i] = sin(t w_i), PE[t, 2i+1] = cos(t w_i), w_i = 10000^(-2i/d_model) (TSLib's
  `PositionalEmbedding`). A numpy constant: it is not a parameter."""
  positions = np.arange(length, dtype=np.float64)[:, None]
  frequencies = np.exp(np.arange(0, d_model, 2, dtype=np.float64) * -(math.log(10000.0) / d_model))
  table = np.zeros((length, d_model), np.float64)
  table[:, 0::2] = np.sin(positions * frequencies)
  table[:, 1::2] = np.cos(positions * frequencies)[:, :d_model // 2]
  return table.astype(np.float32)


class DecoderLayer(nnx.Module):
  """One post-norm decoder layer: masked self-attention, cross-attention to the encoder output,
  feed-forward (equations in the module docstring; TSLib's `DecoderLayer`)."""

  def __init__(
      self,
      d_model: int,
      num_heads: int,
      d_ff: int,
      *,
      dropout_rate: float,
      activation: str = "gelu",
      attention_impl: str = "xla",
      init: str = "torch",
      rngs: nnx.Rngs,
  ):
    activation_fn(activation)  # fail at construction on an unknown name
    self.activation = activation
    attention_kwargs = dict(dropout_rate=dropout_rate, impl=attention_impl, init=init, rngs=rngs)
    self.self_attention = MultiHeadAttention(d_model, num_heads, **attention_kwargs)
    self.cross_attention = MultiHeadAttention(d_model, num_heads, **attention_kwargs)
    self.norm1 = layer_norm(d_model, rngs=rngs)
    self.norm2 = layer_norm(d_model, rngs=rngs)
    self.ff_in = dense(d_model, d_ff, names=("embed", "mlp"), init=init, rngs=rngs)
    self.ff_out = dense(d_ff, d_model, names=("mlp", "embed"), init=init, rngs=rngs)
    self.norm3 = layer_norm(d_model, rngs=rngs)
    self.dropout = Dropout(dropout_rate)

  def __call__(
      self,
      x: jax.Array,
      memory: jax.Array,
      *,
      self_mask: jax.Array | None = None,
      cross_mask: jax.Array | None = None,
      train: bool,
      rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """x [B, T, d_model] (decoder tokens), memory [B, S, d_model] (encoder output) -> [B, T,
    d_model]. `self_mask` is usually `causal_mask(T)`."""
    deterministic = not train
    attended = self.self_attention(x, x, mask=self_mask, train=train, rngs=rngs)
    x = self.norm1(x + self.dropout(attended, deterministic=deterministic, rngs=rngs))
    attended = self.cross_attention(x, memory, mask=cross_mask, train=train, rngs=rngs)
    x = self.norm2(x + self.dropout(attended, deterministic=deterministic, rngs=rngs))
    act = activation_fn(self.activation)
    y = self.dropout(act(self.ff_in(x)), deterministic=deterministic, rngs=rngs)
    y = self.dropout(self.ff_out(y), deterministic=deterministic, rngs=rngs)
    return self.norm3(x + y)


class Decoder(nnx.Module):
  """`num_layers` DecoderLayers, then a final LayerNorm (TSLib's `Decoder(norm_layer=...)`; the
  output projection is left to the model)."""

  def __init__(
      self,
      num_layers: int,
      d_model: int,
      num_heads: int,
      d_ff: int,
      *,
      dropout_rate: float,
      activation: str = "gelu",
      attention_impl: str = "xla",
      init: str = "torch",
      rngs: nnx.Rngs,
  ):
    self.layers = nnx.List([
        DecoderLayer(d_model, num_heads, d_ff, dropout_rate=dropout_rate, activation=activation,
                     attention_impl=attention_impl, init=init, rngs=rngs)
        for _ in range(num_layers)
    ])
    self.norm = layer_norm(d_model, rngs=rngs)

  def __call__(
      self,
      x: jax.Array,
      memory: jax.Array,
      *,
      self_mask: jax.Array | None = None,
      cross_mask: jax.Array | None = None,
      train: bool,
      rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    for layer in self.layers:
      x = layer(x, memory, self_mask=self_mask, cross_mask=cross_mask, train=train, rngs=rngs)
    return self.norm(x)
