"""MetaFormer building blocks: one block whose token mixer is a config choice, and the pieces
the classification backbones assemble from it.

Yu et al., "MetaFormer Is Actually What You Need for Vision" (CVPR 2022), Eq. 1-2, with the
pre-norm residual form every backbone here uses:

    X' = X + DropPath(LayerScale_1(TokenMixer(Norm(X))))
    Y  = X' + DropPath(LayerScale_2(W_2 act(W_1 Norm(X'))))      W_1: d -> mlp_ratio d

Norm is LayerNorm over each token's channels, or with `norm="group"` PoolFormer's GroupNorm
with one group: statistics over all tokens and channels of an example, a scale and bias per
channel (images only: no padding mask).
TokenMixer is `paperzoo.layers.mixers.make_mixer(name, ...)`: attention (ViT), pooling
(PoolFormer), shifted windows (Swin), agent attention, bi-level routing (BiFormer), linear
attention, bidirectional Mamba. LayerScale multiplies by a learned per-channel vector started
at `layer_scale_init` (PoolFormer: 1e-5; 0 disables it). DropPath (stochastic depth, Huang et
al. 2016) zeroes a whole residual branch per example with probability `drop_path` while
training and scales kept branches by 1 / (1 - p).

Hierarchical backbones (PoolFormer, Swin, BiFormer) run `Stage`s on a shrinking grid:
`PatchEmbedding` makes the first grid from the image (non-overlapping p x p patches, or an
overlapping strided convolution as PoolFormer's stem), and between stages `Downsample` halves the
grid, either with a 3x3 stride-2 convolution (PoolFormer, BiFormer) or with Swin's patch merging
(concatenate each 2x2 neighbourhood's 4 tokens, LayerNorm, Linear 4d -> d').

Names: patch and downsample kernels (None, "embed"), LayerNorms and LayerScales ("embed",),
MLP ("embed", "mlp") / ("mlp", "embed").
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from paperzoo.layers.attention import Dropout
from paperzoo.layers.initializers import dense
from paperzoo.layers.mixers import make_mixer
from paperzoo.layers.transformer import LAYER_NORM_EPS, activation_fn, layer_norm

NORMS = ("layer", "group")


def token_norm(kind: str, d_model: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The norm of tokens [B, N, d] (module docstring): "layer" or "group" (GroupNorm(1))."""
  if kind == "layer":
    return layer_norm(d_model, rngs=rngs)
  if kind == "group":
    return nnx.GroupNorm(
        d_model, num_groups=1, epsilon=LAYER_NORM_EPS, use_fast_variance=False,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)), rngs=rngs)
  raise ValueError(f"unknown model.norm {kind!r}; valid: {', '.join(NORMS)}")


