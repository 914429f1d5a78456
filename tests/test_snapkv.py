"""SnapKV: the selection on inputs whose right answer is known (planted votes, pooling, the
window, GQA), bad arguments, and the compressed cache of the attention mixer end to end in the
decoder language model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import configs
from pallas_kernels.flash_attention import reference_attention
from paperzoo.config import ConfigError
from paperzoo.generation import decoding
from paperzoo.layers.causal_mixers import make_causal_mixer
from paperzoo.models.decoder_lm import DecoderLM
from paperzoo.sparse_attention import compress_kv, snapkv_keep
from paperzoo.sparse_attention.snapkv import pool_votes, snapkv_scores

VOCAB = 11

# Jitted once per static setting and shape: eager op-by-op dispatch compiles far more on CPU.
keep = jax.jit(snapkv_keep, static_argnames=("budget", "window", "pool_kernel", "pooling",
                                             "per_query_head"))
scores_of = jax.jit(snapkv_scores, static_argnames=("pool_kernel", "pooling"))
pool = jax.jit(pool_votes, static_argnames=("kernel", "pooling"))


def _planted(length: int, planted: list[list[int]], *, window: int, heads: int | None = None,
             dim: int = 8, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """q [1, length, H, dim], k [1, length, Hkv, dim]: noise keys, except that KV head i's keys at
  planted[i] point along e_i, and every query of query head h points along e_(h // group) (so
  the window votes for the planted positions of its KV head)."""
  kv_heads = len(planted)
  heads = heads or kv_heads
  rng = np.random.default_rng(seed)
  k = 0.01 * rng.standard_normal((1, length, kv_heads, dim))
  q = 0.01 * rng.standard_normal((1, length, heads, dim))
  for head, positions in enumerate(planted):
    k[0, positions, head, head] = 30.0
  for head in range(heads):
    q[0, -window:, head, head // (heads // kv_heads)] = 1.0
  return jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)


def test_the_window_keeps_the_positions_it_attends_to_and_itself_sorted():
  q, k = _planted(24, [[17, 2, 9], [5, 6, 20]], window=3)
  kept = keep(q, k, budget=6, window=3, pool_kernel=1)
  assert kept.dtype == jnp.int32 and kept.shape == (1, 2, 6)
  assert kept.tolist() == [[[2, 9, 17, 21, 22, 23], [5, 6, 20, 21, 22, 23]]]


def test_pooling_spreads_a_vote_to_its_neighbours():
  votes = jnp.asarray([[1.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0]])
  np.testing.assert_allclose(pool(votes, kernel=3, pooling="max"),
                             [[1, 1, 0, 3, 3, 3, 0]])
  # The zero padding counts, as torch's avg_pool1d (SnapKV's code) counts it.
  np.testing.assert_allclose(pool(votes, kernel=3, pooling="avg"),
                             [[1 / 3, 1 / 3, 0, 1, 1, 1, 0]], rtol=1e-6)
  np.testing.assert_allclose(pool(votes, kernel=5, pooling="max"),
                             [[1, 1, 3, 3, 3, 3, 3]])
  # One planted position, three prefix slots: it and its two neighbours.
  q, k = _planted(20, [[8]], window=4)
  for pooling in ("avg", "max"):
    kept = keep(q, k, budget=7, window=4, pool_kernel=3, pooling=pooling)
    assert kept.tolist() == [[[7, 8, 9, 16, 17, 18, 19]]]


def test_scores_are_the_window_attention_summed_over_the_window_then_pooled():
  rng = np.random.default_rng(1)
  q = rng.standard_normal((2, 5, 6, 4)).astype(np.float32)   # H 6, window 5
  k = rng.standard_normal((2, 13, 3, 4)).astype(np.float32)  # Hkv 3, T 13
  length, window = 13, 5
  keys = np.repeat(k, 2, axis=2)
  logits = np.einsum("bwhd,bthd->bhwt", q, keys) / 2.0
  visible = np.arange(length)[None, :] <= (length - window + np.arange(window))[:, None]
  logits = np.where(visible, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  votes = np.pad(probs[..., :length - window].sum(2), ((0, 0), (0, 0), (1, 1)),
                 constant_values=-np.inf)
  want = np.maximum(np.maximum(votes[..., :-2], votes[..., 1:-1]), votes[..., 2:])
  got = scores_of(jnp.asarray(q), jnp.asarray(k), pool_kernel=3, pooling="max")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_window_is_always_kept_and_a_short_prompt_keeps_everything():
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((2, 19, 2, 4)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 19, 2, 4)), jnp.float32)
  kept = np.asarray(keep(q, k, budget=9, window=4, pool_kernel=5))
  assert kept.shape == (2, 2, 9)
  np.testing.assert_array_equal(kept[..., -4:], np.broadcast_to([15, 16, 17, 18], (2, 2, 4)))
  assert (np.diff(kept, axis=-1) > 0).all() and kept.min() >= 0
  np.testing.assert_array_equal(keep(q, k, budget=4, window=4),
                                np.broadcast_to([15, 16, 17, 18], (2, 2, 4)))
  for budget in (19, 25):
    np.testing.assert_array_equal(keep(q, k, budget=budget, window=4),
                                  np.broadcast_to(np.arange(19), (2, 2, 19)))


def test_gqa_sums_the_votes_of_a_group_and_selects_once_per_kv_head():
  # Query heads 0, 1 share KV head 0; 2, 3 share KV head 1. Heads 0 and 1 see the same keys,
  # so KV head 0's group keeps its three planted positions once.
  q, k = _planted(16, [[1, 4, 7], [3, 10, 11]], window=2, heads=4)
  kept = keep(q, k, budget=5, window=2, pool_kernel=1)
  assert kept.tolist() == [[[1, 4, 7, 14, 15], [3, 10, 11, 14, 15]]]
  # The group's selection is the top-k of its heads' summed scores.
  scores = np.asarray(scores_of(q[:, -2:], k, pool_kernel=1)).reshape(1, 2, 2, 14).sum(2)
  np.testing.assert_array_equal(np.sort(np.argsort(-scores, axis=-1)[..., :3], -1),
                                np.asarray(kept)[..., :3])
  per_head = keep(q, k, budget=5, window=2, pool_kernel=1, per_query_head=True)
  assert per_head.shape == (1, 4, 5)
  assert per_head[0, 1].tolist() == [1, 4, 7, 14, 15] and per_head[0, 2].tolist() == [
      3, 10, 11, 14, 15]
  # compress_kv gathers each head's positions from its KV head.
  v = 2.0 * k + 1.0
  for positions, group in ((kept, 1), (per_head, 2)):
    k_kept, v_kept = map(np.asarray, jax.jit(compress_kv)(k, v, positions))
    assert k_kept.shape == (1, 5, positions.shape[1], 8)
    positions, k_np, v_np = np.asarray(positions), np.asarray(k), np.asarray(v)
    for head in range(positions.shape[1]):
      np.testing.assert_array_equal(k_kept[0, :, head], k_np[0, positions[0, head], head // group])
      np.testing.assert_array_equal(v_kept[0, :, head], v_np[0, positions[0, head], head // group])


def test_bad_arguments_are_one_line_errors():
  q = k = jnp.zeros((1, 12, 2, 4))
  for kwargs, message in (
      (dict(budget=3, window=4), r"budget=3 must be >= window=4"),
      (dict(budget=3, window=0), r"window=0 must be >= 1"),
      (dict(budget=8, window=4, pool_kernel=4), r"pool_kernel=4 must be odd and >= 1"),
      (dict(budget=8, window=4, pool_kernel=0), r"pool_kernel=0 must be odd and >= 1"),
      (dict(budget=8, window=4, pooling="sum"), r"pooling='sum': valid: avg, max")):
    with pytest.raises(ValueError, match=message):
      snapkv_keep(q, k, **kwargs)
  with pytest.raises(ValueError, match="heads a multiple of kv_heads"):
    snapkv_keep(jnp.zeros((1, 12, 3, 4)), k, budget=8, window=4)
  with pytest.raises(ValueError, match=r"Hp a multiple of kv_heads=2, got shape \(1, 3, 5\)"):
    compress_kv(k, k, jnp.zeros((1, 3, 5), jnp.int32))
  with pytest.raises(ConfigError, match=r"model.kv_budget=2, snapkv_window=4, snapkv_pool=7, "
                                        r"snapkv_pooling='avg': SnapKV budget=2 must be >= "
                                        r"window=4"):
    make_causal_mixer("attention", 16, {"kv_budget": 2, "snapkv_window": 4}, layer_index=0,
                      num_layers=1, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match=r"model.kv_budget=-1 must be >= 0"):
    make_causal_mixer("attention", 16, {"kv_budget": -1}, layer_index=0, num_layers=1,
                      rngs=nnx.Rngs(0))


# ---- In the decoder language model ---------------------------------------------------------


def _model(*, positions: str = "rotary", max_length: int = 16, **keys) -> DecoderLM:
  config = configs.load("char_lm", "runlocal").model
  config.update(dict(dict(mixer="attention", d_model=16, num_layers=2, num_heads=2,
                          positions=positions), **keys))
  return DecoderLM(config, vocab_size=VOCAB, max_length=max_length, rngs=nnx.Rngs(params=0))


def _tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def _forward(model: DecoderLM, tokens: jax.Array) -> jax.Array:
  """The model's parallel forward pass, jitted (eager dispatch of a whole model is slow)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))(state, tokens)


