r"""Scores for generated images and for image tokenizers, with a classifier the project trains.

Standard FID needs Inception-v3 weights, which nothing here can download; so generated images are
scored in the feature space of a *reference classifier*: a small CNN (`paperzoo.models.
reference_cnn`) that paperzoo trains with its ordinary trainer, once per data set
(`experiments/configs/reference_classifier.py`). Its scores compare runs within paperzoo, not
with published FID.
Standard FID is added where the user supplies the Inception weights file
(`paperzoo.generation.inception`, which says how to get and convert it): `sample_scores(...,
inception_weights=path)`, or `task.inception_weights` in the generation configs.

    from paperzoo.generation import metrics

    classifier = metrics.reference_classifier(metrics.reference_run(config))  # a finished run
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

A reference classifier is a finished run of the trainer, shared by every run on its data set:
by default `cache_dir("reference_classifiers")/<data name>` (`reference_run`). This module only
reads it; `python -m experiments.run` trains it when a config that scores samples needs it
(`experiments.prerequisites`). Delete the folder to retrain it, e.g. after changing its config.
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from paperzoo import workdir as workdir_lib
from paperzoo.data import batches
from paperzoo.data import files
from paperzoo.generation import inception

REFERENCE_MODEL = "reference_cnn"  # the model a reference classifier run trains
_BATCH = 500  # images per jitted call of the reference classifier


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


def shared_reference_workdir(data_name: str) -> pathlib.Path:
  """Where the reference classifier of `data_name` that every run on it shares lives:
  `cache_dir("reference_classifiers")/<data_name>`."""
  return files.cache_dir("reference_classifiers") / data_name


def reference_run(config: Any) -> workdir_lib.RequiredRun:
  """The reference classifier a generation config's samples are scored with: the run in
  `config.task.reference_workdir` ("" = `cache_dir("reference_classifiers")/<data name>`, the
  one classifier every run on that data set shares), trained by
  `experiments/configs/reference_classifier.py:<config.task.reference_config>` ("" =
  `data=<data name>`)."""
  data_name = config.data.name
  get = config.task.get
  workdir = get("reference_workdir", "") or shared_reference_workdir(data_name)
  return workdir_lib.RequiredRun(
      role="reference classifier", workdir=pathlib.Path(workdir).expanduser(),
      config=f"reference_classifier.py:{get('reference_config', '') or f'data={data_name}'}",
      model=REFERENCE_MODEL, data=data_name)


def scoring_runs(config: Any, samples_per_class: int) -> list[workdir_lib.RequiredRun]:
  """What a generation task reads to score its samples: the reference classifier
  (`reference_run`), or nothing when it scores none (`samples_per_class` 0)."""
  return [reference_run(config)] if samples_per_class > 0 else []


def reference_classifier(run: workdir_lib.RequiredRun) -> ReferenceClassifier:
  """The finished reference classifier `run` names (`reference_run`), its best checkpoint
  loaded with the config the run saved; MissingRunError, with the command that trains it, when
  it has not finished."""
  config = workdir_lib.check_required(run)
  model, task = workdir_lib.load_best_model(run.workdir, config=config)
  return ReferenceClassifier(model, task, data_name=run.data, workdir=run.workdir,
                             results=workdir_lib.read_results(run.workdir))


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
