"""CvT (Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021).

A hierarchical vision transformer with convolutions in two places (Sec. 3):

Convolutional token embedding (Sec. 3.1), at the start of every stage i: the previous stage's
tokens (the image for i = 1) are reshaped to their 2-D map x_{i-1} [H_{i-1}, W_{i-1}, C_{i-1}]
and

    x_i = LN(Conv2d_{k_i, stride s_i, padding p_i}(x_{i-1}))       [H_i, W_i, C_i]
    H_i = floor((H_{i-1} + 2 p_i - k_i) / s_i) + 1

an overlapping strided convolution (CvT-13: kernels 7, 3, 3; strides 4, 2, 2; paddings 2, 1,
1; widths 64, 192, 384). This is `paperzoo.layers.metaformer.PatchEmbedding` with its norm.

Convolutional projection (Sec. 3.2, Eq. 2), in every block, on the LayerNorm-ed token map:

    x^{q/k/v} = Flatten(Norm(DWConv_{3x3, stride s}(Reshape2D(x_i))))
    q, k, v   = x^q W_q, x^k W_k, x^v W_v                      pointwise linears (with bias)
    o         = softmax(q k^T / sqrt(d)) v  per head, then W_o

with stride 1 for the queries and s = kv_stride (2 in the paper, "squeezed" keys and values)
for the keys and values, so N = H W queries attend to ceil(H / 2) ceil(W / 2) keys (zero
padding k // 2; depthwise convolutions without bias, since a norm follows). Norm is
BatchNorm as in the paper (`projection_norm="batch"`: statistics over batch and map per
channel while training, running averages with momentum 0.9 (PyTorch's 0.1) kept in the model's
non-parameter state, which the trainer carries) or a per-token LayerNorm
(`projection_norm="layer"`: no batch statistics, so evaluation and training compute alike).
The attention itself goes through `paperzoo.layers.attention.dot_product_attention`.

The block is the pre-norm MetaFormer block (`paperzoo.layers.metaformer.MetaFormerBlock`:
LN, mixer, residual, LN, MLP with ratio 4, residual, stochastic depth), with the convolutional
projection attention as its mixer ("conv_attention"); `mixer` may name any mixer of
`paperzoo.layers.mixers` instead (e.g. "attention": linear projections, the paper's ablation
of the convolutional projection). There is no positional encoding: the paper shows it can be
removed, since the convolutions carry the positions, so nothing is sized by the image.

Class token: as in the paper, a learned class token is prepended in the last stage only
(pool="cls"), and the head reads LN(z)_cls. The class token has no place on the map, so the
convolutional projection passes it by: its q, k, v are the pointwise linears of the token itself,
and it attends and is attended to like the other tokens. pool="mean" instead averages the
last stage's tokens (no class token), which lets grid mixers replace the projection.

Image sizes: every token embedding must cover its map (ValueError naming the stage and the
map side otherwise, e.g. a stride larger than its kernel allows). For 32 x 32 CIFAR-10 the
config uses strides 2, 2, 2 (kernels 7, 3, 3, paddings 3, 1, 1): grids 16, 8, 4 instead of the
paper's total stride 16, which would leave 2 x 2 tokens.

Config keys (`config.model`):
  depths            (tuple, (1, 2, 10))   blocks per stage (CvT-13)
  dims              (tuple, (64, 192, 384)) stage widths C_i
  embed_kernels     (tuple, (7, 3, 3))    k_i of the token embeddings
  embed_strides     (tuple, (4, 2, 2))    s_i
  embed_paddings    (tuple, (2, 1, 1))    p_i
  head_dim          (int, 64)             heads of a stage = C_i / head_dim (CvT-13: 1, 3, 6);
                                          0 uses num_heads in every stage
  num_heads         (int, 4)              heads when head_dim = 0
  qkv_kernel        (int, 3)              depthwise kernel of the projections (odd)
  kv_stride         (int, 2)              stride of the key / value projections (1: unsqueezed)
  projection_norm   (str, "batch")        "batch" (the paper) | "layer"
  mixer             (str, "conv_attention") or any mixer of paperzoo.layers.mixers
  pool              (str, "cls")          "cls" (the paper) | "mean"
  mlp_ratio (4), dropout (0), drop_path (0.1), layer_scale_init (0), attention_dropout (0),
  attention_impl ("xla"), init ("lecun")   as in the MetaFormer block

Names: embedding convolutions (None, None, None, "embed"); depthwise kernels (None, None,
"embed") (they act on the block's input channels); projection norms ("embed",); q/k/v kernels
("embed", "heads"), output kernel ("heads", "embed"); class token (None, None, "embed").
Input {"inputs": float [B, H, W, C]}; output logits [B, num_classes].
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from paperzoo.layers.attention import Dropout, check_attention_impl, dot_product_attention
from paperzoo.layers.initializers import check_init_scheme, dense, kernel_and_bias_init
from paperzoo.layers.metaformer import MetaFormerBlock, PatchEmbedding, drop_path_rates
from paperzoo.layers.mixers import MIXERS
from paperzoo.layers.transformer import layer_norm
from paperzoo.models.t2t_vit import strided_output_size
from paperzoo.registry import MODELS

CONV_ATTENTION = "conv_attention"
POOLS = ("cls", "mean")
PROJECTION_NORMS = ("batch", "layer")
# PyTorch's BatchNorm2d defaults, in flax's convention (running <- 0.9 running + 0.1 batch).
BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPS = 1e-5


class ConvProjection(nnx.Module):
  """Norm(DWConv_{k x k, stride}(map)) flattened: [B, H, W, C] -> [B, H' W', C] (Eq. 2 without
  the pointwise linear, which `ConvProjectionAttention` applies)."""

  def __init__(self, channels: int, *, kernel: int, stride: int, norm: str, init: str,
               rngs: nnx.Rngs):
    self.stride = stride
    kernel_init, _ = kernel_and_bias_init(kernel * kernel, init)  # fan-in k^2 (depthwise)
    # Drawn as [k^2, C] so the initializer sees the fan-in, then laid out [k, k, C].
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (kernel * kernel, channels), jnp.float32).reshape(
            kernel, kernel, channels), out_sharding=(None, None, "embed"))
    if norm == "batch":
      self.norm = nnx.BatchNorm(
          channels, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPS,
          use_fast_variance=False,
          scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
          rngs=rngs)
    else:
      self.norm = layer_norm(channels, rngs=rngs)

  def __call__(self, image: jax.Array, *, train: bool) -> jax.Array:
    pad = self.kernel.shape[0] // 2
    y = jax.lax.conv_general_dilated(
        image, self.kernel[...][:, :, None, :], (self.stride, self.stride),
        ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=image.shape[-1])
    y = y.reshape(y.shape[0], -1, y.shape[-1])
    if isinstance(self.norm, nnx.BatchNorm):
      return self.norm(y, use_running_average=not train)
    return self.norm(y)


class ConvProjectionAttention(nnx.Module):
  """"conv_attention": multi-head attention with convolutional q/k/v projections on the token
  map (module docstring); tokens [B, (1 +) H W, C] with grid (H, W), the class token first
  when `class_token`."""

  def __init__(self, d_model: int, *, num_heads: int, kernel: int, kv_stride: int, norm: str,
               class_token: bool, dropout_rate: float, impl: str, init: str, rngs: nnx.Rngs):
    if num_heads < 1 or d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    if kernel < 1 or kernel % 2 == 0:
      raise ValueError(f"qkv_kernel must be odd (padding qkv_kernel // 2 keeps the query map), "
                       f"got {kernel}")
    if kv_stride < 1:
      raise ValueError(f"kv_stride must be >= 1, got {kv_stride}")
    if norm not in PROJECTION_NORMS:
      raise ValueError(f"unknown projection_norm {norm!r}; valid: {', '.join(PROJECTION_NORMS)}")
    check_attention_impl(impl)
    check_init_scheme(init)
    self.num_heads, self.head_dim = num_heads, d_model // num_heads
    self.kernel_size, self.kv_stride = kernel, kv_stride
    self.class_token, self.impl, self.dropout_rate = class_token, impl, dropout_rate
    projection = dict(kernel=kernel, norm=norm, init=init, rngs=rngs)
    self.q_conv = ConvProjection(d_model, stride=1, **projection)
    self.k_conv = ConvProjection(d_model, stride=kv_stride, **projection)
    self.v_conv = ConvProjection(d_model, stride=kv_stride, **projection)
    self.q_proj = dense(d_model, d_model, names=("embed", "heads"), init=init, rngs=rngs)
    self.k_proj = dense(d_model, d_model, names=("embed", "heads"), init=init, rngs=rngs)
    self.v_proj = dense(d_model, d_model, names=("embed", "heads"), init=init, rngs=rngs)
    self.out_proj = dense(d_model, d_model, names=("heads", "embed"), init=init, rngs=rngs)
    self.attention_dropout = Dropout(dropout_rate)

  def kv_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
    """The squeezed key / value map of a (H, W) query map."""
    pad = self.kernel_size // 2
    return tuple(strided_output_size(side, kernel=self.kernel_size, stride=self.kv_stride,
                                     padding=pad, what="cvt key/value projection")
                 for side in grid)

  def __call__(self, x: jax.Array, *, grid: tuple[int, int] | None = None,
               mask: jax.Array | None = None, train: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    if mask is not None:
      raise ValueError("mixer 'conv_attention' works on image maps and takes no padding mask")
    if grid is None:
      raise ValueError("mixer 'conv_attention' convolves the token map: pass grid=(H, W)")
    height, width = grid
    batch, num_tokens, channels = x.shape
    if num_tokens != height * width + self.class_token:
      raise ValueError(f"mixer 'conv_attention': {num_tokens} tokens do not make a "
                       f"{height}x{width} map" + (" and a class token" if self.class_token
                                                   else ""))
    self.kv_grid(grid)  # a clear error for a map the projection cannot stride over
    cls, tokens = (x[:, :1], x[:, 1:]) if self.class_token else (None, x)
    image = tokens.reshape(batch, height, width, channels)

    def project(conv: ConvProjection, linear: nnx.Linear) -> jax.Array:
      h = conv(image, train=train)
      if cls is not None:  # the class token skips the convolution and its norm
        h = jnp.concatenate([cls, h], axis=1)
      h = linear(h)
      return h.reshape(h.shape[:-1] + (self.num_heads, self.head_dim))

    q = project(self.q_conv, self.q_proj)
    k = project(self.k_conv, self.k_proj)
    v = project(self.v_conv, self.v_proj)
    probs_dropout: Callable[[jax.Array], jax.Array] | None = None
    impl = self.impl
    if train and self.dropout_rate > 0.0:
      # Dropout on the probabilities needs them, which only the reference path materializes.
      impl = "reference"
      probs_dropout = lambda p: self.attention_dropout(p, deterministic=False, rngs=rngs)
    attended = dot_product_attention(q, k, v, impl=impl, probs_dropout=probs_dropout)
    return self.out_proj(attended.reshape(batch, num_tokens, channels))


def conv_transformer_block(d_model: int, config: Any, *, mixer: str, class_token: bool,
                           layer_index: int, drop_path_rate: float,
                           rngs: nnx.Rngs) -> MetaFormerBlock:
  """A MetaFormer block whose mixer is `mixer`; "conv_attention" is this module's."""
  if mixer != CONV_ATTENTION:
    return MetaFormerBlock(d_model, config, mixer=mixer, layer_index=layer_index,
                           drop_path_rate=drop_path_rate, rngs=rngs)
  # MetaFormerBlock builds its mixer by name from the shared mixers only; the parameter-free
  # "pooling" mixer holds the place until the convolutional projection replaces it.
  block = MetaFormerBlock(d_model, config, mixer="pooling", layer_index=layer_index,
                          drop_path_rate=drop_path_rate, rngs=rngs)
  block.mixer = ConvProjectionAttention(
      d_model, num_heads=int(config.get("num_heads", 4)), kernel=int(config.get("qkv_kernel", 3)),
      kv_stride=int(config.get("kv_stride", 2)), norm=config.get("projection_norm", "batch"),
      class_token=class_token, dropout_rate=float(config.get("attention_dropout", 0.0)),
      impl=config.get("attention_impl", "xla"), init=config.get("init", "lecun"), rngs=rngs)
  return block


