"""DiT (paperzoo.models.dit) against its equations, and the generation task
(paperzoo.tasks.generation) on a few MNIST images."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs import dit as dit_config
from paperzoo.models import dit
from paperzoo.registry import MODELS, TASKS
from paperzoo.tasks import generation


def _build(make) -> nnx.Module:
  """make() built under jit: eagerly, every initializer call compiles its own kernel."""
  graphdef = nnx.graphdef(nnx.eval_shape(make))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())


def _apply(model: nnx.Module, inputs: dict[str, jax.Array], **kwargs) -> jax.Array:
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, **kwargs))(state, inputs)


def _tiny_config(**overrides) -> dict:
  config = {"size": "tiny", "depth": 1, "hidden_size": 16, "num_heads": 2, "patch_size": 4,
            "learn_sigma": True, "class_dropout_prob": 0.1, "mixer": "attention"}
  config.update(overrides)
  return config


def _tiny(**overrides):
  config = _tiny_config(**overrides)
  return _build(lambda: dit.DiT(config, num_classes=10, input_shape=(32, 32, 1),
                                rngs=nnx.Rngs(params=0)))


def _inputs(batch: int = 3) -> dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  return {"inputs": jnp.asarray(rng.normal(size=(batch, 32, 32, 1)), jnp.float32),
          "t": jnp.asarray(rng.uniform(0, 999, size=batch), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 11, size=batch), jnp.int32)}


@pytest.mark.parametrize("mixer", ["attention", "linear"])
def test_fresh_dit_outputs_exact_zeros(mixer):
  # adaLN-Zero: zero gates and a zero final layer, so the untrained network predicts 0.
  model = _tiny(mixer=mixer)
  assert MODELS.get("dit") is dit.DiT
  out = _apply(model, _inputs(), train=False)
  assert out.shape == (3, 32, 32, 2)  # eps and the variance values
  assert float(jnp.abs(out).max()) == 0.0


def test_patchify_round_trip_and_layout():
  x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  tokens = dit.patchify(x, 4)
  assert tokens.shape == (2, 6, 48)
  # Token 1 is the patch in grid row 0, column 1, flattened as (row, col, channel).
  np.testing.assert_array_equal(tokens[0, 1], np.asarray(x[0, 0:4, 4:8]).reshape(-1))
  np.testing.assert_array_equal(dit.unpatchify(tokens, (2, 3), 4), x)


def test_2d_sincos_positions_match_the_formula():
  dim, rows, cols = 16, 3, 5
  table = dit.sincos_2d_positions(dim, (rows, cols))
  quarter = dim // 4
  for r in range(rows):
    for c in range(cols):
      expected = []
      for position in (c, r):  # the first half encodes the column, the second the row
        expected += [math.sin(position / 10000 ** (j / quarter)) for j in range(quarter)]
        expected += [math.cos(position / 10000 ** (j / quarter)) for j in range(quarter)]
      np.testing.assert_allclose(table[r * cols + c], expected, rtol=1e-6, atol=1e-6)


def test_timestep_frequencies_match_the_formula():
  t = jnp.array([0.0, 3.0, 999.0])
  emb = np.asarray(dit.timestep_frequencies(t, 8))
  freqs = [10000 ** (-i / 4) for i in range(4)]
  expected = [[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs]
              for s in (0.0, 3.0, 999.0)]
  np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-4)


def test_class_dropout_maps_labels_to_the_null_class_at_the_rate():
  labels = jnp.asarray(np.arange(200_000) % 10, jnp.int32)
  dropped = np.asarray(jax.jit(lambda y: dit.drop_labels(y, 0.1, 10, jax.random.key(0)))(labels))
  is_null = dropped == 10
  # Binomial(200000, 0.1): standard deviation 0.00067 of the fraction.
  assert abs(is_null.mean() - 0.1) < 0.003
  np.testing.assert_array_equal(dropped[~is_null], np.asarray(labels)[~is_null])
  with pytest.raises(ValueError, match="dropout stream"):
    _apply(_tiny(), _inputs(), train=True, rngs=None)


def test_bad_configs_raise_with_valid_values():
  build = lambda **kw: nnx.eval_shape(lambda: dit.DiT(  # noqa: E731
      _tiny_config(**kw), num_classes=10, input_shape=(32, 32, 1), rngs=nnx.Rngs(params=0)))
  assert build(learn_sigma=False).out_channels == 1
  with pytest.raises(ValueError, match="valid: tiny, S, B, L, XL"):
    build(size="M")
  with pytest.raises(ValueError, match="not divisible into 5x5 patches"):
    build(patch_size=5)
  with pytest.raises(ValueError, match="unknown mixer"):
    build(mixer="conv")


# --------------------------------------------------------------------------------------------
# The generation task.
# --------------------------------------------------------------------------------------------
def _task_and_model(*, build_model: bool = True, **task_overrides):
  config = dit_config.get_config("runlocal")
  config.task.update(task_overrides)
  # runlocal's model: one block of width 16 on a 4x4 grid (compiling is most of the time here).
  config.model.learn_sigma = config.task.objective == "ddpm"
  task = TASKS.get("diffusion")(config)
  if not build_model:
    return task, None
  model = _build(lambda: MODELS.get("dit")(config.model, **task.model_kwargs(),
                                           rngs=nnx.Rngs(params=0)))
  return task, model


def _batch(task, split: str, size: int) -> dict[str, np.ndarray]:
  batch = task.splits[split].get_batch(np.arange(size))
  return dict(batch, mask=np.ones(size, np.float32))


def test_task_pads_mnist_and_rejects_bad_settings():
  task, _ = _task_and_model(build_model=False)
  assert task.model_kwargs() == {"num_classes": 10, "input_shape": (32, 32, 1)}
  images = task.splits["train"].get_batch(np.arange(4))["inputs"]
  assert images.shape == (4, 32, 32, 1) and not images[:, :2].any()  # black border
  np.testing.assert_array_equal(images[:, 2:30, 2:30],
                                task.data.train.arrays["inputs"][:4])
  with pytest.raises(ValueError, match="valid: ddpm, flow"):
    _task_and_model(build_model=False, objective="score")
  with pytest.raises(ValueError, match="valid: euler, heun"):
    _task_and_model(build_model=False, objective="flow", sampler="ddim")
  config = dit_config.get_config("runlocal")
  config.data.name = "listops"
  with pytest.raises(ValueError,
                     match="this needs image data; data sets of that kind: cifar10, mnist"):
    TASKS.get("diffusion")(config)
  flow, _ = _task_and_model(build_model=False, objective="flow", sampler="euler")
  with pytest.raises(ValueError, match="learn_sigma=False"):
    flow._learns_variance(jnp.zeros((1, 32, 32, 2)))  # pylint: disable=protected-access


def test_ddpm_task_loss_is_finite_and_decreases():
  task, model = _task_and_model(objective="ddpm", sampler="ddim")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = jax.tree.map(jnp.asarray, _batch(task, "train", 32))
  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):  # one fixed key: the same t and noise every step
      model = nnx.merge(graphdef, p, rest)
      return task.loss(model, batch, train=True, rngs=nnx.Rngs(dropout=jax.random.key(0)))

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  opt_state = optimizer.init(params)
  losses = []
  for _ in range(8):
    params, opt_state, loss, metrics = step(params, opt_state)
    losses.append(float(loss))
  assert all(math.isfinite(v) for v in losses)
  # Same batch, t and noise every step: the loss falls at every step.
  assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
  assert set(metrics) == {"mse", "vlb"}

  eval_sums = jax.jit(lambda p, b: task.eval_sums(nnx.merge(graphdef, p, rest), b))
  val = dict(_batch(task, "val", 16))
  val["mask"][12:] = 0.0
  first, second = eval_sums(params, val), eval_sums(params, val)
  assert float(first["count"]) == 12
  for name in first:  # fixed timesteps and noise: evaluation is deterministic
    assert float(first[name]) == float(second[name]) and math.isfinite(float(first[name]))
  summary = task.summarize({k: float(v) for k, v in first.items()})
  assert 0 < summary["bits_per_dim"] < 100


def test_flow_task_loss_and_evaluation_are_finite():
  task, model = _task_and_model(objective="flow", sampler="heun")
  graphdef, state = nnx.split(model)

  @jax.jit
  def loss_and_sums(state, batch):
    model = nnx.merge(graphdef, state)
    loss, _ = task.loss(model, batch, train=True, rngs=nnx.Rngs(dropout=jax.random.key(0)))
    return loss, task.eval_sums(model, batch)

  loss, sums = loss_and_sums(state, jax.tree.map(jnp.asarray, _batch(task, "val", 8)))
  # The fresh DiT predicts v = 0, so the loss is E|eps - x_0|^2 = 1 + E x_0^2.
  assert 1.0 < float(loss) < 2.0 and set(sums) == {"loss", "count"}
  assert 1.0 < float(sums["loss"]) / float(sums["count"]) < 2.0


def test_final_metrics_and_pictures_with_a_fake_classifier(tmp_path, monkeypatch):
  task, model = _task_and_model(objective="ddpm", sampler="ddpm", samples_per_class=2,
                                sampling_steps=2, guidance_scale=2.0)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, inputs: nnx.merge(graphdef, s)(inputs, train=False, rngs=None))
  seen = {}

  class FakeClassifier:
    def logits(self, images):
      seen.setdefault("logits", images)
      return np.eye(10)[np.arange(len(images)) % 10]

    def features(self, images):
      return images.reshape(len(images), -1)[:, :4].astype(np.float64)

  def sample_scores(samples, labels, real, classifier, *, inception_weights=""):
    assert inception_weights == ""  # the config sets no Inception weights: no FID
    seen.update(samples=samples, labels=labels, real=real)
    return {"class_accuracy": float(np.mean(
        np.argmax(classifier.logits(samples), -1) == labels)),
            "classifier_frechet_distance": 1.5}

  monkeypatch.setattr(generation.metrics, "reference_classifier", lambda run: FakeClassifier())
  monkeypatch.setattr(generation.metrics, "sample_scores", sample_scores)
  # Small pictures: matplotlib's time grows with the number of panels.
  monkeypatch.setattr(generation, "PICTURE_SAMPLES_PER_CLASS", 2)
  monkeypatch.setattr(generation, "TRAJECTORY_SNAPSHOTS", 2)

  results = task.final_metrics(lambda inputs: forward(state, inputs), tmp_path)
  samples = seen["samples"]
  assert samples.dtype == np.uint8 and samples.shape == (20, 28, 28, 1)  # cropped back to 28
  np.testing.assert_array_equal(seen["labels"], np.repeat(np.arange(10), 2))
  assert seen["real"].shape == (2000, 28, 28, 1)
  assert results["class_accuracy"] == pytest.approx(0.1)
  assert results["num_samples"] == 20 and results["guidance_scale"] == 2.0
  assert (tmp_path / "samples.npz").exists()
  # An untrained DiT predicts eps = 0 everywhere; its samples are still valid images.
  paths = task.write_pictures(lambda inputs: forward(state, inputs), tmp_path)
  assert [p.name for p in paths] == ["samples.png", "denoising.png"]
