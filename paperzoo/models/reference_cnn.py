"""A small VGG-style CNN: the reference classifier of the generation metrics.

Not a paper's model. `paperzoo.generation.metrics.reference_classifier` trains it once per data
set (MNIST, CIFAR-10) and scores generated images with it: the accuracy of class-conditional
samples, and the Frechet distance between real and generated images in its feature space. Its
only job is to be accurate and quick to train on a CPU, so it is plain:

    for stage s with width c_s:   h = maxpool_2x2(relu(conv3x3(relu(conv3x3(h)))))
    features = relu(W_f flatten(h) + b_f)            [B, hidden]   (the penultimate layer)
    logits   = W_o dropout(features) + b_o           [B, num_classes]

Flattening (rather than global pooling) keeps where strokes are, which matters for digits.

Config keys (`config.model`):
  channels  (tuple, (16, 32))  width of each stage; each stage halves the image side (the sides
                               must stay divisible by 2 at every stage)
  hidden    (int, 128)         feature width (the Frechet distance's dimension)
  dropout   (float, 0.0)       dropout on the features while training

Input: {"inputs": float [B, H, W, C]} (normalized by the classification task); output: logits.
`features(inputs)` returns the penultimate layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from paperzoo.layers.attention import Dropout
from paperzoo.layers.initializers import dense
from paperzoo.layers.metaformer import Conv2d
from paperzoo.registry import MODELS


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H/2, W/2, C], the maximum of each 2x2 block (H, W even)."""
  batch, height, width, channels = x.shape
  return jnp.max(x.reshape(batch, height // 2, 2, width // 2, 2, channels), axis=(2, 4))


@MODELS.register("reference_cnn")
class ReferenceCNN(nnx.Module):
  """Conv stages, one hidden layer, a linear head (module docstring)."""

  def __init__(self, config: Any, *, num_classes: int, input_shape: tuple[int, ...],
               vocab_size: int = 0, rngs: nnx.Rngs):
    del vocab_size
    if len(input_shape) != 3:
      raise ValueError(f"reference_cnn takes images [H, W, C], got inputs of shape "
                       f"{input_shape}")
    height, width, in_channels = input_shape
    widths = tuple(int(c) for c in config.get("channels", (16, 32)))
    if not widths:
      raise ValueError("model.channels must name at least one stage width")
    factor = 2 ** len(widths)
    if height % factor or width % factor:
      raise ValueError(f"image {height}x{width} cannot be halved {len(widths)} times "
                       f"(model.channels={widths}); the sides must be multiples of {factor}")
    convs = []
    previous = in_channels
    for channels in widths:
      convs.append(Conv2d(previous, channels, kernel=3, stride=1, padding=1, rngs=rngs))
      convs.append(Conv2d(channels, channels, kernel=3, stride=1, padding=1, rngs=rngs))
      previous = channels
    self.convs = nnx.List(convs)
    flat = (height // factor) * (width // factor) * widths[-1]
    hidden = int(config.get("hidden", 128))
    self.hidden = dense(flat, hidden, names=(None, "mlp"), init="lecun", rngs=rngs)
    self.dropout = Dropout(float(config.get("dropout", 0.0)))
    self.head = dense(hidden, num_classes, names=("mlp", None), init="lecun", rngs=rngs)

  def features(self, batch: dict[str, jax.Array]) -> jax.Array:
    """The penultimate layer [B, hidden] of normalized images `batch["inputs"]`."""
    h = batch["inputs"]
    for i in range(0, len(self.convs), 2):
      h = jax.nn.relu(self.convs[i + 1](jax.nn.relu(self.convs[i](h))))
      h = max_pool_2x2(h)
    return jax.nn.relu(self.hidden(h.reshape(h.shape[0], -1)))

  def __call__(self, batch: dict[str, jax.Array], *, train: bool,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    features = self.dropout(self.features(batch), deterministic=not train, rngs=rngs)
    return self.head(features)
