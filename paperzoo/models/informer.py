"""Informer (Zhou et al., "Informer: Beyond Efficient Transformer for Long Sequence Time-Series
Forecasting", AAAI 2021).

ProbSparse self-attention (Sec. "Efficient Self-attention Mechanism", Eqs. 2-4, Lemma 1, Prop. 1),
per head, with q_i, k_j, v_j in R^d projected from the layer input (Linear maps with bias):

    s_ij    = q_i k_j^T / sqrt(d)
    M(q_i)  = max_{j in S_i} s_ij - mean_{j in S_i} s_ij      (max-mean sparsity measurement)
    S_i     = U_part = c * ceil(ln L_K) key indices drawn uniformly with replacement for query i
    Top     = the u = c * ceil(ln L_Q) queries with the largest M   (c = `factor`; u <= L_Q and
              U_part <= L_K; both at least 1)
    A(Q, K, V)_i = softmax_j(s_ij) v_j                        i in Top  ("active" queries)
                 = mean_j v_j        (encoder, unmasked)      i not in Top ("lazy" queries)
                 = sum_{j <= i} v_j  (masked decoder self-attention, cumsum as in the reference)

then Concat(heads) W_O. With u >= L_Q every query is active and ProbSparse attention is full
softmax attention (causal when masked). The scores and softmax of the active queries are f32;
no dropout acts inside ProbSparse attention (the reference code defines one, never applies it).
The key sample is shared over the batch and the heads (as the reference code draws it); M and
the top-u choice carry no gradient (they only pick indices), the gradient flows through the
active queries' softmax attention and the lazy queries' mean / cumsum of V.

  Masked (causal) self-attention: query i may attend to keys j <= i only, so S_i is drawn from
  {0, ..., i} (floor(U * (i + 1)), U ~ Uniform[0, 1)): M measures the distribution the query
  actually has after masking. The reference code draws S_i from all L_K keys, letting keys the
  query can never see decide whether it is active. Note that the top-u ranking itself is global
  over the sequence, so with u < L_Q a change to a later step can still demote an earlier
  query from active to lazy; the decoder is strictly causal only when u >= L_Q.

  Sampling randomness: in training each ProbSparse call draws its key from `rngs` (the
  trainer's per-step `dropout` stream, fold_in(seed key, step)), so a step's sample is a pure
  function of (seed, step). In evaluation (train=False, or when no rngs are given) every layer
  uses a fixed key, `fold_in(key(0), layer id)`: evaluation is deterministic and reproducible,
  and its sample has the same distribution as the training samples.

Self-attention distilling (Eq. 5), between consecutive encoder layers (`distil`):

    X_{j+1} = MaxPool(ELU(BatchNorm(Conv1d(X_j))))

Conv1d: kernel 3, stride 1, circular padding 1, d_model -> d_model with bias (a Linear over
[x_{t-1}, x_t, x_{t+1}]). BatchNorm over (batch, time) per channel, eps 1e-5; its running mean
and variance (momentum 0.1 in PyTorch's convention, i.e. r <- 0.9 r + 0.1 batch) are
`nnx.BatchStat`s, which the trainer keeps in the state's `extra` collection: a training
forward pass normalizes with the batch's statistics and updates them, evaluation normalizes
with them. MaxPool: kernel 3, stride 2, padding 1 (padding never wins the max), so

    L_out = floor((L + 2 - 3) / 2) + 1 = ceil(L / 2)       (96 -> 48, 97 -> 49).

(TSLib's `ConvLayer` pads the conv by 2, so its conv lengthens L to L + 2 and the pool gives
floor((L + 1) / 2) + 1, 96 -> 49; the original Informer code pads 1, which halves, as here.)

Encoder layer (the post-norm layer of `paperzoo.layers.transformer`, ProbSparse attention):

    x = LayerNorm(x + Dropout(ProbAttn(x)))
    x = LayerNorm(x + Dropout(W_2 Dropout(act(W_1 x))))      (kernel-1 convs with bias)

Encoder = layer, [distil, layer] * (encoder_layers - 1), LayerNorm.

Generative-style decoder (Sec. "Decoder: Generating Long Sequential Outputs Through One Forward
Procedure", Eq. 6): the input is the task's `dec_x`, X_de = Concat(X_token, X_0), the last
label_len steps of the encoder input followed by pred_len zeros (placeholders), with the time
features `dec_mark` of those label_len + pred_len steps; one forward pass, no dynamic decoding:

    x = LayerNorm(x + Dropout(MaskedProbAttn(x)))
    x = LayerNorm(x + Dropout(CrossAttn(x, encoder output)))  (full attention, dropout on probs)
    x = LayerNorm(x + Dropout(W_2 Dropout(act(W_1 x))))

Output = Linear(LayerNorm(x)), its last pred_len steps.

Embedding (the reference code's `DataEmbedding`, timeF): Dropout(TokenConv(x) + PE + Linear_nobias
(x_mark)): TokenConv is Autoformer's 3-tap circular Conv1d without bias (Kaiming-normal init),
PE the fixed sinusoidal table PE(t, 2i) = sin(t / 10000^(2i/d)), PE(t, 2i+1) = cos(...).

Departures from the reference code (TSLib `models/Informer.py`): M divides the sampled sum by the
number of samples (the code divides by L_K: the same ranking up to a per-query weighting of the
mean term); causal key sampling in masked attention (above); the distilling conv pads 1 (above);
cross-attention is full attention as in the paper and the original code (TSLib uses unmasked
ProbSparse there; `cross_attention="probsparse"` selects that); BatchNorm's running variance is
the biased batch variance (PyTorch stores the unbiased one; n = batch * length values).

Config keys (`config.model`):
  d_model         (int, required)        model width.
  d_ff            (int, required)        feed-forward hidden width.
  num_heads       (int, required)        attention heads (head_dim = d_model // num_heads).
  encoder_layers  (int, default 2)       encoder layers (TSLib's e_layers).
  decoder_layers  (int, default 1)       decoder layers (d_layers).
  factor          (int, default 5)       c in u = c ceil(ln L_Q) and U_part = c ceil(ln L_K).
  distil          (bool, default True)   distilling layers between encoder layers.
  cross_attention (str, default "full")  "full" | "probsparse" (TSLib's choice).
  dropout         (float, default 0.05)  embedding, residual-branch, FFN and cross-attention
                                         probability dropout.
  activation      (str, default "gelu")  "gelu" | "relu".
  init            (str, default "torch") "torch" (PyTorch defaults) | "lecun".

Names: q/k/v kernels ("embed", "heads"), output ("heads", "embed"); FFN ("embed", "mlp") and
("mlp", "embed"); token conv (None, "embed") over [3 * C, d_model]; time-feature embedding
(None, "embed"); distilling conv (None, "embed") over [3 * d_model, d_model]; BatchNorm and
LayerNorm scale/bias ("embed",); output projection ("embed", None).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from paperzoo.layers.attention import Dropout, MultiHeadAttention
from paperzoo.layers.embedding import DataEmbedding
from paperzoo.layers.initializers import check_init_scheme, dense
from paperzoo.layers.transformer import activation_fn, layer_norm
from paperzoo.registry import MODELS

CROSS_ATTENTIONS = ("full", "probsparse")
BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.9  # flax's convention: running <- 0.9 running + 0.1 batch (torch 0.1)
_MASKED = -0.7 * float(np.finfo(np.float32).max)  # as paperzoo.layers.attention: never NaN


def num_selected(length: int, factor: int) -> int:
  """c * ceil(ln L), clipped to [1, L]: u (active queries) or U_part (sampled keys)."""
  return max(1, min(length, int(factor) * int(math.ceil(math.log(length)))))


def sample_keys(key: jax.Array, query_len: int, key_len: int, num_samples: int, *,
                causal: bool) -> jax.Array:
  """S_i: [L_Q, U_part] key indices, uniform with replacement over {0..L_K-1}, or over {0..i}
  for query i when causal (needs L_Q == L_K)."""
  if not causal:
    return jax.random.randint(key, (query_len, num_samples), 0, key_len)
  if query_len != key_len:
    raise ValueError(f"masked ProbSparse attention is self-attention: L_Q={query_len} must "
                     f"equal L_K={key_len}")
  allowed = jnp.arange(1, query_len + 1, dtype=jnp.float32)[:, None]  # i + 1 keys for query i
  uniform = jax.random.uniform(key, (query_len, num_samples))
  return jnp.minimum(jnp.floor(uniform * allowed).astype(jnp.int32),
                     jnp.arange(query_len)[:, None])


def sparsity_measure(q: jax.Array, k: jax.Array, samples: jax.Array) -> jax.Array:
  """M(q_i) = max_{j in S_i} s_ij - mean_{j in S_i} s_ij, q [B, Lq, H, D], k [B, Lk, H, D],
  samples [Lq, U] -> [B, H, Lq]. Only U dot products per query (the paper's O(L ln L))."""
  k_sampled = k[:, samples]  # [B, Lq, U, H, D]
  scores = jnp.einsum("bqhd,bquhd->bhqu", q, k_sampled,
                      preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  return jnp.max(scores, axis=-1) - jnp.mean(scores, axis=-1)


def prob_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, samples: jax.Array,
                          num_active: int, causal: bool) -> jax.Array:
  """ProbSparse attention (equations in the module docstring), [B, L, H, D] in and out.

  samples: the [L_Q, U_part] key sample S; num_active: u, the number of active queries.
  """
  batch, query_len, heads, head_dim = q.shape
  if causal and k.shape[1] != query_len:
    raise ValueError(f"masked ProbSparse attention needs L_Q == L_K, got {query_len} and "
                     f"{k.shape[1]}")
  measure = sparsity_measure(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), samples)
  _, top = jax.lax.top_k(measure, num_active)  # [B, H, u] indices of the active queries

  qh = jnp.swapaxes(q, 1, 2)  # [B, H, Lq, D]
  q_active = jnp.take_along_axis(qh, top[..., None], axis=2)  # [B, H, u, D]
  logits = jnp.einsum("bhud,bkhd->bhuk", q_active, k,
                      preferred_element_type=jnp.float32) / math.sqrt(head_dim)
  if causal:
    logits = jnp.where(jnp.arange(k.shape[1]) <= top[..., None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1)
  active = jnp.einsum("bhuk,bkhd->bhud", probs.astype(v.dtype), v)  # [B, H, u, D]

  vh = jnp.swapaxes(v, 1, 2)  # [B, H, Lk, D]
  if causal:
    lazy = jnp.cumsum(vh, axis=2)
  else:
    lazy = jnp.broadcast_to(jnp.mean(vh, axis=2, keepdims=True), (batch, heads, query_len,
                                                                  head_dim))
  context = lazy.at[jnp.arange(batch)[:, None, None], jnp.arange(heads)[None, :, None],
                    top].set(active.astype(lazy.dtype))
  return jnp.swapaxes(context, 1, 2)


class ProbSparseAttention(nnx.Module):
  """Multi-head ProbSparse attention: q/k/v projections, `prob_sparse_attention`, output map.

  `layer_id` salts the fixed evaluation key, so layers do not share one evaluation sample.
  """

  def __init__(self, d_model: int, num_heads: int, *, factor: int, causal: bool, layer_id: int,
               init: str, rngs: nnx.Rngs):
    if d_model % num_heads:
      raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.factor = int(factor)
    self.causal = causal
    self.layer_id = int(layer_id)
    self.query = dense(d_model, d_model, names=("embed", "heads"), init=init, rngs=rngs)
    self.key = dense(d_model, d_model, names=("embed", "heads"), init=init, rngs=rngs)
    self.value = dense(d_model, d_model, names=("embed", "heads"), init=init, rngs=rngs)
    self.out = dense(d_model, d_model, names=("heads", "embed"), init=init, rngs=rngs)

  def _split(self, x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[:2] + (self.num_heads, -1))

  def sample_key(self, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """The key of S: from the call's dropout stream in training, fixed otherwise."""
    if train and rngs is not None:
      return rngs.dropout()
    return jax.random.fold_in(jax.random.key(0), self.layer_id)

  def __call__(self, x: jax.Array, context: jax.Array, *, train: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """x [B, L_Q, d] attends to context [B, L_K, d] -> [B, L_Q, d]."""
    batch, query_len, _ = x.shape
    key_len = context.shape[1]
    q = self._split(self.query(x))
    k = self._split(self.key(context))
    v = self._split(self.value(context))
    samples = sample_keys(self.sample_key(train=train, rngs=rngs), query_len, key_len,
                          num_selected(key_len, self.factor), causal=self.causal)
    attended = prob_sparse_attention(q, k, v, samples=samples,
                                     num_active=num_selected(query_len, self.factor),
                                     causal=self.causal)
    return self.out(attended.reshape(batch, query_len, -1))


def max_pool_halve(x: jax.Array) -> jax.Array:
  """MaxPool1d(kernel 3, stride 2, padding 1) over time of x [B, L, C] -> [B, ceil(L/2), C]."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window_dimensions=(1, 3, 1),
                               window_strides=(1, 2, 1), padding=((0, 0), (1, 1), (0, 0)))


class DistillingLayer(nnx.Module):
  """Eq. 5: MaxPool(ELU(BatchNorm(Conv1d_circular_k3(x)))), [B, L, d] -> [B, ceil(L/2), d]."""

  def __init__(self, d_model: int, *, init: str, rngs: nnx.Rngs):
    # torch's Conv1d default init is its Linear's with fan_in = 3 * d_model: `dense` gives that.
    self.conv = dense(3 * d_model, d_model, names=(None, "embed"), init=init, rngs=rngs)
    self.norm = nnx.BatchNorm(
        d_model, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPS, use_fast_variance=False,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
        rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    taps = jnp.concatenate([jnp.roll(x, 1, axis=1), x, jnp.roll(x, -1, axis=1)], axis=-1)
    h = self.norm(self.conv(taps), use_running_average=not train)
    return max_pool_halve(jax.nn.elu(h))


class FeedForward(nnx.Module):
  """Dropout(W_2 Dropout(act(W_1 x))), the kernel-1 convs (with bias) of the reference layers."""

  def __init__(self, d_model: int, d_ff: int, *, activation: str, init: str, rngs: nnx.Rngs):
    activation_fn(activation)  # fail at construction on an unknown name
    self.activation = activation
    self.ff_in = dense(d_model, d_ff, names=("embed", "mlp"), init=init, rngs=rngs)
    self.ff_out = dense(d_ff, d_model, names=("mlp", "embed"), init=init, rngs=rngs)

  def __call__(self, x: jax.Array, dropout: Dropout, *, train: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    y = dropout(activation_fn(self.activation)(self.ff_in(x)), deterministic=not train,
                rngs=rngs)
    return dropout(self.ff_out(y), deterministic=not train, rngs=rngs)


class EncoderLayer(nnx.Module):
  """Post-norm encoder layer with ProbSparse self-attention."""

  def __init__(self, d_model: int, d_ff: int, num_heads: int, *, factor: int, layer_id: int,
               dropout: float, activation: str, init: str, rngs: nnx.Rngs):
    self.attention = ProbSparseAttention(d_model, num_heads, factor=factor, causal=False,
                                         layer_id=layer_id, init=init, rngs=rngs)
    self.norm1 = layer_norm(d_model, rngs=rngs)
    self.feed_forward = FeedForward(d_model, d_ff, activation=activation, init=init, rngs=rngs)
    self.norm2 = layer_norm(d_model, rngs=rngs)
    self.dropout = Dropout(dropout)

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    attended = self.attention(x, x, train=train, rngs=rngs)
    x = self.norm1(x + self.dropout(attended, deterministic=not train, rngs=rngs))
    return self.norm2(x + self.feed_forward(x, self.dropout, train=train, rngs=rngs))


class DecoderLayer(nnx.Module):
  """Masked ProbSparse self-attention, cross-attention to the encoder, FFN; post-norm."""

  def __init__(self, d_model: int, d_ff: int, num_heads: int, *, factor: int, layer_id: int,
               cross_attention: str, dropout: float, activation: str, init: str,
               rngs: nnx.Rngs):
    self.self_attention = ProbSparseAttention(d_model, num_heads, factor=factor, causal=True,
                                              layer_id=layer_id, init=init, rngs=rngs)
    if cross_attention == "full":
      self.cross_attention = MultiHeadAttention(d_model, num_heads, dropout_rate=dropout,
                                                init=init, rngs=rngs)
    else:
      self.cross_attention = ProbSparseAttention(d_model, num_heads, factor=factor,
                                                 causal=False, layer_id=layer_id + 1,
                                                 init=init, rngs=rngs)
    self.norm1 = layer_norm(d_model, rngs=rngs)
    self.norm2 = layer_norm(d_model, rngs=rngs)
    self.feed_forward = FeedForward(d_model, d_ff, activation=activation, init=init, rngs=rngs)
    self.norm3 = layer_norm(d_model, rngs=rngs)
    self.dropout = Dropout(dropout)

  def __call__(self, x: jax.Array, encoded: jax.Array, *, train: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    deterministic = not train
    attended = self.self_attention(x, x, train=train, rngs=rngs)
    x = self.norm1(x + self.dropout(attended, deterministic=deterministic, rngs=rngs))
    attended = self.cross_attention(x, encoded, train=train, rngs=rngs)
    x = self.norm2(x + self.dropout(attended, deterministic=deterministic, rngs=rngs))
    return self.norm3(x + self.feed_forward(x, self.dropout, train=train, rngs=rngs))


@MODELS.register("informer")
class Informer(nnx.Module):
  """ProbSparse encoder-decoder forecaster (equations and config keys in the module docstring)."""

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
    dropout = float(config.get("dropout", 0.05))
    activation = config.get("activation", "gelu")
    init = config.get("init", "torch")
    check_init_scheme(init)
    factor = int(config.get("factor", 5))
    if factor < 1:
      raise ValueError(f"factor must be >= 1, got {factor}")
    cross_attention = config.get("cross_attention", "full")
    if cross_attention not in CROSS_ATTENTIONS:
      raise ValueError(f"unknown cross_attention {cross_attention!r}; valid: "
                       f"{', '.join(CROSS_ATTENTIONS)}")
    num_encoder_layers = int(config.get("encoder_layers", 2))
    num_decoder_layers = int(config.get("decoder_layers", 1))
    self.pred_len = pred_len
    layer_kwargs = dict(factor=factor, dropout=dropout, activation=activation, init=init,
                        rngs=rngs)
    self.encoder_embedding = DataEmbedding(num_variates, num_time_features, d_model,
                                           dropout=dropout, init=init, rngs=rngs)
    self.decoder_embedding = DataEmbedding(num_variates, num_time_features, d_model,
                                           dropout=dropout, init=init, rngs=rngs)
    # layer_id only salts the fixed evaluation key of each ProbSparse attention.
    self.encoder_layers = nnx.List([
        EncoderLayer(d_model, d_ff, num_heads, layer_id=i, **layer_kwargs)
        for i in range(num_encoder_layers)])
    self.distilling_layers = nnx.List([
        DistillingLayer(d_model, init=init, rngs=rngs)
        for _ in range(num_encoder_layers - 1 if config.get("distil", True) else 0)])
    self.encoder_norm = layer_norm(d_model, rngs=rngs)
    self.decoder_layers = nnx.List([
        DecoderLayer(d_model, d_ff, num_heads, layer_id=1000 + 2 * i,
                     cross_attention=cross_attention, **layer_kwargs)
        for i in range(num_decoder_layers)])
    self.decoder_norm = layer_norm(d_model, rngs=rngs)
    self.projection = dense(d_model, num_variates, names=("embed", None), init=init, rngs=rngs)

  def encode(self, x: jax.Array, x_mark: jax.Array | None, *, train: bool,
             rngs: nnx.Rngs | None = None) -> jax.Array:
    """Encoder output [B, L', d_model], L' = L halved (ceil) once per distilling layer."""
    h = self.encoder_embedding(x, x_mark, train=train, rngs=rngs)
    for i, layer in enumerate(self.encoder_layers):
      h = layer(h, train=train, rngs=rngs)
      if i < len(self.distilling_layers):
        h = self.distilling_layers[i](h, train=train)
    return self.encoder_norm(h)

  def __call__(self, batch: dict, *, train: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
    encoded = self.encode(batch["x"], batch.get("x_mark"), train=train, rngs=rngs)
    # The generative decoder's input as the task gives it: the last label_len known steps, then
    # pred_len zero placeholders, with the time features of all those steps.
    h = self.decoder_embedding(batch["dec_x"], batch.get("dec_mark"), train=train, rngs=rngs)
    for layer in self.decoder_layers:
      h = layer(h, encoded, train=train, rngs=rngs)
    output = self.projection(self.decoder_norm(h))
    return output[:, -self.pred_len:]
