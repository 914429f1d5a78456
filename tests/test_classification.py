"""The classification task, its data layout and the backbones built on the MetaFormer block."""

from __future__ import annotations

import dataclasses

import chex
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from experiments.configs import common
from paperzoo.config import ConfigDict
from paperzoo.data import classification as classification_data
from paperzoo.layers import metaformer
from paperzoo.registry import MODELS
from paperzoo.tasks.classification import ClassificationTask

# -------------------------------------------------------------------------------------------
# Data layout.
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_stratified_split_is_disjoint_proportional_and_seeded(seed):
  labels = np.repeat(np.arange(5), [50, 30, 10, 7, 3])
  train, val = classification_data.stratified_split(labels, 0.2, seed)
  assert len(val) == 20 and len(np.intersect1d(train, val)) == 0
  assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
  counts = np.bincount(labels[val], minlength=5)
  assert np.all(counts >= 1)  # every class is seen in validation
  assert counts.tolist() == [10, 6, 2, 1, 1]  # round half up, at least one per class
  again, _ = classification_data.stratified_split(labels, 0.2, seed)
  assert np.array_equal(train, again)
  other, _ = classification_data.stratified_split(labels, 0.2, seed + 7)
  assert not np.array_equal(train, other)


def test_array_split_rejects_ragged_arrays():
  with pytest.raises(ValueError, match="equal leading sizes"):
    classification_data.ArraySplit({"inputs": np.zeros((3, 2)), "label": np.zeros(4)})


def test_classification_data_section_rejects_unknown_keys():
  with pytest.raises(ValueError, match="valid: .*max_len"):
    common.classification_data("listops", max_length=10)
  with pytest.raises(ValueError, match="valid: .*cifar10"):
    common.classification_data("cifar100")


# -------------------------------------------------------------------------------------------
# The task's loss and evaluation.
# -------------------------------------------------------------------------------------------


class _FixedLogits(nnx.Module):
  """A 'model' that returns the logits stored in the batch, to test the task's arithmetic."""

  def __call__(self, batch, *, train, rngs=None):
    return batch["inputs"]


def _task(kind="series", label_smoothing=0.0):
  task = ClassificationTask.__new__(ClassificationTask)
  task.label_smoothing = label_smoothing
  task.crop_padding, task.flip, task.mixup_alpha = 0, False, 0.0
  task.randaugment_ops, task.randaugment_magnitude, task.augments = 0, 9, False
  split = classification_data.ArraySplit({"inputs": np.zeros((2, 3)), "label": np.zeros(2)})
  task.data = classification_data.ClassificationData(
      name="fake", kind=kind, train=split, val=split, test=split, class_names=("a", "b", "c"))
  return task


def test_loss_is_cross_entropy_with_label_smoothing():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((5, 3)).astype(np.float32)
  labels = np.array([0, 2, 1, 1, 0], np.int32)
  s = 0.1
  loss, metrics = _task(label_smoothing=s).loss(
      _FixedLogits(), {"inputs": jnp.asarray(logits), "label": jnp.asarray(labels)},
      train=False, rngs=None)
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  targets = np.full((5, 3), s / 3) + (1 - s) * np.eye(3)[labels]
  np.testing.assert_allclose(loss, -(targets * log_p).sum(1).mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(logits.argmax(1) == labels))


def test_eval_sums_ignore_padding():
  logits = np.array([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], [9.0, 0, 0]], np.float32)
  labels = np.array([0, 1, 0, 1], np.int32)
  mask = np.array([1, 1, 1, 0], np.float32)  # the last row is padding: wrong, but not counted
  task = _task()
  sums = task.eval_sums(_FixedLogits(), {"inputs": logits, "label": labels, "mask": mask})
  summary = task.summarize({k: float(v) for k, v in sums.items()})
  assert summary["accuracy"] == pytest.approx(2 / 3)
  nll = -np.log(np.exp(logits[:3][np.arange(3), labels[:3]])
                / np.exp(logits[:3]).sum(1))
  assert summary["loss"] == pytest.approx(nll.mean(), rel=1e-6)


