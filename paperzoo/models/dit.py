r"""DiT: Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers",
ICCV 2023), class-conditional, with adaLN-Zero blocks and a token mixer chosen by config (so
LiT, the linear diffusion transformer, is `mixer="linear"`).

    tokens = Patchify(x) W_p + PE             x [B, H, W, C], p x p patches, PE fixed 2-D sin-cos
    c      = MLP(freq(t)) + E_y[y]            timestep + class embedding (the condition)
    block:   (a1, b1, g1, a2, b2, g2) = Linear(SiLU(c))           zero-initialized
             h = h + g1 * Mixer(LN(h) (1 + b1) + a1)              LN without affine, eps 1e-6
             h = h + g2 * MLP(LN(h) (1 + b2) + a2)                MLP: d -> 4d -> d, GELU (tanh)
    final:   (a, b) = Linear(SiLU(c));  out = Linear(LN(h) (1 + b) + a)    both zero-initialized
    output = Unpatchify(out)                  [B, H, W, C] (eps / velocity) or [B, H, W, 2C]
                                              with learn_sigma (eps and the variance values v)

adaLN-Zero (Sec. 3.2): every residual branch is gated by g = 0 at initialization and the output
layer is zero, so a freshly built DiT is the identity on its tokens and outputs exactly 0.

  freq(t)[i] = cos(t w_i), freq(t)[i + 128] = sin(t w_i), w_i = 10000^(-i / 128), i < 128
  (256 frequencies, DiT's `TimestepEmbedder`; t on the 0..1000 scale, fractional allowed).
  PE: MAE's 2-D sin-cos table: the first d/2 channels encode the column, the last d/2 the row,
  each half [sin(pos w_j), cos(pos w_j)], w_j = 10000^(-j / (d/4)), j < d/4.
  Class embedding: a table of num_classes + 1 rows; the last row is the null class of
  classifier-free guidance. While training, each label is replaced by the null class with
  probability `class_dropout_prob` (drawn from the "dropout" stream of `rngs`).

Init (DiT): linear kernels Xavier-uniform with zero biases (the patch embedding as a flattened
linear map; the mixer's own projections follow `init`), timestep MLP and class table normal
(std 0.02), the adaLN modulations and the final linear zero.

Sizes (depth, width, heads), DiT Table 1 plus a CPU size:
  tiny (6, 128, 4)   S (12, 384, 6)   B (12, 768, 12)   L (24, 1024, 16)   XL (28, 1152, 16)
with patch 2, 4 or 8 ("DiT-S/2" = size S, patch 2).

Config keys (`config.model`):
  size                (str, "S")        one of SIZES
  depth, hidden_size, num_heads (int, 0) override the size's value when > 0
  patch_size          (int, 2)          p; the image sides must be multiples of it
  learn_sigma         (bool, True)      output 2C channels (eps and the variance interpolation)
  class_dropout_prob  (float, 0.1)      label -> null class while training (for guidance)
  mixer               (str, "attention") any of paperzoo.layers.mixers.MIXERS; "linear" is LiT
                                        (plus that mixer's keys, e.g. attention_impl)
  mlp_ratio           (float, 4.0)      MLP width / d
  init                (str, "lecun")    the mixer's projections: "lecun" | "torch"

Input: {"inputs": float [B, H, W, C] (x_t), "t": float [B] (the timestep, 0..1000 scale),
"label": int [B] in [0, num_classes] (num_classes = the null class)}.
Output: float [B, H, W, C * (2 if learn_sigma else 1)].
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paperzoo.layers.initializers import dense
from paperzoo.layers.mixers import make_mixer
from paperzoo.registry import MODELS

# (depth, hidden size, heads).
SIZES = {"tiny": (6, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
         "XL": (28, 1152, 16)}
FREQUENCY_EMBEDDING_SIZE = 256
MAX_PERIOD = 10000.0
ADALN_NORM_EPS = 1e-6


def patchify(x: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)(W/p), p p C]: row-major patches, each flattened (row, col, C)."""
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height // patch, patch, width // patch, patch, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, patch * patch * channels)


