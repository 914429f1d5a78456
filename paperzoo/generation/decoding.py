"""Sampling from autoregressive models: logit filters, and cached decoding of language models.

`generate(model, prompt, max_new_tokens=...)` decodes a model that keeps a cache (the
`paperzoo.models.decoder_lm` interface: `init_cache(batch, max_length)`, `prefill(tokens,
cache)`, `step(token, cache, position)`): the prompt in one parallel pass, then one token per
step inside a jitted `lax.scan` whose shapes never change (the cache is sized for the whole
sequence up front: attention's keys and values, or the recurrent mixers' constant-size states).
Each new token is drawn from softmax(filter(logits / temperature)), with a key folded from
(seed, position), so a seed fixes the samples; temperature 0 takes the argmax.

A model with a bounded context (`context_limit`: learned positions) decodes with its cache
until the sequence fills the context; each later token comes from a full forward pass over the
last `context_limit` tokens, as nanoGPT's sampler crops its context (a jitted scan of those
passes). A prompt longer than the context is an error.

`decode_logits` runs the same cache path over a known sequence and returns every position's
logits, which must equal the model's full forward pass (the tests check this for each mixer).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CACHE_METHODS = ("init_cache", "prefill", "step")


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
  """Sets the logits outside the top-k, then outside the top-p nucleus, to -inf (VAR's
  `sample_with_top_k_top_p_`): top_k > 0 keeps the logits >= the k-th largest (ties kept);
  0 < top_p keeps, of the logits sorted ascending, those whose cumulative probability exceeds
  1 - top_p, and always the largest. top_k = 0 and top_p = 0 switch the filters off."""
  vocab = logits.shape[-1]
  if top_k < 0 or not 0.0 <= top_p <= 1.0:
    raise ValueError(f"need top_k >= 0 and 0 <= top_p <= 1, got {top_k} and {top_p}")
  if 0 < top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p > 0.0:
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cumulative <= 1.0 - top_p).at[..., -1].set(False)
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How a token is drawn from the logits: temperature (0: argmax), top_k (0: off), top_p (0:
  off)."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 0.0

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0.0 <= self.top_p <= 1.0:
      raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 <= top_p <= 1, got "
                       f"{self.temperature}, {self.top_k} and {self.top_p}")

  def draw(self, logits: jax.Array, key: jax.Array) -> jax.Array:
    """int32 [B] tokens from float logits [B, vocab]."""
    if self.temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / self.temperature, top_k=self.top_k, top_p=self.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class DecodeStats:
  """Wall-clock seconds of a `generate` call, compilation excluded: the prompt's parallel pass,
  the cached steps, and the full passes over a sliding window beyond a bounded context."""
  prefill_seconds: float
  decode_seconds: float
  new_tokens: int  # per sequence, from the cache
  window_seconds: float = 0.0
  window_tokens: int = 0  # per sequence, from the sliding window

  @property
  def decode_tokens_per_second(self) -> float:
    """Tokens per second of the cached steps for each sequence of the batch (prefill and
    sliding window excluded)."""
    return self.new_tokens / max(self.decode_seconds, 1e-9)


def check_decodable(model: Any) -> None:
  """A one-line ValueError unless `model` has the cache path that decoding runs."""
  missing = [name for name in CACHE_METHODS if not callable(getattr(model, name, None))]
  if missing:
    raise ValueError(f"{type(model).__name__} has no cache path for decoding (it lacks "
                     f"{', '.join(missing)}); decoding needs a model such as decoder_lm")


def _check_prompt(model: Any, prompt: np.ndarray) -> None:
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"a prompt must be int tokens [batch, length >= 1], got shape "
                     f"{prompt.shape}")
  vocab = int(model.vocab_size)
  if prompt.min() < 0 or prompt.max() >= vocab:
    raise ValueError(f"prompt tokens must be in [0, {vocab}), got {prompt.min()}..."
                     f"{prompt.max()}")
  limit = getattr(model, "context_limit", None)
  if limit is not None and prompt.shape[1] > limit:
    raise ValueError(f"a prompt of {prompt.shape[1]} tokens is longer than the model's context "
                     f"of {limit}")


@functools.partial(jax.jit, static_argnames=("graphdef", "max_length"))
def _prefill(graphdef, state, prompt, *, max_length):
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(prompt.shape[0], max_length)
  return model.prefill(prompt, cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "num_steps", "window"))
def _decode_windowed(graphdef, state, tokens, start, key, *, sampling, num_steps, window):
  """Fills tokens[:, start:start + num_steps], each token drawn from a full forward pass over
  the `window` tokens before it."""
  model = nnx.merge(graphdef, state)

  def body(tokens, i):
    position = start + i
    context = jax.lax.dynamic_slice_in_dim(tokens, position - window, window, axis=1)
    token = sampling.draw(model(context)[:, -1], jax.random.fold_in(key, position))
    return jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], position, axis=1), None

  tokens, _ = jax.lax.scan(body, tokens, jnp.arange(num_steps, dtype=jnp.int32))
  return tokens


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "num_steps"))
def _decode(graphdef, state, first_logits, cache, start, key, *, sampling, num_steps):
  """Draws num_steps tokens: the first from `first_logits` (the prompt's last), each next one
  from the step that consumed the previous token at position start + i."""
  model = nnx.merge(graphdef, state)

  def body(carry, i):
    logits, cache = carry
    token = sampling.draw(logits, jax.random.fold_in(key, start + i))
    logits, cache = model.step(token, cache, start + i)
    return (logits, cache), token

  (last_logits, _), tokens = jax.lax.scan(body, (first_logits, cache),
                                          jnp.arange(num_steps - 1, dtype=jnp.int32))
  last = sampling.draw(last_logits, jax.random.fold_in(key, start + num_steps - 1))
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def generate(model: Any, prompt: Any, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 0.0, seed: int = 0, return_stats: bool = False
             ) -> np.ndarray | tuple[np.ndarray, DecodeStats]:
  """int32 [B, P + max_new_tokens]: `prompt` [B, P] followed by sampled tokens.

  The prompt runs in one parallel pass (`prefill`), then one jitted `step` per new token while
  the sequence fits the model's context; beyond a bounded context, full passes over a sliding
  window (module docstring). With `return_stats`, also the times of the phases, measured after
  compiling them.
  """
  check_decodable(model)
  prompt = np.asarray(prompt)
  if not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f"a prompt must be integer tokens, got {prompt.dtype}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  _check_prompt(model, prompt)
  sampling = Sampling(float(temperature), int(top_k), float(top_p))
  length = prompt.shape[1]
  total = length + max_new_tokens
  limit = getattr(model, "context_limit", None)
  cached_end = total if limit is None else min(total, limit)  # positions the cache holds
  cached, windowed = cached_end - length, total - cached_end
  graphdef, state = nnx.split(model)
  key = jax.random.key(seed)
  tokens = jnp.asarray(prompt, jnp.int32)

  def phases():
    times = [time.perf_counter()]
    logits, cache = jax.block_until_ready(
        _prefill(graphdef, state, tokens, max_length=cached_end) if cached else (None, None))
    times.append(time.perf_counter())
    out = tokens
    if cached:
      new = _decode(graphdef, state, logits[:, -1], cache, jnp.int32(length), key,
                    sampling=sampling, num_steps=cached)
      out = jnp.concatenate([tokens, new], axis=1)
    jax.block_until_ready(out)
    times.append(time.perf_counter())
    if windowed:
      out = jnp.pad(out, ((0, 0), (0, windowed)))
      out = jax.block_until_ready(_decode_windowed(
          graphdef, state, out, jnp.int32(cached_end), key, sampling=sampling,
          num_steps=windowed, window=limit))
    times.append(time.perf_counter())
    return np.asarray(out), np.diff(times)

  if return_stats:  # compile every phase first: the times are of running them
    phases()
  out, seconds = phases()
  if not return_stats:
    return out
  return out, DecodeStats(float(seconds[0]), float(seconds[1]), cached, float(seconds[2]),
                          windowed)


@functools.partial(jax.jit, static_argnames=("graphdef", "prefill_length"))
def _decode_logits(graphdef, state, tokens, *, prefill_length):
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(tokens.shape[0], tokens.shape[1])
  prefix_logits, cache = model.prefill(tokens[:, :prefill_length], cache)

  def body(cache, position):
    logits, cache = model.step(tokens[:, position], cache, position)
    return cache, logits

  _, step_logits = jax.lax.scan(body, cache, jnp.arange(prefill_length, tokens.shape[1],
                                                        dtype=jnp.int32))
  return jnp.concatenate([prefix_logits, step_logits.swapaxes(0, 1)], axis=1)


def decode_logits(model: Any, tokens: Any, *, prefill_length: int) -> jax.Array:
  """Logits [B, T, vocab] of `tokens` [B, T] through the cache: positions below
  `prefill_length` from one `prefill`, each later one from a `step` (teacher-forced)."""
  check_decodable(model)
  tokens = jnp.asarray(tokens, jnp.int32)
  if not 1 <= prefill_length <= tokens.shape[1]:
    raise ValueError(f"prefill_length={prefill_length} must be in [1, {tokens.shape[1]}]")
  graphdef, state = nnx.split(model)
  return _decode_logits(graphdef, state, tokens, prefill_length=prefill_length)
