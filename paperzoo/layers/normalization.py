"""Instance normalization of each input series, as the forecasting papers use it.

iTransformer (`use_norm`), PatchTST (RevIN without affine) and S-Mamba normalize each variate
of each window by its own statistics over time and undo it on the forecast:

    x' = (x - mean_t(x)) / sqrt(var_t(x) + eps),      y = y' * sqrt(var_t(x) + eps) + mean_t(x)

with the biased variance and eps = 1e-5, as the papers' code computes it. This removes the
level and scale shifts between training and test windows (non-stationarity) from what the
network has to learn.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NORM_EPS = 1e-5


def normalize_series(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """x [B, L, C] -> (normalized x, (mean, std) each [B, 1, C]) over the time axis."""
  mean = jnp.mean(x, axis=1, keepdims=True)
  centered = x - mean
  std = jnp.sqrt(jnp.mean(jnp.square(centered), axis=1, keepdims=True) + NORM_EPS)
  return centered / std, (mean, std)


def denormalize_series(y: jax.Array, stats: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Undoes `normalize_series` on a forecast y [B, P, C] with the input's statistics."""
  mean, std = stats
  return y * std + mean