def unpatchify(tokens: jax.Array, grid: tuple[int, int], patch: int) -> jax.Array:
  """The inverse of `patchify`: [B, h w, p p C] -> [B, h p, w p, C]."""
  batch = tokens.shape[0]
  rows, cols = grid
  channels = tokens.shape[-1] // (patch * patch)
  x = tokens.reshape(batch, rows, cols, patch, patch, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows * patch, cols * patch, channels)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """[len(positions), dim]: [sin(pos w_j), cos(pos w_j)], w_j = 10000^(-j / (dim/2))."""
  omega = 1.0 / MAX_PERIOD ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.outer(np.asarray(positions, np.float64).reshape(-1), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_positions(dim: int, grid: tuple[int, int]) -> np.ndarray:
  """MAE / DiT's fixed 2-D table [rows cols, dim] (module docstring), float32."""
  if dim % 4:
    raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
  rows, cols = grid
  row, col = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
  return np.concatenate([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)],
                        axis=1).astype(np.float32)


def timestep_frequencies(t: jax.Array, dim: int = FREQUENCY_EMBEDDING_SIZE) -> jax.Array:
  """[B] -> [B, dim]: [cos(t w_i), sin(t w_i)], w_i = 10000^(-i / (dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def drop_labels(labels: jax.Array, rate: float, null_label: int, key: jax.Array) -> jax.Array:
  """Each label becomes `null_label` with probability `rate`, independently."""
  dropped = jax.random.bernoulli(key, rate, labels.shape)
  return jnp.where(dropped, null_label, labels)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x [B, N, d] * (1 + scale [B, d]) + shift [B, d]."""
  return x * (1.0 + scale[:, None]) + shift[:, None]


def _xavier_dense(d_in: int, d_out: int, names: tuple, rngs: nnx.Rngs) -> nnx.Linear:
  return dense(d_in, d_out, names=names, init="lecun", rngs=rngs,
               kernel_init=nnx.initializers.xavier_uniform())


def _zero_dense(d_in: int, d_out: int, names: tuple, rngs: nnx.Rngs) -> nnx.Linear:
  return dense(d_in, d_out, names=names, init="lecun", rngs=rngs,
               kernel_init=nnx.initializers.zeros_init())


