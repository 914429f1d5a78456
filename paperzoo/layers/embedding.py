"""Time-series token embeddings shared by the encoder-decoder forecasters (the vanilla
Transformer, Informer, Autoformer), in the form of Time-Series-Library's `DataEmbedding`:

    h = Dropout(TokenConv(x) + PE + Linear_nobias(x_mark))

TokenConv is a kernel-3 circular Conv1d without bias over time (`CircularConv3`); PE is the fixed
sinusoidal encoding (`paperzoo.layers.transformer.sinusoidal_positions`), left out with
`positional=False` (Autoformer's `DataEmbedding_wo_pos`); Linear_nobias embeds the timeF
features (absent when the data has none).

Names: token conv (None, "embed") over [3 C, d_model]; time-feature embedding (None, "embed").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from paperzoo.layers.attention import Dropout
from paperzoo.layers.initializers import dense
from paperzoo.layers.transformer import sinusoidal_positions


class CircularConv3(nnx.Module):
  """A kernel-3, stride-1 circular Conv1d without bias over time, [B, L, in] -> [B, L, out]:
  one Linear over [x_{t-1}, x_t, x_{t+1}] (kernel rows are the taps in that order)."""

  def __init__(self, in_features: int, out_features: int, *, names: tuple[str | None, ...],
               init: str, kaiming_leaky_relu: bool, rngs: nnx.Rngs):
    kernel_init = None
    if kaiming_leaky_relu and init == "torch":
      # nn.init.kaiming_normal_(mode="fan_in", nonlinearity="leaky_relu"), negative slope 0.01.
      kernel_init = nnx.initializers.variance_scaling(
          2.0 / (1.0 + 0.01 ** 2), "fan_in", "normal")
    self.linear = dense(3 * in_features, out_features, names=names, init=init, use_bias=False,
                        kernel_init=kernel_init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    taps = jnp.concatenate([jnp.roll(x, 1, axis=1), x, jnp.roll(x, -1, axis=1)], axis=-1)
    return self.linear(taps)


class DataEmbedding(nnx.Module):
  """Dropout(TokenConv(x) [+ PE] + Linear_nobias(x_mark)) (equations in the module docstring)."""

  def __init__(self, num_variates: int, num_time_features: int, d_model: int, *,
               dropout: float, init: str, positional: bool = True, rngs: nnx.Rngs):
    self.d_model = d_model
    self.positional = positional
    self.value_embedding = CircularConv3(num_variates, d_model, names=(None, "embed"),
                                         init=init, kaiming_leaky_relu=True, rngs=rngs)
    self.time_embedding = (
        dense(num_time_features, d_model, names=(None, "embed"), init=init, use_bias=False,
              rngs=rngs) if num_time_features else None)
    self.dropout = Dropout(dropout)

  def __call__(self, x: jax.Array, x_mark: jax.Array | None, *, train: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    """x [B, T, C], x_mark [B, T, F] (or None) -> [B, T, d_model]."""
    h = self.value_embedding(x)
    if self.positional:
      h = h + sinusoidal_positions(x.shape[1], self.d_model).astype(h.dtype)
    if self.time_embedding is not None and x_mark is not None:
      h = h + self.time_embedding(x_mark)
    return self.dropout(h, deterministic=not train, rngs=rngs)
