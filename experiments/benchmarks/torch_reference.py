"""A PyTorch baseline for the speed benchmark, timed in the same run as paperzoo.

Our own PyTorch implementation of the iTransformer and DLinear training steps with the same
operations and sizes as the papers' reference code (Time-Series-Library): PyTorch-default Linear
layers, post-norm encoder layers with dropout on the attention probabilities, exact GELU,
LayerNorm eps 1e-5, instance normalization, the projection applied to every token before the
time-feature tokens are dropped, Adam, MSE. The reference computes the encoder's feed-forward
with `nn.Conv1d(kernel_size=1)` over transposed activations (layers/Transformer_EncDec.py);
`ffn="conv1d"` does the same, `ffn="linear"` uses `nn.Linear`, which computes the same function
faster in PyTorch, so the benchmark reports against both. Also the character language model
(`decoder_lm` with attention, as nanoGPT writes it) for `lm_speed.py`. Used only by the
benchmarks and only when torch is installed; torch is not a paperzoo dependency.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

# The models with a PyTorch baseline here.
MODELS = ("itransformer", "dlinear")


def _build(name: str, config: Any, *, num_variates: int, num_time_features: int, ffn: str):
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  seq_len, pred_len = config.data.seq_len, config.data.pred_len

  class EncoderLayer(nn.Module):

    def __init__(self, d, heads, d_ff, p):
      super().__init__()
      self.heads = heads
      self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
      if ffn == "conv1d":
        self.ff_in, self.ff_out = nn.Conv1d(d, d_ff, 1), nn.Conv1d(d_ff, d, 1)
      else:
        self.ff_in, self.ff_out = nn.Linear(d, d_ff), nn.Linear(d_ff, d)
      self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
      self.dropout = nn.Dropout(p)

    def forward(self, x):
      b, s, _ = x.shape
      q, k, v = (f(x).view(b, s, self.heads, -1) for f in (self.q, self.k, self.v))
      scores = torch.einsum("blhe,bshe->bhls", q, k) / math.sqrt(q.shape[-1])
      attended = torch.einsum("bhls,bshd->blhd", self.dropout(torch.softmax(scores, -1)), v)
      x = self.norm1(x + self.dropout(self.o(attended.reshape(b, s, -1))))
      if ffn == "conv1d":  # channels first, as Conv1d wants
        y = self.dropout(F.gelu(self.ff_in(x.transpose(-1, 1))))
        return self.norm2(x + self.dropout(self.ff_out(y).transpose(-1, 1)))
      y = self.dropout(F.gelu(self.ff_in(x)))
      return self.norm2(x + self.dropout(self.ff_out(y)))

  class ITransformer(nn.Module):

    def __init__(self, m):
      super().__init__()
      self.embedding = nn.Linear(seq_len, m.d_model)
      self.dropout = nn.Dropout(m.dropout)
      self.layers = nn.ModuleList(EncoderLayer(m.d_model, m.num_heads, m.d_ff, m.dropout)
                                  for _ in range(m.num_layers))
      self.norm = nn.LayerNorm(m.d_model)
      self.projection = nn.Linear(m.d_model, pred_len)

    def forward(self, x, x_mark):
      mean = x.mean(1, keepdim=True).detach()
      x = x - mean
      std = torch.sqrt(torch.var(x, dim=1, keepdim=True, unbiased=False) + 1e-5)
      x = x / std
      h = self.dropout(self.embedding(torch.cat([x.permute(0, 2, 1),
                                                 x_mark.permute(0, 2, 1)], 1)))
      for layer in self.layers:
        h = layer(h)
      y = self.projection(self.norm(h)).permute(0, 2, 1)[:, :, :num_variates]
      return y * std + mean

  class DLinear(nn.Module):

    def __init__(self, m):
      super().__init__()
      self.kernel = m.moving_avg
      self.seasonal, self.trend = nn.Linear(seq_len, pred_len), nn.Linear(seq_len, pred_len)
      for layer in (self.seasonal, self.trend):
        layer.weight = nn.Parameter(torch.full((pred_len, seq_len), 1.0 / seq_len))

    def forward(self, x, x_mark):
      del x_mark
      pad = (self.kernel - 1) // 2
      padded = torch.cat([x[:, :1].repeat(1, pad, 1), x, x[:, -1:].repeat(1, pad, 1)], 1)
      trend = F.avg_pool1d(padded.permute(0, 2, 1), self.kernel, stride=1)
      seasonal = x.permute(0, 2, 1) - trend
      return (self.seasonal(seasonal) + self.trend(trend)).permute(0, 2, 1)

  torch.manual_seed(config.seed)
  model = {"itransformer": ITransformer, "dlinear": DLinear}[name](config.model)  # = MODELS
  return model, torch.optim.Adam(model.parameters(), lr=config.optimizer.learning_rate)


def epoch_seconds(name: str, config: Any, task: Any, order: Any, *, ffn: str = "conv1d"
                  ) -> dict[str, float]:
  """Seconds for one training epoch and for one pass over validation and test, in PyTorch."""
  import torch  # pylint: disable=g-import-not-at-top

  train = task.splits["train"]
  model, optimizer = _build(name, config, num_variates=task.data.num_variates,
                            num_time_features=task.data.num_time_features, ffn=ffn)
  loss_fn = torch.nn.MSELoss()

  def tensors(batch):
    return (torch.from_numpy(batch["x"]), torch.from_numpy(batch["x_mark"]),
            torch.from_numpy(batch["y"]))

  model.train()
  start = time.perf_counter()
  for step in range(order.steps_per_epoch):
    x, x_mark, y = tensors(train.get_batch(order.indices(step)))
    optimizer.zero_grad()
    loss = loss_fn(model(x, x_mark), y)
    loss.backward()
    optimizer.step()
  train_seconds = time.perf_counter() - start

  model.eval()
  start = time.perf_counter()
  with torch.no_grad():
    for split in ("val", "test"):
      dataset = task.splits[split]
      for first in range(0, len(dataset), config.train.batch_size):
        x, x_mark, _ = tensors(dataset.get_batch(
            np.arange(first, min(first + config.train.batch_size, len(dataset)))))
        model(x, x_mark)
  return {"train_epoch": train_seconds, "val_and_test": time.perf_counter() - start,
          "threads": torch.get_num_threads(), "version": torch.__version__}


# ---------------------------------------------------------------------------------------------
# The character language model (`decoder_lm` with mixer "attention" and learned positions).

def _build_char_lm(config: Any, vocab_size: int):
  """GPT-2's pre-norm decoder as `paperzoo.models.decoder_lm` computes it with the attention
  mixer: LayerNorms and linear maps without biases (as the config's bias=False), a fused qkv
  map, `F.scaled_dot_product_attention(is_causal=True)`, exact GELU, tied embeddings; AdamW
  with weight decay on matrices and embeddings only, as paperzoo's config sets it."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  m = config.model
  d, heads, layers = m.d_model, m.num_heads, m.num_layers
  length = config.data.seq_len

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.norm1, self.norm2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
      self.qkv, self.out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
      self.fc = nn.Linear(d, int(m.mlp_ratio * d), bias=False)
      self.proj = nn.Linear(int(m.mlp_ratio * d), d, bias=False)

    def forward(self, x):
      b, t, _ = x.shape
      q, k, v = self.qkv(self.norm1(x)).split(d, dim=2)
      q, k, v = (a.view(b, t, heads, d // heads).transpose(1, 2) for a in (q, k, v))
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
      return x + self.proj(F.gelu(self.fc(self.norm2(x))))

  class CharLM(nn.Module):

    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(vocab_size, d)
      self.positions = nn.Parameter(0.02 * torch.randn(length, d))
      self.blocks = nn.ModuleList(Block() for _ in range(layers))
      self.norm = nn.LayerNorm(d, bias=False)
      for parameter in self.parameters():
        if parameter.dim() >= 2:
          nn.init.normal_(parameter, std=0.02)

    def forward(self, tokens):
      x = self.embed(tokens) + self.positions[:tokens.shape[1]]
      for block in self.blocks:
        x = block(x)
      return self.norm(x) @ self.embed.weight.T

  torch.manual_seed(config.seed)
  model = CharLM()
  opt = config.optimizer
  decayed = [p for p in model.parameters() if p.dim() >= 2]
  others = [p for p in model.parameters() if p.dim() < 2]
  optimizer = torch.optim.AdamW(
      [{"params": decayed, "weight_decay": opt.weight_decay},
       {"params": others, "weight_decay": 0.0}],
      lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps)
  return model, optimizer


def char_lm_step_seconds(config: Any, vocab_size: int, batches: Any, *, warmup: int = 3
                         ) -> dict[str, Any]:
  """Seconds per training step of the character model in PyTorch (forward, backward, gradient
  clipping, AdamW), the median over `batches` (dicts of int32 "inputs", "targets" [B, T]) after
  `warmup` untimed steps; also the forward alone."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  model, optimizer = _build_char_lm(config, vocab_size)
  clip = config.optimizer.grad_clip_norm

  def step(batch):
    inputs = torch.from_numpy(batch["inputs"].astype(np.int64))
    targets = torch.from_numpy(batch["targets"].astype(np.int64))
    logits = model(inputs)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()

  batches = list(batches)
  for batch in batches[:warmup]:
    step(batch)
  times = []
  for batch in batches[warmup:]:
    start = time.perf_counter()
    step(batch)
    times.append(time.perf_counter() - start)
  forward = []
  with torch.no_grad():
    for batch in batches[warmup:]:
      start = time.perf_counter()
      model(torch.from_numpy(batch["inputs"].astype(np.int64)))
      forward.append(time.perf_counter() - start)
  return {"step": float(np.median(times)), "forward": float(np.median(forward)),
          "threads": torch.get_num_threads(), "version": torch.__version__}
