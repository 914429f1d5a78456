"""Parameter initializers, and a `dense` constructor that attaches logical sharding names.

The forecasting papers' reference numbers come from PyTorch code, so by default we reproduce
PyTorch's `nn.Linear.reset_parameters` (and `nn.Conv1d` with kernel size 1, which TSLib's encoder
feed-forward uses and which initializes the same way):

    weight ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))   (kaiming_uniform with a = sqrt(5))
    bias   ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))

A uniform U(-l, l) has variance l^2 / 3, so the kernel is `variance_scaling(1/3, "fan_in",
"uniform")`: its limit sqrt(3 * scale / fan_in) equals 1/sqrt(fan_in).

`init="lecun"` selects flax's defaults instead (lecun_normal kernel, zero bias), for runs that do
not need to match the PyTorch code.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from paperzoo.layers.matmul import dense_dot_general

Initializer = Callable[..., jax.Array]

INIT_SCHEMES = ("torch", "lecun")


def torch_linear_kernel_init() -> Initializer:
  """PyTorch's default `nn.Linear` weight init, U(+-1/sqrt(fan_in)), for a [in, out] kernel."""
  return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default `nn.Linear` bias init, U(+-1/sqrt(fan_in)).

  The bias alone does not know the layer's fan-in, hence the argument.
  """
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

  return init


def check_init_scheme(init: str) -> None:
  if init not in INIT_SCHEMES:
    raise ValueError(f"unknown init scheme {init!r}; valid: {', '.join(INIT_SCHEMES)}")


def kernel_and_bias_init(fan_in: int, init: str) -> tuple[Initializer, Initializer]:
  """The (kernel, bias) initializers of a linear map with `fan_in` inputs, without names."""
  check_init_scheme(init)
  if init == "torch":
    return torch_linear_kernel_init(), torch_linear_bias_init(fan_in)
  return nnx.initializers.lecun_normal(), nnx.initializers.zeros_init()


def dense(
    in_features: int,
    out_features: int,
    *,
    names: tuple[str | None, str | None],
    init: str,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    kernel_init: Initializer | None = None,
    matmul: str = "float32",
) -> nnx.Linear:
  """An `nnx.Linear` whose [in, out] kernel is named `names` and whose bias is named `names[1]`.

  `init` is "torch" (PyTorch defaults) or "lecun" (flax defaults); `kernel_init` overrides the
  kernel's initializer only (DLinear starts its kernels at 1/seq_len but keeps the bias init).
  `matmul` is the product's precision (`paperzoo.layers.matmul`): "float32", or "bfloat16"
  operands with float32 accumulation and output (parameters stay float32).
  """
  if len(names) != 2:
    raise ValueError(f"a dense kernel needs two logical names (in, out), got {names!r}")
  default_kernel_init, bias_init = kernel_and_bias_init(in_features, init)
  kernel_init = default_kernel_init if kernel_init is None else kernel_init
  dot_general = dense_dot_general(matmul)
  return nnx.Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      kernel_init=nnx.with_partitioning(kernel_init, tuple(names)),
      bias_init=nnx.with_partitioning(bias_init, (names[1],)),
      rngs=rngs,
      **({} if dot_general is None else {"dot_general": dot_general}),
  )


def flat_dense(layer: nnx.Linear, x: jax.Array) -> jax.Array:
  """`layer` on the 2-D [batch * tokens, features] view of x [..., features]: on this project's
  CPU XLA's backward of a 3-D [B, T, D] @ W (followed by GELU) was 2.7x slower than the same on
  the flattened array."""
  return layer(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1] + (-1,))
