"""Generation metrics: the Frechet distance against closed forms, sample scores with a fake
classifier, PSNR, codebook usage, and the reference classifier: a finished run the library reads
(a two-step run into tmp_path; the real classifier is never trained here)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.linalg

from experiments import prerequisites
from experiments.configs import dit as dit_config
from paperzoo import workdir as workdir_lib
from paperzoo.generation import metrics


def whitened(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
  """n samples whose sample mean is exactly 0 and sample covariance exactly the identity."""
  z = rng.normal(size=(n, d))
  z -= z.mean(0)
  root = scipy.linalg.sqrtm(np.cov(z, rowvar=False)).real
  return z @ np.linalg.inv(root)


def test_frechet_distance_of_identical_sets_is_zero():
  features = np.random.default_rng(0).normal(size=(300, 16)) @ np.random.default_rng(1).normal(
      size=(16, 16))
  assert metrics.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-7)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
  rng = np.random.default_rng(0)
  m1, m2 = rng.normal(size=6), rng.normal(size=6)
  v1, v2 = rng.uniform(0.2, 3.0, size=6), rng.uniform(0.2, 3.0, size=6)
  a = m1 + whitened(rng, 500, 6) * np.sqrt(v1)
  b = m2 + whitened(rng, 400, 6) * np.sqrt(v2)
  expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_the_general_formula_and_a_shift():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5))
  b = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + 1.0
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1 + s2)
              - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
  assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
  shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
  assert metrics.frechet_distance(a, a + shift) == pytest.approx(np.sum(shift ** 2), rel=1e-8)


def test_frechet_distance_rejects_bad_shapes():
  with pytest.raises(ValueError, match="same D"):
    metrics.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
  with pytest.raises(ValueError, match="at least 2"):
    metrics.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


class FakeClassifier:
  """Predicts class = the image's mean intensity // 26; features = (mean, std, max) / 255."""

  def logits(self, images):
    classes = np.minimum(images.reshape(len(images), -1).mean(1) // 26, 9).astype(int)
    return np.eye(10)[classes]

  def features(self, images):
    flat = images.reshape(len(images), -1).astype(np.float64) / 255
    return np.stack([flat.mean(1), flat.std(1), flat.max(1)], 1)


def test_sample_scores_with_a_fake_classifier():
  rng = np.random.default_rng(0)
  labels = np.arange(8) % 10
  samples = np.stack([np.full((4, 4, 1), 26 * c + 5, np.uint8) for c in labels])
  samples[2] = 0  # generated for class 2, looks like class 0
  samples[5] = 0  # and class 5
  real = rng.integers(0, 256, size=(20, 4, 4, 1), dtype=np.uint8)
  classifier = FakeClassifier()
  scores = metrics.sample_scores(samples, labels, real, classifier)
  assert set(scores) == {"class_accuracy", "classifier_frechet_distance"}
  assert scores["class_accuracy"] == pytest.approx(6 / 8)
  assert scores["classifier_frechet_distance"] == pytest.approx(metrics.frechet_distance(
      classifier.features(real), classifier.features(samples)))
  assert metrics.sample_scores(real, FakeClassifier().logits(real).argmax(1), real, classifier
                               ) == pytest.approx({"class_accuracy": 1.0,
                                                   "classifier_frechet_distance": 0.0}, abs=1e-9)
  with pytest.raises(ValueError, match="labels must be"):
    metrics.sample_scores(samples, labels[:3], real, classifier)


def test_psnr_uint8_and_float_agree_and_have_the_textbook_values():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 255, size=(3, 8, 8, 1), dtype=np.uint8)
  off_by_one = images + np.uint8(1)
  assert metrics.psnr(off_by_one, images) == pytest.approx(20 * np.log10(255.0))
  as_float = lambda x: x.astype(np.float64) / 127.5 - 1.0  # noqa: E731
  assert metrics.psnr(as_float(off_by_one), as_float(images)) == pytest.approx(
      20 * np.log10(255.0))
  x = rng.uniform(-1, 1, size=(2, 4, 4, 3))
  assert metrics.psnr(x + 0.01, x) == pytest.approx(10 * np.log10(4 / 1e-4))
  assert metrics.psnr(images, images) == np.inf
  with pytest.raises(ValueError, match="both uint8 or both float"):
    metrics.psnr(images, as_float(images))


def test_codebook_usage():
  assert metrics.codebook_usage([np.array([[0, 1]]), np.array([[1, 3, 3]])], 8) == 3 / 8
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    metrics.codebook_usage(np.array([4]), 4)


def test_the_reference_classifier_is_a_finished_run_the_library_reads_and_never_trains(
    tmp_path):
  config = dit_config.get_config("runlocal")
  config.task.update(samples_per_class=2, reference_workdir=str(tmp_path / "reference"))
  run = metrics.reference_run(config)
  assert run.workdir == tmp_path / "reference"
  assert run.config == "reference_classifier.py:data=mnist,runlocal"
  with pytest.raises(workdir_lib.MissingRunError,
                     match=f"--workdir={tmp_path / 'reference'} --config=experiments/configs/"
                           "reference_classifier.py:data=mnist,runlocal"):
    metrics.reference_classifier(run)
  assert not run.workdir.exists()

  # The experiment layer trains it (what `python -m experiments.run` does first).
  (needed,) = prerequisites.train_prerequisites(config, log=lambda _: None)
  assert needed.workdir == run.workdir and workdir_lib.is_done(run.workdir)
  classifier = metrics.reference_classifier(run)
  images = classifier.task.data.test.arrays["inputs"][:7]
  logits, features = classifier.logits(images), classifier.features(images)
  assert logits.shape == (7, 10) and features.shape == (7, 128)
  assert np.all(np.isfinite(logits)) and np.all(features >= 0)  # ReLU features
  # Normalized as the classification task normalizes: same logits as the model on task.inputs.
  model, task = workdir_lib.load_best_model(run.workdir)
  np.testing.assert_allclose(
      logits, np.asarray(model(task.inputs({"inputs": images}), train=False)), atol=1e-5)
  assert np.allclose(classifier.logits(images[..., 0]), logits)  # [N, H, W] grayscale too
  with pytest.raises(ValueError, match="uint8"):
    classifier.logits(images.astype(np.float32))
  with pytest.raises(ValueError, match=r"\[N, 28, 28, 1\]"):
    classifier.logits(np.zeros((2, 32, 32, 1), np.uint8))
  # A finished run of another data set is refused, naming both.
  with pytest.raises(ValueError, match="'reference_cnn' run on 'mnist'; this run needs a "
                                       "'reference_cnn' run on 'cifar10'"):
    metrics.reference_classifier(dataclasses.replace(run, data="cifar10"))
