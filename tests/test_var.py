"""VAR's next-scale transformer (paperzoo.models.var) against its equations and the promises of
its design: the block-causal mask, logits of a scale blind to finer scales, the KV-cached decode
equal to teacher forcing (also through the sampler, with and without guidance), top-k / top-p
against a numpy reference, class dropout at its rate; and the next_scale task on the tokens of
a tiny trained tokenizer (paperzoo.tasks.next_scale)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import prerequisites
from experiments.configs import var as var_config
from paperzoo.generation import decoding
from paperzoo import workdir as workdir_lib
from paperzoo.models import var
from paperzoo.models import var_tokenizer as vt
from paperzoo.registry import MODELS, TASKS
from paperzoo.tasks import next_scale

SCALES = (1, 2, 4)  # L = 21 tokens
LATENT_DIM, CODEBOOK, CLASSES = 8, 16, 10


def _build_under_jit(make) -> nnx.Module:
  """make() built under jit: eagerly, every initializer call compiles its own kernel."""
  graphdef = nnx.graphdef(nnx.eval_shape(make))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())


def _model(seed: int = 0, scales=SCALES, **overrides) -> var.VAR:
  """A tiny VAR whose parameters are all random (std 0.2), so every block, gate and table
  matters (fresh adaLN gates are ~1e-5)."""
  config = {"size": "tiny", "depth": 2, "width": 32, "heads": 2, **overrides}
  model = nnx.eval_shape(lambda: var.VAR(config, num_classes=CLASSES, scales=scales,
                                         latent_dim=LATENT_DIM, codebook_size=CODEBOOK,
                                         rngs=nnx.Rngs(params=seed)))
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(
      lambda x: jnp.asarray(0.2 * rng.normal(size=x.shape), x.dtype)
      if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros(x.shape, x.dtype), state))


def _inputs(batch: int, seed: int = 0, scales=SCALES) -> jax.Array:
  length = var.scale_offsets(scales)[-1] - scales[0] ** 2
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, length, LATENT_DIM)),
                     jnp.float32)


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------
def test_block_causal_mask_sees_own_and_coarser_scales_only():
  scales = (1, 2, 3)
  mask = var.block_causal_mask(scales)
  assert var.scale_offsets(scales) == (0, 1, 5, 14) and mask.shape == (14, 14)
  blocks = [(0, 1), (1, 5), (5, 14)]
  for k, (row_start, row_stop) in enumerate(blocks):
    for m, (col_start, col_stop) in enumerate(blocks):
      assert mask[row_start:row_stop, col_start:col_stop].all() == (m <= k)
      assert mask[row_start:row_stop, col_start:col_stop].any() == (m <= k)
  # Unlike a token-causal mask, tokens of one scale see each other in both directions.
  assert mask[1, 4] and mask[4, 1] and not mask[0, 1]


@pytest.fixture(scope="module")
def forward_and_decode():
  """One compilation for the two tests below: teacher-forced logits of (inputs, inputs with
  the finest scale perturbed, other labels), and the KV-cached decode of the first."""
  model = _model()
  labels = jnp.asarray([0, 3, 10])  # 10: the null class
  x = _inputs(3)
  offsets = var.scale_offsets(SCALES)
  # x holds x_2.., so position p of the sequence is x[:, p - 1]: perturb the last scale only.
  perturbed = x.at[:, offsets[-2] - 1:].add(5.0)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state):
    model = nnx.merge(graphdef, state)
    full = model({"label": jnp.concatenate([labels, labels, jnp.asarray([1, 4, 9])]),
                  "scale_inputs": jnp.concatenate([x, perturbed, x])}, train=False)
    cache, decoded = None, []
    for k, side in enumerate(SCALES):
      scale_input = None if k == 0 else x[:, offsets[k] - 1:offsets[k + 1] - 1].reshape(
          -1, side, side, LATENT_DIM)
      logits, cache = model.decode_scale(k, scale_input, labels, cache)
      decoded.append(logits)
    return full.reshape(3, 3, *full.shape[1:]), decoded, cache

  return run(state)


def test_logits_of_a_scale_do_not_depend_on_finer_scales(forward_and_decode):
  logits, perturbed, other_labels = np.asarray(forward_and_decode[0])
  coarse = var.scale_offsets(SCALES)[-2]
  np.testing.assert_array_equal(perturbed[:, :coarse], logits[:, :coarse])
  assert np.abs(perturbed[:, coarse:] - logits[:, coarse:]).max(-1).min() > 1e-3
  # And the class reaches every position (start token and adaLN).
  assert np.abs(other_labels - logits).max(-1).min() > 1e-3


def test_kv_cached_decode_equals_teacher_forcing(forward_and_decode):
  full, decoded, cache = forward_and_decode
  offsets = var.scale_offsets(SCALES)
  for k in range(len(SCALES)):
    np.testing.assert_allclose(decoded[k], full[0, :, offsets[k]:offsets[k + 1]], atol=2e-5,
                               rtol=2e-5)
  assert len(cache) == 2 and cache[0][0].shape == (3, offsets[-1], 2, 16)  # [B, L, H, hd]


def _tokenizer() -> vt.VARTokenizer:
  config = ml_collections.ConfigDict({
      "name": "var_tokenizer", "channels": (8, 8, 8), "num_res_blocks": 0,
      "latent_dim": LATENT_DIM, "scales": SCALES, "codebook_size": CODEBOOK})
  model = nnx.eval_shape(lambda: vt.VARTokenizer(config, input_shape=(16, 16, 1),
                                                 rngs=nnx.Rngs(params=0)))
  rng = np.random.default_rng(5)
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(
      lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype)
      if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros(x.shape, x.dtype), state))


def test_greedy_guided_sampling_follows_the_teacher_forced_logits_of_its_own_tokens():
  model, tokenizer = _model(seed=3), _tokenizer()
  labels = jnp.asarray([0, 4, 7, 9])
  model_def, model_state = nnx.split(model)
  tokenizer_def, tokenizer_state = nnx.split(tokenizer)

  @jax.jit
  def run(model_state, tokenizer_state):
    model = nnx.merge(model_def, model_state)
    tokenizer = nnx.merge(tokenizer_def, tokenizer_state)
    images, maps = var.sample(model, tokenizer, labels, jax.random.key(0),
                              guidance_scale=1.5, top_k=1)
    scale_inputs = jnp.concatenate([x.reshape(4, -1, LATENT_DIM)
                                    for x in tokenizer.next_scale_inputs(maps)], axis=1)
    cond = model({"label": labels, "scale_inputs": scale_inputs}, train=False)
    null = model({"label": jnp.full_like(labels, CLASSES), "scale_inputs": scale_inputs},
                 train=False)
    return images, maps, cond, null, tokenizer.decode_indices(maps)

  images, maps, cond, null, decoded = run(model_state, tokenizer_state)
  assert images.shape == (4, 16, 16, 1)
  np.testing.assert_allclose(images, decoded, atol=1e-5)
  offsets = var.scale_offsets(SCALES)
  differs = []
  for k, token_map in enumerate(maps):
    t = var.guidance_at(k, len(SCALES), 1.5, "linear")  # 0, 0.75, 1.5
    guided = var.guided_logits(cond, null, t)[:, offsets[k]:offsets[k + 1]]
    np.testing.assert_array_equal(np.asarray(token_map).reshape(4, -1),
                                  np.argmax(guided, axis=-1))
    differs.append(np.any(np.argmax(guided, -1) != np.argmax(
        cond[:, offsets[k]:offsets[k + 1]], -1)))
  assert any(differs)  # guidance changed some token: the test tells guided from conditional


def test_guidance_zero_is_the_conditional_model_and_the_schedules():
  rng = np.random.default_rng(0)
  cond, null = (jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32) for _ in range(2))
  np.testing.assert_array_equal(var.guided_logits(cond, null, 0.0), cond)
  np.testing.assert_allclose(var.guided_logits(cond, null, 2.0), 3 * cond - 2 * null,
                             rtol=1e-6)
  assert [var.guidance_at(k, 5, 2.0, "linear") for k in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]
  assert var.guidance_at(0, 5, 2.0, "constant") == 2.0
  with pytest.raises(ValueError, match="valid: linear, constant"):
    var.guidance_at(0, 5, 2.0, "cosine")


def _numpy_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
  """Reference without sorting: keep j iff it is among the top_k, and the probability (after
  top-k) of the tokens at most as likely as j exceeds 1 - top_p (or j is the most likely)."""
  out = logits.copy()
  for row in np.ndindex(logits.shape[:-1]):
    values = logits[row].astype(np.float64)
    keep = np.ones(len(values), bool)
    if top_k:
      keep &= values >= np.sort(values)[-top_k]
    if top_p:
      probs = np.where(keep, np.exp(values - values.max()), 0.0)
      probs /= probs.sum()
      mass_up_to = np.array([probs[probs <= p].sum() for p in probs])
      keep &= (mass_up_to > 1 - top_p) | (values == values.max())
    out[row] = np.where(keep, values, -np.inf)
  return out


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (5, 0.0), (0, 0.7), (12, 0.9), (1, 0.5),
                                         (0, 1.0)])
def test_top_k_top_p_filter_matches_numpy(top_k, top_p):
  logits = np.random.default_rng(top_k).normal(size=(3, 4, 40)).astype(np.float32) * 2
  filtered = np.asarray(decoding.filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
  expected = _numpy_filter(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(filtered), np.isinf(expected))
  np.testing.assert_array_equal(filtered[~np.isinf(filtered)], logits[~np.isinf(expected)])
  if top_k:
    assert np.all(np.sum(~np.isinf(filtered), -1) <= top_k)
  with pytest.raises(ValueError, match="top_p"):
    decoding.filter_logits(jnp.asarray(logits), top_p=1.5)


def test_class_dropout_replaces_labels_by_the_null_class_at_its_rate():
  scales = (1, 2)
  model = _model(scales=scales, class_dropout_prob=0.3)
  n = 4000
  labels = jnp.full((n,), 3, jnp.int32)
  x = _inputs(n, scales=scales)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state):
    model = nnx.merge(graphdef, state)
    trained = model({"label": labels, "scale_inputs": x}, train=True,
                    rngs=nnx.Rngs(dropout=jax.random.key(7)))
    reference = model({"label": jnp.asarray([3, CLASSES]), "scale_inputs": x[:2]},
                      train=False)
    return trained[:, 0], reference[:, 0]  # the first position sees the class only

  trained, (cond, null) = (np.asarray(a) for a in run(state))
  is_null = np.abs(trained - null).max(-1) < 1e-5
  is_cond = np.abs(trained - cond).max(-1) < 1e-5
  assert np.all(is_null ^ is_cond)
  assert abs(is_null.mean() - 0.3) < 0.03  # Binomial(4000, 0.3): std 0.007
  with pytest.raises(ValueError, match="dropout stream"):
    nnx.eval_shape(lambda: model({"label": labels[:2], "scale_inputs": x[:2]}, train=True,
                                 rngs=None))


def test_bad_configs_and_inputs_fail_clearly():
  build = lambda **kw: nnx.eval_shape(lambda: var.VAR(  # noqa: E731
      {"size": "tiny", **kw}, num_classes=10, scales=SCALES, latent_dim=8, codebook_size=16,
      rngs=nnx.Rngs(params=0)))
  assert MODELS.get("var") is var.VAR
  model = build()
  assert model.seq_len == 21
  with pytest.raises(ValueError, match="valid: tiny, S, d12, d16"):
    build(size="XL")
  with pytest.raises(ValueError, match="takes no block-causal mask"):
    build(attention_impl="flash")
  with pytest.raises(ValueError, match="not divisible by heads"):
    build(width=30, heads=4)
  with pytest.raises(ValueError, match=r"scale_inputs must be \[B, L - n_1, D\]"):
    nnx.eval_shape(lambda: model({"label": jnp.zeros(2, jnp.int32),
                                  "scale_inputs": jnp.zeros((2, 19, 8))}, train=False))
  with pytest.raises(ValueError, match=r"the input of scale 1 must be \[B, 2, 2, 8\]"):
    nnx.eval_shape(lambda: model.decode_scale(1, jnp.zeros((2, 3, 3, 8)),
                                              jnp.zeros(2, jnp.int32), []))


# --------------------------------------------------------------------------------------------
# The task, on the tokens of the runlocal tokenizer (trained once into the cache).
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task():
  config = var_config.get_config("runlocal")
  prerequisites.train_prerequisites(config)  # the runlocal tokenizer, the first time
  return TASKS.get("next_scale")(config)


@pytest.fixture(scope="module")
def fresh_model(task):
  """The runlocal VAR, freshly initialized (built once: initialization compiles for seconds)."""
  config = var_config.get_config("runlocal")
  return _build_under_jit(lambda: MODELS.get("var")(config.model, **task.model_kwargs(),
                                                    rngs=nnx.Rngs(params=0)))


def test_task_tokens_are_the_tokenizers_and_bad_settings_fail(task, tmp_path):
  kwargs = task.model_kwargs()
  assert kwargs["scales"] == (1, 2, 3, 4, 6, 8) and kwargs["num_classes"] == 10
  batch = task.splits["val"].get_batch(np.arange(4))
  assert batch["tokens"].shape == (4, 130) and batch["scale_inputs"].shape == (4, 129, 8)
  images = task.data.val.arrays["inputs"][:4]
  graphdef, state = nnx.split(task.tokenizer)

  @jax.jit
  def encode(state, images):
    tokenizer = nnx.merge(graphdef, state)
    token_maps = tokenizer.encode_indices(images.astype(jnp.float32) / 127.5 - 1)
    return token_maps, tokenizer.next_scale_inputs(token_maps)

  token_maps, inputs = encode(state, jnp.asarray(images))
  np.testing.assert_array_equal(
      batch["tokens"], np.concatenate([np.asarray(m).reshape(4, -1) for m in token_maps], 1))
  np.testing.assert_allclose(
      batch["scale_inputs"].astype(np.float32),
      np.concatenate([np.asarray(x).reshape(4, -1, 8) for x in inputs], 1), rtol=2e-3,
      atol=2e-3)  # stored as float16

  config = var_config.get_config("runlocal")
  config.task.update(tokenizer_workdir=str(tmp_path / "none"))
  # The library reads the tokenizer, never trains it: the error names the run and its command.
  with pytest.raises(workdir_lib.MissingRunError,
                     match=f"VAR tokenizer in {tmp_path / 'none'} has not finished.*"
                           f"--workdir={tmp_path / 'none'} --config=experiments/configs/"
                           "var_tokenizer.py:data=mnist,seed=2021,runlocal"):
    TASKS.get("next_scale")(config)
  assert not (tmp_path / "none").exists()
  config = var_config.get_config("runlocal")
  config.data.name = "cifar10"
  with pytest.raises(ValueError, match="is a 'var_tokenizer' run on 'mnist'; this run needs "
                                       "a 'var_tokenizer' run on 'cifar10'"):
    TASKS.get("next_scale")(config)
  config = var_config.get_config("runlocal")
  config.task.guidance_schedule = "cosine"
  with pytest.raises(ValueError, match="valid: linear, constant"):
    TASKS.get("next_scale")(config)


def test_task_loss_is_finite_and_decreases(task, fresh_model):
  graphdef, params, rest = nnx.split(fresh_model, nnx.Param, ...)
  batch = jax.tree.map(jnp.asarray, task.splits["train"].get_batch(np.arange(16)))
  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      return task.loss(nnx.merge(graphdef, p, rest), batch, train=True,
                       rngs=nnx.Rngs(dropout=jax.random.key(0)))

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  opt_state = optimizer.init(params)
  losses = []
  for _ in range(6):
    params, opt_state, loss, metrics = step(params, opt_state)
    losses.append(float(loss))
  assert all(math.isfinite(v) for v in losses)
  assert losses[0] == pytest.approx(math.log(32), rel=0.05)  # a fresh head: ~uniform
  assert np.all(np.diff(losses) < 0) and losses[-1] < 0.9 * losses[0], losses
  assert set(metrics) == {"accuracy"}

  val = dict(task.splits["val"].get_batch(np.arange(8)), mask=np.ones(8, np.float32))
  val["mask"][6:] = 0.0
  sums = jax.jit(lambda p, b: task.eval_sums(nnx.merge(graphdef, p, rest), b))(params, val)
  summary = task.summarize({k: float(v) for k, v in sums.items()})
  assert float(sums["count"]) == 6
  assert set(summary) == {"loss", "accuracy"} | {f"accuracy_{s}x{s}" for s in task.scales}
  assert math.isfinite(summary["loss"]) and 0 <= summary["accuracy"] <= 1


def test_final_metrics_and_pictures_with_a_fake_classifier(task, fresh_model, tmp_path,
                                                           monkeypatch):
  monkeypatch.setattr(task, "_best_model", fresh_model)  # as if loaded from a checkpoint
  monkeypatch.setattr(task, "samples_per_class", 2)
  monkeypatch.setattr(task, "sample_batch_size", 20)
  monkeypatch.setattr(next_scale, "PICTURE_SAMPLES_PER_CLASS", 2)
  monkeypatch.setattr(task, "_samples", None)  # final_metrics sets it; restored afterwards
  seen = {}

  class FakeClassifier:
    def logits(self, images):
      return np.eye(10)[np.arange(len(images)) % 10]

    def features(self, images):
      return images.reshape(len(images), -1)[:, :4].astype(np.float64)

  def sample_scores(samples, labels, real, classifier, *, inception_weights=""):
    assert inception_weights == ""  # the config sets no Inception weights: no FID
    seen.setdefault("samples", samples)
    seen.update(labels=labels, real=real)
    return {"class_accuracy": float(np.mean(
        np.argmax(classifier.logits(samples), -1) == labels)),
            "classifier_frechet_distance": 1.5}

  monkeypatch.setattr(next_scale.metrics, "reference_classifier", lambda run: FakeClassifier())
  monkeypatch.setattr(next_scale.metrics, "sample_scores", sample_scores)

  results = task.final_metrics(None, tmp_path)
  assert seen["samples"].dtype == np.uint8 and seen["samples"].shape == (20, 28, 28, 1)
  np.testing.assert_array_equal(seen["labels"], np.repeat(np.arange(10), 2))
  assert seen["real"].shape == (2000, 28, 28, 1)
  assert results["num_samples"] == 20 and "class_accuracy_unguided" in results
  assert (tmp_path / "samples.npz").exists()
  paths = task.write_pictures(None, tmp_path)
  assert [p.name for p in paths] == ["samples.png", "scales.png"]
  assert all(p.exists() for p in paths)