def test_predicted_labels_never_pad_a_small_split_up_to_the_batch():
  logits = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
  task = _task()
  task.splits = {"test": classification_data.ArraySplit({"inputs": logits,
                                                         "label": np.zeros(7)})}
  seen = []

  def predict(inputs):
    seen.append(len(inputs["inputs"]))
    return inputs["inputs"]

  predicted = task.predict_labels(predict, "test", batch_size=500)
  np.testing.assert_array_equal(predicted, logits.argmax(1))
  assert seen == [7]  # one batch of the split's own size, not 500
  predicted = task.predict_labels(predict, "test", batch_size=3)
  np.testing.assert_array_equal(predicted, logits.argmax(1))
  assert seen[1:] == [3, 3, 3]


def test_augmentation_only_for_images(tmp_path):
  for augmentation in (dict(flip=True), dict(randaugment_ops=2)):
    config = ConfigDict({"data": common.classification_data("uea"),
                         "task": common.classification_task(**augmentation)})
    with pytest.raises(ValueError, match="augment images"):
      ClassificationTask(config)
  config.task.randaugment_magnitude = 31
  with pytest.raises(ValueError, match=r"randaugment_magnitude=31 in \[0, 30\]"):
    ClassificationTask(config)


def test_randaugment_runs_on_the_uint8_pixels_before_normalization():
  from paperzoo.data import randaugment  # pylint: disable=g-import-not-at-top
  task = _task(kind="image")
  task.data = dataclasses.replace(task.data, image_mean=(0.5,), image_std=(0.25,))
  task.randaugment_ops, task.randaugment_magnitude, task.augments = 2, 9, True
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (6, 7, 7, 1)), jnp.uint8)
  seen = {}

  def model(inputs, train, rngs):
    del train, rngs
    seen["inputs"] = inputs["inputs"]
    return jnp.zeros((6, 3))

  task.loss(model, {"inputs": images, "label": jnp.zeros(6, jnp.int32)}, train=True,
            rngs=nnx.Rngs(dropout=0))
  key = jax.random.fold_in(nnx.Rngs(dropout=0).dropout(), 1)
  augmented = randaugment.rand_augment(images, key, num_ops=2, magnitude=9)
  assert not np.array_equal(augmented, images)
  np.testing.assert_allclose(seen["inputs"],
                             (augmented.astype(np.float32) / 255.0 - 0.5) / 0.25, rtol=1e-6)


def test_train_augmented_picture_shows_the_training_augmentation(tmp_path, monkeypatch):
  from paperzoo import plots  # pylint: disable=g-import-not-at-top
  from paperzoo.data import randaugment  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(1).integers(0, 256, (9, 10, 10, 1), dtype=np.uint8)
  task = _task(kind="image")
  split = classification_data.ArraySplit({"inputs": images, "label": np.zeros(9, np.int32)})
  task.data = dataclasses.replace(task.data, train=split, image_mean=(0.4,), image_std=(0.3,))
  task.randaugment_ops, task.randaugment_magnitude, task.augments = 2, 9, True
  shown = {}
  monkeypatch.setattr(plots, "image_grid",
                      lambda grid, titles, path, **kw: shown.update(grid=grid, titles=titles)
                      or path)
  assert task.write_augmented(tmp_path / "a.png", num_images=4, draws=2) == tmp_path / "a.png"
  grid = shown["grid"]
  assert grid.shape == (12, 10, 10, 1) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[:4], images[:4])
  for draw in (1, 2):  # no crop or flip here: each row is RandAugment's, back in pixels
    np.testing.assert_array_equal(grid[4 * draw:4 * draw + 4], randaugment.rand_augment(
        jnp.asarray(images[:4]), jax.random.fold_in(jax.random.key(draw - 1), 1)))
  assert shown["titles"][:5] == ["original"] * 4 + ["draw 1"]


def test_forecasting_data_is_refused_with_the_valid_names():
  config = ConfigDict({"data": {"name": "etth1"}, "task": common.classification_task()})
  with pytest.raises(ValueError, match="holds forecasting data.*needs tokens, image or series "
                                       "data; data sets of those kinds: cifar10, listops, "
                                       "lra_image, mnist"):
    ClassificationTask(config)