@MODELS.register("cvt")
class CvT(nnx.Module):
  """Stages of convolutional token embedding + convolutional transformer blocks, then the
  class-token (or mean) head (module docstring)."""

  def __init__(self, config: Any, *, num_classes: int, input_shape: tuple[int, ...],
               vocab_size: int = 0, rngs: nnx.Rngs):
    del vocab_size
    if len(input_shape) != 3:
      raise ValueError(f"cvt takes images [H, W, C], got inputs of shape {input_shape}")
    height, width, channels = input_shape
    depths = tuple(int(d) for d in config.get("depths", (1, 2, 10)))
    dims = tuple(int(d) for d in config.get("dims", (64, 192, 384)))
    kernels = tuple(int(k) for k in config.get("embed_kernels", (7, 3, 3)))
    strides = tuple(int(s) for s in config.get("embed_strides", (4, 2, 2)))
    paddings = tuple(int(p) for p in config.get("embed_paddings", (2, 1, 1)))
    if not depths or len({len(depths), len(dims), len(kernels), len(strides),
                          len(paddings)}) != 1:
      raise ValueError(f"depths {depths}, dims {dims}, embed_kernels {kernels}, embed_strides "
                       f"{strides} and embed_paddings {paddings} need the same length >= 1")
    self.pool = config.get("pool", "cls")
    if self.pool not in POOLS:
      raise ValueError(f"unknown pool {self.pool!r}; valid: {', '.join(POOLS)}")
    self.mixer = config.get("mixer", CONV_ATTENTION)
    if self.mixer != CONV_ATTENTION and self.mixer not in MIXERS:
      raise ValueError(f"unknown mixer {self.mixer!r}; valid: {CONV_ATTENTION}, "
                       f"{', '.join(MIXERS)}")
    if self.pool == "cls" and self.mixer not in (CONV_ATTENTION, "attention", "linear",
                                                 "mamba"):
      raise ValueError(f"mixer {self.mixer!r} works on the token grid, where the last stage's "
                       f"class token has no place; use pool='mean'")
    base = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    rates = drop_path_rates(float(base.get("drop_path", 0.1)), sum(depths))
    grid, in_channels = (height, width), channels
    embeddings, stages, grids = [], [], []
    for s, (depth, d_model, kernel, stride, padding) in enumerate(
        zip(depths, dims, kernels, strides, paddings)):
      grid = tuple(strided_output_size(
          side, kernel=kernel, stride=stride, padding=padding,
          what=f"cvt token embedding of stage {s + 1} on the {grid[0]}x{grid[1]} map of a "
               f"{height}x{width} image") for side in grid)
      embeddings.append(PatchEmbedding(in_channels, d_model, kernel=kernel, stride=stride,
                                       padding=padding, norm=True, rngs=rngs))
      stage_config = dict(base)
      # As HierarchicalBackbone: a swapped-in mixer's window / regions fit this stage's grid.
      stage_config["window_size"] = min(base.get("window_size", 4), min(grid))
      stage_config["routing_regions"] = min(base.get("routing_regions", 2), min(grid))
      if base.get("head_dim", 64):
        stage_config["num_heads"] = max(d_model // base.get("head_dim", 64), 1)
      last = s == len(depths) - 1
      first = sum(depths[:s])
      blocks = [conv_transformer_block(d_model, stage_config, mixer=self.mixer,
                                       class_token=last and self.pool == "cls",
                                       layer_index=i, drop_path_rate=rates[first + i],
                                       rngs=rngs)
                for i in range(depth)]
      if self.mixer == CONV_ATTENTION and blocks:
        blocks[0].mixer.kv_grid(grid)  # fail here, not at the first call, on a bad map
      stages.append(nnx.List(blocks))
      grids.append(grid)
      in_channels = d_model
    self.grids = tuple(grids)
    self.embeddings = nnx.List(embeddings)
    self.stages = nnx.List(stages)
    self.class_token = (nnx.Param(jnp.zeros((1, 1, dims[-1]), jnp.float32),
                                  out_sharding=(None, None, "embed"))
                        if self.pool == "cls" else None)
    self.norm = layer_norm(dims[-1], rngs=rngs)
    self.head = dense(dims[-1], num_classes, names=("embed", None),
                      init=config.get("init", "lecun"), rngs=rngs)

  def __call__(self, batch: dict[str, jax.Array], *, train: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    image = batch["inputs"]
    x = None
    for s, (embedding, blocks) in enumerate(zip(self.embeddings, self.stages)):
      x, grid = embedding(image)
      if self.class_token is not None and s == len(self.stages) - 1:
        x = jnp.concatenate(
            [jnp.broadcast_to(self.class_token[...], (x.shape[0], 1, x.shape[2])), x], axis=1)
        # Shared mixers other than the grid ones ignore the grid; they see a plain sequence.
        block_grid = grid if self.mixer == CONV_ATTENTION else None
      else:
        block_grid = grid
      for block in blocks:
        x = block(x, grid=block_grid, mask=None, train=train, rngs=rngs)
      if s < len(self.stages) - 1:
        image = x.reshape(x.shape[0], grid[0], grid[1], x.shape[-1])
    x = self.norm(x)
    return self.head(x[:, 0] if self.class_token is not None else jnp.mean(x, axis=1))
