"""Token mixers behind one interface: the TokenMixer of a MetaFormer block.

MetaFormer (Yu et al., "MetaFormer Is Actually What You Need for Vision", CVPR 2022) abstracts a
Transformer block as norm -> TokenMixer -> residual -> norm -> MLP -> residual, so the token
mixer of every backbone is a config choice. This module holds only the TokenMixer part:

    mixer = make_mixer(name, d_model, config.model, layer_index=i, rngs=rngs)
    y = mixer(x, grid=grid, mask=mask, train=train, rngs=rngs)      x, y [B, N, d_model]

`grid=(H, W)` when the N tokens are an H x W image grid in row-major order (vision), None for 1-D
sequences (LRA text, time series); `mask` [B, N] bool, True = real token, False = padding (1-D
sequences; None = all real). `rngs` supplies the "dropout" stream when training with
attention_dropout > 0. `name` is one of `MIXERS`; an unknown name is a ValueError listing them.

Config keys (read with `config.get(key, default)`; `experiments/configs/common.MIXER_DEFAULTS`
repeats them):

    num_heads          4        heads of attention, linear, window, agent, biformer
    attention_dropout  0.0      dropout on attention probabilities while training (attention,
                                window, agent, biformer; linear attention has no probabilities)
    attention_impl     "xla"    `dot_product_attention` impl of "attention" and "biformer"
    init               "torch"  "torch" | "lecun" for linear maps and convolution kernels
    pool_size          3        pooling window (odd)
    window_size        4        Swin window side M
    agent_num          16       agent tokens n (a perfect square on a grid)
    routing_regions    2        BiFormer's S: the grid is split into S x S regions
    routing_topk       2        BiFormer's k: regions routed to each region (>= 1; clamped to
                                S^2, so a late stage whose grid shrank S keeps working)
    d_state            16       Mamba state size
    d_conv             4        Mamba causal conv width
    expand             2        Mamba d_inner = expand * d_model
    scan_impl          "auto"   `pallas_kernels.selective_scan` impl of the Mamba blocks

Notation: per head h (head_dim d = d_model / num_heads), q_i = W_q x_i, k_j = W_k x_j,
v_j = W_v x_j (biased linear maps "embed" -> "heads"), and the mixer's output is W_o(o)
("heads" -> "embed"), o the concatenated heads. softmax rows are over keys.

"attention": softmax multi-head self-attention (Vaswani et al. 2017), `MultiHeadAttention`:
    o_i = sum_j softmax_j(q_i . k_j / sqrt(d) [j real]) v_j
  Padded keys get no weight; outputs at padded queries are finite but meaningless.

"linear": linear attention (Katharopoulos et al., "Transformers are RNNs", ICML 2020, Eq. 4-6),
non-causal, phi(u) = elu(u) + 1:
    o_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j) + 1e-6)
  with phi(k_j) = 0 at padded keys. The two sums are [d, d] and [d] per head, so the cost is
  O(N d^2) instead of O(N^2 d).

"mamba": bidirectional Mamba (as S-Mamba and Vision Mamba use it), two independent Mamba blocks
(`paperzoo.layers.mamba.MambaBlock`, each causal over the token axis):
    y = Mamba_fwd(x) + R(Mamba_bwd(R(x)))
  R reverses the order of tokens (a grid is scanned as its row-major sequence). With a mask, R
  reverses each sequence within its own length L_b (R(x)_t = x_{L_b - 1 - t} for t < L_b, x_t
  after), so the backward scan starts at the last real token: padding must be at the end (right
  padding), then no padded token reaches a real token's output in either direction. Vision
  Mamba shares the input and output projections between the directions; here the two blocks
  share nothing (as in S-Mamba).

"pooling": PoolFormer (Yu et al. 2022, Eq. 4), no parameters:
    y = AvgPool_{p x p, stride 1, padding p // 2, count_include_pad=False}(x) - x
  on the grid (the mean at a border counts only the positions inside the grid).

"window": Swin Transformer window attention (Liu et al., "Swin Transformer", ICCV 2021, Sec. 3.2,
Eq. 4), windows of M x M tokens, M = window_size:
    o_i = sum_{j in window(i)} softmax_j(q_i . k_j / sqrt(d) + B[r(i, j)] [allowed(i, j)]) v_j
  B is a learned relative position bias table [(2M-1)^2, heads] (trunc. normal 0.02), indexed by
  r(i, j) = (row_i - row_j + M - 1) (2M - 1) + (col_i - col_j + M - 1). Odd layer_index uses the
  shifted configuration: the grid is rolled by (-M/2, -M/2) (jnp.roll), attention is masked so
  that tokens of a window that came from different regions of the unrolled grid (the wrapped
  bottom/right strips) do not see each other, and the result is rolled back. If H or W is not a
  multiple of M the grid is padded at the bottom/right to the next multiple (before the shift,
  as Swin's detection code does) and padded keys are masked. As in Swin, a grid whose smaller
  side is <= M is not shifted; a side shorter than M gets windows of that side (M_h = min(M, H),
  M_w = min(M, W)), so a grid inside one window is full attention with the bias.

"agent": Agent Attention (Han et al., "Agent Attention: On the Integration of Softmax and Linear
Attention", ECCV 2024, Eq. 3-4, Sec. 4.2), n = agent_num agent tokens A = pool(Q):
    V_A = softmax(A K^T / sqrt(d) + B_1) V               agent aggregation  [n, d] per head
    O   = softmax(Q A^T / sqrt(d) + B_2) V_A + DWC(V)    agent broadcast
  On a grid, pool = adaptive average pooling of the query map to sqrt(n) x sqrt(n) bins and DWC
  a depthwise 3x3 convolution of V on the grid (zero padding 1); on a 1-D sequence, pool =
  adaptive average pooling along N to n segments (PyTorch's bins, [floor(iN/n), ceil((i+1)N/n)))
  and DWC the same 3x3 convolution on the 1 x N grid, i.e. a depthwise convolution of width 3
  along N with the kernel's middle row (one parameter set serves both layouts). With a mask,
  padded tokens are left out of the pooling (a bin of padding only gives a zero agent), are
  masked keys of the aggregation, and are zeroed before the DWC.
  Position biases, simplified: the paper adds to a [heads, n, 7, 7] table, bilinearly resized to
  the grid, row and column biases sized for one fixed resolution; since a mixer here does not
  know its grid until called, B_1 and B_2 are only the resized tables: two learned
  [heads, n, 7, 7] tables (trunc. normal 0.02) resized bilinearly without antialiasing (as
  PyTorch's F.interpolate, which the paper's code uses) to [heads, n, H, W] (B_1[h, a, token];
  B_2 is its transpose [h, token, a]); a 1-D sequence resizes them to a 1 x N grid, which
  reads the middle of the 7 rows.

"biformer": BiFormer bi-level routing attention (Zhu et al., "BiFormer: Vision Transformer with
Bi-Level Routing Attention", CVPR 2023, Sec. 3.2, Eq. 2-6): the H x W grid is split into S x S
regions of HW / S^2 tokens (S = routing_regions; H, W must be multiples of S), then
    Q_r, K_r = per-region means of Q, K                       [S^2, d_model]
    A_r      = Q_r K_r^T                                      region affinity [S^2, S^2]
    I_r      = topk-index(A_r, k)                             k = routing_topk routed regions
    K_g, V_g = the tokens of the k routed regions of each region, gathered  [S^2, k HW / S^2]
    o        = Attention(Q, K_g, V_g) + LCE(V)                per region, multi-head
  LCE is a depthwise 5x5 convolution of V on the grid (padding 2), added before W_o. Routing is
  not differentiable (top-k indices); gradients reach W_q and W_k through the token attention.
  With k = S^2 every region attends to all tokens, i.e. full attention plus LCE; a larger k is
  clamped to S^2.

The grid mixers ("pooling", "window", "biformer") need `grid` with H * W = N and take no mask
(ValueError otherwise). "attention", "linear", "mamba" and "agent" work on both layouts and take
a mask; "attention", "linear" and "mamba" ignore the grid ("agent" uses it for pooling and DWC).

Names: q/k/v kernels ("embed", "heads"), biases ("heads",); output kernel ("heads", "embed"),
bias ("embed",); DWC / LCE kernels (None, None, "heads") and biases ("heads",) (they act on V's
"heads" axis); the relative position table and the agent bias tables have a per-head axis of
size num_heads, not the num_heads * head_dim that "heads" names, and are small, so they are
replicated (None, ...); the Mamba blocks' names are in `paperzoo.layers.mamba`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from paperzoo.layers.attention import (Dropout, MultiHeadAttention, check_attention_impl,
                                       dot_product_attention)
from paperzoo.layers.initializers import check_init_scheme, dense, kernel_and_bias_init
from paperzoo.layers.mamba import MambaBlock

MIXERS: tuple[str, ...] = ("attention", "linear", "mamba", "pooling", "window", "agent",
                           "biformer")

GRID_MIXERS = ("pooling", "window", "biformer")

# Linear attention's denominator guard (Katharopoulos et al.'s reference code uses 1e-6).
LINEAR_ATTENTION_EPS = 1e-6

# Side of Agent Attention's learned position-bias tables before they are resized to the grid
# (the paper's 7 x 7 `an_bias` / `na_bias`).
AGENT_BIAS_SIZE = 7

# BiFormer's local context enhancement: a depthwise 5x5 convolution.
LCE_KERNEL = 5

# A large finite negative (as `reference_attention` uses) instead of -inf, so that a query whose
# keys are all masked (a window made only of padding) gets a uniform row instead of NaNs.
_MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _check_tokens(name: str, x: jax.Array, grid: tuple[int, int] | None, *,
                  needs_grid: bool) -> tuple[int, int] | None:
  """Validates x [B, N, C] against `grid`; returns (H, W) or None."""
  if x.ndim != 3:
    raise ValueError(f"mixer {name!r} takes tokens [B, N, d_model], got shape {x.shape}")
  num_tokens = x.shape[1]
  if grid is None:
    if needs_grid:
      raise ValueError(
          f"mixer {name!r} mixes tokens on a 2-D grid: pass grid=(H, W) with H * W = N "
          f"(N = {num_tokens}); it does not work on 1-D sequences (grid=None)")
    return None
  height, width = (int(side) for side in grid)
  if height * width != num_tokens:
    raise ValueError(f"mixer {name!r}: grid {height}x{width} has {height * width} cells but "
                     f"the input has N = {num_tokens} tokens")
  return height, width


def _refuse_mask(name: str, mask: jax.Array | None) -> None:
  if mask is not None:
    raise ValueError(f"mixer {name!r} works on image grids and does not support a padding "
                     f"mask; pass mask=None")


def _attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    allowed: jax.Array | None = None,
    probs_dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """softmax(q k^T / sqrt(d) + bias [allowed]) v over any leading axes.

  q [..., Tq, H, D], k and v [..., Tk, H, D]; `bias` (added) and `allowed` (bool, True = may
  attend) broadcast to the logits [..., H, Tq, Tk]. Written out (not `dot_product_attention`)
  because window and agent attention add a learned bias to the logits.
  """
  logits = jnp.einsum("...qhd,...khd->...hqk", q, k) * (1.0 / math.sqrt(q.shape[-1]))
  if bias is not None:
    logits = logits + bias
  if allowed is not None:
    logits = jnp.where(allowed, logits, _MASKED_LOGIT)
  probs = jax.nn.softmax(logits, axis=-1)
  if probs_dropout is not None:
    probs = probs_dropout(probs)
  return jnp.einsum("...hqk,...khd->...qhd", probs, v)


def _depthwise_kernel(kernel_size: int, channels: int, *, init: str, rngs: nnx.Rngs
                      ) -> tuple[nnx.Param, nnx.Param]:
  """A depthwise k x k convolution's kernel [k, k, C] and bias [C], initialized as PyTorch's
  depthwise Conv2d (fan-in k^2) under init="torch", or LeCun normal / zeros under "lecun"."""
  fan_in = kernel_size * kernel_size
  kernel_init, bias_init = kernel_and_bias_init(fan_in, init)
  # Drawn as [fan_in, C] so that the initializer sees the fan-in directly, then reshaped.
  kernel = kernel_init(rngs.params(), (fan_in, channels), jnp.float32)
  kernel = kernel.reshape(kernel_size, kernel_size, channels)
  return (nnx.Param(kernel, out_sharding=(None, None, "heads")),
          nnx.Param(bias_init(rngs.params(), (channels,), jnp.float32), out_sharding=("heads",)))


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """x [B, H, W, C] * kernel [k, k, C] (odd k, zero padding k // 2, stride 1) + bias."""
  pad = kernel.shape[0] // 2
  y = jax.lax.conv_general_dilated(
      x, kernel[:, :, None, :], (1, 1), ((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
  return y + bias


def adaptive_pool_bins(length: int, bins: int) -> np.ndarray:
  """[bins, length] 0/1 membership of PyTorch's adaptive pooling bins,
  [floor(i L / n), ceil((i + 1) L / n)); bins overlap when they do not divide L."""
  members = np.zeros((bins, length), np.float32)
  for i in range(bins):
    members[i, (i * length) // bins:-(-((i + 1) * length) // bins)] = 1.0
  return members


class _ProjectedHeads(nnx.Module):
  """q/k/v/output projections with MultiHeadAttention's shapes and names, for the mixers that
  compute their own attention pattern (linear, window, agent, biformer)."""

  def __init__(self, d_model: int, *, num_heads: int, dropout_rate: float, init: str,
               rngs: nnx.Rngs):
    if num_heads < 1 or d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    check_init_scheme(init)
    self.num_heads = num_heads
    self.head_dim = d_model // num_heads
    self.dropout_rate = dropout_rate
    self.q_proj = dense(d_model, d_model, names=("embed", "heads"), init=init, rngs=rngs)
    self.k_proj = dense(d_model, d_model, names=("embed", "heads"), init=init, rngs=rngs)
    self.v_proj = dense(d_model, d_model, names=("embed", "heads"), init=init, rngs=rngs)
    self.out_proj = dense(d_model, d_model, names=("heads", "embed"), init=init, rngs=rngs)
    self.attention_dropout = Dropout(dropout_rate)

  def split_heads(self, h: jax.Array) -> jax.Array:
    return h.reshape(h.shape[:-1] + (self.num_heads, self.head_dim))

  def probs_dropout(self, train: bool, rngs: nnx.Rngs | None
                    ) -> Callable[[jax.Array], jax.Array] | None:
    if not train or self.dropout_rate == 0.0:
      return None
    return lambda probs: self.attention_dropout(probs, deterministic=False, rngs=rngs)


# --------------------------------------------------------------------------------------------
# The mixers
# --------------------------------------------------------------------------------------------


class AttentionMixer(nnx.Module):
  """"attention": softmax multi-head self-attention with a key padding mask."""

  def __init__(self, d_model: int, *, num_heads: int, dropout_rate: float, impl: str,
               init: str, rngs: nnx.Rngs):
    self.attention = MultiHeadAttention(d_model, num_heads, dropout_rate=dropout_rate,
                                        impl=impl, init=init, rngs=rngs)

  def __call__(self, x: jax.Array, *, grid: tuple[int, int] | None = None,
               mask: jax.Array | None = None, train: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    _check_tokens("attention", x, grid, needs_grid=False)
    # [B, N] -> [B, 1 (heads), 1 (queries), N (keys)]: padded keys get no weight.
    key_mask = None if mask is None else mask[:, None, None, :]
    return self.attention(x, x, mask=key_mask, train=train, rngs=rngs)


class LinearAttentionMixer(_ProjectedHeads):
  """"linear": non-causal linear attention with phi = elu + 1 (module docstring)."""

  def __call__(self, x: jax.Array, *, grid: tuple[int, int] | None = None,
               mask: jax.Array | None = None, train: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    del train, rngs  # no attention probabilities, so nothing to drop out
    _check_tokens("linear", x, grid, needs_grid=False)
    phi_q = jax.nn.elu(self.split_heads(self.q_proj(x))) + 1.0
    phi_k = jax.nn.elu(self.split_heads(self.k_proj(x))) + 1.0
    v = self.split_heads(self.v_proj(x))
    if mask is not None:
      # Zero feature maps remove padded keys from both the numerator and the normalizer.
      phi_k = phi_k * mask[:, :, None, None].astype(phi_k.dtype)
    kv = jnp.einsum("bnhd,bnhe->bhde", phi_k, v)  # sum_j phi(k_j) v_j^T, [d, d] per head
    k_sum = jnp.sum(phi_k, axis=1)  # sum_j phi(k_j), [B, H, d]
    numerator = jnp.einsum("bnhd,bhde->bnhe", phi_q, kv)
    denominator = jnp.einsum("bnhd,bhd->bnh", phi_q, k_sum) + LINEAR_ATTENTION_EPS
    out = numerator / denominator[..., None]
    return self.out_proj(out.reshape(out.shape[:-2] + (-1,)))


def reverse_within_length(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Reverses x [B, N, ...] along N; with a right-padding mask [B, N], each example's first
  L_b = sum(mask_b) tokens are reversed in place and its padding stays where it is. An
  involution: applying it twice gives x back."""
  if mask is None:
    return jnp.flip(x, axis=1)
  positions = jnp.arange(x.shape[1])[None, :]
  lengths = jnp.sum(mask.astype(jnp.int32), axis=1, keepdims=True)
  index = jnp.where(positions < lengths, lengths - 1 - positions, positions)
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


class BidirectionalMambaMixer(nnx.Module):
  """"mamba": Mamba_fwd(x) + R(Mamba_bwd(R(x))), R reversing within each sequence's length."""

  def __init__(self, d_model: int, *, d_state: int, d_conv: int, expand: int, init: str,
               scan_impl: str, rngs: nnx.Rngs):
    kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand, init=init, scan_impl=scan_impl,
                  rngs=rngs)
    self.forward_block = MambaBlock(d_model, **kwargs)
    self.backward_block = MambaBlock(d_model, **kwargs)

  def __call__(self, x: jax.Array, *, grid: tuple[int, int] | None = None,
               mask: jax.Array | None = None, train: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    del train, rngs  # no dropout inside the mixer (the block around it has its own)
    _check_tokens("mamba", x, grid, needs_grid=False)
    # The forward scan is causal, so with right padding the real outputs never see padding;
    # the backward scan runs over each sequence reversed within its own length for the same.
    backward = reverse_within_length(
        self.backward_block(reverse_within_length(x, mask)), mask)
    return self.forward_block(x) + backward


class PoolingMixer(nnx.Module):
  """"pooling": PoolFormer's AvgPool(x) - x on the grid, border means over real positions."""

  def __init__(self, *, pool_size: int):
    if pool_size < 1 or pool_size % 2 == 0:
      raise ValueError(f"pool_size must be odd and >= 1 (stride 1 with padding pool_size // 2 "
                       f"keeps the grid), got {pool_size}")
    self.pool_size = pool_size

  def __call__(self, x: jax.Array, *, grid: tuple[int, int] | None = None,
               mask: jax.Array | None = None, train: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    del train, rngs
    height, width = _check_tokens("pooling", x, grid, needs_grid=True)
    _refuse_mask("pooling", mask)
    batch, _, channels = x.shape
    image = x.reshape(batch, height, width, channels)
    size, pad = self.pool_size, self.pool_size // 2
    sums = jax.lax.reduce_window(image, 0.0, jax.lax.add, (1, size, size, 1), (1, 1, 1, 1),
                                 ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    # count_include_pad=False: divide by the number of in-grid cells of each window, a constant
    # of the grid (per axis: the window clipped to [0, side)).
    def counts(side: int) -> np.ndarray:
      i = np.arange(side)
      return np.minimum(i + pad, side - 1) - np.maximum(i - pad, 0) + 1
    count = np.outer(counts(height), counts(width)).astype(np.float32)[None, :, :, None]
    return ((sums / count) - image).reshape(batch, height * width, channels)


class WindowAttentionMixer(_ProjectedHeads):
  """"window": Swin's (shifted) window attention with relative position bias."""

  def __init__(self, d_model: int, *, window_size: int, shifted: bool, num_heads: int,
               dropout_rate: float, init: str, rngs: nnx.Rngs):
    if window_size < 1:
      raise ValueError(f"window_size must be >= 1, got {window_size}")
    super().__init__(d_model, num_heads=num_heads, dropout_rate=dropout_rate, init=init,
                     rngs=rngs)
    self.window_size = window_size
    self.shifted = shifted
    table_init = nnx.initializers.truncated_normal(stddev=0.02)
    self.relative_position_bias = nnx.Param(
        table_init(rngs.params(), ((2 * window_size - 1) ** 2, num_heads), jnp.float32),
        out_sharding=(None, None))

  def relative_bias(self, window: tuple[int, int]) -> jax.Array:
    """B[r(i, j)] for the tokens of one window of `window` = (M_h, M_w): [heads, T, T]."""
    m = self.window_size
    rows, cols = np.meshgrid(np.arange(window[0]), np.arange(window[1]), indexing="ij")
    coords = np.stack([rows.ravel(), cols.ravel()], axis=-1)  # [T, 2], row-major in the window
    relative = coords[:, None, :] - coords[None, :, :] + (m - 1)  # query minus key, >= 0
    index = relative[..., 0] * (2 * m - 1) + relative[..., 1]
    return jnp.transpose(self.relative_position_bias[...][index], (2, 0, 1))

  def layout(self, grid: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], int]:
    """(window (M_h, M_w), padded grid (H_p, W_p), shift) used on `grid`."""
    height, width = grid
    m = self.window_size
    window = (min(m, height), min(m, width))
    padded = (-(-height // window[0]) * window[0], -(-width // window[1]) * window[1])
    # Swin shifts only when the grid is larger than a window (else there is one window).
    shift = m // 2 if self.shifted and min(height, width) > m else 0
    return window, padded, shift

  def __call__(self, x: jax.Array, *, grid: tuple[int, int] | None = None,
               mask: jax.Array | None = None, train: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    height, width = _check_tokens("window", x, grid, needs_grid=True)
    _refuse_mask("window", mask)
    (wh, ww), (hp, wp), shift = self.layout((height, width))
    batch, _, channels = x.shape
    num_windows, window_tokens = (hp // wh) * (wp // ww), wh * ww

    # Static masks of the padded (and rolled) grid: which cells are real, and which region of
    # the unrolled grid each cell came from (Swin's 3 x 3 slices of the shifted grid).
    valid = np.zeros((hp, wp), bool)
    valid[:height, :width] = True
    region = np.zeros((hp, wp), np.int32)
    if shift:
      valid = np.roll(valid, (-shift, -shift), axis=(0, 1))
      label = 0
      for rows in (slice(0, hp - wh), slice(hp - wh, hp - shift), slice(hp - shift, hp)):
        for cols in (slice(0, wp - ww), slice(wp - ww, wp - shift), slice(wp - shift, wp)):
          region[rows, cols] = label
          label += 1

    def to_windows(a: Any) -> Any:  # [H_p, W_p, *rest] -> [nW, T, *rest], numpy or jax
      rest = a.shape[2:]
      a = a.reshape((hp // wh, wh, wp // ww, ww) + rest)
      order = (0, 2, 1, 3) + tuple(range(4, a.ndim))
      return a.transpose(order).reshape((num_windows, window_tokens) + rest)

    valid_w, region_w = to_windows(valid), to_windows(region)
    allowed = (region_w[:, :, None] == region_w[:, None, :]) & valid_w[:, None, :]  # [nW, T, T]

    def windows_of(h: jax.Array) -> jax.Array:  # [B, N, C] -> [B, nW, T, heads, d]
      h = h.reshape(batch, height, width, channels)
      h = jnp.pad(h, ((0, 0), (0, hp - height), (0, wp - width), (0, 0)))
      if shift:
        h = jnp.roll(h, (-shift, -shift), axis=(1, 2))
      h = jax.vmap(to_windows)(h)
      return self.split_heads(h)

    q, k, v = (windows_of(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
    out = _attend(q, k, v, bias=self.relative_bias((wh, ww)), allowed=allowed[None, :, None],
                  probs_dropout=self.probs_dropout(train, rngs))
    # Windows back to the padded grid, roll back, crop the padding.
    out = out.reshape(batch, hp // wh, wp // ww, wh, ww, channels).transpose(0, 1, 3, 2, 4, 5)
    out = out.reshape(batch, hp, wp, channels)
    if shift:
      out = jnp.roll(out, (shift, shift), axis=(1, 2))
    out = out[:, :height, :width].reshape(batch, height * width, channels)
    return self.out_proj(out)


class AgentAttentionMixer(_ProjectedHeads):
  """"agent": agent aggregation and broadcast through n pooled-query agents, plus DWC(V)."""

  def __init__(self, d_model: int, *, agent_num: int, num_heads: int, dropout_rate: float,
               init: str, rngs: nnx.Rngs):
    if agent_num < 1:
      raise ValueError(f"agent_num must be >= 1, got {agent_num}")
    super().__init__(d_model, num_heads=num_heads, dropout_rate=dropout_rate, init=init,
                     rngs=rngs)
    self.agent_num = agent_num
    table_init = nnx.initializers.truncated_normal(stddev=0.02)
    shape = (num_heads, agent_num, AGENT_BIAS_SIZE, AGENT_BIAS_SIZE)
    self.agent_bias = nnx.Param(table_init(rngs.params(), shape, jnp.float32),
                                out_sharding=(None,) * 4)  # B_1: agents attending to keys
    self.query_bias = nnx.Param(table_init(rngs.params(), shape, jnp.float32),
                                out_sharding=(None,) * 4)  # B_2: queries attending to agents
    self.dwc_kernel, self.dwc_bias = _depthwise_kernel(3, d_model, init=init, rngs=rngs)

  def position_bias(self, table: jax.Array, layout: tuple[int, int]) -> jax.Array:
    """A [heads, n, 7, 7] table resized to the token layout (H, W): [heads, n, H W]."""
    resized = jax.image.resize(table, table.shape[:2] + tuple(layout), method="bilinear",
                               antialias=False)
    return resized.reshape(table.shape[:2] + (-1,))

  def pool_members(self, grid: tuple[int, int] | None, num_tokens: int) -> np.ndarray:
    """[n, N] 0/1 membership of each token in each agent's pooling bin."""
    if grid is None:
      return adaptive_pool_bins(num_tokens, self.agent_num)
    side = math.isqrt(self.agent_num)
    if side * side != self.agent_num:
      raise ValueError(f"mixer 'agent' on a grid pools the queries to sqrt(n) x sqrt(n) agents: "
                       f"agent_num must be a perfect square, got {self.agent_num}")
    rows, cols = adaptive_pool_bins(grid[0], side), adaptive_pool_bins(grid[1], side)
    return np.einsum("ah,bw->abhw", rows, cols).reshape(self.agent_num, num_tokens)

  def __call__(self, x: jax.Array, *, grid: tuple[int, int] | None = None,
               mask: jax.Array | None = None, train: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    grid = _check_tokens("agent", x, grid, needs_grid=False)
    batch, num_tokens, channels = x.shape
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    weights = (jnp.ones((batch, num_tokens), x.dtype) if mask is None
               else mask.astype(x.dtype))
    # Agents: the mean of the (real) queries in each bin; a bin without real tokens gives 0.
    members = jnp.asarray(self.pool_members(grid, num_tokens))
    counts = jnp.einsum("an,bn->ba", members, weights)
    agents = (jnp.einsum("an,bnc->bac", members, q * weights[..., None])
              / jnp.maximum(counts, 1.0)[..., None])
    layout = grid if grid is not None else (1, num_tokens)
    bias_agents = self.position_bias(self.agent_bias[...], layout)  # [heads, n, N]
    bias_queries = self.position_bias(self.query_bias[...], layout).transpose(0, 2, 1)
    probs_dropout = self.probs_dropout(train, rngs)
    q, k, v, agents = (self.split_heads(h) for h in (q, k, v, agents))
    key_mask = None if mask is None else mask[:, None, None, :]
    agent_values = _attend(agents, k, v, bias=bias_agents, allowed=key_mask,
                           probs_dropout=probs_dropout)  # V_A [B, n, heads, d]
    out = _attend(q, agents, agent_values, bias=bias_queries, probs_dropout=probs_dropout)
    out = out.reshape(batch, num_tokens, channels)
    # DWC(V): padded values are zeroed first so that the convolution does not carry them.
    v = (v * weights[..., None, None]).reshape(batch, num_tokens, channels)
    # On a 1 x N layout the 3x3 kernel's middle row is a width-3 convolution along N.
    dwc = depthwise_conv2d(v.reshape(batch, *layout, channels), self.dwc_kernel[...],
                           self.dwc_bias[...]).reshape(batch, num_tokens, channels)
    return self.out_proj(out + dwc)


class BiLevelRoutingMixer(_ProjectedHeads):
  """"biformer": region routing (top-k regions per region) then token attention + LCE(V)."""

  def __init__(self, d_model: int, *, regions: int, topk: int, impl: str, num_heads: int,
               dropout_rate: float, init: str, rngs: nnx.Rngs):
    if regions < 1:
      raise ValueError(f"routing_regions must be >= 1, got {regions}")
    if topk < 1:
      raise ValueError(f"routing_topk must be >= 1, got {topk}")
    check_attention_impl(impl)
    super().__init__(d_model, num_heads=num_heads, dropout_rate=dropout_rate, init=init,
                     rngs=rngs)
    self.regions = regions
    # Routing to more regions than exist routes to all of them.
    self.topk = min(topk, regions * regions)
    self.impl = impl
    self.lce_kernel, self.lce_bias = _depthwise_kernel(LCE_KERNEL, d_model, init=init,
                                                       rngs=rngs)

  def __call__(self, x: jax.Array, *, grid: tuple[int, int] | None = None,
               mask: jax.Array | None = None, train: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    height, width = _check_tokens("biformer", x, grid, needs_grid=True)
    _refuse_mask("biformer", mask)
    s = self.regions
    if height % s or width % s:
      raise ValueError(f"mixer 'biformer' splits the grid into routing_regions x "
                       f"routing_regions = {s}x{s} regions: H and W must be multiples of {s}, "
                       f"got a {height}x{width} grid")
    batch, _, channels = x.shape
    rh, rw = height // s, width // s  # tokens per region side

    def to_regions(h: jax.Array) -> jax.Array:  # [B, N, C] -> [B, S^2, rh rw, C]
      h = h.reshape(batch, s, rh, s, rw, channels).transpose(0, 1, 3, 2, 4, 5)
      return h.reshape(batch, s * s, rh * rw, channels)

    q_proj, k_proj, v_proj = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q, k, v = to_regions(q_proj), to_regions(k_proj), to_regions(v_proj)
    # Region-level routing; the scale does not change the top-k but keeps A_r at attention size.
    affinity = jnp.einsum("brc,bsc->brs", q.mean(axis=2), k.mean(axis=2))
    _, routed = jax.lax.top_k(affinity / math.sqrt(self.head_dim), self.topk)  # [B, S^2, k]
    gather = jax.vmap(lambda tokens, index: tokens[index])  # per example: [S^2, T, C][S^2, k]
    k_routed = gather(k, routed).reshape(batch * s * s, self.topk * rh * rw, channels)
    v_routed = gather(v, routed).reshape(batch * s * s, self.topk * rh * rw, channels)
    q = q.reshape(batch * s * s, rh * rw, channels)
    q, k_routed, v_routed = (self.split_heads(h) for h in (q, k_routed, v_routed))
    probs_dropout = self.probs_dropout(train, rngs)
    # Probability dropout needs the probabilities, which only the reference path materializes.
    attended = dot_product_attention(
        q, k_routed, v_routed, impl="reference" if probs_dropout is not None else self.impl,
        probs_dropout=probs_dropout)
    attended = attended.reshape(batch, s, s, rh, rw, channels).transpose(0, 1, 3, 2, 4, 5)
    attended = attended.reshape(batch, height * width, channels)
    lce = depthwise_conv2d(v_proj.reshape(batch, height, width, channels), self.lce_kernel[...],
                           self.lce_bias[...]).reshape(batch, height * width, channels)
    return self.out_proj(attended + lce)


# --------------------------------------------------------------------------------------------
# The factory
# --------------------------------------------------------------------------------------------


def make_mixer(name: str, d_model: int, config: Any, *, layer_index: int,
               rngs: nnx.Rngs) -> nnx.Module:
  """The token mixer `name` (one of MIXERS) for width d_model, its keys read from `config`
  (the model's config section, an ml_collections.ConfigDict or a dict; keys and defaults in the
  module docstring). `layer_index` makes odd "window" layers use shifted windows."""
  if name not in MIXERS:
    raise ValueError(f"unknown mixer {name!r}; valid: {', '.join(MIXERS)}")
  get = config.get
  init = get("init", "torch")
  heads = dict(num_heads=int(get("num_heads", 4)),
               dropout_rate=float(get("attention_dropout", 0.0)), init=init, rngs=rngs)
  if name == "attention":
    return AttentionMixer(d_model, impl=get("attention_impl", "xla"), **heads)
  if name == "linear":
    return LinearAttentionMixer(d_model, **heads)
  if name == "mamba":
    return BidirectionalMambaMixer(
        d_model, d_state=int(get("d_state", 16)), d_conv=int(get("d_conv", 4)),
        expand=int(get("expand", 2)), init=init, scan_impl=get("scan_impl", "auto"), rngs=rngs)
  if name == "pooling":
    return PoolingMixer(pool_size=int(get("pool_size", 3)))
  if name == "window":
    return WindowAttentionMixer(d_model, window_size=int(get("window_size", 4)),
                                shifted=layer_index % 2 == 1, **heads)
  if name == "agent":
    return AgentAttentionMixer(d_model, agent_num=int(get("agent_num", 16)), **heads)
  return BiLevelRoutingMixer(d_model, regions=int(get("routing_regions", 2)),
                             topk=int(get("routing_topk", 2)),
                             impl=get("attention_impl", "xla"), **heads)
