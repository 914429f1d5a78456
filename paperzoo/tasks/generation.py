r"""Class-conditional image generation with a diffusion (DDPM) or flow-matching objective.

Registered as task "diffusion"; `config.task.objective` picks the objective. The equations,
samplers and guidance are in `paperzoo.generation.diffusion`; the network (e.g. DiT,
`paperzoo.models.dit`) maps {"inputs": x_t, "t", "label"} to eps (ddpm) or a velocity (flow),
and for ddpm optionally 2C channels (eps and a learned variance, improved DDPM): the task reads
which from the output's channel count, so it needs no model key.

Data: any data set of kind "image" (mnist, cifar10), uint8 [N, H, W, C] with labels. Pixels
are scaled to [-1, 1] (x / 127.5 - 1); images are padded with black to `image_size` (MNIST
28 -> 32, two pixels each side) once, when the splits are built. Sampled
images are mapped back to uint8 and cropped to the data set's own size for scoring.

Time input of the network, on one 0..1000 scale for both objectives: ddpm the integer timestep t
(the original one, also when sampling with respaced steps), flow 1000 t for t in [0, 1].

Training (one random t per example, drawn with the noise from the step's "dropout" key):
  ddpm  t ~ U{0..T-1}, x_t = q_sample(x_0, t, eps); loss = L_simple + lambda T L_t (the L_t term
        only with a learned variance, trained through the variance alone)
  flow  t ~ U(0, 1), x_t = (1 - t) x_0 + t eps; loss = |v - (eps - x_0)|^2
Metrics: mse, vlb (ddpm, L_t in bits/dim of the sampled t).

Evaluation (`eval_sums`, deterministic in the batch: fixed timesteps and a fixed noise key, so
every evaluation of a split sees the same x_t):
  loss            the training loss averaged over K = eval_timesteps timesteps,
                  t_k = 1 + floor((k + 1/2)(T - 1) / K) (ddpm) or t_k = (k + 1/2) / K (flow)
  bits_per_dim    (ddpm) the variational bound L_T + L_0 + (T - 1)/K sum_k L_{t_k}: the prior and
                  decoder terms exact, the T - 1 KL terms by the stratified estimate over the
                  same K timesteps (an estimate: compare runs only at equal eval_timesteps)
  mse             (ddpm) the eps error alone
Model selection: validation `loss` (min).

After training (`final_metrics`, the trainer's optional hook): `samples_per_class` guided
samples of every class, scored by `paperzoo.generation.metrics.sample_scores` against the test
images with the data set's reference classifier, a finished run the task reads
(`paperzoo.generation.metrics.reference_run`; class accuracy of the samples, Frechet distance
in the classifier's feature space), plus standard FID ("fid") when
`inception_weights` names the Inception weights file (`paperzoo.generation.inception`); the
samples are saved to `samples.npz`.
Pictures: `samples.png` (rows = classes) and `denoising.png` (x_t along the sampler, one row per
class).

Config keys (`config.task`):
  objective           ("ddpm")  "ddpm" | "flow"
  num_timesteps       (1000)    T of the ddpm process
  beta_start, beta_end (1e-4, 0.02)  DDPM's linear schedule (for T = 1000; scaled by 1000 / T)
  vlb_weight          (0.001)   lambda of the hybrid loss (with a learned variance)
  image_size          (32)      pad the images (centered, black) to this side; 0: native size
  flip                (False)   random horizontal flips while training (CIFAR-10, not digits)
  eval_timesteps      (10)      K above
  flow_time_sampling  ("uniform") flow: the training times, "uniform" | "logit_normal"
                                (diffusion.flow_training_times; validation stays stratified)
  sampler             (first)   ddpm: "ddpm" | "ddim"; flow: "euler" | "heun"
  sampling_steps      (100)     respaced steps (ddpm, ddim) or ODE steps (euler, heun; heun
                                makes two network calls per step)
  ddim_eta            (0.0)     DDIM's eta (0: deterministic)
  clip_denoised       (True)    clip the predicted x_0 to [-1, 1] while sampling (ddpm, ddim)
  guidance_scale      (4.0)     classifier-free guidance scale s (1: no guidance)
  samples_per_class   (100)     samples per class scored at the end (0: no sample scores, no
                                reference classifier)
  sample_batch_size   (500)     samples drawn per jitted sampler call
  sample_seed         (0)       seed of the sampling noise (apart from config.seed)
  inception_weights   ("")      path of the FID Inception weights (.npz,
                                paperzoo.generation.inception); set: final_metrics adds "fid"
                                of the samples against the test images ("": off). Checked when
                                the task is built, so a wrong path fails before training.
  reference_workdir   ("")      the reference classifier's workdir ("" = the shared
                                cache_dir("reference_classifiers")/<data name>)
  reference_config    ("")      the `experiments/configs/reference_classifier.py` argument that
                                trains it ("" = "data=<data name>")
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from paperzoo import plots
from paperzoo import sharding
from paperzoo import workdir as workdir_lib
from paperzoo.data import augment
from paperzoo.data import batches
from paperzoo.data import classification as classification_data
from paperzoo.generation import diffusion
from paperzoo.generation import inception
from paperzoo.generation import metrics
from paperzoo.registry import DATASETS, TASKS

# The fixed noise of evaluation: every evaluation of a batch draws the same x_t.
EVAL_NOISE_SEED = 20_231_020
# The network's time input for flow matching is 1000 t, on the scale of the ddpm timesteps.
FLOW_TIME_SCALE = 1000.0
PICTURE_SAMPLES_PER_CLASS = 8
TRAJECTORY_SNAPSHOTS = 8

Predict = Callable[[dict[str, jax.Array]], jax.Array]


def to_unit_range(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8, rounded and clipped."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def pad_images(images: np.ndarray, size: int) -> np.ndarray:
  """Pads uint8 [N, H, W, C] with zeros (black) to [N, size, size, C], centered."""
  height, width = images.shape[1:3]
  if size < max(height, width):
    raise ValueError(f"task.image_size={size} is smaller than the {height}x{width} images")
  top, left = (size - height) // 2, (size - width) // 2
  return np.pad(images, ((0, 0), (top, size - height - top), (left, size - width - left),
                         (0, 0)))


def crop_images(images: np.ndarray, height: int, width: int) -> np.ndarray:
  """The inverse of `pad_images`: the centered height x width window."""
  top, left = (images.shape[1] - height) // 2, (images.shape[2] - width) // 2
  return images[:, top:top + height, left:left + width]


@TASKS.register("diffusion")
class DiffusionTask:
  """Learn p(image | class) by denoising (module docstring)."""

  selection_metric = "loss"
  selection_mode = "min"
  data_kinds = ("image",)

  @staticmethod
  def required_runs(config: Any) -> list[workdir_lib.RequiredRun]:
    """The reference classifier, when samples are scored."""
    return metrics.scoring_runs(config, int(config.task.get("samples_per_class", 100)))

  def __init__(self, config: Any):
    self.config = config
    task = config.task
    get = task.get
    self.objective = get("objective", "ddpm")
    if self.objective not in diffusion.OBJECTIVES:
      raise ValueError(f"unknown objective {self.objective!r}; valid: "
                       f"{', '.join(diffusion.OBJECTIVES)}")
    self.sampler = get("sampler", diffusion.SAMPLERS[self.objective][0])
    valid_samplers = diffusion.SAMPLERS[self.objective]
    if self.sampler not in valid_samplers:
      raise ValueError(f"unknown sampler {self.sampler!r} for objective {self.objective!r}; "
                       f"valid: {', '.join(valid_samplers)}")
    self.num_timesteps = int(get("num_timesteps", 1000))
    self.sampling_steps = int(get("sampling_steps", 100))
    self.eval_timesteps = int(get("eval_timesteps", 10))
    if self.eval_timesteps < 1:
      raise ValueError(f"task.eval_timesteps={self.eval_timesteps} must be >= 1")
    self.vlb_weight = float(get("vlb_weight", 0.001))
    self.flow_time_sampling = str(get("flow_time_sampling", "uniform"))
    if self.flow_time_sampling not in diffusion.FLOW_TIME_SAMPLINGS:
      raise ValueError(f"unknown task.flow_time_sampling {self.flow_time_sampling!r}; valid: "
                       f"{', '.join(diffusion.FLOW_TIME_SAMPLINGS)}")
    self.ddim_eta = float(get("ddim_eta", 0.0))
    self.clip_denoised = bool(get("clip_denoised", True))
    self.guidance_scale = float(get("guidance_scale", 4.0))
    self.samples_per_class = int(get("samples_per_class", 100))
    self.sample_batch_size = int(get("sample_batch_size", 500))
    self.sample_seed = int(get("sample_seed", 0))
    self.inception_weights = str(get("inception_weights", ""))
    if self.inception_weights:
      inception.read_weights(self.inception_weights)  # fail now, not after training
    self.flip = bool(get("flip", False))
    if self.objective == "ddpm":
      self.diffusion = diffusion.GaussianDiffusion.from_betas(diffusion.linear_betas(
          self.num_timesteps, float(get("beta_start", 1e-4)), float(get("beta_end", 0.02))))
      self.sampling_diffusion = diffusion.respace(
          self.diffusion, diffusion.spaced_timesteps(self.num_timesteps, self.sampling_steps))
    elif self.sampling_steps < 1:
      raise ValueError(f"task.sampling_steps={self.sampling_steps} must be >= 1")

    self.data = DATASETS.get(config.data.name, kinds=self.data_kinds)(config.data)
    self.native_shape = self.data.input_shape  # (H, W, C)
    size = int(get("image_size", 32)) or max(self.native_shape[:2])
    self.splits = {split: classification_data.ArraySplit({
        "inputs": pad_images(getattr(self.data, split).arrays["inputs"], size),
        "label": getattr(self.data, split).arrays["label"]})
        for split in ("train", "val", "test")}
    self.image_shape = (size, size, self.native_shape[2])
    self.num_classes = self.data.num_classes
    self._samples: tuple[np.ndarray, np.ndarray] | None = None  # from final_metrics

  def model_kwargs(self) -> dict[str, Any]:
    return dict(num_classes=self.num_classes, input_shape=self.image_shape)

  # ------------------------------------------------------------------------------------------
  # Losses
  # ------------------------------------------------------------------------------------------
  def _learns_variance(self, output: jax.Array) -> bool:
    channels = self.image_shape[-1]
    if output.shape[-1] == channels:
      return False
    if output.shape[-1] == 2 * channels and self.objective == "ddpm":
      return True
    raise ValueError(
        f"the model outputs {output.shape[-1]} channels for {channels}-channel images; "
        + ("flow matching predicts a velocity: set model.learn_sigma=False"
           if self.objective == "flow" else f"ddpm takes {channels} (eps) or {2 * channels} "
           "(eps and a learned variance)"))

  def _call(self, model: Any, x_t: jax.Array, time_input: jax.Array, labels: jax.Array, *,
            train: bool, rngs: Any) -> jax.Array:
    return model({"inputs": x_t, "t": time_input.astype(jnp.float32), "label": labels},
                 train=train, rngs=rngs)

  def _ddpm_terms(self, model, x0, labels, t, noise, *, train, rngs):
    """Per-example (loss, mse, L_t in bits/dim) at integer timesteps t [B]."""
    x_t = diffusion.q_sample(self.diffusion, x0, t, noise)
    output = self._call(model, x_t, t, labels, train=train, rngs=rngs)
    learned = self._learns_variance(output)
    loss, terms = diffusion.ddpm_loss(self.diffusion, output, x0, x_t, t, noise,
                                      learn_sigma=learned, vlb_weight=self.vlb_weight)
    if not learned:  # the bound of the fixed variance (the loss does not need it)
      step = diffusion.p_mean_variance(self.diffusion, output, x_t, t, learn_sigma=False,
                                       clip_denoised=False)
      terms["vlb"] = diffusion.vlb_term_bits(self.diffusion, step, x0, x_t, t)
    return loss, terms["mse"], terms["vlb"]

  def _flow_loss(self, model, x0, labels, t, noise, *, train, rngs):
    x_t = diffusion.flow_interpolate(x0, noise, t)
    velocity = self._call(model, x_t, FLOW_TIME_SCALE * t, labels, train=train, rngs=rngs)
    self._learns_variance(velocity)
    return diffusion.flow_loss(velocity, x0, noise)

  def loss(self, model: Any, batch: dict[str, jax.Array], *, train: bool, rngs: Any
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    x0 = to_unit_range(batch["inputs"])
    labels = batch["label"]
    t_key, noise_key, flip_key = jax.random.split(rngs.dropout(), 3)
    if train and self.flip:
      x0 = augment.random_flip(x0, flip_key)
    noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
    batch_size = x0.shape[0]
    if self.objective == "ddpm":
      t = jax.random.randint(t_key, (batch_size,), 0, self.num_timesteps)
      loss, mse, vlb = self._ddpm_terms(model, x0, labels, t, noise, train=train, rngs=rngs)
      return jnp.mean(loss), {"mse": jnp.mean(mse), "vlb": jnp.mean(vlb)}
    t = diffusion.flow_training_times(t_key, batch_size, self.flow_time_sampling)
    return jnp.mean(self._flow_loss(model, x0, labels, t, noise, train=train, rngs=rngs)), {}

  # ------------------------------------------------------------------------------------------
  # Evaluation
  # ------------------------------------------------------------------------------------------
  def eval_times(self) -> np.ndarray:
    """The K fixed evaluation timesteps (module docstring): int (ddpm) or float (flow)."""
    k = np.arange(self.eval_timesteps)
    if self.objective == "ddpm":
      return 1 + np.floor((k + 0.5) * (self.num_timesteps - 1) / self.eval_timesteps).astype(
          np.int64)
    return ((k + 0.5) / self.eval_timesteps).astype(np.float32)

  def eval_sums(self, model: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    x0 = to_unit_range(batch["inputs"])
    labels = batch["label"]
    mask = batch["mask"].astype(jnp.float32)
    batch_size = x0.shape[0]
    key = jax.random.key(EVAL_NOISE_SEED)
    times = self.eval_times()

    if self.objective == "flow":
      def flow_at(k):
        noise = jax.random.normal(jax.random.fold_in(key, k), x0.shape, x0.dtype)
        t = jnp.full((batch_size,), jnp.asarray(times)[k])
        return self._flow_loss(model, x0, labels, t, noise, train=False, rngs=None)

      losses = jax.lax.map(flow_at, jnp.arange(len(times)))  # [K, B]
      return {"loss": jnp.sum(jnp.mean(losses, axis=0) * mask), "count": jnp.sum(mask)}

    # ddpm: t = 0 (the decoder term) first, then the K stratified timesteps.
    all_times = jnp.asarray(np.concatenate([[0], times]), jnp.int32)

    def ddpm_at(k):
      noise = jax.random.normal(jax.random.fold_in(key, k), x0.shape, x0.dtype)
      t = jnp.full((batch_size,), all_times[k])
      return self._ddpm_terms(model, x0, labels, t, noise, train=False, rngs=None)

    loss, mse, vlb = jax.lax.map(ddpm_at, jnp.arange(len(all_times)))  # [K + 1, B] each
    kl_weight = (self.num_timesteps - 1) / len(times)
    bits = (diffusion.prior_bits(self.diffusion, x0) + vlb[0]
            + kl_weight * jnp.sum(vlb[1:], axis=0))
    return {"loss": jnp.sum(jnp.mean(loss[1:], axis=0) * mask),
            "mse": jnp.sum(jnp.mean(mse[1:], axis=0) * mask),
            "bits_per_dim": jnp.sum(bits * mask), "count": jnp.sum(mask)}

  def summarize(self, sums: dict[str, float]) -> dict[str, float]:
    count = sums["count"]
    return {name: value / count for name, value in sums.items() if name != "count"}

  # ------------------------------------------------------------------------------------------
  # Sampling
  # ------------------------------------------------------------------------------------------
  def make_sampler(self, predict: Predict, *, guidance_scale: float | None = None,
                   return_trajectory: bool = False
                   ) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array | None]]:
    """A jitted `sample(labels [B], key) -> (x_0 [B, H, W, C] in [-1, 1], trajectory)` running
    the configured sampler with classifier-free guidance; `predict(inputs)` is the network."""
    scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
    channels = self.image_shape[-1]

    def net(x, time_input, labels):
      return predict({"inputs": x, "t": time_input.astype(jnp.float32), "label": labels})

    def sample(labels, key):
      x_T = jax.random.normal(key, (labels.shape[0],) + self.image_shape, jnp.float32)
      guided = diffusion.guided_net(net, labels, null_label=self.num_classes, scale=scale,
                                    guided_channels=channels)
      if self.objective == "flow":
        return diffusion.flow_sample(lambda x, t: guided(x, FLOW_TIME_SCALE * t), x_T,
                                     num_steps=self.sampling_steps, method=self.sampler,
                                     return_trajectory=return_trajectory)
      learned = self._learns_variance(jax.eval_shape(guided, x_T, jnp.zeros(labels.shape)))
      noise_key = jax.random.fold_in(key, 1)
      if self.sampler == "ddim":
        return diffusion.ddim_sample(self.sampling_diffusion, guided, x_T, noise_key,
                                     learn_sigma=learned, eta=self.ddim_eta,
                                     clip_denoised=self.clip_denoised,
                                     return_trajectory=return_trajectory)
      return diffusion.ddpm_sample(self.sampling_diffusion, guided, x_T, noise_key,
                                   learn_sigma=learned, clip_denoised=self.clip_denoised,
                                   return_trajectory=return_trajectory)

    return jax.jit(sample)

  def generate(self, predict: Predict, labels: np.ndarray, *, guidance_scale: float | None = None,
               seed: int | None = None) -> np.ndarray:
    """uint8 samples [N, H, W, C] of `labels` at the data set's own size (padding cropped),
    drawn `sample_batch_size` at a time (the last batch padded, so one compilation)."""
    sample = self.make_sampler(predict, guidance_scale=guidance_scale)
    key = jax.random.key(self.sample_seed if seed is None else seed)
    labels = np.asarray(labels, np.int32)
    # Batch keys are folded from the batch's first index, so samples do not depend on how many
    # batches came before.
    images = batches.map_batches(
        lambda indices: sample(jnp.asarray(labels[indices]),
                               jax.random.fold_in(key, int(indices[0])))[0],
        len(labels), self.sample_batch_size, shrink=True)
    height, width = self.native_shape[:2]
    return crop_images(to_uint8(images), height, width)

  def final_metrics(self, predict: Predict, workdir: pathlib.Path) -> dict[str, Any]:
    """Sample-based scores of the trained model (module docstring); {} if samples_per_class
    is 0."""
    if self.samples_per_class <= 0:
      return {}
    start = time.perf_counter()
    labels = np.repeat(np.arange(self.num_classes), self.samples_per_class).astype(np.int32)
    samples = self.generate(predict, labels)
    sampling_seconds = time.perf_counter() - start
    self._samples = (samples, labels)
    if sharding.is_primary_process():
      np.savez_compressed(pathlib.Path(workdir) / "samples.npz", images=samples, labels=labels)
    classifier = metrics.reference_classifier(metrics.reference_run(self.config))
    scores = metrics.sample_scores(samples, labels, self.data.test.arrays["inputs"], classifier,
                                   inception_weights=self.inception_weights)
    return {**{k: float(v) for k, v in scores.items()}, "num_samples": int(len(labels)),
            "guidance_scale": self.guidance_scale, "sampler": self.sampler,
            "sampling_steps": self.sampling_steps,
            "sampling_seconds": round(sampling_seconds, 1)}

  # ------------------------------------------------------------------------------------------
  # Pictures
  # ------------------------------------------------------------------------------------------
  def write_pictures(self, predict: Predict, workdir: pathlib.Path) -> list[pathlib.Path]:
    """`samples.png`: PICTURE_SAMPLES_PER_CLASS guided samples per class (those scored by
    final_metrics when it ran); `denoising.png`: x_t along the sampler for one sample per
    class, TRAJECTORY_SNAPSHOTS snapshots from the noise to the sample."""
    workdir = pathlib.Path(workdir)
    names = self.data.class_names
    per_class = PICTURE_SAMPLES_PER_CLASS
    if self._samples is not None and self.samples_per_class >= per_class:
      samples, labels = self._samples
      shown = np.concatenate([np.flatnonzero(labels == c)[:per_class]
                              for c in range(self.num_classes)])
      samples, labels = samples[shown], labels[shown]
    else:
      labels = np.repeat(np.arange(self.num_classes), per_class).astype(np.int32)
      samples = self.generate(predict, labels)
    paths = [plots.image_grid(samples, [names[y] for y in labels], workdir / "samples.png",
                              columns=per_class,
                              title=f"{self.objective} {self.sampler} {self.sampling_steps} "
                                    f"steps, guidance {self.guidance_scale:g}")]

    sample = self.make_sampler(predict, return_trajectory=True)
    classes = jnp.arange(self.num_classes, dtype=jnp.int32)
    _, trajectory = sample(classes, jax.random.key(self.sample_seed + 1))
    trajectory = np.asarray(trajectory)  # [steps + 1, classes, H, W, C]
    picked = np.unique(np.round(np.linspace(0, len(trajectory) - 1,
                                            TRAJECTORY_SNAPSHOTS)).astype(np.int64))
    frames = to_uint8(np.clip(trajectory[picked], -1.0, 1.0)).transpose(1, 0, 2, 3, 4)
    steps = len(trajectory) - 1
    titles = [f"{names[c]} step {i}/{steps}" for c in range(self.num_classes) for i in picked]
    paths.append(plots.image_grid(frames.reshape((-1,) + frames.shape[2:]), titles,
                                  workdir / "denoising.png", columns=len(picked),
                                  title="x_t from noise (left) to the sample (right)"))
    return paths