def drop_path(x: jax.Array, rate: float, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
  """Stochastic depth on a residual branch x [B, ...]: per example, 0 with probability `rate`,
  else x / (1 - rate)."""
  if not train or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class MetaFormerBlock(nnx.Module):
  """The block of the module docstring: [B, N, d] -> [B, N, d]."""

  def __init__(self, d_model: int, config: Any, *, mixer: str, layer_index: int,
               drop_path_rate: float = 0.0, rngs: nnx.Rngs):
    init = config.get("init", "lecun")
    mlp_ratio = config.get("mlp_ratio", 4)
    self.activation = config.get("activation", "gelu")
    activation_fn(self.activation)
    self.norm_kind = config.get("norm", "layer")
    self.norm1 = token_norm(self.norm_kind, d_model, rngs=rngs)
    self.mixer = make_mixer(mixer, d_model, config, layer_index=layer_index, rngs=rngs)
    self.norm2 = token_norm(self.norm_kind, d_model, rngs=rngs)
    self.mlp_in = dense(d_model, int(mlp_ratio * d_model), names=("embed", "mlp"), init=init,
                        rngs=rngs)
    self.mlp_out = dense(int(mlp_ratio * d_model), d_model, names=("mlp", "embed"), init=init,
                         rngs=rngs)
    self.dropout = Dropout(float(config.get("dropout", 0.0)))
    self.drop_path_rate = float(drop_path_rate)
    scale = float(config.get("layer_scale_init", 0.0))
    self.layer_scales = (nnx.Param(jnp.full((2, d_model), scale, jnp.float32),
                                   out_sharding=(None, "embed")) if scale > 0 else None)

  def _scaled(self, h: jax.Array, i: int) -> jax.Array:
    return h if self.layer_scales is None else h * self.layer_scales[i]

  def __call__(self, x: jax.Array, *, grid: tuple[int, int] | None = None,
               mask: jax.Array | None = None, train: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    if mask is not None and self.norm_kind == "group":
      raise ValueError("model.norm='group' normalizes over all tokens, padding included: "
                       "use it for images, not padded sequences")
    mixed = self.mixer(self.norm1(x), grid=grid, mask=mask, train=train, rngs=rngs)
    mixed = self.dropout(mixed, deterministic=not train, rngs=rngs)
    x = x + drop_path(self._scaled(mixed, 0), self.drop_path_rate, train=train, rngs=rngs)
    h = activation_fn(self.activation)(self.mlp_in(self.norm2(x)))
    h = self.dropout(h, deterministic=not train, rngs=rngs)
    h = self.dropout(self.mlp_out(h), deterministic=not train, rngs=rngs)
    return x + drop_path(self._scaled(h, 1), self.drop_path_rate, train=train, rngs=rngs)


def drop_path_rates(total: float, num_blocks: int) -> list[float]:
  """Stochastic-depth rates rising linearly from 0 to `total` over the blocks (as in Swin)."""
  if num_blocks <= 1:
    return [0.0] * num_blocks
  return [total * i / (num_blocks - 1) for i in range(num_blocks)]


class Conv2d(nnx.Module):
  """A 2-D convolution on [B, H, W, C_in] with "SAME"-style explicit padding, kernel named
  (None, None, None, "embed")."""

  def __init__(self, in_channels: int, out_channels: int, *, kernel: int, stride: int,
               padding: int, rngs: nnx.Rngs):
    self.stride = stride
    self.padding = padding
    # LeCun normal with fan-in kernel * kernel * in_channels (HWIO layout).
    self.kernel = nnx.Param(
        nnx.initializers.lecun_normal()(rngs.params(), (kernel, kernel, in_channels,
                                                        out_channels), jnp.float32),
        out_sharding=(None, None, None, "embed"))
    self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32), out_sharding=("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...], (self.stride, self.stride),
        ((self.padding, self.padding), (self.padding, self.padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...]


class PatchEmbedding(nnx.Module):
  """Image [B, H, W, C] -> tokens [B, H' W', d] on an (H', W') grid.

  `kernel == stride` (and no padding) gives ViT's non-overlapping patches; PoolFormer's stem is
  kernel 7, stride 4, padding 2.
  """

  def __init__(self, in_channels: int, d_model: int, *, kernel: int, stride: int,
               padding: int = 0, norm: bool = False, rngs: nnx.Rngs):
    self.conv = Conv2d(in_channels, d_model, kernel=kernel, stride=stride, padding=padding,
                       rngs=rngs)
    self.norm = layer_norm(d_model, rngs=rngs) if norm else None

  def __call__(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    y = self.conv(images)
    batch, height, width, channels = y.shape
    tokens = y.reshape(batch, height * width, channels)
    return (tokens if self.norm is None else self.norm(tokens)), (height, width)


class Downsample(nnx.Module):
  """Halves the grid between stages: "conv" (3x3, stride 2, padding 1) or "merge" (Swin's
  patch merging)."""

  def __init__(self, d_in: int, d_out: int, *, kind: str, rngs: nnx.Rngs):
    if kind not in ("conv", "merge"):
      raise ValueError(f"unknown downsample {kind!r}; valid: conv, merge")
    self.kind = kind
    if kind == "conv":
      self.conv = Conv2d(d_in, d_out, kernel=3, stride=2, padding=1, rngs=rngs)
    else:
      self.norm = layer_norm(4 * d_in, rngs=rngs)
      self.reduction = dense(4 * d_in, d_out, names=(None, "embed"), init="lecun", rngs=rngs,
                             use_bias=False)

  def __call__(self, x: jax.Array, grid: tuple[int, int]) -> tuple[jax.Array, tuple[int, int]]:
    batch, _, channels = x.shape
    height, width = grid
    image = x.reshape(batch, height, width, channels)
    if self.kind == "conv":
      y = self.conv(image)
      return y.reshape(batch, -1, y.shape[-1]), (y.shape[1], y.shape[2])
    if height % 2 or width % 2:
      raise ValueError(f"patch merging needs an even grid, got {height}x{width}")
    # [B, H/2, 2, W/2, 2, C] -> [B, H/2, W/2, 2 (col), 2 (row), C] -> 4C per merged token.
    blocks = image.reshape(batch, height // 2, 2, width // 2, 2, channels)
    merged = blocks.transpose(0, 1, 3, 4, 2, 5).reshape(batch, -1, 4 * channels)
    return self.reduction(self.norm(merged)), (height // 2, width // 2)


class Stage(nnx.Module):
  """`depth` MetaFormer blocks at one width and grid; layer indices count from 0 in each
  stage, so Swin's shifted windows alternate within it (odd blocks shift)."""

  def __init__(self, d_model: int, depth: int, config: Any, *, mixer: str,
               drop_path: Sequence[float], rngs: nnx.Rngs):
    self.blocks = nnx.List([
        MetaFormerBlock(d_model, config, mixer=mixer, layer_index=i,
                        drop_path_rate=drop_path[i], rngs=rngs)
        for i in range(depth)])

  def __call__(self, x: jax.Array, *, grid: tuple[int, int] | None, mask: jax.Array | None,
               train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    for block in self.blocks:
      x = block(x, grid=grid, mask=mask, train=train, rngs=rngs)
    return x


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean over tokens [B, N, d] -> [B, d], counting only tokens where mask [B, N] is True."""
  if mask is None:
    return jnp.mean(x, axis=1)
  weights = mask.astype(x.dtype)[..., None]
  return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


class HierarchicalBackbone(nnx.Module):
  """Image classifier of `Stage`s on a shrinking grid (PoolFormer, Swin, BiFormer):

      tokens, grid = PatchEmbedding(image)                          stem
      for stage s: [Downsample (s > 0)] -> depths[s] blocks at width dims[s]
      logits = Head(LN(mean over tokens))

  `config.model` keys read here: depths (tuple), dims (tuple), mixer, drop_path (0.1),
  head_dim (0; > 0 sets each stage's num_heads to its width / head_dim), and
  for the stem patch_size p (kernel and stride p; with `stem_overlap`, kernel 2p - 1 and padding
  (2p - 1) // 2 - (p - 1) // 2, PoolFormer's 7 / 4 / 2 at p = 4), plus every key of
  MetaFormerBlock and of the mixer.
  Mixers whose window or region count does not fit a small late-stage grid are clamped to the
  grid there (a 2x2 grid gets one 2x2 window), as Swin does.
  """

  def __init__(self, config: Any, *, num_classes: int, input_shape: tuple[int, ...],
               mixer: str, downsample: str, stem_overlap: bool, stem_norm: bool,
               rngs: nnx.Rngs):
    if len(input_shape) != 3:
      raise ValueError(f"a hierarchical backbone takes images [H, W, C], got inputs of shape "
                       f"{input_shape}")
    height, width, channels = input_shape
    depths, dims = tuple(config.depths), tuple(config.dims)
    if len(depths) != len(dims) or not depths:
      raise ValueError(f"model.depths {depths} and model.dims {dims} need the same length >= 1")
    patch = config.get("patch_size", 4)
    if stem_overlap:
      kernel, padding = 2 * patch - 1, (2 * patch - 1) // 2 - (patch - 1) // 2
    else:
      kernel, padding = patch, 0
    self.stem = PatchEmbedding(channels, dims[0], kernel=kernel, stride=patch, padding=padding,
                               norm=stem_norm, rngs=rngs)
    grid = ((height + 2 * padding - kernel) // patch + 1, (width + 2 * padding - kernel) // patch
            + 1)
    rates = drop_path_rates(config.get("drop_path", 0.1), sum(depths))
    base = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    grids, downsamples, stages = [], [], []
    for s, (depth, d_model) in enumerate(zip(depths, dims)):
      if s:
        downsamples.append(Downsample(dims[s - 1], d_model, kind=downsample, rngs=rngs))
        grid = (-(-grid[0] // 2), -(-grid[1] // 2))
      stage_config = dict(base)
      side = min(grid)
      stage_config["window_size"] = min(base.get("window_size", 4), side)
      stage_config["routing_regions"] = min(base.get("routing_regions", 2), side)
      if base.get("head_dim", 0):  # Swin: a fixed head width, so heads grow with the width
        stage_config["num_heads"] = max(d_model // base["head_dim"], 1)
      first = sum(depths[:s])
      stages.append(Stage(d_model, depth, stage_config, mixer=mixer,
                          drop_path=rates[first:first + depth], rngs=rngs))
      grids.append(grid)
    self.grids = tuple(grids)
    self.downsamples = nnx.List(downsamples)
    self.stages = nnx.List(stages)
    self.norm = token_norm(config.get("norm", "layer"), dims[-1], rngs=rngs)
    self.head = dense(dims[-1], num_classes, names=("embed", None),
                      init=config.get("init", "lecun"), rngs=rngs)

  def __call__(self, batch: dict[str, jax.Array], *, train: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    x, grid = self.stem(batch["inputs"])
    for s, stage in enumerate(self.stages):
      if s:
        x, grid = self.downsamples[s - 1](x, grid)
      x = stage(x, grid=grid, mask=None, train=train, rngs=rngs)
    # Norm, then average over the tokens, as Swin, PoolFormer and BiFormer do.
    return self.head(jnp.mean(self.norm(x), axis=1))
