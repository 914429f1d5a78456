r"""Scores for generated images and for image tokenizers, with a classifier the project trains.

Standard FID needs Inception-v3 weights, which nothing here can download; so generated images are
scored in the feature space of a *reference classifier* that paperzoo trains itself, once per data
set, through the ordinary trainer (`experiments/configs/reference_classifier.py`, a small CNN,
`paperzoo.models.reference_cnn`). Its scores compare runs within paperzoo, not with published FID.
Standard FID is added where the user supplies the Inception weights file
(`paperzoo.generation.inception`, which says how to get and convert it): `sample_scores(...,
inception_weights=path)`, or `task.inception_weights` in the generation configs.

    from paperzoo.generation import metrics

    classifier = metrics.reference_classifier("mnist")     # trained once, then reused
    scores = metrics.sample_scores(samples, labels, real_images, classifier)
    # {"class_accuracy": ..., "classifier_frechet_distance": ...}

What each score is:

  class_accuracy               the fraction of class-conditional samples the reference classifier
                               labels with the class they were generated for
  classifier_frechet_distance  the Frechet distance between Gaussians fitted to the reference
                               classifier's penultimate features of real and of generated images
                               (FID's formula in another network's feature space; not FID)
  fid                          standard FID: the same distance between Inception-v3 pool3
                               features (only with an inception_weights file)
  psnr                         peak signal-to-noise ratio of reconstructions, for tokenizers
  codebook_usage               the fraction of a codebook's entries that some token uses

Frechet distance between N(m1, S1) and N(m2, S2) (Dowson and Landau 1982; FID, Heusel et al.
2017, Eq. 6):

    d^2 = |m1 - m2|^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2})

tr((S1 S2)^{1/2}) equals tr((S1^{1/2} S2 S1^{1/2})^{1/2}), and the latter is the square root of
a symmetric positive semi-definite matrix: both square roots here are eigendecompositions
(`numpy.linalg.eigh`) in float64 with the rounding-negative eigenvalues clipped to 0, where
scipy's `sqrtm` of the non-symmetric S1 S2 can return complex parts. Covariances are unbiased
(divided by n - 1). With fewer examples than dimensions in one set (n <= D, e.g. a few hundred
samples' 2048-d Inception features) the same d^2 comes from n x n products instead of D x D
eigendecompositions (`frechet_distance`).

PSNR (dB) of one image: 10 log10(peak^2 / MSE), MSE over all its pixels and channels; `psnr`
returns the mean over images. uint8 images have peak 255; float images are taken to be in
[-1, 1] (paperzoo's generative models' pixel range), whose peak-to-peak range is 2, so the two
give the same number for the same picture (up to uint8 rounding).

Reference classifiers live in `cache_dir("reference_classifiers")/<data name>` (a workdir of the
trainer); delete the folder to retrain, e.g. after changing their config.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from paperzoo.data import batches

REFERENCE_DATA_SETS = ("mnist", "cifar10")
_BATCH = 500  # images per jitted call of the reference classifier


# --------------------------------------------------------------------------------------------
# Loading a trained run.
# --------------------------------------------------------------------------------------------
def read_workdir_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The config a run was trained with (`<workdir>/config.json`; tuples come back as lists)."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {workdir} is not a paperzoo workdir")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_best_model(config: Any, workdir: str | pathlib.Path, *, task: Any = None
                    ) -> tuple[nnx.Module, Any]:
  """The model of `workdir`'s best checkpoint (its EMA parameters if the run kept an EMA) and
  the task, from the config the run was trained with.

  The abstract train state is rebuilt as the trainer builds it ({step, params, extra,
  opt_state, [ema]}, Variables unboxed to plain arrays) so that orbax restores the checkpoint
  onto it; a model config that does not match the checkpoint raises CheckpointMismatchError.
  """
  from paperzoo import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from paperzoo import optim  # pylint: disable=g-import-not-at-top
  from paperzoo import trainer  # pylint: disable=g-import-not-at-top
  from paperzoo.registry import MODELS, TASKS  # pylint: disable=g-import-not-at-top
  task = TASKS.get(config.task.name)(config) if task is None else task
  model_cls = MODELS.get(config.model.name)
  tx = optim.make_optimizer(config.optimizer, optim.make_schedule(
      config.optimizer, total_steps=1, steps_per_epoch=1))  # only the state's structure counts
  ema = float(config.train.ema_decay) > 0

  def make_model() -> nnx.Module:
    return model_cls(config.model, **task.model_kwargs(), rngs=nnx.Rngs(params=0))

  def boxed_state() -> dict[str, Any]:
    _, params, extra = nnx.split(make_model(), nnx.Param, ...)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "extra": extra,
             "opt_state": tx.init(params)}
    if ema:
      state["ema"] = params
    return state

  with nnx.use_eager_sharding(False):
    graphdef = nnx.graphdef(nnx.eval_shape(make_model))
    abstract = trainer.unbox_variables(jax.eval_shape(boxed_state))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
  checkpoints = checkpoint_lib.Checkpoints(workdir, keep=1)
  try:
    state, _ = checkpoints.restore(abstract, best=True)
  finally:
    checkpoints.close()
  return nnx.merge(graphdef, state["ema" if ema else "params"], state["extra"]), task


# --------------------------------------------------------------------------------------------
# The reference classifier.
# --------------------------------------------------------------------------------------------
class ReferenceClassifier:
  """A trained classifier of one image data set: logits and penultimate features of uint8
  images, normalized exactly as the classification task normalizes them."""

  def __init__(self, model: nnx.Module, task: Any, *, data_name: str,
               workdir: pathlib.Path, results: dict[str, Any]):
    self.data_name = data_name
    self.workdir = workdir
    self.results = results
    self.task = task
    self.image_shape = tuple(task.data.input_shape)  # (H, W, C)
    self.num_classes = task.data.num_classes
    graphdef, state = nnx.split(model)

    def run(state, images, which):
      net = nnx.merge(graphdef, state)
      inputs = task.inputs({"inputs": images})
      return net.features(inputs) if which == "features" else net(inputs, train=False)

    self._state = state
    self._run = jax.jit(run, static_argnums=2)

  @property
  def test_accuracy(self) -> float:
    """Accuracy on the data set's held-out test split (the best checkpoint, from results)."""
    return float(self.results["test"]["accuracy"])

  def logits(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] (or [N, H, W] when C = 1) -> float32 logits [N, num_classes]."""
    return self._apply(images, "logits")

  def features(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] (or [N, H, W] when C = 1) -> float32 penultimate features [N, D]."""
    return self._apply(images, "features")

  def _apply(self, images: np.ndarray, which: str) -> np.ndarray:
    images = self._check_images(images)
    return batches.map_batches(lambda indices: self._run(self._state, images[indices], which),
                               len(images), _BATCH).astype(np.float32)

  def _check_images(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3 and self.image_shape[-1] == 1:
      images = images[..., None]
    if images.dtype != np.uint8:
      raise ValueError(f"the reference classifier takes uint8 images (0..255), got "
                       f"{images.dtype}; convert [-1, 1] floats with "
                       f"np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)")
    if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape or not len(images):
      raise ValueError(f"the {self.data_name} reference classifier takes images [N, "
                       f"{', '.join(map(str, self.image_shape))}] with N >= 1, got "
                       f"{images.shape}")
    return images


def reference_classifier(data_name: str, *, workdir: str | pathlib.Path | None = None,
                         config_arg: str = "") -> ReferenceClassifier:
  """The reference classifier of `data_name` ("mnist" or "cifar10"), trained if needed.

  The run lives in `workdir` (default `cache_dir("reference_classifiers")/<data_name>`). If its
  `results.json` says "done" it is reused; otherwise `experiments/configs/reference_classifier.py`
  (with `data=<data_name>` and `config_arg`, e.g. "runlocal" for a two-step smoke run) is trained
  there through `paperzoo.train_and_evaluate` (resuming an interrupted run). The best checkpoint
  is loaded with the config the run saved.
  """
  if data_name not in REFERENCE_DATA_SETS:
    raise ValueError(f"no reference classifier for data set {data_name!r}; valid: "
                     f"{', '.join(REFERENCE_DATA_SETS)}")
  if workdir is None:
    from paperzoo.data.files import cache_dir  # pylint: disable=g-import-not-at-top
    workdir = cache_dir("reference_classifiers") / data_name
  workdir = pathlib.Path(workdir)
  results_path = workdir / "results.json"
  results = json.loads(results_path.read_text()) if results_path.exists() else {}
  if results.get("status") != "done":
    import paperzoo  # pylint: disable=g-import-not-at-top
    # pylint: disable-next=g-import-not-at-top
    from experiments.configs import reference_classifier as config_module
    config = config_module.get_config(",".join(filter(None, [f"data={data_name}", config_arg])))
    results = paperzoo.train_and_evaluate(config, workdir)
    if results.get("status") != "done":
      raise RuntimeError(f"training the {data_name} reference classifier in {workdir} stopped "
                         f"({results}); call reference_classifier again to resume")
  config = read_workdir_config(workdir)
  if config.data.name != data_name:
    raise ValueError(f"{workdir} holds a reference classifier of {config.data.name!r}, not "
                     f"{data_name!r}")
  model, task = load_best_model(config, workdir)
  return ReferenceClassifier(model, task, data_name=data_name, workdir=workdir, results=results)


# --------------------------------------------------------------------------------------------
# Scores.
# --------------------------------------------------------------------------------------------
def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
  """The PSD square root of a symmetric matrix, eigenvalues below 0 (rounding) clipped."""
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """The Frechet distance d^2 (module docstring) between Gaussians fitted to two feature sets
  [N_a, D] and [N_b, D] (N >= 2 each), in float64. Clipped at 0 (rounding)."""
  a = np.asarray(features_a, np.float64)
  b = np.asarray(features_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"frechet_distance takes two feature sets [N, D] of the same D, got "
                     f"{a.shape} and {b.shape}")
  if len(a) < 2 or len(b) < 2:
    raise ValueError(f"a covariance needs at least 2 examples per set, got {len(a)} and "
                     f"{len(b)}")
  mean_a, mean_b = a.mean(0), b.mean(0)
  if min(len(a), len(b)) <= a.shape[1]:
    # Few examples: with centered X = a - m1, Y = b - m2, tr(S1) = |X|_F^2 / (n_a - 1), and the
    # nonzero eigenvalues of S1^{1/2} S2 S1^{1/2} (those of S2 S1) are those of M M^T / c, with
    # M = Y X^T [n_b, n_a] and c = (n_a - 1)(n_b - 1): the trace of the root is the sum of M's
    # singular values over sqrt(c). O(n_a n_b D), where the eigh route costs O(D^3).
    x, y = a - mean_a, b - mean_b
    trace_root = (np.sum(np.linalg.svd(y @ x.T, compute_uv=False))
                  / np.sqrt((len(a) - 1) * (len(b) - 1)))
    distance = (np.sum((mean_a - mean_b) ** 2) + np.sum(x * x) / (len(a) - 1)
                + np.sum(y * y) / (len(b) - 1) - 2.0 * trace_root)
    return float(max(distance, 0.0))
  cov_a = np.atleast_2d(np.cov(a, rowvar=False))
  cov_b = np.atleast_2d(np.cov(b, rowvar=False))
  root_a = _symmetric_sqrt(cov_a)
  middle = root_a @ cov_b @ root_a
  trace_root = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)))
  distance = (np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
              - 2.0 * trace_root)
  return float(max(distance, 0.0))


