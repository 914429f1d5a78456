"""The vanilla (post-norm) Transformer encoder (Vaswani et al., 2017, Sec. 3.1), in the form
iTransformer (Liu et al., ICLR 2024, Sec. 3.2) uses it via TSLib's `EncoderLayer`/`Encoder`:

    x   = LayerNorm(x + Dropout(MultiHeadAttention(x, x)))
    y   = Dropout(act(Linear_{d_model -> d_ff}(x)))
    y   = Dropout(Linear_{d_ff -> d_model}(y))
    out = LayerNorm(x + y)

and `Encoder` = the layers followed by a final LayerNorm. LayerNorm epsilon is 1e-5 (PyTorch's
default) and its variance is computed as E[(x - mean)^2] (not E[x^2] - mean^2) to stay close to
PyTorch numerically. `act` is "gelu" (exact erf form, as PyTorch's F.gelu) or "relu".

Names: LayerNorm scale and bias ("embed",); feed-forward kernels ("embed", "mlp") and
("mlp", "embed"); the attention's names are in `paperzoo.layers.attention`.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
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


def layer_norm(d_model: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      d_model,
      epsilon=LAYER_NORM_EPS,
      use_fast_variance=False,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
      rngs=rngs,
  )


class EncoderLayer(nnx.Module):
  """One post-norm encoder layer (equations in the module docstring)."""

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
  ) -> jax.Array:
    """x [B, S, d_model] -> [B, S, d_model]."""
    deterministic = not train
    attended = self.attention(x, x, mask=mask, train=train, rngs=rngs)
    x = self.norm1(x + self.dropout(attended, deterministic=deterministic, rngs=rngs))
    act = activation_fn(self.activation)
    y = self.dropout(act(self.ff_in(x)), deterministic=deterministic, rngs=rngs)
    y = self.dropout(self.ff_out(y), deterministic=deterministic, rngs=rngs)
    return self.norm2(x + y)


class Encoder(nnx.Module):
  """`num_layers` EncoderLayers, then a final LayerNorm (TSLib's `Encoder(norm_layer=...)`)."""

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
        EncoderLayer(d_model, num_heads, d_ff, dropout_rate=dropout_rate, activation=activation,
                     attention_impl=attention_impl, init=init, rngs=rngs)
        for _ in range(num_layers)
    ])
    self.norm = layer_norm(d_model, rngs=rngs)

  def __call__(
      self,
      x: jax.Array,
      *,
      mask: jax.Array | None = None,
      train: bool,
      rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    for layer in self.layers:
      x = layer(x, mask=mask, train=train, rngs=rngs)
    return self.norm(x)
