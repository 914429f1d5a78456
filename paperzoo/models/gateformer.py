"""Gateformer (Lan & Oermann, "Gateformer: Advancing Multivariate Time Series Forecasting through
Temporal and Variate-Wise Attention with Gated Representations", 2025, arXiv 2505.00307).

Two stages: each variate is first embedded on its own into one token that summarizes its
cross-time dynamics; attention over these variate tokens (iTransformer's inverted layout) then
models the cross-variate dependencies. A gate regulates the information flow in each stage.

For an input X in R^{L x N} (lookback L, N variates), per variate series x^(i) in R^L:

  Instance normalization (RevIN without affine, `paperzoo.layers.normalization`):
      x' = (x - mean_t x) / sqrt(var_t x + 1e-5),   undone on the forecast at the end.

  Stage 1, variate-wise embedding, two parallel pathways:
    Global temporal embedding (the whole series at once, as iTransformer embeds it):
      g   = Dropout(x' W_g + b_g)                           W_g in R^{L x D}
    Temporal dependency embedding (patching and temporal-wise attention within the variate):
      x_p = Patches(x') in R^{M x P}, x_p[m] = x'_pad[m S : m S + P],   M = floor((L - P)/S) + 2
            (x'_pad: the series followed by S copies of its last value, `patchtst.make_patches`)
      z   = Encoder_T(Dropout(x_p W_P + PE))                W_P in R^{P x D} (no bias),
                                                            PE the fixed sinusoidal encoding
      t   = Dropout(Flatten(z) W_h + b_h)                   Flatten: [D, M] -> D M (D-major),
                                                            W_h in R^{D M x D}
    Gated fusion into the variate embedding:
      G_1 = sigmoid(g W_1 + b_1 + t W_2 + b_2)
      v   = G_1 * g + (1 - G_1) * t                         (elementwise)

  Stage 2, cross-variate dependencies over the N tokens V = [v^(1); ...; v^(N)] in R^{N x D}:
      C   = Encoder_V(V)                                    variate-wise attention
      G_2 = sigmoid(V W_3 + b_3 + C W_4 + b_4)
      H   = G_2 * V + (1 - G_2) * C                         (the gated copy of the
                                                            non-interacting embeddings)
  Output: Y^(i) = H^(i) W_o + b_o in R^{pred_len}, de-normalized.

Encoder_T and Encoder_V are `paperzoo.layers.transformer.Encoder`s with `num_layers` layers each
(TSLib's e_layers), pre-norm (`norm_first=True`: x + Dropout(MHA(LN x)), then x + FFN(LN x)) and
without a final LayerNorm; Encoder_T's weights are shared by all variates (the variates are folded
into the batch), so stage 1 never mixes variates. Without positional information in stage 2,
permuting the variates permutes the forecast.

Choices where the abstract leaves the details open (a summary of the method section, the authors'
README, and their released model and scripts were consulted for the architecture; this module is
written from the equations above, not translated from their code):
  * Gates: the convex mix G * a + (1 - G) * b with G = sigmoid(W a + W' b) computed from both
    inputs, in both stages (the paper's "gating operation" between the two pathways, and between
    a copy of the variate embeddings and the variate-interacting embeddings). Both linear maps
    carry a bias, as two PyTorch `nn.Linear`s would. G -> 1 selects the first input (the global
    embedding, resp. the non-interacting copy), G -> 0 the second.
  * Encoder layers: pre-norm without a final LayerNorm, ReLU feed-forward (PyTorch's
    `nn.TransformerEncoderLayer(norm_first=True)` defaults), attention-probability dropout as in
    every paperzoo attention. `norm_first` and `activation` are config keys.
  * Patching: patch length 8 and stride 8 (non-overlapping), with the end padding of PatchTST /
    TSLib's `PatchEmbedding` (one extra patch: M = 13 at L = 96); patch tokens get the fixed
    sinusoidal positional encoding and no bias in W_P. The global pathway is one linear map (the
    README calls it an MLP; the released model uses a single linear layer).
  * Dropout `dropout` after both embeddings, inside the encoders, and on the flatten head's
    output. The time features (`x_mark`) are not used (no time-feature tokens, unlike
    iTransformer), nor is the decoder input.
  * Hyper-parameters (experiments/configs/gateformer.py) are the authors' released scripts',
    not iTransformer's: d_model = d_ff = 64, 4 heads, batch 8.

Config keys (`config.model`):
  d_model        (int, required)        token width D (both stages).
  d_ff           (int, required)        feed-forward hidden width.
  num_heads      (int, required)        attention heads (head_dim = d_model // num_heads).
  num_layers     (int, required)        layers of each encoder (Encoder_T and Encoder_V).
  patch_len      (int, default 8)       patch length P.
  stride         (int, default 8)       stride S between patch starts (also the end padding).
  dropout        (float, default 0.1)   see above.
  activation     (str, default "relu")  "relu" | "gelu" (exact erf).
  norm_first     (bool, default True)   pre-norm encoder layers (False: post-norm + final norm).
  use_norm       (bool, default True)   instance normalization.
  init           (str, default "torch") "torch" (PyTorch defaults) | "lecun".
  attention_impl (str, default "xla")   "xla" | "cudnn" | "reference" | "flash".

Names: global embedding kernel ("time", "embed"); patch embedding ("time", "embed"); flatten head
(None, "embed") over [D M, D]; gate kernels ("embed", None); output projection ("embed", "time");
the encoders' in `paperzoo.layers.transformer`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from paperzoo.layers.attention import Dropout
from paperzoo.layers.initializers import check_init_scheme, dense
from paperzoo.layers.normalization import denormalize_series, normalize_series
from paperzoo.layers.transformer import Encoder, sinusoidal_positions
from paperzoo.models.patchtst import make_patches, num_patches
from paperzoo.registry import MODELS


class Gate(nnx.Module):
  """G * a + (1 - G) * b with G = sigmoid(a W_a + b_a + b W_b + b_b), elementwise over d_model."""

  def __init__(self, d_model: int, *, init: str, rngs: nnx.Rngs):
    self.first = dense(d_model, d_model, names=("embed", None), init=init, rngs=rngs)
    self.second = dense(d_model, d_model, names=("embed", None), init=init, rngs=rngs)

  def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
    gate = jax.nn.sigmoid(self.first(a) + self.second(b))
    return gate * a + (1.0 - gate) * b


@MODELS.register("gateformer")
class Gateformer(nnx.Module):
  """Gated temporal + variate-wise attention forecaster (equations, choices and config keys in
  the module docstring)."""

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
    del num_variates, num_time_features  # shared weights across variates; no time features
    d_model = int(config.d_model)
    dropout = float(config.get("dropout", 0.1))
    init = config.get("init", "torch")
    check_init_scheme(init)
    self.d_model = d_model
    self.use_norm = bool(config.get("use_norm", True))
    self.patch_len = int(config.get("patch_len", 8))
    self.stride = int(config.get("stride", 8))
    self.num_patches = num_patches(seq_len, self.patch_len, self.stride)
    norm_first = bool(config.get("norm_first", True))
    encoder_kwargs = dict(
        dropout_rate=dropout, activation=config.get("activation", "relu"),
        attention_impl=config.get("attention_impl", "xla"), init=init, norm_first=norm_first,
        final_norm=not norm_first, rngs=rngs)
    num_layers, num_heads, d_ff = int(config.num_layers), int(config.num_heads), int(config.d_ff)
    # Stage 1: the two pathways of the variate-wise embedding and their gate.
    self.global_embedding = dense(seq_len, d_model, names=("time", "embed"), init=init,
                                  rngs=rngs)
    self.patch_embedding = dense(self.patch_len, d_model, names=("time", "embed"), init=init,
                                 use_bias=False, rngs=rngs)
    self.temporal_encoder = Encoder(num_layers, d_model, num_heads, d_ff, **encoder_kwargs)
    self.head = dense(d_model * self.num_patches, d_model, names=(None, "embed"), init=init,
                      rngs=rngs)
    self.embedding_gate = Gate(d_model, init=init, rngs=rngs)
    # Stage 2: variate-wise attention and the gate with the non-interacting copy.
    self.variate_encoder = Encoder(num_layers, d_model, num_heads, d_ff, **encoder_kwargs)
    self.variate_gate = Gate(d_model, init=init, rngs=rngs)
    self.projection = dense(d_model, pred_len, names=("embed", "time"), init=init, rngs=rngs)
    # One stateless dropout for the embeddings and the head.
    self.dropout = Dropout(dropout)

  def temporal_dependency_embedding(self, series: jax.Array, *, train: bool,
                                    rngs: nnx.Rngs | None) -> jax.Array:
    """t: series [B, N, L] -> [B, N, d_model], each variate on its own (patches + attention)."""
    batch_size, num_variates, _ = series.shape
    patches = make_patches(series, self.patch_len, self.stride)  # [B, N, M, P]
    tokens = self.patch_embedding(patches) + sinusoidal_positions(self.num_patches,
                                                                  self.d_model)
    tokens = self.dropout(tokens.reshape(batch_size * num_variates, self.num_patches, -1),
                          deterministic=not train, rngs=rngs)
    z = self.temporal_encoder(tokens, train=train, rngs=rngs)  # [B N, M, D]
    flat = jnp.swapaxes(z, 1, 2).reshape(batch_size, num_variates, -1)  # D-major [D, M] -> D M
    return self.dropout(self.head(flat), deterministic=not train, rngs=rngs)

  def __call__(self, batch: dict, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = batch["x"]  # [B, L, N]
    if self.use_norm:
      x, stats = normalize_series(x)
    series = jnp.swapaxes(x, 1, 2)  # [B, N, L]: one row per variate
    g = self.dropout(self.global_embedding(series), deterministic=not train, rngs=rngs)
    t = self.temporal_dependency_embedding(series, train=train, rngs=rngs)
    v = self.embedding_gate(g, t)  # [B, N, D] variate embeddings
    c = self.variate_encoder(v, train=train, rngs=rngs)  # variate-interacting embeddings
    h = self.variate_gate(v, c)
    y = jnp.swapaxes(self.projection(h), 1, 2)  # [B, pred_len, N]
    if self.use_norm:
      y = denormalize_series(y, stats)
    return y
