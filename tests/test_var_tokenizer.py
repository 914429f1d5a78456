"""VAR's multi-scale residual VQ tokenizer against its equations (numpy on the module's own
weights), and the promises of its design: each added scale refines the latent, the encoder
sees the identity gradient through the quantizer, tokens decode to the forward pass's
reconstruction, dead codes are restarted (through the trainer too)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import paperzoo
from experiments.configs import var_tokenizer as var_tokenizer_config
from paperzoo import workdir as workdir_lib
from paperzoo.models import var_tokenizer as vt

SCALES = (1, 2, 3, 4, 6, 8)


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "name": "var_tokenizer", "channels": (8, 16, 16), "num_res_blocks": 1, "latent_dim": 8,
      "padded_size": 32, "scales": SCALES, "codebook_size": 32, **overrides})


def random_images(seed: int, n: int = 4) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, 28, 28, 1)), jnp.float32)


def numpy_initialized(make, seed: int = 0):
  """`make()`'s module with numpy-drawn weights (kernels N(0, 1/fan_in), norm scales 1, biases
  0, codebooks N(0, 0.1^2)) and fresh codebook statistics. Its own initializers would compile
  one XLA program per kernel shape, most of a CPU test's time; the equations hold for any
  weights."""
  model = nnx.eval_shape(make)
  rng = np.random.default_rng(seed)

  def draw(path, value):
    name = getattr(path[-1], "key", None)
    if value.dtype != jnp.float32:
      return jnp.zeros(value.shape, value.dtype)
    if name == "scale":
      return jnp.ones(value.shape)
    if name == "bias":
      return jnp.zeros(value.shape)
    fan_in = int(np.prod(value.shape[:-1])) if name == "kernel" else 100
    return jnp.asarray(rng.normal(size=value.shape) / np.sqrt(fan_in), jnp.float32)

  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
  quantizer = model if isinstance(model, vt.MultiScaleResidualQuantizer) else model.quantizer
  quantizer.reset_statistics()
  return model


def tiny_quantizer(dim: int = 8, **kwargs) -> vt.MultiScaleResidualQuantizer:
  kwargs = {"scales": SCALES, "codebook_size": 32, **kwargs}
  return numpy_initialized(lambda: vt.MultiScaleResidualQuantizer(dim, **kwargs,
                                                                  rngs=nnx.Rngs(params=0)))


@nnx.jit(static_argnames="train")
def quantize(quantizer, f, train=False):
  return quantizer(f, train=train)


# ------------------------------------------------------------------------------------------
# The pieces.
# ------------------------------------------------------------------------------------------
def test_area_downsample_keeps_constants_and_is_the_block_mean():
  constant = jnp.full((2, 8, 8, 3), 1.7)
  for size in SCALES:
    np.testing.assert_allclose(vt.area_downsample(constant, size), 1.7, rtol=1e-6)
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  for size in (1, 2, 4, 8):
    block = 8 // size
    expected = x.reshape(2, size, block, size, block, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(vt.area_downsample(jnp.asarray(x), size), expected, atol=1e-6)
  # 8 -> 3: torch's adaptive windows [0, 3), [2, 6), [5, 8).
  np.testing.assert_allclose(vt.area_downsample(jnp.asarray(x), 3)[:, 1, 2],
                             x[:, 2:6, 5:8].mean(axis=(1, 2)), atol=1e-6)


def test_upsample_is_torch_interpolate():
  x = np.random.default_rng(1).normal(size=(2, 3, 3, 4)).astype(np.float32)
  expected = jax.image.resize(jnp.asarray(x), (2, 8, 8, 4), "bicubic-pytorch", antialias=False)
  np.testing.assert_allclose(vt.upsample(jnp.asarray(x), 8, "bicubic"), expected, atol=1e-5)
  for method in vt.UPSAMPLE_METHODS:
    np.testing.assert_allclose(vt.upsample(jnp.full((1, 2, 2, 1), 0.3), 8, method), 0.3,
                               rtol=1e-5)
  torch = pytest.importorskip("torch")
  for size in SCALES[:-1]:
    x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
    as_torch = torch.from_numpy(x).permute(0, 3, 1, 2)
    for method in vt.UPSAMPLE_METHODS:
      extra = {} if method == "nearest" else {"align_corners": False}
      reference = torch.nn.functional.interpolate(as_torch, size=(8, 8), mode=method, **extra)
      np.testing.assert_allclose(vt.upsample(jnp.asarray(x), 8, method),
                                 reference.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    big = np.random.default_rng(size).normal(size=(2, 8, 8, 3)).astype(np.float32)
    reference = torch.nn.functional.interpolate(torch.from_numpy(big).permute(0, 3, 1, 2),
                                                size=(size, size), mode="area")
    np.testing.assert_allclose(vt.area_downsample(jnp.asarray(big), size),
                               reference.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_nearest_codes_is_the_numpy_argmin():
  rng = np.random.default_rng(2)
  z = rng.normal(size=(3, 5, 5, 6)).astype(np.float32)
  codebook = rng.normal(size=(40, 6)).astype(np.float32)
  distances = np.sum((z[..., None, :] - codebook) ** 2, axis=-1)
  np.testing.assert_array_equal(vt.nearest_codes(jnp.asarray(z), jnp.asarray(codebook)),
                                np.argmin(distances, axis=-1))


def test_phi_sharing_follows_var():
  # VAR: ticks linspace(1/12, 11/12, 4); scale k of 6 sits at k / 5.
  assert [vt.phi_index(k, 6, 4) for k in range(6)] == [0, 0, 1, 2, 3, 3]
  assert vt.phi_index(0, 1, 4) == 0


def test_bad_configs_fail_clearly():
  def build(input_shape=(28, 28, 1), **overrides):
    nnx.eval_shape(lambda: vt.VARTokenizer(tiny_config(**overrides), input_shape=input_shape,
                                           rngs=nnx.Rngs(params=0)))

  with pytest.raises(ValueError, match="strictly increasing"):
    build(scales=(1, 3, 2, 8))
  with pytest.raises(ValueError, match="must equal the latent side 8"):
    build(scales=(1, 2, 4))
  with pytest.raises(ValueError, match="not divisible by 4"):
    build(input_shape=(30, 30, 1), padded_size=0)
  with pytest.raises(ValueError, match="valid: ema, loss"):
    build(codebook_update="kmeans")
  with pytest.raises(ValueError, match="valid: bicubic, bilinear, nearest"):
    build(upsample="area")


# ------------------------------------------------------------------------------------------
# The residual quantizer.
# ------------------------------------------------------------------------------------------
def test_each_scale_refines_the_latent_exactly_when_zero_is_a_code():
  """With block upsampling (nearest, divisible scales), phi = identity and 0 in the codebook,
  |r - up(c)|^2 = |r|^2 + n (|area(r) - c|^2 - |area(r)|^2) <= |r|^2: never worse."""
  quantizer = tiny_quantizer(4, scales=(1, 2, 4, 8), codebook_size=64, upsample_method="nearest",
                             phi_residual_ratio=0.0, restart_after_steps=0)
  codebook = np.random.default_rng(3).normal(size=(64, 4)).astype(np.float32)
  codebook[0] = 0.0
  quantizer.codebook_vectors[...] = jnp.asarray(codebook)
  f = jnp.asarray(np.random.default_rng(4).normal(size=(5, 8, 8, 4)), jnp.float32)
  errors = np.asarray(quantize(quantizer, f)["partial_errors"])
  assert np.all(np.diff(errors) <= 1e-7), errors
  assert errors[-1] < 0.5 * np.mean(np.asarray(f) ** 2)


def test_each_scale_refines_the_latent_with_a_data_fitted_codebook():
  """The default quantizer (bicubic, scales 1..8, phi's) after a few EMA/restart steps on the
  data: every added scale lowers |f_hat_k - f|^2 (deterministic: fixed seeds)."""
  quantizer = tiny_quantizer(8, codebook_size=128, ema_decay=0.5)
  rng = np.random.default_rng(5)
  smooth = vt.upsample(jnp.asarray(rng.normal(size=(16, 2, 2, 8)), jnp.float32), 8, "bilinear")
  f = smooth + 0.3 * jnp.asarray(rng.normal(size=(16, 8, 8, 8)), jnp.float32)
  for _ in range(5):
    quantize(quantizer, f, train=True)
  errors = np.asarray(quantize(quantizer, f)["partial_errors"])
  assert np.all(np.diff(errors) < 0), errors
  assert errors[-1] < 0.25 * float(jnp.mean(f ** 2))


def test_straight_through_gradient_is_the_identity_and_vq_loss_its_formula():
  quantizer = tiny_quantizer(8)
  f = jnp.asarray(np.random.default_rng(6).normal(size=(2, 8, 8, 8)), jnp.float32)
  weights = jnp.asarray(np.random.default_rng(7).normal(size=f.shape), jnp.float32)
  out = quantize(quantizer, f)
  np.testing.assert_allclose(out["f_hat_st"], out["f_hat"], atol=1e-5)  # value: f_hat
  graphdef, state = nnx.split(quantizer)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(
      nnx.merge(graphdef, state)(x)["f_hat_st"] * weights)))(f)
  np.testing.assert_allclose(grad, weights, atol=1e-6)  # gradient: identity
  # Codebook and commitment terms have the same value, the mean partial error over scales.
  np.testing.assert_allclose(out["vq_loss"], 1.25 * np.mean(out["partial_errors"]), rtol=1e-5)
  # Per image: the same terms, each image's latent error alone.
  for i in range(2):
    np.testing.assert_allclose(out["vq_loss_per_example"][i],
                               quantize(quantizer, f[i:i + 1])["vq_loss"], rtol=1e-5)
  np.testing.assert_allclose(np.mean(out["vq_loss_per_example"]), out["vq_loss"], rtol=1e-6)


def test_tokens_decode_to_the_forward_reconstruction_and_give_the_transformer_inputs():
  model = numpy_initialized(lambda: vt.VARTokenizer(
      tiny_config(num_res_blocks=0), input_shape=(28, 28, 1), rngs=nnx.Rngs(params=0)))
  images = random_images(8)

  @nnx.jit
  def everything(model, images):
    indices = model.encode_indices(images)
    f_hat, steps, prefixes = jnp.zeros((4, 8, 8, 8)), [], []
    for k in range(len(SCALES) - 1):
      f_hat = model.add_scale(f_hat, k, indices[k])
      steps.append(model.next_scale_input(f_hat, k))
      prefixes.append(vt.area_downsample(model.fhat_from_indices(indices[:k + 1]),
                                         SCALES[k + 1]))
    return {"forward": model({"inputs": images}, train=False), "indices": indices,
            "decoded": model.decode_indices(indices),
            "f_hat": model.quantizer(model.encode(images))["f_hat"],
            "f_hat_from_indices": model.fhat_from_indices(indices),
            "inputs": model.next_scale_inputs(indices), "steps": steps, "prefixes": prefixes}

  out = everything(model, images)
  forward, indices = out["forward"], out["indices"]
  assert [i.shape for i in indices] == [(4, s, s) for s in SCALES]
  assert all(i.dtype == jnp.int32 for i in indices)
  for a, b in zip(indices, forward["indices"]):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(out["decoded"], forward["reconstruction"], atol=1e-5)
  assert forward["reconstruction"].shape == images.shape  # the padding is cropped
  np.testing.assert_allclose(out["f_hat_from_indices"], out["f_hat"], atol=1e-5)
  assert [x.shape for x in out["inputs"]] == [(4, s, s, 8) for s in SCALES[1:]]
  for k in range(len(SCALES) - 1):
    np.testing.assert_allclose(out["inputs"][k], out["prefixes"][k], atol=1e-5)
    np.testing.assert_allclose(out["steps"][k], out["inputs"][k], atol=1e-5)
  with pytest.raises(ValueError, match=r"must be \[B, 3, 3\]"):
    model.scale_contribution(2, indices[1])


def distance_to_nearest(vectors: np.ndarray, pool: np.ndarray) -> np.ndarray:
  return np.min(np.sum((vectors[:, None] - pool[None]) ** 2, -1), axis=1)


@pytest.mark.parametrize("update", vt.CODEBOOK_UPDATES)
def test_dead_codes_are_restarted_from_lookup_inputs_and_live_codes_kept(update):
  quantizer = tiny_quantizer(4, scales=(1, 2, 4), codebook_size=16, codebook_update=update,
                             restart_after_steps=3)
  f = jnp.asarray(np.random.default_rng(9).normal(size=(6, 4, 4, 4)), jnp.float32)

  def lookup_pool(out):
    return np.concatenate([np.asarray(z).reshape(-1, 4) for z in out["lookup_inputs"]])

  # Every code starts stale, so the first training step draws every code it did not choose
  # from the data.
  out = quantize(quantizer, f, train=True)
  codebook = np.asarray(quantizer.codebook())
  used = np.unique(np.concatenate([np.asarray(i).ravel() for i in out["indices"]]))
  unused = np.setdiff1d(np.arange(16), used)
  assert len(unused) and np.all(distance_to_nearest(codebook[unused], lookup_pool(out)) < 1e-10)
  assert np.all(np.asarray(quantizer.steps_stale[...]) == 0)
  assert int(quantizer.training_steps[...]) == 1

  # Codes 0..3: unreachable and one step from dead; the others fresh.
  far = codebook.copy()
  far[:4] = 1e3
  if update == "ema":
    quantizer.codebook_vectors[...] = jnp.asarray(far)
  else:
    quantizer.codebook_offset[...] = jnp.asarray(far) - quantizer.codebook_vectors[...]
  quantizer.steps_stale[...] = jnp.asarray([2] * 4 + [0] * 12, jnp.int32)
  out = quantize(quantizer, f, train=True)
  after = np.asarray(quantizer.codebook())
  used = set(np.concatenate([np.asarray(i).ravel() for i in out["indices"]]).tolist())
  assert not used & {0, 1, 2, 3}
  assert np.all(distance_to_nearest(after[:4], lookup_pool(out)) < 1e-10)  # restarted
  assert np.all(np.asarray(quantizer.steps_stale[...])[:4] == 0)
  assert np.all(np.asarray(quantizer.steps_unused[...])[:4] >= 1)  # restarted is not used
  if update == "loss":  # the optimizer owns live codes: a restart leaves them untouched
    np.testing.assert_array_equal(after[4:], far[4:])


def test_the_trainer_carries_the_codebook_statistics_and_the_loss_decreases(tmp_path):
  config = var_tokenizer_config.get_config("runlocal")
  config.train.num_steps = 8
  config.train.plots = False
  config.optimizer.warmup_steps = 0
  config.optimizer.learning_rate = 3e-3
  config.model.restart_after_steps = 2
  results = paperzoo.train_and_evaluate(config, tmp_path)
  assert results["status"] == "done" and results["steps"] == 8
  records = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
  losses = [r["loss"] for r in records]
  assert len(losses) == 8 and np.all(np.isfinite(losses)), losses
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  assert np.isfinite(results["val"]["psnr"]) and 0 < results["val"]["codebook_usage"] <= 1
  # The best checkpoint's model state holds every step's forward-pass updates (a state that was
  # not carried from step to step would count 1 step), and a codebook drawn from the data.
  model, task = workdir_lib.load_best_model(tmp_path, config=config)
  initial = vt.VARTokenizer(config.model, **task.model_kwargs(), rngs=nnx.Rngs(
      params=jax.random.fold_in(jax.random.key(config.seed), 0)))  # the trainer's init key
  quantizer = model.quantizer
  assert int(quantizer.training_steps[...]) == 8
  assert not np.allclose(quantizer.codebook(), initial.quantizer.codebook())
  assert np.any(np.asarray(quantizer.steps_unused[...]) < vt.NEVER_USED)
  # Evaluation sums leave a padded last batch's padding rows out, the VQ loss included.
  padded = dict(task.splits["val"].get_batch(np.array([0, 1, 2, 2])),
                mask=np.array([1.0, 1.0, 1.0, 0.0], np.float32))
  real = dict(task.splits["val"].get_batch(np.arange(3)), mask=np.ones(3, np.float32))
  with_padding, without = task.eval_sums(model, padded), task.eval_sums(model, real)
  for name in without:
    np.testing.assert_allclose(with_padding[name], without[name], rtol=1e-5, err_msg=name)
