"""DLinear (Zeng et al., "Are Transformers Effective for Time Series Forecasting?", AAAI 2023).

Decomposition (Sec. 4, "DLinear", the Autoformer series decomposition): for a lookback
X in R^{L x C},

    X_t = AvgPool_k(ReplicatePad_{(k-1)/2}(X))     (moving-average trend, stride 1)
    X_s = X - X_t                                   (seasonal remainder)

the average runs over time per channel; the padding repeats the first / last time step
(k-1)/2 times at either end so the trend has length L (k must be odd). Then one linear layer over
time per component,

    Y = W_s X_s + b_s + W_t X_t + b_t,   W_s, W_t in R^{H x L}, applied to every channel,

shared across channels, or one (W_s, b_s, W_t, b_t) per channel when `individual`.

Initialization: TSLib's DLinear (the code behind the protocol's reference numbers) sets both
weights to ones / seq_len, i.e. each output step starts as the mean of the lookback; the
original LTSF-Linear repository ships those lines commented out (PyTorch's default init).
`weight_init` chooses between them; biases use the `init` scheme's bias init
(torch: U(+-1/sqrt(seq_len)); lecun: zeros).

Config keys (`config.model`):
  moving_avg  (int, default 25)        moving-average kernel size k, odd.
  individual  (bool, default False)    one pair of linear maps per channel instead of shared.
  init        (str, default "torch")   "torch" | "lecun": bias init (and the weights' init when
                                       weight_init = "default").
  weight_init (str, default "average") "average": W = 1/seq_len (TSLib); "default": the `init`
                                       scheme's kernel init (LTSF-Linear as released).
The time features (`x_mark`) and decoder inputs are not used.

Names: shared kernels ("time", None) over [seq_len, pred_len], biases (None,); individual
kernels ("variates", "time", None) over [C, seq_len, pred_len], biases ("variates", None).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from paperzoo.layers.initializers import Initializer, dense, kernel_and_bias_init
from paperzoo.registry import MODELS

WEIGHT_INITS = ("average", "default")


def moving_average(x: jax.Array, kernel_size: int) -> jax.Array:
  """Trend of x [B, L, C]: mean over a window of `kernel_size` steps, replicate-padded, stride 1."""
  if kernel_size < 1 or kernel_size % 2 == 0:
    # An even window with (k-1)//2 pads per side would shorten the series by one step.
    raise ValueError(f"moving_avg kernel size must be a positive odd integer, got {kernel_size}")
  pad = (kernel_size - 1) // 2
  front = jnp.repeat(x[:, :1, :], pad, axis=1)
  back = jnp.repeat(x[:, -1:, :], pad, axis=1)
  padded = jnp.concatenate([front, x, back], axis=1)
  # A sum of k shifted slices: exact, fused by XLA, and differentiable (Autoformer decomposes
  # hidden states with it; reduce_window with a generic reducer has no reverse-mode rule).
  length = x.shape[1]
  window_sums = sum(padded[:, i:i + length] for i in range(kernel_size))
  return window_sums / kernel_size


def series_decomposition(x: jax.Array, kernel_size: int) -> tuple[jax.Array, jax.Array]:
  """(seasonal, trend) with trend = moving_average(x) and seasonal = x - trend."""
  trend = moving_average(x, kernel_size)
  return x - trend, trend


def _average_kernel_init(seq_len: int) -> Initializer:
  def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    del key
    return jnp.full(shape, 1.0 / seq_len, dtype)
  return init


class PerVariateTimeLinear(nnx.Module):
  """One Linear(seq_len -> pred_len) per channel: [B, L, C] -> [B, P, C]."""

  def __init__(self, num_variates: int, seq_len: int, pred_len: int, *,
               kernel_init: Initializer, bias_init: Initializer, rngs: nnx.Rngs):
    # Each channel's [L, P] kernel is drawn as its own nn.Linear would be: vmapping the 2-D
    # initializer keeps fan_in = L (a 3-D variance_scaling would count C into the fan-in).
    kernel_keys = jax.random.split(rngs.params(), num_variates)
    bias_keys = jax.random.split(rngs.params(), num_variates)
    self.kernel = nnx.Param(
        jax.vmap(lambda key: kernel_init(key, (seq_len, pred_len), jnp.float32))(kernel_keys),
        out_sharding=("variates", "time", None))
    self.bias = nnx.Param(
        jax.vmap(lambda key: bias_init(key, (pred_len,), jnp.float32))(bias_keys),
        out_sharding=("variates", None))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("blc,clp->bpc", x, self.kernel[...]) + self.bias[...].T[None]


@MODELS.register("dlinear")
class DLinear(nnx.Module):
  """Decomposition-Linear forecaster (equations and config keys in the module docstring)."""

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      *,
      seq_len: int,
      pred_len: int,
      num_variates: int,
      num_time_features: int,
      rngs: nnx.Rngs,
  ):
    del num_time_features  # DLinear sees only the series values.
    self.kernel_size = int(config.get("moving_avg", 25))
    self.individual = bool(config.get("individual", False))
    init = config.get("init", "torch")
    weight_init = config.get("weight_init", "average")
    if weight_init not in WEIGHT_INITS:
      raise ValueError(f"unknown weight_init {weight_init!r}; valid: {', '.join(WEIGHT_INITS)}")
    moving_average(jnp.zeros((1, 1, 1)), self.kernel_size)  # validate k before any compute
    default_kernel_init, bias_init = kernel_and_bias_init(seq_len, init)
    kernel_init = (_average_kernel_init(seq_len) if weight_init == "average"
                   else default_kernel_init)

    def time_linear():
      if self.individual:
        return PerVariateTimeLinear(num_variates, seq_len, pred_len, kernel_init=kernel_init,
                                    bias_init=bias_init, rngs=rngs)
      return dense(seq_len, pred_len, names=("time", None), init=init,
                   kernel_init=kernel_init, rngs=rngs)

    self.seasonal_linear = time_linear()
    self.trend_linear = time_linear()

  def _apply(self, linear: nnx.Module, x: jax.Array) -> jax.Array:
    """A linear map over the time axis of x [B, L, C] -> [B, P, C]."""
    if self.individual:
      return linear(x)
    return jnp.swapaxes(linear(jnp.swapaxes(x, 1, 2)), 1, 2)

  def __call__(self, batch: dict, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    del train, rngs  # no dropout
    seasonal, trend = series_decomposition(batch["x"], self.kernel_size)
    return self._apply(self.seasonal_linear, seasonal) + self._apply(self.trend_linear, trend)