def test_a_budget_of_the_whole_prompt_changes_nothing():
  model = _model(positions="learned", kv_budget=9, snapkv_window=4, snapkv_pool=3)
  prompt = _tokens(2, 9)
  greedy = decoding.generate(model, prompt, max_new_tokens=5, temperature=0.0)
  np.testing.assert_array_equal(greedy[:, :9], prompt)
  parallel = np.asarray(_forward(model, jnp.asarray(greedy)))
  # Greedy decoding: each token the argmax of the full forward pass over the tokens before it.
  np.testing.assert_array_equal(greedy[:, 9:], parallel[:, 8:-1].argmax(-1))
  cached = decoding.decode_logits(model, greedy, prefill_length=9)
  np.testing.assert_allclose(cached, parallel, atol=1e-5, rtol=1e-5)


def _restricted_logits(model: DecoderLM, tokens: jax.Array, prompt_length: int,
                       snapkv: dict) -> jax.Array:
  """The parallel forward pass with each layer's queries after the prompt attending only to
  the prompt positions SnapKV keeps for their head (and to the later positions): dense masked
  attention, no cache."""
  length = tokens.shape[1]
  x = model._embed(tokens)
  for block in model.blocks:
    mixer = block.mixer
    q, k, v = mixer._qkv(block.mixer_norm(x), jnp.arange(length))
    kept = snapkv_keep(q[:, :prompt_length], k[:, :prompt_length], **snapkv)  # [B, H, n]
    batch, heads = kept.shape[:2]
    visible = jnp.zeros((batch, heads, length), bool).at[
        jnp.arange(batch)[:, None, None], jnp.arange(heads)[None, :, None], kept].set(True)
    visible = visible | (jnp.arange(length) >= prompt_length)
    after_prompt = (jnp.arange(length) >= prompt_length)[:, None]
    mask = jnp.where(after_prompt, visible[:, :, None, :], True)   # [B, H, T, T]
    attended = reference_attention(q, k, v, causal=True, mask=mask)
    x = block._mlp(x + mixer._out(attended, x.dtype), False, None)
  return model._logits(x)