# -------------------------------------------------------------------------------------------
# MetaFormer pieces.
# -------------------------------------------------------------------------------------------


def test_non_overlapping_patch_embedding_is_a_matmul_on_flattened_patches():
  rng = np.random.default_rng(1)
  images = rng.standard_normal((2, 8, 12, 3)).astype(np.float32)
  embed = metaformer.PatchEmbedding(3, 5, kernel=4, stride=4, rngs=nnx.Rngs(0))
  tokens, grid = embed(jnp.asarray(images))
  assert grid == (2, 3)
  kernel = np.asarray(embed.conv.kernel[...])  # [4, 4, 3, 5] (HWIO)
  patches = images.reshape(2, 2, 4, 3, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 6, 48)
  expected = patches @ kernel.reshape(48, 5) + np.asarray(embed.conv.bias[...])
  np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-5)


def test_patch_merging_concatenates_each_2x2_group():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((1, 4 * 6, 3)).astype(np.float32)
  down = metaformer.Downsample(3, 7, kind="merge", rngs=nnx.Rngs(0))
  y, grid = down(jnp.asarray(x), (4, 6))
  assert grid == (2, 3) and y.shape == (1, 6, 7)
  image = x.reshape(4, 6, 3)
  # Token (i, j) of the merged grid sees the four tokens (2i + a, 2j + b); the layout inside
  # the 4C vector is (b, a, C) (column offset first), then LayerNorm and the reduction.
  merged = np.stack([np.concatenate([image[2 * i + a, 2 * j + b] for b in (0, 1)
                                     for a in (0, 1)]) for i in range(2) for j in range(3)])
  normed = (merged - merged.mean(-1, keepdims=True)) / np.sqrt(merged.var(-1, keepdims=True)
                                                              + 1e-5)
  expected = normed @ np.asarray(down.reduction.kernel[...])
  np.testing.assert_allclose(y[0], expected, rtol=1e-4, atol=1e-4)


