"""The vanilla Transformer (Vaswani et al., "Attention Is All You Need", NeurIPS 2017) as the
long-term forecasting baseline of Time-Series-Library (TSLib's `models/Transformer.py`).

An encoder-decoder over time-step tokens (each token mixes all C variates of one time step):

  Embedding (TSLib's `DataEmbedding`), for a series s [T, C] with time features m [T, F]:
      E(s, m) = Dropout(TokenConv(s) + PE + Linear_nobias(m))
    TokenConv: a kernel-3 circular Conv1d C -> d_model without bias (Kaiming-normal leaky-relu
    init when init = "torch"), i.e. one linear map of [s_{t-1}, s_t, s_{t+1}] with circular
    indices (`paperzoo.layers.embedding.CircularConv3`); PE: the fixed sinusoidal encoding
    (Sec. 3.5, `paperzoo.layers.transformer.sinusoidal_positions`); Linear_nobias(m): TSLib's
    "timeF" time-feature embedding.
  Encoder (Sec. 3.1), over the lookback x [L, C]:
      m_enc = Encoder(E(x, x_mark))          `encoder_layers` post-norm layers of full
                                             self-attention + FFN, then LayerNorm
  Decoder input (TSLib's `exp_long_term_forecasting`): the last label_len known steps followed by
  pred_len zeros, dec_x = [x[L - label_len:], 0_{pred_len}]  (batch["dec_x"], with the time
  features of those steps batch["dec_mark"]; label_len = dec_x length - pred_len):
      h = Decoder(E(dec_x, dec_mark), m_enc)  `decoder_layers` post-norm layers of causal
                                             self-attention, cross-attention to m_enc and FFN,
                                             then LayerNorm (`paperzoo.layers.transformer`)
  Output: y = (h W_out + b_out)[label_len:], W_out: d_model -> C (one-shot, no autoregression).

Attention: full softmax attention with scale 1/sqrt(head_dim) and dropout on the attention
probabilities (TSLib's `FullAttention`); the decoder's self-attention is causal (TSLib's
`TriangularCausalMask`: position i attends to j <= i), its cross-attention is unmasked. The
decoder layers are therefore causal in their inputs; the model as a whole is not quite, because
the circular kernel-3 TokenConv of the decoder embedding lets the input at step t reach the tokens
at t - 1 and t + 1 (and wraps around at the ends), as in TSLib. Since the future part of dec_x is
all zeros this leaks nothing.

No instance normalization (TSLib's Transformer has none): the data set's training-split
StandardScaler is the only normalization, which is why this baseline suffers from the
distribution shift between ETT's training and test periods.

Config keys (`config.model`):
  d_model        (int, required)        token width.
  d_ff           (int, required)        feed-forward hidden width.
  num_heads      (int, required)        attention heads (head_dim = d_model // num_heads).
  encoder_layers (int, default 2)       encoder layers (TSLib's e_layers).
  decoder_layers (int, default 1)       decoder layers (d_layers).
  dropout        (float, default 0.1)   embedding, residual-branch, FFN and attention-probability
                                        dropout.
  activation     (str, default "gelu")  "gelu" (exact erf) | "relu".
  init           (str, default "torch") "torch" (PyTorch defaults) | "lecun".
  attention_impl (str, default "xla")   "xla" | "cudnn" | "reference" (the flash paths take no
                                        mask); training with dropout > 0 uses "reference".

Names: token conv (None, "embed") over [3 C, d_model]; time-feature embedding (None, "embed");
output projection ("embed", None); the encoder's and decoder's in `paperzoo.layers.transformer`.
"""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from paperzoo.layers.initializers import check_init_scheme, dense
from paperzoo.layers.embedding import DataEmbedding
from paperzoo.layers.transformer import Decoder, Encoder, causal_mask
from paperzoo.registry import MODELS


@MODELS.register("transformer")
class Transformer(nnx.Module):
  """Vanilla encoder-decoder Transformer forecaster (equations, config keys in the docstring)."""

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
    del seq_len  # every layer works at whatever length it is given
    d_model, d_ff = int(config.d_model), int(config.d_ff)
    num_heads = int(config.num_heads)
    dropout = float(config.get("dropout", 0.1))
    init = config.get("init", "torch")
    check_init_scheme(init)
    self.pred_len = pred_len
    layer_kwargs = dict(dropout_rate=dropout, activation=config.get("activation", "gelu"),
                        attention_impl=config.get("attention_impl", "xla"), init=init,
                        rngs=rngs)
    self.encoder_embedding = DataEmbedding(num_variates, num_time_features, d_model,
                                           dropout=dropout, init=init, rngs=rngs)
    self.decoder_embedding = DataEmbedding(num_variates, num_time_features, d_model,
                                           dropout=dropout, init=init, rngs=rngs)
    self.encoder = Encoder(int(config.get("encoder_layers", 2)), d_model, num_heads, d_ff,
                           **layer_kwargs)
    self.decoder = Decoder(int(config.get("decoder_layers", 1)), d_model, num_heads, d_ff,
                           **layer_kwargs)
    self.projection = dense(d_model, num_variates, names=("embed", None), init=init, rngs=rngs)

  def __call__(self, batch: dict, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    encoded = self.encoder_embedding(batch["x"], batch.get("x_mark"), train=train, rngs=rngs)
    encoded = self.encoder(encoded, train=train, rngs=rngs)  # [B, L, d_model]
    dec_x = batch["dec_x"]  # [B, label_len + pred_len, C]: known steps, then zeros
    h = self.decoder_embedding(dec_x, batch.get("dec_mark"), train=train, rngs=rngs)
    h = self.decoder(h, encoded, self_mask=causal_mask(dec_x.shape[1]), train=train, rngs=rngs)
    return self.projection(h[:, -self.pred_len:])  # [B, pred_len, C]
