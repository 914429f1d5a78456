"""Tokens-to-Token ViT (Yuan et al., "Tokens-to-Token ViT: Training Vision Transformers from
Scratch on ImageNet", ICCV 2021).

A ViT whose tokens are built by a Tokens-to-Token (T2T) module instead of a one-shot patch
cut, so that each token aggregates its neighbours' local structure (Sec. 3.1, Eq. 1-3):

    T_1     = SS_1(I_0)                          I_0: the image [H, W, C]
    T'_i    = MLP(MSA(T_i))                      T2T transformer layer      i = 1 .. n - 1
    I_i     = Reshape(T'_i)                      re-structurize: tokens back to the 2-D map
    T_{i+1} = SS_{i+1}(I_i)                      soft split of the map
    T_f     = T_n E                              linear projection C_n k_n^2 -> d_model

The soft split SS (kernel k, stride s, zero padding p) is an overlapping unfold: every k x k
window of the map, its k^2 C values concatenated into one token, on a grid of

    H' = floor((H + 2p - k) / s) + 1      (Eq. 3, with overlap k - s)

Feature order inside a token is channel-major (c, row offset, column offset), PyTorch's
`nn.Unfold`. It is written with k^2 strided slices (exact data movement; a convolution with
one-hot kernels, `jax.lax.conv_general_dilated_patches`, gives the same values but costs
(C k^2)^2 multiply-adds per output position and depends on the backend's matmul precision).
A soft split that would leave real rows or columns of its map out of every window (stride too
large for kernel + padding), or that has no window at all, is a ValueError naming the map size.

The backbone (Sec. 3.2) is a deep-narrow ViT on the fixed tokens, pre-norm MetaFormer blocks:

    z_0 = [t_cls; T_f] + E_pos          E_pos: sinusoidal (the paper) or learned
    z_l = Block_l(z_{l-1}),  l = 1..L
    y   = Head(LN(z_L)_cls)             or the mean of the tokens (pool="mean")

T2T transformer layer, as implemented: LayerNorm over the C k^2 values of each unfolded window,
a linear map to `t2t_dim`, then one pre-norm MetaFormer block with the attention mixer at width
t2t_dim (t2t_heads heads, MLP ratio t2t_mlp_ratio). The paper uses a Performer or a Transformer
layer of width 64 with one head and MLP ratio 1; the authors' layer projects C k^2 -> t2t_dim
inside its q/k/v maps and uses v as the residual stream, while here a plain linear projection
comes first so that the layer is the shared block.

Token counts: the paper's ImageNet module (kernels 7, 3, 3; strides 4, 2, 2; paddings 2, 1, 1)
turns 224 x 224 into 14 x 14 tokens (total stride 16), which would leave 2 x 2 tokens of a
32 x 32 image. For CIFAR-10 and MNIST the configs use kernels (5, 3, 3), strides (2, 2, 1),
paddings (2, 1, 1): total stride 4, so 32 x 32 -> 16 -> 8 -> 8 x 8 = 64 tokens and
28 x 28 -> 14 -> 7 -> 7 x 7 = 49 tokens, the grids of the ViT configs (patch 4); every split
still overlaps (k > s).

Config keys (`config.model`):
  t2t_kernels    (tuple, (7, 3, 3))  k of each soft split (n splits, n - 1 T2T layers)
  t2t_strides    (tuple, (4, 2, 2))  s of each soft split
  t2t_paddings   (tuple, (2, 1, 1))  p of each soft split
  t2t_dim        (int, 64)           width of the T2T layers
  t2t_heads      (int, 1)            heads of the T2T layers' attention
  t2t_mlp_ratio  (float, 1.0)        MLP width / t2t_dim in the T2T layers
  d_model        (int, 384)          backbone width (T2T-ViT-14: 384)
  num_layers     (int, 14)           backbone depth L (T2T-ViT-14: 14)
  num_heads      (int, 6)            backbone heads
  mlp_ratio      (float, 3.0)        backbone MLP width / d_model (T2T-ViT-14: 3)
  mixer          (str, "attention")  backbone token mixer (any of paperzoo.layers.mixers; grid
                                     mixers need pool="mean")
  pool           (str, "cls")        "cls" (the paper) | "mean"
  positions      (str, "sinusoidal") "sinusoidal" (the paper) | "learned"
  dropout, drop_path (0.1), layer_scale_init, attention_dropout, attention_impl, init ("lecun")
                                     as in the MetaFormer block (the T2T layers use no
                                     stochastic depth)

Names: the unfolded windows' LayerNorm and the projections' input axes are replicated (None;
C k^2 need not divide a mesh axis), their output axes "embed"; learned positions (None,
"embed"); the blocks' names are paperzoo.layers.metaformer's.
Input {"inputs": float [B, H, W, C]}; output logits [B, num_classes].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from paperzoo.layers.attention import Dropout
from paperzoo.layers.initializers import dense
from paperzoo.layers.metaformer import MetaFormerBlock, Stage, drop_path_rates
from paperzoo.layers.transformer import LAYER_NORM_EPS, layer_norm, sinusoidal_positions
from paperzoo.registry import MODELS

POOLS = ("cls", "mean")
POSITIONS = ("sinusoidal", "learned")


def strided_output_size(size: int, *, kernel: int, stride: int, padding: int,
                        what: str) -> int:
  """floor((size + 2 padding - kernel) / stride) + 1, the output length of a strided window
  (unfold or convolution) over `size` positions; ValueError when there is no window or when
  the windows leave real positions out (`what` names the operation in the message)."""
  if kernel < 1 or stride < 1 or padding < 0:
    raise ValueError(f"{what}: kernel and stride must be >= 1 and padding >= 0, got kernel "
                     f"{kernel}, stride {stride}, padding {padding}")
  out = (size + 2 * padding - kernel) // stride + 1
  if out < 1:
    raise ValueError(f"{what}: a map of side {size} padded by {padding} is smaller than the "
                     f"kernel {kernel}")
  # The last window ends at padded index (out - 1) s + k - 1; the last real one is p + size - 1.
  if (out - 1) * stride + kernel < padding + size:
    raise ValueError(f"{what}: on a map of side {size}, windows of kernel {kernel}, stride "
                     f"{stride}, padding {padding} leave the last "
                     f"{padding + size - (out - 1) * stride - kernel} real row(s)/column(s) out; "
                     f"change the image size, kernel, stride or padding")
  return out


def soft_split(image: jax.Array, *, kernel: int, stride: int, padding: int
               ) -> tuple[jax.Array, tuple[int, int]]:
  """The soft split (overlapping unfold): image [B, H, W, C] -> tokens [B, H' W', C k^2] on the
  (H', W') grid of window positions, row-major; token features channel-major (c, i, j), i.e.
  token[(y, x)][c k^2 + i k + j] = padded[y s + i, x s + j, c]."""
  batch, height, width, channels = image.shape
  out_h, out_w = (strided_output_size(side, kernel=kernel, stride=stride, padding=padding,
                                      what="soft split") for side in (height, width))
  padded = jnp.pad(image, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  rows_end, cols_end = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
  # Window offset (i, j) of every position at once: one strided slice [B, H', W', C] each.
  offsets = [padded[:, i:i + rows_end:stride, j:j + cols_end:stride, :]
             for i in range(kernel) for j in range(kernel)]
  windows = jnp.stack(offsets, axis=-1)  # [B, H', W', C, k^2]
  return windows.reshape(batch, out_h * out_w, channels * kernel * kernel), (out_h, out_w)


def _unfolded_norm(features: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """`layer_norm` with replicated scale and bias: C k^2 need not divide the "embed" mesh axis."""
  return nnx.LayerNorm(
      features, epsilon=LAYER_NORM_EPS, use_fast_variance=False,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), (None,)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)), rngs=rngs)


class T2TLayer(nnx.Module):
  """LN -> Linear(C k^2 -> t2t_dim) -> one MetaFormer attention block: [B, N, C k^2] ->
  [B, N, t2t_dim] (the module docstring's T2T transformer layer)."""

  def __init__(self, in_features: int, config: Any, *, rngs: nnx.Rngs):
    width = int(config["t2t_dim"])
    self.norm = _unfolded_norm(in_features, rngs=rngs)
    self.proj = dense(in_features, width, names=(None, "embed"), init=config["init"],
                      rngs=rngs)
    self.block = MetaFormerBlock(width, config, mixer="attention", layer_index=0, rngs=rngs)

  def __call__(self, tokens: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    return self.block(self.proj(self.norm(tokens)), grid=None, mask=None, train=train,
                      rngs=rngs)


@MODELS.register("t2t_vit")
class T2TViT(nnx.Module):
  """T2T module, class token + positions, deep-narrow ViT blocks, head (module docstring)."""

  def __init__(self, config: Any, *, num_classes: int, input_shape: tuple[int, ...],
               vocab_size: int = 0, rngs: nnx.Rngs):
    del vocab_size
    if len(input_shape) != 3:
      raise ValueError(f"t2t_vit takes images [H, W, C], got inputs of shape {input_shape}")
    height, width, channels = input_shape
    kernels = tuple(int(k) for k in config.get("t2t_kernels", (7, 3, 3)))
    strides = tuple(int(s) for s in config.get("t2t_strides", (4, 2, 2)))
    paddings = tuple(int(p) for p in config.get("t2t_paddings", (2, 1, 1)))
    if not kernels or not len(kernels) == len(strides) == len(paddings):
      raise ValueError(f"t2t_kernels {kernels}, t2t_strides {strides} and t2t_paddings "
                       f"{paddings} need the same length >= 1")
    self.pool = config.get("pool", "cls")
    if self.pool not in POOLS:
      raise ValueError(f"unknown pool {self.pool!r}; valid: {', '.join(POOLS)}")
    mixer = config.get("mixer", "attention")
    if self.pool == "cls" and mixer not in ("attention", "linear", "mamba"):
      raise ValueError(f"mixer {mixer!r} works on the token grid; use pool='mean'")
    positions = config.get("positions", "sinusoidal")
    if positions not in POSITIONS:
      raise ValueError(f"unknown positions {positions!r}; valid: {', '.join(POSITIONS)}")

    # The T2T layers: width t2t_dim, t2t_heads heads, MLP ratio t2t_mlp_ratio, no drop path.
    base = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    t2t_config = {**base, "t2t_dim": int(base.get("t2t_dim", 64)),
                  "num_heads": int(base.get("t2t_heads", 1)),
                  "mlp_ratio": float(base.get("t2t_mlp_ratio", 1.0)),
                  "init": base.get("init", "lecun")}
    self.splits = tuple(zip(kernels, strides, paddings))
    grid, features, layers = (height, width), channels, []
    for i, (kernel, stride, padding) in enumerate(self.splits):
      grid = tuple(strided_output_size(
          side, kernel=kernel, stride=stride, padding=padding,
          what=f"t2t_vit soft split {i + 1} of {len(kernels)} on the {grid[0]}x{grid[1]} map "
               f"of a {height}x{width} image") for side in grid)
      features *= kernel * kernel
      if i < len(kernels) - 1:
        layers.append(T2TLayer(features, t2t_config, rngs=rngs))
        features = t2t_config["t2t_dim"]
    self.grid = grid
    self.t2t_layers = nnx.List(layers)
    d_model = config.get("d_model", 384)
    init = config.get("init", "lecun")
    self.project = dense(features, d_model, names=(None, "embed"), init=init, rngs=rngs)

    num_tokens = grid[0] * grid[1] + (self.pool == "cls")
    # Sinusoidal positions are a constant, made when called; learned ones a parameter.
    self.positions = (nnx.Param(
        0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (num_tokens, d_model)),
        out_sharding=(None, "embed")) if positions == "learned" else None)
    self.class_token = (nnx.Param(jnp.zeros((1, 1, d_model), jnp.float32),
                                  out_sharding=(None, None, "embed"))
                        if self.pool == "cls" else None)
    depth = config.get("num_layers", 14)
    self.blocks = Stage(d_model, depth, config, mixer=mixer,
                        drop_path=drop_path_rates(config.get("drop_path", 0.1), depth),
                        rngs=rngs)
    self.dropout = Dropout(float(config.get("dropout", 0.0)))
    self.norm = layer_norm(d_model, rngs=rngs)
    self.head = dense(d_model, num_classes, names=("embed", None), init=init, rngs=rngs)

  def tokens_to_token(self, images: jax.Array, *, train: bool,
                      rngs: nnx.Rngs | None = None) -> tuple[jax.Array, tuple[int, int]]:
    """The T2T module: images [B, H, W, C] -> T_n [B, H_n W_n, C_n k_n^2] on (H_n, W_n)."""
    x = images
    for layer, (kernel, stride, padding) in zip(self.t2t_layers, self.splits[:-1]):
      tokens, grid = soft_split(x, kernel=kernel, stride=stride, padding=padding)
      tokens = layer(tokens, train=train, rngs=rngs)
      x = tokens.reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[-1])  # re-structurize
    kernel, stride, padding = self.splits[-1]
    return soft_split(x, kernel=kernel, stride=stride, padding=padding)

  def __call__(self, batch: dict[str, jax.Array], *, train: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    tokens, grid = self.tokens_to_token(batch["inputs"], train=train, rngs=rngs)
    x = self.project(tokens)
    if self.class_token is not None:
      x = jnp.concatenate([jnp.broadcast_to(self.class_token[...], (x.shape[0], 1, x.shape[2])),
                           x], axis=1)
      grid = None
    positions = (sinusoidal_positions(x.shape[1], x.shape[2]) if self.positions is None
                 else self.positions[...])
    x = self.dropout(x + positions, deterministic=not train, rngs=rngs)
    x = self.norm(self.blocks(x, grid=grid, mask=None, train=train, rngs=rngs))
    pooled = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
    return self.head(pooled)