def _plain_layer_norm(d: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm without scale and bias: adaLN supplies them."""
  return nnx.LayerNorm(d, epsilon=ADALN_NORM_EPS, use_bias=False, use_scale=False, rngs=rngs)


class DiTBlock(nnx.Module):
  """One adaLN-Zero block (module docstring)."""

  def __init__(self, d: int, config: Any, *, mixer: str, layer_index: int, rngs: nnx.Rngs):
    hidden = int(float(config.get("mlp_ratio", 4.0)) * d)
    self.norm1 = _plain_layer_norm(d, rngs)
    self.mixer = make_mixer(mixer, d, config, layer_index=layer_index, rngs=rngs)
    self.norm2 = _plain_layer_norm(d, rngs)
    self.mlp_in = _xavier_dense(d, hidden, ("embed", "mlp"), rngs)
    self.mlp_out = _xavier_dense(hidden, d, ("mlp", "embed"), rngs)
    self.modulation = _zero_dense(d, 6 * d, ("embed", "mlp"), rngs)

  def __call__(self, x: jax.Array, c: jax.Array, *, grid: tuple[int, int], train: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
        self.modulation(jax.nn.silu(c)), 6, axis=-1)
    mixed = self.mixer(modulate(self.norm1(x), shift1, scale1), grid=grid, mask=None,
                       train=train, rngs=rngs)
    x = x + gate1[:, None] * mixed
    h = self.mlp_out(jax.nn.gelu(self.mlp_in(modulate(self.norm2(x), shift2, scale2)),
                                 approximate=True))
    return x + gate2[:, None] * h


@MODELS.register("dit")
class DiT(nnx.Module):
  """Class-conditional diffusion transformer (module docstring)."""

  def __init__(self, config: Any, *, num_classes: int, input_shape: tuple[int, ...],
               rngs: nnx.Rngs, **unused: Any):
    del unused  # other tasks' shape information (vocab_size)
    if len(input_shape) != 3:
      raise ValueError(f"dit takes images [H, W, C], got inputs of shape {input_shape}")
    size = config.get("size", "S")
    if size not in SIZES:
      raise ValueError(f"unknown DiT size {size!r}; valid: {', '.join(SIZES)}")
    depth, d, heads = SIZES[size]
    depth = int(config.get("depth", 0)) or depth
    d = int(config.get("hidden_size", 0)) or d
    heads = int(config.get("num_heads", 0)) or heads
    height, width, channels = input_shape
    patch = int(config.get("patch_size", 2))
    if patch < 1 or height % patch or width % patch:
      raise ValueError(f"image {height}x{width} is not divisible into {patch}x{patch} patches; "
                       f"valid patch sizes divide both sides")
    self.patch = patch
    self.grid = (height // patch, width // patch)
    self.channels = channels
    self.learn_sigma = bool(config.get("learn_sigma", True))
    self.out_channels = channels * (2 if self.learn_sigma else 1)
    self.num_classes = num_classes
    self.null_label = num_classes
    self.class_dropout_prob = float(config.get("class_dropout_prob", 0.1))
    if not 0.0 <= self.class_dropout_prob < 1.0:
      raise ValueError(f"class_dropout_prob={self.class_dropout_prob} must be in [0, 1)")
    self.d = d

    self.patch_embed = _xavier_dense(patch * patch * channels, d, (None, "embed"), rngs)
    normal = nnx.initializers.normal(0.02)
    self.time_in = dense(FREQUENCY_EMBEDDING_SIZE, d, names=(None, "embed"), init="lecun",
                         kernel_init=normal, rngs=rngs)
    self.time_out = dense(d, d, names=(None, "embed"), init="lecun", kernel_init=normal,
                          rngs=rngs)
    self.label_table = nnx.Param(normal(rngs.params(), (num_classes + 1, d), jnp.float32),
                                 out_sharding=(None, "embed"))
    block_config = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    block_config["num_heads"] = heads
    block_config.setdefault("init", "lecun")
    mixer = config.get("mixer", "attention")
    self.blocks = nnx.List([DiTBlock(d, block_config, mixer=mixer, layer_index=i, rngs=rngs)
                            for i in range(depth)])
    self.final_norm = _plain_layer_norm(d, rngs)
    self.final_modulation = _zero_dense(d, 2 * d, ("embed", "mlp"), rngs)
    self.final = _zero_dense(d, patch * patch * self.out_channels, ("embed", None), rngs)

  def condition(self, t: jax.Array, labels: jax.Array) -> jax.Array:
    """c = MLP(freq(t)) + E_y[labels], [B, d]."""
    t_embedding = self.time_out(jax.nn.silu(self.time_in(timestep_frequencies(t))))
    return t_embedding + self.label_table[...][labels]

  def __call__(self, batch: dict[str, jax.Array], *, train: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    x, t, labels = batch["inputs"], batch["t"], batch["label"]
    if x.shape[1:3] != (self.grid[0] * self.patch, self.grid[1] * self.patch):
      raise ValueError(f"dit was built for {self.grid[0] * self.patch}x"
                       f"{self.grid[1] * self.patch} images, got {x.shape}")
    if train and self.class_dropout_prob > 0:
      if rngs is None:
        raise ValueError("training with class_dropout_prob > 0 needs rngs with a dropout stream")
      labels = drop_labels(labels, self.class_dropout_prob, self.null_label, rngs.dropout())
    h = self.patch_embed(patchify(x, self.patch)) + sincos_2d_positions(self.d, self.grid)
    c = self.condition(t, labels)
    for block in self.blocks:
      h = block(h, c, grid=self.grid, train=train, rngs=rngs)
    shift, scale = jnp.split(self.final_modulation(jax.nn.silu(c)), 2, axis=-1)
    out = self.final(modulate(self.final_norm(h), shift, scale))
    return unpatchify(out, self.grid, self.patch)