def sample_scores(samples: np.ndarray, labels: np.ndarray, real: np.ndarray,
                  classifier: Any, *, inception_weights: str = "") -> dict[str, float]:
  """Scores of class-conditional samples uint8 [N, H, W, C] generated for `labels` int [N],
  against real images uint8 [M, H, W, C], under `classifier` (anything with `logits` and
  `features` of uint8 images, e.g. a ReferenceClassifier).

  Returns {"class_accuracy", "classifier_frechet_distance"} (module docstring), and "fid" when
  `inception_weights` names the FID Inception weights file (`paperzoo.generation.inception`).
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or len(labels) != len(samples):
    raise ValueError(f"labels must be [N] with N = {len(samples)} samples, got {labels.shape}")
  predicted = np.argmax(classifier.logits(samples), axis=-1)
  scores = {
      "class_accuracy": float(np.mean(predicted == labels)),
      "classifier_frechet_distance": frechet_distance(classifier.features(real),
                                                      classifier.features(samples)),
  }
  if inception_weights:
    from paperzoo.generation import inception  # pylint: disable=g-import-not-at-top
    scores["fid"] = inception.frechet_inception_distance(real, samples, inception_weights)
  return scores


def psnr(reconstructions: np.ndarray, images: np.ndarray) -> float:
  """Mean over images of the per-image PSNR in dB (module docstring): both uint8 (peak 255) or
  both float in [-1, 1] (peak-to-peak 2). Identical images give inf."""
  reconstructions = np.asarray(reconstructions)
  images = np.asarray(images)
  if reconstructions.shape != images.shape or images.ndim < 2:
    raise ValueError(f"psnr takes two image batches [N, ...] of one shape, got "
                     f"{reconstructions.shape} and {images.shape}")
  kinds = {reconstructions.dtype == np.uint8, images.dtype == np.uint8}
  if len(kinds) != 1:
    raise ValueError(f"psnr takes images that are both uint8 or both float in [-1, 1], got "
                     f"{reconstructions.dtype} and {images.dtype}")
  peak_to_peak = 255.0 if kinds == {True} else 2.0
  error = reconstructions.astype(np.float64) - images.astype(np.float64)
  mse = np.mean(error.reshape(len(error), -1) ** 2, axis=1)
  with np.errstate(divide="ignore"):
    return float(np.mean(10.0 * np.log10(peak_to_peak ** 2 / mse)))


def codebook_usage(indices: np.ndarray | Sequence[np.ndarray], codebook_size: int) -> float:
  """The fraction of the `codebook_size` codes that occur in `indices` (an int array, or a list
  of them such as a multi-scale tokenizer's per-scale token maps)."""
  arrays = list(indices) if isinstance(indices, (list, tuple)) else [indices]
  flat = np.concatenate([np.asarray(a).ravel() for a in arrays])
  if flat.size and (flat.min() < 0 or flat.max() >= codebook_size):
    raise ValueError(f"code indices must lie in [0, {codebook_size}), got "
                     f"[{flat.min()}, {flat.max()}]")
  return float(len(np.unique(flat)) / codebook_size)
