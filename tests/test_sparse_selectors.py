"""FlexPrefill, SALE and MInference's per-head patterns: each checked on
planted attention targets whose right answer is known, its estimates against
direct numpy computations, and end to end through block_sparse_attention."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.block_sparse_attention import block_sparse_attention
from pallas_kernels.flash_attention import reference_attention
from paperzoo.config import ConfigError
from paperzoo.layers.causal_mixers import CausalSelfAttention
from paperzoo.sparse_attention import (HeadPattern, calibrate_head_patterns,
                                       causal_block_mask, flexprefill_blocks,
                                       flexprefill_patterns, make_block_selector,
                                       minference_blocks, quantize_int4,
                                       sale_blocks)
from paperzoo.sparse_attention.flexprefill import pattern_divergence
from paperzoo.sparse_attention.minference import (a_shape_mask,
                                                  line_block_mass,
                                                  vertical_slash_mask)
from paperzoo.sparse_attention.sale import (estimated_logits,
                                            relative_attention_scores)
from paperzoo.sparse_attention.selection import top_count_selection

# Cheap XLA options (as tests/pallas_kernels/conftest.py): compile dominates.
_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}


def _fast_jit(fn):
  """jax.jit(fn) compiled with cheap XLA options, once per argument shapes."""
  jitted, compiled = jax.jit(fn), {}

  def call(*args):
    key = tuple((x.shape, x.dtype) for x in jax.tree.leaves(args))
    if key not in compiled:
      compiled[key] = jitted.lower(*args).compile(compiler_options=_FAST_COMPILE)
    return compiled[key](*args)

  return call


# ------------------------------------------------------ planted heads --
# Three heads of one input, 256 tokens in 8 blocks of 32:
#   0 "blocks": query block i attends to key block PARTNER[i] only;
#   1 "lines": queries alternate +d / -d and attend to the sink key +10 d at
#     VERTICAL[0] or -10 d at VERTICAL[1]: two vertical lines, and block means
#     of the queries near 0, so the pooled estimate misses them;
#   2 "local": query t attends to its 16-token bucket and the one before, and
#     to key 0: a sink plus a window of at most 32 keys.
BLOCK, LENGTH, DIM = 32, 256, 32
NUM_BLOCKS = LENGTH // BLOCK
PARTNER = [0, 0, 1, 0, 2, 3, 1, 5]
VERTICAL = (37, 150)


def _planted_heads():
  rng = np.random.default_rng(0)
  q = np.zeros((LENGTH, 3, DIM), np.float32)
  k = np.zeros((LENGTH, 3, DIM), np.float32)
  for j in range(NUM_BLOCKS):
    k[j * BLOCK:(j + 1) * BLOCK, 0, j] = 1.0
  for i, j in enumerate(PARTNER):
    q[i * BLOCK:(i + 1) * BLOCK, 0, j] = 30.0
  sign = np.where(np.arange(LENGTH) % 2 == 0, 1.0, -1.0)
  q[:, 1, 0] = 10.0 * sign
  k[:, 1] = 0.1 * rng.standard_normal((LENGTH, DIM))
  k[VERTICAL[0], 1, 0], k[VERTICAL[1], 1, 0] = 10.0, -10.0
  bucket = np.arange(LENGTH) // 16
  k[np.arange(LENGTH), 2, bucket] = 1.0
  q[np.arange(LENGTH), 2, bucket] = 60.0
  q[np.arange(16, LENGTH), 2, bucket[16:] - 1] = 60.0
  q[:, 2, DIM - 1], k[0, 2, DIM - 1] = 60.0, 1.0
  q += 0.01 * rng.standard_normal(q.shape)
  k += 0.01 * rng.standard_normal(k.shape)
  return jnp.asarray(q[None]), jnp.asarray(k[None])


Q, K = _planted_heads()
PARTNER_MASK = np.zeros((NUM_BLOCKS, NUM_BLOCKS), bool)
PARTNER_MASK[np.arange(NUM_BLOCKS), PARTNER] = True
DIAGONAL = np.eye(NUM_BLOCKS, dtype=bool)
CAUSAL = causal_block_mask(LENGTH, LENGTH, BLOCK, BLOCK)


def _mask(blocks, num_kv_blocks=NUM_BLOCKS):
  return np.asarray(blocks.to_block_mask(num_kv_blocks))


def _assert_lines_and_window(mask):
  """Head 1 keeps the sinks' blocks wherever they are visible; head 2 its
  sink block and the block before each diagonal one."""
  for key in VERTICAL:
    assert mask[1, key // BLOCK:, key // BLOCK].all()
  assert mask[2, :, 0].all()
  assert all(mask[2, i, i - 1] for i in range(1, NUM_BLOCKS))


# ---------------------------------------------------------- shared parts --


def test_line_block_mass_counts_the_lines_each_block_crosses():
  q_len, kv_len, block = 20, 27, 8
  rng = np.random.default_rng(1)
  vertical, slash = rng.random((2, 1, 1, kv_len))
  got = np.asarray(line_block_mass(jnp.asarray(vertical), jnp.asarray(slash),
                                   q_len=q_len, block=block))[0, 0]
  shift = kv_len - q_len
  want = np.zeros((3, 4))
  for i in range(3):
    queries = [t + shift for t in range(i * block, min((i + 1) * block, q_len))]
    for j in range(4):
      keys = range(j * block, min((j + 1) * block, kv_len))
      want[i, j] += sum(vertical[0, 0, key] for key in keys
                        if key <= max(queries))
      offsets = {t - key for t in queries for key in keys if key <= t}
      want[i, j] += sum(slash[0, 0, o] for o in offsets)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_top_count_selection_keeps_the_best_allowed_blocks():
  scores = jnp.asarray([[0.1, 0.5, 0.4, 0.3]])
  allowed = jnp.asarray([[True, False, True, True]])
  assert top_count_selection(scores, 2, allowed).tolist() == [
      [False, False, True, True]]
  assert top_count_selection(scores, 9, allowed).tolist() == [
      [True, False, True, True]]
  with pytest.raises(ValueError, match="count=-1 must be >= 0"):
    top_count_selection(scores, -1)


# ------------------------------------------------------------ FlexPrefill --


def test_pattern_divergence_is_the_jensen_shannon_distance_of_a_direct_computation():
  q_len, kv_len, block = 37, 45, 16
  rng = np.random.default_rng(2)
  q = rng.standard_normal((1, q_len, 2, 8)).astype(np.float32)
  k = rng.standard_normal((1, kv_len, 1, 8)).astype(np.float32)
  divergence = _fast_jit(functools.partial(pattern_divergence, block=block))
  got = np.asarray(divergence(jnp.asarray(q), jnp.asarray(k)))[0]
  for h in range(2):
    true = np.zeros(kv_len)
    for t in range(q_len - block, q_len):
      seen = t + kv_len - q_len + 1
      logits = k[0, :seen, 0] @ q[0, t, h] / np.sqrt(8)
      true[:seen] += np.exp(logits - logits.max()) / np.exp(
          logits - logits.max()).sum()
    true = np.add.reduceat(true, np.arange(0, kv_len, block))
    true /= true.sum()
    k_bar = np.stack([k[0, j:j + block, 0].mean(0)
                      for j in range(0, kv_len, block)])
    logits = k_bar @ q[0, q_len - block:, h].mean(0) / np.sqrt(8)
    pooled = np.exp(logits - logits.max())
    pooled /= pooled.sum()
    middle = (true + pooled) / 2
    jsd = 0.5 * (np.sum(true * np.log(true / middle))
                 + np.sum(pooled * np.log(pooled / middle)))
    np.testing.assert_allclose(got[h], np.sqrt(jsd), rtol=1e-4, atol=1e-6)


def test_flexprefill_picks_each_planted_heads_pattern_and_its_blocks():
  aware = np.asarray(_fast_jit(functools.partial(
      flexprefill_patterns, block=BLOCK, tau=0.1))(Q, K))
  assert aware.tolist() == [[True, False, False]]
  select = _fast_jit(functools.partial(flexprefill_blocks, block=BLOCK,
                                       gamma=0.9, tau=0.1, min_budget=0))
  mask = _mask(select(Q, K))[0]
  np.testing.assert_array_equal(mask[0], PARTNER_MASK | DIAGONAL)
  _assert_lines_and_window(mask)
  assert not (mask & ~CAUSAL).any()
  # The minimum budget: every query block keeps at least 3 blocks (all it
  # sees, when fewer), whatever its head's pattern.
  select = _fast_jit(functools.partial(flexprefill_blocks, block=BLOCK,
                                       min_budget=3 * BLOCK - 5))
  blocks = select(Q, K)
  counts = np.asarray(blocks.counts)[0]
  assert np.all(counts >= np.minimum(3, CAUSAL.sum(1)))
  assert not (_mask(blocks)[0] & ~CAUSAL).any()


@pytest.mark.parametrize("kwargs,message", [
    (dict(gamma=0.0), r"gamma=0.0 must be in \(0, 1\]"),
    (dict(gamma=1.5), r"gamma=1.5 must be in \(0, 1\]"),
    (dict(tau=-0.1), "tau=-0.1 must be >= 0"),
    (dict(min_budget=-1), "min_budget=-1 must be an integer >= 0"),
    (dict(block=0), "block=0 must be a positive integer"),
])
def test_flexprefill_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    flexprefill_blocks(Q, K, **kwargs)


# ------------------------------------------------------------------- SALE --


def test_int4_quantizer_round_trips_within_half_a_step():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 13, 3, 8)).astype(np.float32)
  x[0, 5, 1, 2] = 40.0                       # an outlier sets its token's scale
  for group in (1, 4):
    values, scale = (np.asarray(a) for a in _fast_jit(functools.partial(
        quantize_int4, group=group))(jnp.asarray(x)))
    assert values.dtype == np.int8 and values.min() >= -8 and values.max() <= 7
    assert np.all(np.abs(x - values * scale) <= scale / 2 + 1e-6)
    # One scale per group of tokens (per head), max|x| / 7.
    padded = np.concatenate([x, np.zeros((2, -13 % group, 3, 8), np.float32)], 1)
    peak = np.abs(padded).reshape(2, -1, group, 3, 8).max(axis=(2, 4))
    np.testing.assert_allclose(scale[..., 0], np.repeat(peak, group, 1)[:, :13] / 7,
                               rtol=1e-6)
    assert values[0, 5, 1, 2] == 7
  zeros, unit = quantize_int4(jnp.zeros((1, 3, 1, 4)))
  assert not np.asarray(zeros).any() and np.all(np.asarray(unit) == 1.0)
  with pytest.raises(ValueError, match="group=0 must be a positive integer"):
    quantize_int4(jnp.asarray(x), group=0)


def test_sale_estimate_and_relative_scores_match_a_direct_computation():
  q_len, kv_len, block, local = 21, 29, 8, 9
  rng = np.random.default_rng(4)
  q = rng.standard_normal((1, q_len, 2, 8)).astype(np.float32)
  k = rng.standard_normal((1, kv_len, 1, 8)).astype(np.float32)
  scale = 8 ** -0.5
  # The error bound of two 4-bit factors: |q'||k' - K| + |q' - Q||K| <= ...
  q_s, k_s = q - q.mean(1, keepdims=True), k - k.mean(1, keepdims=True)
  q_int, q_step = (np.asarray(x) for x in quantize_int4(jnp.asarray(q_s)))
  k_int, k_step = (np.asarray(x) for x in quantize_int4(jnp.asarray(k_s)))
  exact = np.einsum("thd,jd->htj", q[0], k_s[0, :, 0]) * scale
  estimate = np.asarray(_fast_jit(estimated_logits)(jnp.asarray(q),
                                                    jnp.asarray(k)))[0]
  bound = scale * (np.abs(q_s[0]).sum(-1).T[:, :, None] * k_step[0, :, 0, 0] / 2
                   + q_step[0, :, :, 0].T[:, :, None]
                   * np.abs(k_int[0, :, 0] * k_step[0, :, 0]).sum(-1) / 2)
  assert np.all(np.abs(estimate - exact) <= bound + 1e-5)
  want_estimate = (np.einsum("thd,jd->htj", q_int[0].astype(np.float32),
                             k_int[0, :, 0].astype(np.float32))
                   * q_step[0, :, :, 0].T[:, :, None] * k_step[0, :, 0, 0]
                   + (q.mean(1)[0] @ k_s[0, :, 0].T)[:, None, :]) * scale
  np.testing.assert_allclose(estimate, want_estimate, rtol=1e-5, atol=1e-5)
  # RAS: exp(estimate) over the exact normalizer of the sink and local blocks.
  got = np.asarray(_fast_jit(functools.partial(
      relative_attention_scores, block=block, local=local))(
          jnp.asarray(q), jnp.asarray(k)))[0]
  shift = kv_len - q_len
  for t in range(q_len):
    block_last = min((t // block + 1) * block, q_len) - 1 + shift
    diagonal = block_last // block
    window = [j for j in range(t + shift + 1)
              if j // block == 0 or diagonal - 2 < j // block <= diagonal]
    log_z = np.log(np.exp(exact[:, t, window]).sum(-1))
    seen = t + shift + 1
    np.testing.assert_allclose(got[:, t, :seen],
                               want_estimate[:, t, :seen] - log_z[:, None],
                               rtol=1e-4, atol=1e-4)
    assert np.all(got[:, t, seen:] == -np.inf)


def test_sale_keeps_the_planted_blocks_with_its_sink_and_window():
  # Heads 3 and 4 repeat heads 0 and 1 with their own thresholds: 0 keeps
  # every visible block, one too large for any estimate only the sink and
  # the window.
  select = _fast_jit(functools.partial(sale_blocks, block=BLOCK, local=BLOCK,
                                       threshold=(0.1, 0.1, 0.1, 0.0, 1e30)))
  mask = _mask(select(jnp.concatenate([Q, Q[:, :, :2]], axis=2),
                      jnp.concatenate([K, K[:, :, :2]], axis=2)))[0]
  always = DIAGONAL.copy()
  always[:, 0] = True
  np.testing.assert_array_equal(mask[0], PARTNER_MASK | always)
  _assert_lines_and_window(mask)
  np.testing.assert_array_equal(mask[3], CAUSAL)
  np.testing.assert_array_equal(mask[4], always)
  assert not (mask & ~CAUSAL).any()


@pytest.mark.parametrize("kwargs,message", [
    (dict(threshold=-1.0), "threshold=-1.0 must be finite and >= 0"),
    (dict(threshold=(0.1, 0.1)), r"threshold must be one number or one per query "
                                 r"head \(3\), got shape \(2,\)"),
    (dict(local=0), "local=0 must be a positive integer"),
    (dict(group=0), "group=0 must be a positive integer"),
])
def test_sale_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sale_blocks(Q, K, block=BLOCK, **kwargs)


# ------------------------------------------------------------- MInference --


def test_a_shape_keeps_the_blocks_of_the_sink_and_the_window():
  q_len, kv_len, block, sink, local = 20, 30, 4, 3, 6
  got = a_shape_mask(q_len, kv_len, block=block, sink=sink, local=local)
  shift = kv_len - q_len
  want = np.zeros_like(got)
  for t in range(q_len):
    for j in range(t + shift + 1):
      if j < sink or j > t + shift - local:
        want[t // block, j // block] = True
  np.testing.assert_array_equal(got, want)


CANDIDATES = (HeadPattern("a_shape", (16, 32)), HeadPattern("vertical_slash", (3, 1)),
              HeadPattern("block_sparse", (1,)), HeadPattern("block_sparse", (2,)))


def test_calibration_picks_each_planted_heads_pattern_and_minference_applies_it():
  patterns = calibrate_head_patterns(Q, K, budget=0.7, candidates=CANDIDATES,
                                     block=BLOCK, last_q=32)
  assert patterns == (HeadPattern("block_sparse", (1,)),
                      HeadPattern("vertical_slash", (3, 1)),
                      HeadPattern("a_shape", (16, 32)))
  select = _fast_jit(functools.partial(minference_blocks, patterns=patterns,
                                       block=BLOCK, last_q=32))
  mask = _mask(select(Q, K))[0]
  np.testing.assert_array_equal(mask[0], PARTNER_MASK | DIAGONAL)
  np.testing.assert_array_equal(
      mask[1], np.asarray(vertical_slash_mask(Q[:, :, 1:2], K[:, :, 1:2], block=BLOCK,
                                              vertical_size=3, slash_size=1,
                                              last_q=32))[0, 0])
  np.testing.assert_array_equal(
      mask[2], a_shape_mask(LENGTH, LENGTH, block=BLOCK, sink=16, local=32))
  _assert_lines_and_window(mask)


def test_minference_patterns_reject_bad_arguments():
  with pytest.raises(ValueError, match="HeadPattern.name='diagonal': unknown "
                     "pattern; valid: a_shape, vertical_slash, block_sparse"):
    HeadPattern("diagonal", (1,))
  with pytest.raises(ValueError, match=r"sizes must be \(sink, local\) integers, "
                     "sink >= 0, local >= 1"):
    HeadPattern("a_shape", (4,))
  with pytest.raises(ValueError, match=r"sizes must be \(top\) integers, top >= 1"):
    HeadPattern("block_sparse", (0,))
  with pytest.raises(ValueError, match="patterns has 1 entries; q has 3 heads"):
    minference_blocks(Q, K, (HeadPattern("block_sparse", (1,)),))
  with pytest.raises(ValueError, match=r"budget=0.0 must be in \(0, 1\]"):
    calibrate_head_patterns(Q, K, budget=0.0)


# ------------------------------------------------------------ end to end --


def _selectors():
  patterns = (HeadPattern("a_shape", (16, 16)), HeadPattern("vertical_slash", (8, 8)),
              HeadPattern("block_sparse", (2,)), HeadPattern("a_shape", (0, 40)))
  return {
      "flexprefill": functools.partial(flexprefill_blocks, block=16, min_budget=16),
      "sale": functools.partial(sale_blocks, block=16, threshold=0.01, local=16),
      "minference": functools.partial(minference_blocks, patterns=patterns,
                                      block=16, last_q=16),
  }


_SPARSE_ATTENTION = _fast_jit(lambda q, k, v, blocks: block_sparse_attention(
    q, k, v, blocks, causal=True, impl="xla"))
_REFERENCE_ATTENTION = _fast_jit(lambda q, k, v, mask: reference_attention(
    q, k, v, causal=True, mask=mask))


@pytest.mark.parametrize("name", ["flexprefill", "sale", "minference"])
def test_selected_blocks_run_through_block_sparse_attention(name):
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.standard_normal((2, 90, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 90, 2, 8)), jnp.float32)
          for _ in range(2))
  blocks = _fast_jit(_selectors()[name])(q, k)
  assert blocks.indices.shape == (2, 4, 6, 6)
  block_mask = _mask(blocks, 6)
  assert not (block_mask & ~causal_block_mask(90, 90, 16, 16)).any()
  assert block_mask[..., np.arange(6), np.arange(6)].all()   # the diagonal
  dense_mask = np.repeat(np.repeat(block_mask, 16, 2), 16, 3)[:, :, :90, :90]
  np.testing.assert_allclose(
      _SPARSE_ATTENTION(q, k, v, blocks),
      _REFERENCE_ATTENTION(q, k, v, jnp.asarray(dense_mask)), atol=2e-5)


def test_config_names_the_new_selectors_and_a_layer_takes_per_head_patterns():
  selector = make_block_selector({"sparse_prefill": "flexprefill", "sparse_block": 32,
                                  "sparse_gamma": 0.8, "sparse_tau": 0.2,
                                  "sparse_min_budget": 64})
  assert selector.func is flexprefill_blocks and selector.keywords == dict(
      block=32, gamma=0.8, tau=0.2, min_budget=64)
  selector = make_block_selector({"sparse_prefill": "sale",
                                  "sparse_sale_threshold": 0.01,
                                  "sparse_sale_local": 64})
  assert selector.func is sale_blocks and selector.keywords == dict(
      block=64, threshold=0.01, local=64)
  with pytest.raises(ConfigError, match="valid: none, xattention, minference, "
                     "flexprefill, sale"):
    make_block_selector({"sparse_prefill": "quest"})
  # A calibrated layer: patterns that keep every visible block give dense
  # attention; the selector is set on the layer after construction.
  layer = CausalSelfAttention(16, num_heads=2, dropout_rate=0.0, impl="xla",
                              use_bias=False, rotary=False, rope_base=10000.0,
                              num_layers=1, matmul="float32", rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(6).standard_normal((1, 24, 16)), jnp.float32)
  forward = nnx.jit(lambda layer, x: layer(x, train=False))
  dense = forward(layer, x)
  layer.block_selector = functools.partial(
      minference_blocks, block=8,
      patterns=(HeadPattern("a_shape", (0, 24)), HeadPattern("block_sparse", (3,))))
  np.testing.assert_allclose(forward(layer, x), dense, atol=2e-5)
