"""The text data sets (tinyshakespeare, mqar, passkey) and the language_model task."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from paperzoo.config import ConfigDict
from paperzoo.data import text
from paperzoo.generation import decoding
from paperzoo.registry import DATASETS
from paperzoo.tasks import language_model


def _load(name, **keys):
  return DATASETS.get(name)(ConfigDict(dict(name=name, **keys)))


def _stream(batch, row):
  """The seq_len + 1 tokens of a window example: its inputs and its last target."""
  return np.concatenate([batch["inputs"][row], batch["targets"][row][-1:]])


@pytest.fixture(scope="module")
def shakespeare():
  return _load("tinyshakespeare", seq_len=64)


# -------------------------------------------------------------------------------------------
# Tiny Shakespeare.
# -------------------------------------------------------------------------------------------


def test_shakespeare_vocabulary_and_nanogpt_split(shakespeare):
  data = shakespeare
  raw, vocab, _ = text.shakespeare()
  n = len(raw)
  n_train = int(n * 0.9)
  assert data.vocab_size == len(data.vocab) == 65 and data.vocab == "".join(sorted(set(raw)))
  assert (n, n_train, n - n_train) == (1115394, 1003854, 111540)  # nanoGPT's printed sizes
  assert len(data.train) == n_train - 64
  indices = np.array([0, 1, 12345, len(data.train) - 1])
  batch = data.train.get_batch(indices)
  assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
  assert batch["weights"].dtype == np.float32 and np.all(batch["weights"] == 1)
  for row, i in enumerate(indices):
    assert data.decode(batch["inputs"][row]) == raw[i:i + 64]
    assert data.decode(batch["targets"][row]) == raw[i + 1:i + 65]
  assert indices[-1] + 65 == n_train  # the last window ends exactly at the end of train
  assert data.test is data.val and "same split" in data.selection


def test_shakespeare_validation_windows_predict_every_character_once(shakespeare):
  data = shakespeare
  raw, _, _ = text.shakespeare()
  val_text = raw[int(len(raw) * 0.9):]
  m = len(val_text)
  assert len(data.val) == math.ceil((m - 1) / 64)
  batch = data.val.get_batch(np.arange(len(data.val)))
  weights = batch["weights"]
  assert weights.sum() == m - 1
  assert np.all(weights[:-1] == 1)  # only the last window is partial
  tail = (m - 1) % 64
  assert tail and np.all(weights[-1, :tail] == 1) and np.all(weights[-1, tail:] == 0)
  scored = weights > 0
  assert data.decode(batch["targets"][scored]) == val_text[1:]
  assert data.decode(batch["inputs"][scored]) == val_text[:-1]
  assert np.all(batch["targets"][~scored] == 0)


def test_encode_decode_round_trip(shakespeare):
  line = "ROMEO:\nBut, soft! what light through yonder window breaks?"
  ids = shakespeare.encode(line)
  assert ids.dtype == np.int32 and shakespeare.decode(ids) == line
  with pytest.raises(ValueError, match="'7'"):
    shakespeare.encode("route 7")


def test_passkey_fraction_mixes_passkey_examples_into_training_windows():
  seq_len = 160
  data = _load("tinyshakespeare", seq_len=seq_len, passkey_fraction=0.3, data_seed=1)
  plain = _load("tinyshakespeare", seq_len=seq_len)
  fmt = text.PasskeyFormat(data.vocab, seq_len)
  indices = np.arange(1000, 1400)
  batch = data.train.get_batch(indices)
  windows = plain.train.get_batch(indices)
  chosen = data.train.is_passkey(indices)
  assert 0.22 < chosen.mean() < 0.38
  assert np.all(batch["weights"] == 1)
  for row in range(len(indices)):
    if not chosen[row]:
      assert np.array_equal(batch["inputs"][row], windows["inputs"][row])
      continue
    example = data.decode(_stream(batch, row))
    key = example[-1 - text.PASSKEY_LENGTH:-1]
    assert example.endswith(f"\nWhat is the pass key? The pass key is {key}.")
    line = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    assert line in example
    # The filler is the window's own text, the key line spliced into it.
    prefix, suffix = example[:-len(fmt.tail_text) - 1].split(line)
    window = data.decode(_stream(windows, row))
    assert prefix + suffix == window[:fmt.filler_length]
  # A pure function of the index: the same example in another batch.
  again = data.train.get_batch(indices[::-7])
  np.testing.assert_array_equal(again["inputs"], batch["inputs"][::-7])
  with pytest.raises(ValueError, match="passkey_fraction.*seq_len"):
    _load("tinyshakespeare", seq_len=64, passkey_fraction=0.1)
  with pytest.raises(ValueError, match="passkey_fraction"):
    _load("tinyshakespeare", passkey_fraction=1.0)


# -------------------------------------------------------------------------------------------
# MQAR.
# -------------------------------------------------------------------------------------------

_MQAR = dict(seq_len=32, num_kv_pairs=4, vocab_size=64, num_train=300, num_val=50,
             num_test=50)


@pytest.mark.parametrize("random_filler", [False, True])
def test_mqar_targets_are_the_values_of_the_queried_keys(random_filler):
  data = _load("mqar", random_filler=random_filler, **_MQAR)
  assert data.vocab is None and data.vocab_size == 64 and data.probe
  k, half = 4, 32
  batch = data.train.get_batch(np.arange(len(data.train)))
  for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"]):
    keys, values = inputs[0:2 * k:2], inputs[1:2 * k:2]
    assert np.all((keys >= 1) & (keys < half)) and np.all(values >= half)
    assert len(set(keys)) == k and len(set(values)) == k
    queries = np.flatnonzero(weights)
    assert len(queries) == k and np.all(queries >= 2 * k) and np.all((queries - 2 * k) % 2 == 0)
    pairs = dict(zip(keys.tolist(), values.tolist()))
    assert sorted(inputs[queries].tolist()) == sorted(keys.tolist())  # each key asked once
    assert [pairs[q] for q in inputs[queries]] == targets[queries].tolist()
    if not random_filler:
      filler = np.ones(len(inputs), bool)
      filler[:2 * k] = False
      filler[queries] = False
      assert np.all(inputs[filler] == 0)


def test_mqar_is_deterministic_per_seed_and_splits_differ():
  first, again = _load("mqar", **_MQAR), _load("mqar", **_MQAR)
  other = _load("mqar", data_seed=1, **_MQAR)
  assert np.array_equal(first.train.arrays["inputs"], again.train.arrays["inputs"])
  assert np.array_equal(first.test.arrays["targets"], again.test.arrays["targets"])
  assert not np.array_equal(first.train.arrays["inputs"], other.train.arrays["inputs"])
  assert not np.array_equal(first.val.arrays["inputs"], first.test.arrays["inputs"])
  # Zoology's power law puts queries near the pairs: the first gap is the most likely.
  queries = np.flatnonzero(first.train.arrays["weights"].any(0))
  assert queries.min() == 8


def test_mqar_refuses_pairs_that_do_not_fit():
  with pytest.raises(ValueError, match="num_kv_pairs=9.*seq_len=32"):
    _load("mqar", **dict(_MQAR, num_kv_pairs=9))
  with pytest.raises(ValueError, match="vocab_size=8 .*num_kv_pairs=4"):
    _load("mqar", **dict(_MQAR, vocab_size=8))


# -------------------------------------------------------------------------------------------
# Passkey.
# -------------------------------------------------------------------------------------------


def test_passkey_answers_are_the_key_written_earlier_and_depths_cover_every_bin():
  seq_len, bins = 180, 5
  data = _load("passkey", seq_len=seq_len, num_depth_bins=bins, num_train=10, num_val=10,
               num_test=60)
  _, vocab, _ = text.shakespeare()
  assert data.vocab == vocab and data.probe and data.num_depth_bins == bins
  fmt = text.PasskeyFormat(vocab, seq_len)
  batch = data.test.get_batch(np.arange(60))
  assert batch["inputs"].max() < 65 and batch["targets"].max() < 65
  assert np.bincount(batch["depth_bin"], minlength=bins).tolist() == [12] * bins
  for row in range(60):
    example = data.decode(_stream(batch, row))
    assert len(example) == seq_len + 1
    weighted = np.flatnonzero(batch["weights"][row])
    answer = data.decode(batch["targets"][row][weighted])
    assert len(answer) == 5 and answer.isalpha() and answer.islower()
    assert weighted.tolist() == list(range(seq_len - 6, seq_len - 1))
    line = f"\nThe pass key is {answer}. Remember it. {answer} is the pass key.\n"
    assert example.count(line) == 1
    assert example.endswith(f"\nWhat is the pass key? The pass key is {answer}.")
    depth = example.index(line)  # the prefix length P
    assert depth * bins // (fmt.filler_length + 1) == batch["depth_bin"][row]
    assert text.PASSKEY_FILLER.startswith(example[:depth].rstrip())
  assert not np.array_equal(data.val.arrays["inputs"], data.test.arrays["inputs"][:10])


def test_passkey_refuses_a_sequence_too_short_for_its_lines():
  with pytest.raises(ValueError, match="seq_len=64 .*>= 104"):
    _load("passkey", seq_len=64, num_train=2, num_val=2, num_test=2)


# -------------------------------------------------------------------------------------------
# The task.
# -------------------------------------------------------------------------------------------


class _Bigram(nnx.Module):
  """A stand-in language model: logits of the next token from the current one."""

  def __init__(self, vocab_size, max_length, *, rngs):
    del max_length
    self.table = nnx.Embed(vocab_size, vocab_size, rngs=rngs)

  def __call__(self, inputs, *, train, rngs=None):
    del train, rngs
    return self.table(inputs)


def _task(data_name, task_keys=None, **data_keys):
  config = ConfigDict({"task": dict(name="language_model", **(task_keys or {})),
                       "data": dict(name=data_name, **data_keys),
                       "train": {"eval_batch_size": 512}})
  return language_model.LanguageModelTask(config)


def _model(task):
  return _Bigram(**task.model_kwargs(), rngs=nnx.Rngs(params=0))


def test_loss_eval_sums_and_summary_on_text(shakespeare):
  task = _task("tinyshakespeare", seq_len=16)
  assert task.model_kwargs() == {"vocab_size": 65, "max_length": 16}
  assert (task.selection_metric, task.selection_mode) == ("loss", "min")
  model = _model(task)
  batch = task.splits["val"].get_batch(np.array([0, 1, len(task.splits["val"]) - 1]))
  logits = np.asarray(model(jnp.asarray(batch["inputs"]), train=False), np.float64)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_p, batch["targets"][..., None], -1)[..., 0]
  w = batch["weights"]
  assert w[-1].sum() < 16  # the last window is partial
  loss, metrics = task.loss(model, batch, train=True, rngs=None)
  np.testing.assert_allclose(loss, (nll * w).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"],
                             ((logits.argmax(-1) == batch["targets"]) * w).sum() / w.sum())
  sums = task.eval_sums(model, dict(batch, mask=np.ones(3, np.float32)))
  # A padded example (mask 0) changes nothing.
  padded = {k: np.concatenate([v, v[:1]]) for k, v in batch.items()}
  padded_sums = task.eval_sums(model, dict(padded, mask=np.array([1, 1, 1, 0], np.float32)))
  for key in sums:
    np.testing.assert_allclose(padded_sums[key], sums[key], rtol=1e-6)
  summary = task.summarize({k: float(v) for k, v in sums.items()})
  assert set(summary) == {"loss", "bits_per_char", "accuracy"}
  np.testing.assert_allclose(summary["loss"], (nll * w).sum() / w.sum(), rtol=1e-5)
  assert summary["bits_per_char"] == pytest.approx(summary["loss"] / math.log(2))


def test_probe_sums_count_whole_sequences_by_depth_bin():
  task = _task("passkey", seq_len=120, num_depth_bins=3, num_train=6, num_val=6, num_test=6)
  assert (task.selection_metric, task.selection_mode) == ("accuracy", "max")
  batch = task.splits["test"].get_batch(np.arange(6))
  assert batch["depth_bin"].tolist() == [0, 1, 2, 0, 1, 2]
  logits = 10.0 * jax.nn.one_hot(batch["targets"], 65)  # right everywhere ...
  answer = np.flatnonzero(batch["weights"][0])
  for row in (1, 5):  # ... but one letter of examples 1 and 5
    wrong = (batch["targets"][row, answer[2]] + 1) % 65
    logits = logits.at[row, answer[2]].set(20.0 * jax.nn.one_hot(wrong, 65))
  fixed = lambda inputs, *, train, rngs: logits  # pylint: disable=unused-argument
  mask = np.array([1, 1, 1, 1, 1, 0], np.float32)  # example 5 is padding
  sums = jax.jit(lambda b: task.eval_sums(fixed, b))(dict(batch, mask=mask))
  summary = task.summarize({k: float(v) for k, v in sums.items()})
  assert summary["accuracy"] == pytest.approx(24 / 25)
  assert summary["sequence_accuracy"] == pytest.approx(4 / 5)
  # Bins: 0 = examples 0, 3; 1 = 1 (wrong), 4; 2 = 2 (and 5, wrong but padding).
  assert summary["accuracy_depth_0"] == 1.0 and summary["accuracy_depth_2"] == 1.0
  assert summary["accuracy_depth_1"] == pytest.approx(0.5)
  assert sums["depth_2_count"] == 1
  assert summary["bits_per_char"] == pytest.approx(summary["loss"] / math.log(2))


def test_mqar_task_reports_bits_per_token_and_draws_no_samples(tmp_path):
  task = _task("mqar", **_MQAR)
  model = _model(task)
  batch = task.splits["val"].get_batch(np.arange(8))
  sums = task.eval_sums(model, dict(batch, mask=np.ones(8, np.float32)))
  summary = task.summarize({k: float(v) for k, v in sums.items()})
  assert {"loss", "bits_per_token", "accuracy", "sequence_accuracy"} == set(summary)
  assert sums["weight"] == 8 * 4
  assert task.final_metrics(None, tmp_path) == {} and task.write_pictures(None, tmp_path) == []


def test_final_metrics_write_samples_and_pictures(tmp_path, monkeypatch):
  task = _task("tinyshakespeare", {"num_samples": 3, "sample_length": 20,
                                   "sample_prompt": "ROMEO:", "top_k": 5}, seq_len=16)
  model = _model(task)
  calls = []

  def generate(model_arg, prompt, *, max_new_tokens, temperature, top_k, top_p, seed,
               return_stats):
    calls.append(dict(prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_k=top_k, top_p=top_p, seed=seed))
    assert model_arg is model and return_stats
    new = np.random.default_rng(seed).integers(0, 65, (len(prompt), max_new_tokens))
    return (np.concatenate([prompt, new], axis=1).astype(np.int32),
            decoding.DecodeStats(0.01, 0.5, max_new_tokens))

  # The stand-in model has no cache path: the task's call is checked, not the decoding.
  monkeypatch.setattr(decoding, "generate", generate)
  monkeypatch.setattr(language_model.workdir_lib, "load_best_model",
                      lambda workdir, config, task: (model, task))
  metrics = task.final_metrics(None, tmp_path)
  assert metrics["samples_file"] == "samples.txt" and metrics["decode_tokens_per_second"] > 0
  (call,) = calls
  assert call["prompt"].shape == (3, 6) and call["prompt"].dtype == np.int32
  assert (call["max_new_tokens"], call["top_k"], call["top_p"], call["seed"]) == (20, 5, 0.0, 0)
  samples = (tmp_path / "samples.txt").read_text()
  assert samples.count("--- sample") == 3 and samples.count("ROMEO:") == 3

  predict = jax.jit(lambda inputs: model(inputs, train=False))
  (path,) = task.write_pictures(predict, tmp_path)
  assert path.name == "loss_by_position.png" and path.exists()

  with pytest.raises(ValueError, match="sample_prompt.*'7'"):
    _task("tinyshakespeare", {"sample_prompt": "7"}, seq_len=16)


def test_passkeys_in_training_text_are_probed_in_held_out_text_after_training(tmp_path):
  task = _task("tinyshakespeare", {"num_samples": 0}, seq_len=120, passkey_fraction=0.2)
  probe = task.data.passkey_probe
  assert len(probe) == text.PASSKEY_PROBE_EXAMPLES
  batch = probe.get_batch(np.arange(7))
  fmt = text.PasskeyFormat(task.data.vocab, 120)
  assert np.all(batch["weights"].sum(1) == text.PASSKEY_LENGTH)
  assert np.all(batch["weights"][:, fmt.answer_slice] == 1)
  assert "The pass key is" in task.data.decode(batch["inputs"][0])
  model = _model(task)
  metrics = task.final_metrics(jax.jit(lambda inputs: model(inputs, train=False)), tmp_path)
  assert 0.0 <= metrics["passkey_accuracy"] <= 1.0
  assert sorted(k for k in metrics if "depth" in k) == [
      f"passkey_accuracy_depth_{b}" for b in range(text.PASSKEY_PROBE_BINS)]
  assert "samples_file" not in metrics


def test_passkey_depth_picture(tmp_path):
  task = _task("passkey", seq_len=120, num_depth_bins=3, num_train=4, num_val=4, num_test=9)
  model = _model(task)
  (path,) = task.write_pictures(jax.jit(lambda inputs: model(inputs, train=False)), tmp_path)
  assert path.name == "passkey_depth.png" and path.exists()
