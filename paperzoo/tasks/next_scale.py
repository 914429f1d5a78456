r"""Next-scale prediction: VAR's second stage, a transformer over a frozen multi-scale tokenizer.

Registered as task "next_scale" (Tian et al., NeurIPS 2024, Sec. 3.2; the model is
`paperzoo.models.var`). The tokenizer (`paperzoo.models.var_tokenizer`) is a finished run of
this project's trainer, named by `task.tokenizer_workdir`; it is loaded from its best checkpoint
(`paperzoo.workdir.load_best_model`) and never trained here: `required_runs` names it, so the
trainer refuses to start without it and `python -m experiments.run` trains it first.

Data: an image data set (kind "image", e.g. mnist or cifar10, the classification splits), the
one the tokenizer was trained on. Every image of every split is
encoded once into its token maps r_1..r_K (flattened scale by scale into "tokens" int32 [L]) and
the teacher-forcing inputs x_2..x_K (the tokenizer's `next_scale_inputs`, flattened into
"scale_inputs" [L - n_1, D], stored as float16 to halve the memory: CIFAR-10's 60,000 images
take ~0.5 GB). The arrays are cached in `cache_dir("var_tokens")`, keyed by the sha256 of the
tokenizer's best checkpoint files and the `data` config section, so a retrained tokenizer or
another split gets new tokens and deleting the cache only costs the encoding time.

Loss: cross-entropy of the teacher-forced logits over all L positions of all scales, averaged
with equal weight per token (VAR's `loss_weight` = 1 / L: a scale weighs by its token count,
so the finest scales dominate, as in VAR). Training metric: token accuracy.

Evaluation over a whole split: `loss` (mean NLL per token, nats), `accuracy` (top-1 token
accuracy) and `accuracy_<s>x<s>` per scale. Model selection: validation `loss` (min).

After training (`final_metrics`): the best checkpoint is rebuilt (`load_best_model` on this
run's workdir), `samples_per_class` images per class are sampled with guidance
(`paperzoo.models.var.sample`: KV cache, classifier-free guidance, top-k / top-p) and scored by
the data set's reference classifier (`paperzoo.generation.metrics.sample_scores`: class accuracy,
Frechet distance in its feature space), and again without guidance (class accuracy and distance
`*_unguided`, to show what guidance buys), each with standard FID ("fid", "fid_unguided") when
`inception_weights` names the Inception weights file (`paperzoo.generation.inception`); the
guided samples go to `samples.npz`.
The reference classifier is another finished run (`paperzoo.generation.metrics.reference_run`);
`samples_per_class=0` skips all of this, and then no reference classifier is needed (runlocal).
Pictures: `samples.png` (rows = classes) and `scales.png` (one sample per class decoded from
f_hat after 1, 2, ..., K scales: the image built coarse to fine).

Config keys (`config.task`):
  tokenizer_workdir  (str, required) workdir of a finished var_tokenizer run on this data set
  tokenizer_config   (str, "")      the `experiments/configs/var_tokenizer.py` argument that
                                    trains it ("" = "data=<data name>"): shown in the error
                                    when it is missing, and what `experiments.run` trains
  reference_workdir  (str, "")      the reference classifier's workdir ("" = the shared
                                    cache_dir("reference_classifiers")/<data name>)
  reference_config   (str, "")      the `experiments/configs/reference_classifier.py` argument
                                    that trains it ("" = "data=<data name>")
  guidance_scale     (float, 2.0)   s of the module docstring of paperzoo.models.var (0: none)
  guidance_schedule  (str, "linear") "linear" (VAR's ramp over scales) | "constant"
  top_k              (int, 0)       keep the k most likely tokens (0: all)
  top_p              (float, 0.0)   nucleus mass (0: off)
  temperature        (float, 1.0)   logits / temperature before filtering
  samples_per_class  (int, 50)      samples per class scored at the end (0: none)
  sample_batch_size  (int, 250)     samples per jitted sampler call
  sample_seed        (int, 0)       seed of the sampling
  inception_weights  (str, "")      path of the FID Inception weights (.npz,
                                    paperzoo.generation.inception); set: final_metrics adds
                                    "fid" against the test images ("": off); checked when the
                                    task is built, so a wrong path fails before training
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from paperzoo import plots
from paperzoo import sharding
from paperzoo import workdir as workdir_lib
from paperzoo.data import batches
from paperzoo.data import classification as classification_data
from paperzoo.data import files
from paperzoo.generation import inception
from paperzoo.generation import metrics
from paperzoo.models import var as var_model
from paperzoo.registry import DATASETS, TASKS
from paperzoo.tasks.generation import to_uint8
from paperzoo.tasks.tokenizer import to_pixels

TOKEN_CACHE_FORMAT = 1  # bump when the cached arrays change meaning
PICTURE_SAMPLES_PER_CLASS = 8
_ENCODE_BATCH = 500


# --------------------------------------------------------------------------------------------
# The frozen tokenizer.
# --------------------------------------------------------------------------------------------
def tokenizer_run(config: Any) -> workdir_lib.RequiredRun:
  """The finished var_tokenizer run that `config` reads: `task.tokenizer_workdir`, trained by
  `experiments/configs/var_tokenizer.py:<task.tokenizer_config>`."""
  get = config.task.get
  workdir = get("tokenizer_workdir", "")
  if not workdir:
    raise ValueError("task.tokenizer_workdir is empty: set it to the workdir of a var_tokenizer "
                     "run (experiments/configs/var.py does)")
  data_name = config.data.name
  return workdir_lib.RequiredRun(
      role="VAR tokenizer", workdir=pathlib.Path(workdir).expanduser(),
      config=f"var_tokenizer.py:{get('tokenizer_config', '') or f'data={data_name}'}",
      model="var_tokenizer", data=data_name)


def encode_images(tokenizer: nnx.Module, images: np.ndarray, *,
                  batch_size: int = _ENCODE_BATCH) -> dict[str, np.ndarray]:
  """uint8 images [N, H, W, C] -> {"tokens": int32 [N, L], "scale_inputs": float16
  [N, L - n_1, D]} (module docstring), `batch_size` at a time (the last batch padded)."""
  graphdef, state = nnx.split(tokenizer)

  @jax.jit
  def encode(state, images):
    model = nnx.merge(graphdef, state)
    token_maps = model.encode_indices(to_pixels(images))
    inputs = model.next_scale_inputs(token_maps)
    batch = images.shape[0]
    return (jnp.concatenate([m.reshape(batch, -1) for m in token_maps], axis=1),
            jnp.concatenate([x.reshape(batch, -1, x.shape[-1]) for x in inputs],
                            axis=1).astype(jnp.float16))

  tokens, scale_inputs = batches.map_batches(lambda indices: encode(state, images[indices]),
                                             len(images), batch_size)
  return {"tokens": tokens.astype(np.int32), "scale_inputs": scale_inputs}


# --------------------------------------------------------------------------------------------
# The task.
# --------------------------------------------------------------------------------------------
@TASKS.register("next_scale")
class NextScaleTask:
  """Learn p(r_1..r_K | class) of a frozen tokenizer's token maps (module docstring)."""

  selection_metric = "loss"
  selection_mode = "min"
  data_kinds = ("image",)

  @staticmethod
  def required_runs(config: Any) -> list[workdir_lib.RequiredRun]:
    """The tokenizer, and the reference classifier when samples are scored."""
    return [tokenizer_run(config)] + metrics.scoring_runs(
        config, int(config.task.get("samples_per_class", 50)))

  def __init__(self, config: Any):
    get = config.task.get
    self.config = config
    name = config.data.name
    load = DATASETS.get(name, kinds=self.data_kinds)
    self.guidance_scale = float(get("guidance_scale", 2.0))
    self.guidance_schedule = get("guidance_schedule", "linear")
    var_model.guidance_at(0, 1, 0.0, self.guidance_schedule)  # fails on an unknown schedule
    self.top_k = int(get("top_k", 0))
    self.top_p = float(get("top_p", 0.0))
    self.temperature = float(get("temperature", 1.0))
    if self.top_k < 0 or not 0.0 <= self.top_p <= 1.0 or not self.temperature > 0:
      raise ValueError(f"need task.top_k >= 0, 0 <= task.top_p <= 1 and task.temperature > 0; "
                       f"got {self.top_k}, {self.top_p}, {self.temperature}")
    self.samples_per_class = int(get("samples_per_class", 50))
    self.sample_batch_size = int(get("sample_batch_size", 250))
    self.sample_seed = int(get("sample_seed", 0))
    self.inception_weights = str(get("inception_weights", ""))
    if self.inception_weights:
      inception.read_weights(self.inception_weights)  # fail now, not after training

    # The frozen tokenizer: a finished run (never trained here).
    tokenizer = tokenizer_run(config)
    self.tokenizer_workdir = tokenizer.workdir
    tokenizer_config = workdir_lib.check_required(tokenizer)
    self.tokenizer, _ = workdir_lib.load_best_model(tokenizer.workdir, config=tokenizer_config)
    self.scales = tuple(int(s) for s in self.tokenizer.scales)
    self.offsets = var_model.scale_offsets(self.scales)
    self.latent_dim = int(self.tokenizer.quantizer.dim)
    self.codebook_size = int(self.tokenizer.quantizer.codebook_size)

    # The images, and their tokens (cached).
    self.data = load(config.data)
    self.num_classes = self.data.num_classes
    key = hashlib.sha256(json.dumps({
        "format": TOKEN_CACHE_FORMAT,
        "tokenizer": workdir_lib.checkpoint_sha256(self.tokenizer_workdir),
        "data": json.loads(config.data.to_json())}, sort_keys=True).encode()).hexdigest()[:20]
    self.token_cache_path = files.cache_dir("var_tokens") / f"{name}_{key}.npz"
    arrays = files.cached_arrays(self.token_cache_path, self._encode_splits)
    self.splits = {split: classification_data.ArraySplit({
        "tokens": arrays[f"{split}_tokens"], "scale_inputs": arrays[f"{split}_scale_inputs"],
        "label": getattr(self.data, split).arrays["label"]})
        for split in ("train", "val", "test")}
    self._best_model: nnx.Module | None = None
    # (samples, labels, token maps) of final_metrics, reused by the pictures.
    self._samples: tuple[np.ndarray, np.ndarray, list[np.ndarray]] | None = None

  def _encode_splits(self) -> dict[str, np.ndarray]:
    arrays = {}
    for split in ("train", "val", "test"):
      encoded = encode_images(self.tokenizer, getattr(self.data, split).arrays["inputs"])
      arrays.update({f"{split}_{k}": v for k, v in encoded.items()})
    return arrays

  def model_kwargs(self) -> dict[str, Any]:
    return dict(num_classes=self.num_classes, scales=self.scales, latent_dim=self.latent_dim,
                codebook_size=self.codebook_size)

  # ------------------------------------------------------------------------------------------
  # Loss and evaluation.
  # ------------------------------------------------------------------------------------------
  @staticmethod
  def model_inputs(batch: dict[str, Any]) -> dict[str, jax.Array]:
    return {"label": jnp.asarray(batch["label"]).astype(jnp.int32),
            "scale_inputs": jnp.asarray(batch["scale_inputs"]).astype(jnp.float32)}

  def _token_nll(self, model: Any, batch: dict[str, jax.Array], *, train: bool, rngs: Any
                 ) -> tuple[jax.Array, jax.Array]:
    """NLL [B, L] and correctness [B, L] of the teacher-forced logits."""
    logits = model(self.model_inputs(batch), train=train, rngs=rngs)
    tokens = batch["tokens"].astype(jnp.int32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    return nll, (jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32)

  def loss(self, model: Any, batch: dict[str, jax.Array], *, train: bool, rngs: Any
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    nll, correct = self._token_nll(model, batch, train=train, rngs=rngs)
    return jnp.mean(nll), {"accuracy": jnp.mean(correct)}

  def eval_sums(self, model: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    nll, correct = self._token_nll(model, batch, train=False, rngs=None)
    mask = batch["mask"].astype(jnp.float32)
    sums = {"nll": jnp.sum(jnp.mean(nll, axis=1) * mask),
            "correct": jnp.sum(jnp.mean(correct, axis=1) * mask), "count": jnp.sum(mask)}
    for k, side in enumerate(self.scales):
      per_scale = jnp.mean(correct[:, self.offsets[k]:self.offsets[k + 1]], axis=1)
      sums[f"correct_{side}x{side}"] = jnp.sum(per_scale * mask)
    return sums

  def summarize(self, sums: dict[str, float]) -> dict[str, float]:
    count = sums["count"]
    summary = {"loss": sums["nll"] / count, "accuracy": sums["correct"] / count}
    for side in self.scales:
      summary[f"accuracy_{side}x{side}"] = sums[f"correct_{side}x{side}"] / count
    return summary

  # ------------------------------------------------------------------------------------------
  # Sampling.
  # ------------------------------------------------------------------------------------------
  def best_model(self, workdir: pathlib.Path) -> nnx.Module:
    """The VAR of `workdir`'s best checkpoint (EMA parameters if the run kept an EMA)."""
    if self._best_model is None:
      self._best_model, _ = workdir_lib.load_best_model(workdir, config=self.config, task=self)
    return self._best_model

  def make_sampler(self, model: nnx.Module
                   ) -> Callable[[jax.Array, jax.Array, jax.Array],
                                 tuple[jax.Array, list[jax.Array]]]:
    """A jitted `sample(labels [B], key, guidance_scale) -> (images, token maps)` with this
    task's schedule and filters; the guidance scale is traced, so guided and unguided sampling
    share one compilation (both run the null-class rows)."""
    model_def, model_state = nnx.split(model)
    tokenizer_def, tokenizer_state = nnx.split(self.tokenizer)

    @jax.jit
    def run(model_state, tokenizer_state, labels, key, guidance_scale):
      return var_model.sample(
          nnx.merge(model_def, model_state), nnx.merge(tokenizer_def, tokenizer_state), labels,
          key, guidance_scale=guidance_scale, guidance_schedule=self.guidance_schedule,
          top_k=self.top_k, top_p=self.top_p, temperature=self.temperature)

    return lambda labels, key, scale: run(model_state, tokenizer_state, labels, key,
                                          jnp.float32(scale))

  def generate(self, model: nnx.Module, labels: np.ndarray, *,
               guidance_scale: float | None = None, seed: int | None = None,
               sampler: Callable[..., Any] | None = None
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """uint8 samples [N, H, W, C] of `labels` and their token maps, `sample_batch_size` at a
    time (the last batch padded, so one compilation)."""
    sampler = sampler or self.make_sampler(model)
    scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
    key = jax.random.key(self.sample_seed if seed is None else seed)
    labels = np.asarray(labels, np.int32)
    images, token_maps = batches.map_batches(  # keys folded from each batch's first index
        lambda indices: sampler(jnp.asarray(labels[indices]),
                                jax.random.fold_in(key, int(indices[0])), scale),
        len(labels), self.sample_batch_size, shrink=True)
    return to_uint8(np.clip(images, -1.0, 1.0)), list(token_maps)

  def decode_prefixes(self, token_maps: list[np.ndarray]) -> np.ndarray:
    """uint8 [B, K, H, W, C]: the images decoded from f_hat after 1, 2, ..., K scales of
    `token_maps` [r_1 .. r_K] (one jitted call)."""
    tokenizer_def, tokenizer_state = nnx.split(self.tokenizer)

    @jax.jit
    def decode(state, maps):
      tokenizer = nnx.merge(tokenizer_def, state)
      f_hat = jnp.zeros((maps[0].shape[0], self.scales[-1], self.scales[-1],
                         self.latent_dim), jnp.float32)
      prefixes = []
      for k, token_map in enumerate(maps):
        f_hat = tokenizer.add_scale(f_hat, k, token_map)
        prefixes.append(f_hat)
      return tokenizer.decode_fhat(jnp.concatenate(prefixes))  # [K B, H, W, C], k major

    images = np.asarray(decode(tokenizer_state, [jnp.asarray(m) for m in token_maps]))
    images = images.reshape((len(token_maps), -1) + images.shape[1:]).swapaxes(0, 1)
    return to_uint8(np.clip(images, -1.0, 1.0))

  def final_metrics(self, predict: Callable[..., Any], workdir: pathlib.Path
                    ) -> dict[str, Any]:
    """Guided and unguided sample scores of the best checkpoint (module docstring); {} when
    samples_per_class is 0."""
    del predict  # sampling needs the KV-cached decode, not the teacher-forced forward
    if self.samples_per_class <= 0:
      return {}
    model = self.best_model(pathlib.Path(workdir))
    sampler = self.make_sampler(model)
    labels = np.repeat(np.arange(self.num_classes), self.samples_per_class).astype(np.int32)
    start = time.perf_counter()
    samples, token_maps = self.generate(model, labels, sampler=sampler)
    sampling_seconds = time.perf_counter() - start
    unguided, _ = self.generate(model, labels, guidance_scale=0.0, sampler=sampler)
    self._samples = (samples, labels, token_maps)
    if sharding.is_primary_process():
      np.savez_compressed(pathlib.Path(workdir) / "samples.npz", images=samples, labels=labels)
    classifier = metrics.reference_classifier(metrics.reference_run(self.config))
    real = self.data.test.arrays["inputs"]
    # The real images' Inception features are computed once and reused for the unguided FID.
    scores = metrics.sample_scores(samples, labels, real, classifier,
                                   inception_weights=self.inception_weights)
    unguided_scores = metrics.sample_scores(unguided, labels, real, classifier,
                                            inception_weights=self.inception_weights)
    return {**{k: float(v) for k, v in scores.items()},
            **{f"{k}_unguided": float(v) for k, v in unguided_scores.items()},
            "num_samples": int(len(labels)), "guidance_scale": self.guidance_scale,
            "guidance_schedule": self.guidance_schedule, "top_k": self.top_k,
            "top_p": self.top_p, "temperature": self.temperature,
            "sampling_seconds": round(sampling_seconds, 1)}

  # ------------------------------------------------------------------------------------------
  # Pictures.
  # ------------------------------------------------------------------------------------------
  def write_pictures(self, predict: Callable[..., Any], workdir: pathlib.Path
                     ) -> list[pathlib.Path]:
    """`samples.png`: PICTURE_SAMPLES_PER_CLASS guided samples per class (those scored by
    final_metrics when it ran); `scales.png`: one sample per class decoded after each scale."""
    del predict
    workdir = pathlib.Path(workdir)
    names = self.data.class_names
    per_class = PICTURE_SAMPLES_PER_CLASS
    if self._samples is not None and self.samples_per_class >= per_class:
      samples, labels, token_maps = self._samples
    else:
      labels = np.repeat(np.arange(self.num_classes), per_class).astype(np.int32)
      samples, token_maps = self.generate(self.best_model(workdir), labels)
    shown = np.concatenate([np.flatnonzero(labels == c)[:per_class]
                            for c in range(self.num_classes)])
    paths = [plots.image_grid(
        samples[shown], [names[y] for y in labels[shown]], workdir / "samples.png",
        columns=per_class,
        title=f"VAR samples, guidance {self.guidance_scale:g} ({self.guidance_schedule}), "
              f"top-k {self.top_k}, top-p {self.top_p:g}")]

    first = np.asarray([np.flatnonzero(labels == c)[0] for c in range(self.num_classes)])
    frames = self.decode_prefixes([m[first] for m in token_maps])  # [classes, K, H, W, C]
    titles = [f"{names[c]} {side}x{side}" for c in range(self.num_classes)
              for side in self.scales]
    paths.append(plots.image_grid(frames.reshape((-1,) + frames.shape[2:]), titles,
                                  workdir / "scales.png", columns=len(self.scales),
                                  title="f_hat after 1, 2, ..., K scales, decoded"))
    return paths
