"""Classification: one task for token sequences (LRA), images (CIFAR-10, MNIST) and time series
(UEA).

The data set (`config.data.name`, see `paperzoo.data.classification`) decides the inputs; the
task turns them into what the model takes and scores the logits:

  tokens  int32 ids [B, L] are passed as they are (the model embeds them), with `padding_mask`
  image   uint8 [B, H, W, C] -> float32 (x / 255 - mean) / std with the training set's per-channel
          statistics; while training, optionally RandAugment (on the uint8 pixels), then a
          random crop (zero padding after normalization), a horizontal flip and mixup, drawn on
          the device from the step's key, so the augmentation is a pure function of
          (seed, step) and a resumed run replays it
  series  float32 [B, T, C] (already normalized by the loader), with `padding_mask`

The model sees `{"inputs": x, "padding_mask": m}` (the mask only where the data has one) and
returns logits [B, num_classes]. Loss: softmax cross-entropy, optionally with label smoothing
(targets (1 - s) one-hot + s / num_classes). Model selection: validation accuracy (a tie keeps
the earlier checkpoint unless `train.selection_tie_break` says otherwise). Scores: accuracy and
mean cross-entropy over every example of a split.

Config keys (`config.task`):
  label_smoothing  (float, 0.0)  s above
  crop_padding     (int, 0)      images: pad by this many pixels and crop back at random (0: off)
  flip             (bool, False) images: mirror left-right with probability 1/2
  mixup_alpha      (float, 0.0)  images: mixup (Zhang et al. 2018) with lambda ~ Beta(a, a),
                                 one per batch, on the (smoothed) targets (0: off)
  randaugment_ops  (int, 0)      images: RandAugment (Cubuk et al. 2020) with this many
                                 operations per image, on the uint8 pixels before
                                 normalization, crop and flip (0: off)
  randaugment_magnitude (int, 9) its magnitude bin, 0..30 (`paperzoo.data.randaugment`)
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from paperzoo import plots
from paperzoo import sharding
from paperzoo.data import augment
from paperzoo.data import batches
from paperzoo.data import randaugment
from paperzoo.data.lra import listops
from paperzoo.registry import DATASETS, TASKS


@TASKS.register("classification")
class ClassificationTask:
  """Predict one of `num_classes` labels for each example."""

  selection_metric = "accuracy"
  selection_mode = "max"
  data_kinds = ("tokens", "image", "series")

  def __init__(self, config: Any):
    name = config.data.name
    load = DATASETS.get(name, kinds=self.data_kinds)
    task = config.task
    self.label_smoothing = float(task.get("label_smoothing", 0.0))
    self.crop_padding = int(task.get("crop_padding", 0))
    self.flip = bool(task.get("flip", False))
    self.mixup_alpha = float(task.get("mixup_alpha", 0.0))
    self.randaugment_ops = int(task.get("randaugment_ops", 0))
    self.randaugment_magnitude = int(task.get("randaugment_magnitude", 9))
    if self.randaugment_ops < 0 or not 0 <= self.randaugment_magnitude <= 30:
      raise ValueError(f"task.randaugment_ops={self.randaugment_ops} must be >= 0 and "
                       f"task.randaugment_magnitude={self.randaugment_magnitude} in [0, 30]")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"task.label_smoothing={self.label_smoothing} must be in [0, 1)")
    self.data = load(config.data)
    self.augments = bool(self.crop_padding or self.flip or self.mixup_alpha
                         or self.randaugment_ops)
    if self.augments and self.data.kind != "image":
      raise ValueError(f"task.crop_padding / flip / mixup_alpha / randaugment_ops augment "
                       f"images; data set {name!r} has {self.data.kind} inputs")
    self.splits = {"train": self.data.train, "val": self.data.val, "test": self.data.test}
    self.selection = self.data.selection  # "test (legacy)" for UEA's legacy protocol

  def model_kwargs(self) -> dict[str, Any]:
    return dict(num_classes=self.data.num_classes, input_shape=self.data.input_shape,
                vocab_size=self.data.vocab_size)

  def normalize(self, images: jax.Array) -> jax.Array:
    """uint8 images -> float32 (x / 255 - mean) / std, per channel."""
    mean = jnp.asarray(self.data.image_mean, jnp.float32)
    std = jnp.asarray(self.data.image_std, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std

  def inputs(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """What the model sees: the (normalized) inputs and, for variable lengths, the mask."""
    x = batch["inputs"]
    if self.data.kind == "image":
      x = self.normalize(x)
    inputs = {"inputs": x}
    if "padding_mask" in batch:
      inputs["padding_mask"] = batch["padding_mask"]
    return inputs

  def targets(self, labels: jax.Array) -> jax.Array:
    """One-hot targets [B, num_classes], smoothed: (1 - s) one_hot + s / num_classes."""
    num_classes = self.data.num_classes
    targets = jax.nn.one_hot(labels, num_classes)
    if self.label_smoothing:
      targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / num_classes
    return targets

  def augment(self, images: jax.Array, key: jax.Array) -> jax.Array:
    """The training augmentation of uint8 images up to mixup: RandAugment on the pixels, then
    normalization, random crop and flip. Returns normalized float32 images."""
    if self.randaugment_ops:
      images = randaugment.rand_augment(images, jax.random.fold_in(key, 1),
                                        num_ops=self.randaugment_ops,
                                        magnitude=self.randaugment_magnitude)
    x = self.normalize(images)
    crop_key, flip_key, _ = jax.random.split(key, 3)  # the third is mixup's
    if self.crop_padding:
      x = augment.random_crop(x, crop_key, padding=self.crop_padding)
    if self.flip:
      x = augment.random_flip(x, flip_key)
    return x

  def loss(self, model: Any, batch: dict[str, jax.Array], *, train: bool, rngs: Any
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    inputs = self.inputs(batch)
    targets = self.targets(batch["label"])
    if train and self.augments:
      key = rngs.dropout()
      inputs["inputs"] = self.augment(batch["inputs"], key)
      if self.mixup_alpha:
        inputs["inputs"], targets = augment.mixup(inputs["inputs"], targets,
                                                  jax.random.split(key, 3)[2],
                                                  alpha=self.mixup_alpha)
    logits = model(inputs, train=train, rngs=rngs)
    loss = jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, {"accuracy": accuracy}

  def eval_sums(self, model: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    logits = model(self.inputs(batch), train=False, rngs=None)
    mask = batch["mask"].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    # Unsmoothed cross-entropy: the evaluation loss is comparable across configs.
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], -1)[:, 0]
    return {"correct": jnp.sum(correct * mask), "nll": jnp.sum(nll * mask),
            "count": jnp.sum(mask)}

  def summarize(self, sums: dict[str, float]) -> dict[str, float]:
    return {"accuracy": sums["correct"] / sums["count"], "loss": sums["nll"] / sums["count"]}

  def predict_labels(self, predict: Callable[[dict[str, np.ndarray]], Any], split: str, *,
                     batch_size: int = 500) -> np.ndarray:
    """The predicted class of every example of `split`, in batches that never pad a small
    split up to `batch_size` (`batches.map_batches`)."""
    dataset = self.splits[split]
    return batches.map_batches(
        lambda indices: np.argmax(predict(self.inputs(dataset.get_batch(indices))), -1),
        len(dataset), batch_size, shrink=True)

  def write_pictures(self, predict: Callable[[dict[str, np.ndarray]], Any],
                     workdir: pathlib.Path, *, num_examples: int = 16) -> list[pathlib.Path]:
    """The test confusion matrix, and a few test inputs with their true and predicted labels."""
    test = self.data.test
    labels = test.arrays["label"]
    predicted = self.predict_labels(predict, "test")
    counts = np.zeros((self.data.num_classes,) * 2, np.int64)
    np.add.at(counts, (labels, predicted), 1)
    paths = [plots.confusion_matrix(counts, self.data.class_names,
                                    workdir / "confusion_matrix.png",
                                    title=f"{self.data.name} test")]
    shown = np.linspace(0, len(test) - 1, min(num_examples, len(test))).astype(np.int64)
    names = self.data.class_names
    titles = [f"true {names[labels[i]]}\npred {names[predicted[i]]}" for i in shown]
    inputs = test.arrays["inputs"][shown]
    if self.data.kind == "image":
      paths.append(plots.image_grid(inputs, titles, workdir / "examples.png"))
      if self.augments:
        paths.append(self.write_augmented(workdir / "train_augmented.png"))
    elif self.data.name in ("pathfinder", "lra_image"):
      side = int(round(np.sqrt(inputs.shape[1])))
      paths.append(plots.image_grid(inputs.reshape(-1, side, side).astype(np.uint8), titles,
                                    workdir / "examples.png"))
    elif self.data.name == "listops":
      lines = [f"true {names[labels[i]]} predicted {names[predicted[i]]}: "
               + " ".join(listops.VOCAB[t] for t in test.arrays["inputs"][i] if t)
               for i in shown]
      path = workdir / "examples.txt"
      if sharding.is_primary_process():
        path.write_text("\n".join(lines) + "\n")
      paths.append(path)
    return paths

  def write_augmented(self, path: pathlib.Path, *, num_images: int = 8, draws: int = 3
                      ) -> pathlib.Path:
    """A few training images (first row) and `draws` draws of the training augmentation
    before mixup (`augment`), shown back in pixels."""
    originals = jnp.asarray(self.data.train.arrays["inputs"][:num_images])
    mean = np.asarray(self.data.image_mean, np.float32)
    std = np.asarray(self.data.image_std, np.float32)
    rows = [np.asarray(originals)]
    for draw in range(draws):
      x = np.asarray(self.augment(originals, jax.random.key(draw)))
      rows.append(np.clip(np.round((x * std + mean) * 255.0), 0, 255).astype(np.uint8))
    titles = [f"{'original' if r == 0 else f'draw {r}'}" for r in range(draws + 1)
              for _ in range(len(originals))]
    return plots.image_grid(np.concatenate(rows), titles, path, columns=len(originals),
                            title=f"{self.data.name}: training augmentation")