def test_group_norm_normalizes_each_example_over_tokens_and_channels():
  x = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, (2, 5, 6)), jnp.float32)
  x = x.at[1].multiply(10.0)  # the second example on another scale
  y = np.asarray(metaformer.token_norm("group", 6, rngs=nnx.Rngs(0))(x))
  flat = np.asarray(x).reshape(2, -1)
  expected = (flat - flat.mean(1, keepdims=True)) / np.sqrt(flat.var(1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(y.reshape(2, -1), expected, rtol=1e-4, atol=1e-5)
  per_token = np.asarray(metaformer.token_norm("layer", 6, rngs=nnx.Rngs(0))(x))
  assert not np.allclose(per_token, y, atol=1e-2)
  with pytest.raises(ValueError, match="unknown model.norm 'batch'; valid: layer, group"):
    metaformer.token_norm("batch", 6, rngs=nnx.Rngs(0))


def test_poolformer_config_uses_group_norm_and_refuses_padded_sequences():
  from experiments.configs import poolformer  # pylint: disable=g-import-not-at-top
  config = poolformer.get_config("data=mnist")
  model = MODELS.get("poolformer")(config.model, num_classes=10, input_shape=(28, 28, 1),
                                   rngs=nnx.Rngs(0))
  block = model.stages[0].blocks[0]
  assert isinstance(block.norm1, nnx.GroupNorm) and isinstance(model.norm, nnx.GroupNorm)
  with pytest.raises(ValueError, match="not padded sequences"):
    block(jnp.zeros((1, 4, 32)), grid=(2, 2), mask=jnp.ones((1, 4), bool), train=False)


def test_drop_path_drops_whole_examples_and_keeps_the_mean():
  x = jnp.ones((4000, 3, 2))
  y = metaformer.drop_path(x, 0.25, train=True, rngs=nnx.Rngs(dropout=0))
  per_example = np.asarray(y).reshape(4000, -1)
  assert np.all((per_example == 0).all(1) | np.isclose(per_example, 1 / 0.75).all(1))
  assert abs(per_example.mean() - 1.0) < 0.05
  assert metaformer.drop_path(x, 0.25, train=False, rngs=None) is x


def test_masked_mean_counts_real_tokens_only():
  x = jnp.arange(12.0).reshape(1, 4, 3)
  mask = jnp.array([[True, True, False, False]])
  np.testing.assert_allclose(metaformer.masked_mean(x, mask), [[1.5, 2.5, 3.5]])


def _model_config(**overrides):
  return ConfigDict({**common.MIXER_DEFAULTS, "d_model": 16, "num_layers": 2, "num_heads": 2,
                     "mlp_ratio": 2.0, "dropout": 0.0, "drop_path": 0.0,
                     "layer_scale_init": 0.0, "init": "lecun", "positions": "sinusoidal",
                     "mixer": "attention", **overrides})


@pytest.mark.parametrize("mixer", ["attention", "linear", "mamba"])
def test_sequence_classifier_ignores_padding_content(mixer):
  config = _model_config(mixer=mixer, scan_impl="reference")
  model = MODELS.get("sequence_classifier")(config, num_classes=3, input_shape=(11,),
                                            vocab_size=17, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  tokens = rng.integers(1, 17, (2, 11)).astype(np.int32)
  lengths = np.array([7, 11])
  mask = np.arange(11)[None] < lengths[:, None]
  other = np.where(mask, tokens, rng.integers(1, 17, (2, 11))).astype(np.int32)
  a = model({"inputs": jnp.asarray(tokens), "padding_mask": jnp.asarray(mask)}, train=False)
  b = model({"inputs": jnp.asarray(other), "padding_mask": jnp.asarray(mask)}, train=False)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_vit_with_a_class_token_refuses_grid_mixers():
  with pytest.raises(ValueError, match="pool='mean'"):
    MODELS.get("vit")(_model_config(mixer="pooling", pool="cls", patch_size=2),
                      num_classes=3, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name,extra,check_grads", [
    ("poolformer", {}, False), ("swin", {"head_dim": 8, "window_size": 2}, False),
    ("biformer", {"routing_regions": 2, "routing_topk": 2, "head_dim": 8}, True)])
def test_hierarchical_backbones_shrink_the_grid_and_train(name, extra, check_grads):
  config = _model_config(depths=(1, 1, 1), dims=(8, 16, 16), patch_size=2, **extra)
  model = MODELS.get(name)(config, num_classes=4, input_shape=(16, 16, 3), rngs=nnx.Rngs(0))
  assert model.grids == ((8, 8), (4, 4), (2, 2))
  images = jnp.asarray(np.random.default_rng(4).standard_normal((2, 16, 16, 3)), jnp.float32)
  graphdef, params = nnx.split(model)

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p)({"inputs": images}, train=False) ** 2)

  if not check_grads:  # the mixers' gradients are tested in test_mixers; one backbone here
    assert np.isfinite(loss(params))
    return
  value, grads = jax.value_and_grad(loss)(params)
  assert np.isfinite(value)
  chex.assert_tree_all_finite(grads)


def test_itransformer_classifier_reads_whole_series_as_tokens():
  config = ConfigDict({"d_model": 8, "d_ff": 16, "num_layers": 1, "num_heads": 2,
                       "dropout": 0.0, "activation": "gelu", "init": "torch"})
  model = MODELS.get("itransformer_classifier")(config, num_classes=3, input_shape=(10, 4),
                                                rngs=nnx.Rngs(0))
  x = np.random.default_rng(5).standard_normal((2, 10, 4)).astype(np.float32)
  logits = model({"inputs": jnp.asarray(x)}, train=False)
  assert logits.shape == (2, 3)
  # Permuting the channels permutes the tokens: the encoder is equivariant, so the flattened
  # head sees permuted blocks; with the head's blocks permuted alike the logits are unchanged.
  perm = np.array([2, 0, 3, 1])
  kernel = np.asarray(model.head.kernel[...]).reshape(4, 8, 3)
  model.head.kernel[...] = jnp.asarray(kernel[perm].reshape(32, 3))
  np.testing.assert_allclose(model({"inputs": jnp.asarray(x[:, :, perm])}, train=False), logits,
                             rtol=1e-5, atol=1e-5)
