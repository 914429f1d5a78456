"""The decoder-only language model: cached decoding equals the parallel forward pass for every
mixer, sampling, bad prompts, and the character model end to end (grid, samples, the sample
command)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import configs
from experiments import language_model_grid
from paperzoo.config import ConfigError
from paperzoo.generation import decoding
from paperzoo.layers import causal_mixers
from paperzoo.models.decoder_lm import DecoderLM

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 11


def _model(mixer: str, *, positions: str = "none", max_length: int = 16, **keys):
  config = configs.load("char_lm", "runlocal").model
  config.update(mixer=mixer, d_model=16, num_layers=2, num_heads=2, positions=positions,
                d_state=3, chunk_size=4, **keys)
  return DecoderLM(config, vocab_size=VOCAB, max_length=max_length, rngs=nnx.Rngs(params=0))


def _tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("mixer,positions", [("attention", "learned"), ("attention", "rotary"),
                                             ("linear", "none"), ("gla", "none"),
                                             ("lightning", "none"), ("mamba", "none")])
def test_cached_decoding_gives_the_logits_of_the_parallel_forward_pass(mixer, positions):
  model = _model(mixer, positions=positions)
  tokens = _tokens(2, 13)
  parallel = model(jnp.asarray(tokens))
  cached = decoding.decode_logits(model, tokens, prefill_length=5)
  assert cached.shape == parallel.shape == (2, 13, VOCAB)
  np.testing.assert_allclose(cached, parallel, atol=2e-5, rtol=1e-4)


def test_generate_keeps_the_prompt_follows_the_argmax_at_temperature_zero_and_a_seed():
  model = _model("gla")
  prompt = _tokens(2, 4, seed=1)
  greedy = decoding.generate(model, prompt, max_new_tokens=6, temperature=0.0)
  assert greedy.shape == (2, 10) and greedy.dtype == np.int32
  np.testing.assert_array_equal(greedy[:, :4], prompt)
  # Each greedy token is the argmax of the full forward pass over the tokens before it.
  logits = np.asarray(model(jnp.asarray(greedy[:, :-1])))
  np.testing.assert_array_equal(greedy[:, 4:], logits[:, 3:].argmax(-1))
  sampled = [decoding.generate(model, prompt, max_new_tokens=6, seed=seed, top_k=5)
             for seed in (0, 0, 1)]
  np.testing.assert_array_equal(sampled[0], sampled[1])
  assert not np.array_equal(sampled[0], sampled[2])
  assert sampled[0].min() >= 0 and sampled[0].max() < VOCAB


def test_beyond_a_learned_context_each_token_comes_from_the_last_window_as_in_nanogpt():
  model = _model("attention", positions="learned", max_length=8)
  prompt = _tokens(2, 5, seed=3)
  tokens, stats = decoding.generate(model, prompt, max_new_tokens=9, temperature=0.0,
                                    return_stats=True)
  assert tokens.shape == (2, 14)
  assert (stats.new_tokens, stats.window_tokens) == (3, 6)  # the cache fills 8 positions
  # Inside the context: the argmax of one causal pass; beyond it: of the last 8 tokens.
  inside = np.asarray(model(jnp.asarray(tokens[:, :8])))[:, 4:7].argmax(-1)
  np.testing.assert_array_equal(tokens[:, 5:8], inside)
  last_window = jax.jit(lambda window: model(window)[:, -1].argmax(-1))
  for position in range(8, 14):
    np.testing.assert_array_equal(tokens[:, position],
                                  last_window(jnp.asarray(tokens[:, position - 8:position])))


def test_bad_decoding_requests_are_one_line_errors():
  model = _model("attention", positions="learned", max_length=8)
  with pytest.raises(ValueError, match=r"a prompt of 9 tokens is longer than the model's "
                                       r"context of 8"):
    decoding.generate(model, _tokens(1, 9), max_new_tokens=3)
  with pytest.raises(ValueError, match=r"prompt tokens must be in \[0, 11\)"):
    decoding.generate(model, np.array([[3, 11]], np.int32), max_new_tokens=1)
  with pytest.raises(ValueError, match="no cache path for decoding"):
    decoding.generate(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), _tokens(1, 2), max_new_tokens=1)
  with pytest.raises(ValueError, match="unknown mixer 'retnet'; valid: attention, linear, gla, "
                                       "lightning, mamba"):
    _model("retnet")
  assert causal_mixers.CAUSAL_MIXERS == ("attention", "linear", "gla", "lightning", "mamba")


def test_bf16_products_keep_the_model_close_to_float32():
  tokens = jnp.asarray(_tokens(2, 9))
  high = _model("attention", positions="learned")(tokens)
  low = _model("attention", positions="learned", matmul_dtype="bfloat16")(tokens)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, high, atol=3e-2)


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_the_char_model_trains_in_the_grid_writes_samples_and_the_sample_command_decodes(
    tmp_path):
  report = tmp_path / "lm.md"
  outcome = language_model_grid.GRID.train(["shakespeare/gla"], seeds=1, workdir=tmp_path,
                                           fast=True, report=report, log=lambda _: None)
  assert len(outcome["trained"]) == 1, outcome
  run = outcome["trained"][0]
  text = report.read_text()
  assert "Smoke mode" in text and "| gla |" in text
  assert "## Samples" in text and "**gla** (seed 2021)" in text
  samples = (run.workdir / "samples.txt").read_text()
  assert samples.startswith("--- sample 0")
  results = language_model_grid.grids.run_state(run).results
  assert results["test"]["bits_per_char"] == pytest.approx(
      results["test"]["loss"] / np.log(2))
  assert results["final_metrics"]["decode_tokens_per_second"] > 0

  done = _run("experiments.sample", f"--workdir={run.workdir}", "--prompt=ROMEO:",
              "--max_new_tokens=12", "--num_samples=2", "--temperature=0.5")
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.count("ROMEO:") == 2 and "characters/s decoding" in done.stdout
  bad = _run("experiments.sample", f"--workdir={run.workdir}", "--prompt=caf\u00e9",
             "--max_new_tokens=4")
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == (
      "error: characters '\u00e9' are not in the 65-character vocabulary")
  assert "Traceback" not in bad.stderr
  unknown = _run("experiments.run", f"--workdir={tmp_path / 'retnet'}",
                 "--config=experiments/configs/char_lm.py:runlocal",
                 "--config.model.mixer=retnet")
  assert unknown.returncode == 2
  assert unknown.stderr.strip().splitlines()[-1] == (
      "error: model.mixer='retnet': unknown mixer 'retnet'; valid: attention, linear, gla, "
      "lightning, mamba")


def test_sparse_prefill_keeps_the_selected_blocks_outside_training_only():
  tokens = jnp.asarray(_tokens(2, 16, seed=4))
  sparse = dict(positions="rotary", sparse_prefill="xattention", sparse_block=8,
                sparse_stride=4)
  dense = _model("attention", positions="rotary")(tokens)
  everything = _model("attention", sparse_threshold=1.0, **sparse)
  logits, sown = nnx.capture(everything, nnx.Intermediate)(tokens)
  np.testing.assert_allclose(logits, dense, atol=2e-5)
  sown = jax.tree.leaves(sown)
  assert len(sown) == 2 and all(float(d) == 1.0 for d in sown)  # one per layer
  diagonal = _model("attention", sparse_threshold=0.0, **sparse)
  # Two query blocks of 8: the first sees its own block, the second keeps only the diagonal
  # of its two, so 2 of the 3 visible blocks.
  logits, sown = nnx.capture(diagonal, nnx.Intermediate)(tokens)
  assert np.abs(np.asarray(logits) - np.asarray(dense)).max() > 1e-3
  np.testing.assert_allclose(jax.tree.leaves(sown), 2 / 3)
  np.testing.assert_allclose(diagonal(tokens, train=True, rngs=nnx.Rngs(0)), dense, atol=2e-5)
  with pytest.raises(ConfigError, match="model.sparse_prefill='snapkv': unknown method; "
                     "valid: none, xattention, minference"):
    _model("attention", sparse_prefill="snapkv")