def test_a_small_budget_keeps_the_prompt_logits_and_attends_to_the_kept_positions():
  snapkv = dict(budget=6, window=3, pool_kernel=3, pooling="max")
  model = _model(kv_budget=6, snapkv_window=3, snapkv_pool=3, snapkv_pooling="max")
  tokens = jnp.asarray(_tokens(2, 15, seed=5))
  cached = np.asarray(decoding.decode_logits(model, tokens, prefill_length=11))
  graphdef, state = nnx.split(model)
  dense, want = map(np.asarray, jax.jit(lambda state, tokens: (
      nnx.merge(graphdef, state)(tokens),
      _restricted_logits(nnx.merge(graphdef, state), tokens, 11, snapkv)))(state, tokens))
  np.testing.assert_allclose(cached[:, :11], dense[:, :11], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(cached[:, 11:], want[:, 11:], atol=1e-5, rtol=1e-5)
  assert np.abs(cached[:, 11:] - dense[:, 11:]).max() > 1e-4  # the budget drops keys

  # The cache: 6 kept entries and 4 for the tokens to come, against 15 without a budget.
  mixer = model.blocks[0].mixer
  graphdef, state = nnx.split(mixer)
  x = jnp.zeros((2, 11, 16))
  cache = jax.eval_shape(lambda state: nnx.merge(graphdef, state).prefill(
      x, nnx.merge(graphdef, state).init_cache(2, 15))[1], state)
  assert cache["k"].shape == cache["v"].shape == (2, 10, 2, 8)
  nbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))
  assert mixer.cache_bytes(2, 15, 11) == nbytes == 2 * 4 * 2 * 10 * 2 * 8 + 4
  assert _model().blocks[0].mixer.cache_bytes(2, 15, 11) == 2 * 4 * 2 * 15 * 2 * 8


def test_lean_decode_attention_gives_the_dense_steps_logits():
  """model.decode_attention_impl="lean" (split-K decode attention) changes how the cached
  steps attend, not what: the same logits as the dense steps, with and without SnapKV."""
  tokens = _tokens(2, 21, seed=3)
  for budget in (0, 12):
    logits = {}
    for impl in ("dense", "lean"):
      model = _model(kv_budget=budget, snapkv_window=4, max_length=21,
                     decode_attention_impl=impl)
      logits[impl] = np.asarray(decoding.decode_logits(model, tokens, prefill_length=16))
    np.testing.assert_allclose(logits["lean"], logits["dense"], atol=1e-5)
  with pytest.raises(ConfigError, match="decode_attention_impl='flash'.*valid: "
                     "dense, lean"):
    _model(decode_attention_impl="flash")
