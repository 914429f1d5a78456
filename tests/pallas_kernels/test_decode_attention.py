"""Decode attention: every implementation against a direct numpy softmax on
odd shapes (GQA, head_dim 24, a cache of 37, Tq 1 and 3, lengths from 1 to
S), the exact merge of softmax partials, the stream-K schedule, and input
validation. Forward only (the op has no gradient rule)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention_problem import MASK_VALUE
from pallas_kernels.decode_attention import (_stream_k_schedule,
                                             decode_attention, merge_partials,
                                             normalize)

TOLERANCE = 1e-5  # float32, relative to max |expected|


def _inputs(rng, batch, q_len, capacity, heads, kv_heads, dim,
            dtype=jnp.float32):
  q = rng.standard_normal((batch, q_len, heads, dim))
  k = rng.standard_normal((batch, capacity, kv_heads, dim))
  v = rng.standard_normal((batch, capacity, kv_heads, dim))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _numpy_decode(q, k, v, kv_lengths, sm_scale=None):
  """Softmax attention written out per (sequence, query, head), float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, q_len, heads, dim = q.shape
  group = heads // k.shape[2]
  sm_scale = dim ** -0.5 if sm_scale is None else sm_scale
  out = np.zeros_like(q)
  for b in range(batch):
    for t in range(q_len):
      visible = int(kv_lengths[b]) - (q_len - 1 - t)
      for h in range(heads):
        if visible <= 0:
          continue  # sees no key: 0
        keys, values = k[b, :visible, h // group], v[b, :visible, h // group]
        logits = sm_scale * keys @ q[b, t, h]
        weights = np.exp(logits - logits.max())
        out[b, t, h] = weights @ values / weights.sum()
  return out


def _assert_close(actual, expected, tolerance=TOLERANCE, what=""):
  actual = np.asarray(actual, np.float64)
  assert np.isfinite(actual).all(), what
  np.testing.assert_allclose(actual, expected,
                             atol=tolerance * np.abs(expected).max(),
                             err_msg=what)


@pytest.mark.parametrize("q_len", [1, 3])
def test_xla_and_reference_match_numpy(q_len):
  rng = np.random.default_rng(q_len)
  capacity = 37
  q, k, v = _inputs(rng, 3, q_len, capacity, 6, 2, 24)
  kv_lengths = jnp.asarray([1, capacity, 20], jnp.int32)
  want = _numpy_decode(q, k, v, kv_lengths)
  if q_len == 3:  # length 1 < Tq: the first two queries see nothing
    assert not want[0, :2].any() and want[0, 2].any()
  # A chunk count that does not divide S, one key per chunk, the default
  # (one chunk here) through "auto" ("xla" on CPU).
  last = ("xla", capacity) if q_len == 3 else ("auto", None)
  for impl, num_splits in (("reference", None), ("xla", 5), last):
    run = jax.jit(lambda q, k, v, lengths, impl=impl, n=num_splits:
                  decode_attention(q, k, v, lengths, num_splits=n, impl=impl))
    _assert_close(run(q, k, v, kv_lengths), want,
                  what=f"{impl} num_splits={num_splits}")


@pytest.mark.parametrize("q_len,num_workers,kv_heads", [
    # Tiles per head 1, 1, 3, 3, 2, 2: five workers of 3 units, so heads are
    # cut at both ends of ranges, one range spans three heads, one is empty.
    (3, 5, 2),
    # More workers than the 7 tiles (MQA, 6 rows per kv head), one unit each.
    (1, 9, 1),
])
def test_stream_k_kernel_matches_numpy(q_len, num_workers, kv_heads,
                                       fast_jit):
  rng = np.random.default_rng(num_workers)
  capacity = 37
  q, k, v = _inputs(rng, 3, q_len, capacity, 6, kv_heads, 24)
  kv_lengths = jnp.asarray([1, capacity, 20], jnp.int32)
  sm_scale = 0.3
  run = fast_jit(lambda q, k, v, lengths: decode_attention(
      q, k, v, lengths, sm_scale=sm_scale, num_splits=num_workers,
      block_kv=16, impl="interpret"))
  _assert_close(run(q, k, v, kv_lengths),
                _numpy_decode(q, k, v, kv_lengths, sm_scale))


def test_stream_k_schedule_splits_the_work_evenly():
  lengths = jnp.asarray([1, 37, 20], jnp.int32)
  schedule = jax.jit(_stream_k_schedule, static_argnums=(1, 2, 3))
  head_start, start, end, first, last = schedule(lengths, 2, 16, 5)
  assert head_start.tolist() == [0, 1, 2, 5, 8, 10, 12]
  assert start.tolist() == [0, 3, 6, 9, 12]
  assert end.tolist() == [3, 6, 9, 12, 12]
  assert first.tolist() == [0, 2, 3, 4, 5]
  assert last.tolist() == [2, 3, 4, 5, 5]


def _partial(q, k, v):
  """The (o, m, l) of one query row over the given keys, float64."""
  logits = k @ q
  m = logits.max()
  p = np.exp(logits - m)
  return p @ v, m, p.sum()


def test_merged_partials_equal_attention_over_the_union():
  rng = np.random.default_rng(0)
  q = rng.standard_normal(8)
  k, v = 3.0 * rng.standard_normal((30, 8)), rng.standard_normal((30, 8))
  whole = _partial(q, k, v)
  # Uneven pieces, merged at once and in a tree of a different order.
  pieces = [_partial(q, k[a:b], v[a:b]) for a, b in ((0, 7), (7, 8), (8, 30))]
  stacked = [jnp.asarray(np.stack(x), jnp.float32) for x in zip(*pieces)]
  o, m, l = merge_partials(*stacked)
  np.testing.assert_allclose(m, whole[1], rtol=1e-7)
  _assert_close(normalize(o, l), whole[0] / whole[2], tolerance=1e-6)
  pair = merge_partials(*[jnp.stack(x) for x in zip(pieces[2], pieces[0])])
  o2, _, l2 = merge_partials(*[jnp.stack(x) for x in zip(pair, pieces[1])])
  _assert_close(normalize(o2, l2), np.asarray(normalize(o, l)),
                tolerance=1e-6)


def test_merge_is_exact_on_known_partials():
  # Equal maxima: weights exp(0) = 1, so o, l are plain sums (exact here).
  o = jnp.asarray([[[1.0, 2.0]], [[3.0, -4.0]]])       # [split, row, dim]
  m = jnp.asarray([[0.5], [0.5]])
  l = jnp.asarray([[1.0], [2.0]])
  merged_o, merged_m, merged_l = merge_partials(o, m, l)
  np.testing.assert_array_equal(merged_o, [[4.0, -2.0]])
  np.testing.assert_array_equal(merged_m, [0.5])
  np.testing.assert_array_equal(merged_l, [3.0])
  np.testing.assert_array_equal(normalize(merged_o, merged_l),
                                np.float32([[4.0, -2.0]]) / np.float32(3))
  # The empty partial (m = MASK_VALUE, l = 0, o = 0) is the identity, bit
  # for bit; merging empties gives l = 0 and a normalized 0.
  empty = (jnp.zeros((1, 1, 2)), jnp.full((1, 1), MASK_VALUE),
           jnp.zeros((1, 1)))
  with_empty = merge_partials(*[jnp.concatenate([x[:1], e])
                                for x, e in zip((o, m, l), empty)])
  for got, want in zip(with_empty, (o[0], m[0], l[0])):
    np.testing.assert_array_equal(got, want)
  none = merge_partials(*[jnp.concatenate([e, e]) for e in empty])
  np.testing.assert_array_equal(normalize(none[0], none[2]), [[0.0, 0.0]])


def test_traced_lengths_and_bfloat16():
  rng = np.random.default_rng(5)
  q, k, v = _inputs(rng, 2, 1, 40, 4, 2, 16)
  run = jax.jit(lambda q, k, v, lengths: decode_attention(
      q, k, v, lengths, num_splits=3, impl="xla"))
  for lengths in ([40, 9], [2, 33]):  # one compiled function, new lengths
    lengths = jnp.asarray(lengths, jnp.int32)
    _assert_close(run(q, k, v, lengths), _numpy_decode(q, k, v, lengths))
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
  got = run(q16, k16, v16, lengths)
  assert got.dtype == jnp.bfloat16
  _assert_close(got.astype(jnp.float32), _numpy_decode(q16, k16, v16, lengths),
                tolerance=2e-2)


@pytest.mark.parametrize("change,match", [
    (dict(kv_lengths=[0, 5]), r"kv_lengths\[0\] = 0 is outside \[1, S=16\]"),
    (dict(kv_lengths=[5, 17]), r"kv_lengths\[1\] = 17"),
    (dict(kv_lengths=[5.0, 3.0]), "kv_lengths must be integers"),
    (dict(kv_lengths=[5]), r"kv_lengths must have shape \[batch\]"),
    (dict(num_splits=0), "num_splits=0"),
    (dict(num_splits=17), r"num_splits=17 must be 1..S=16"),
    (dict(block_kv=24, impl="interpret"), "block_kv=24.*power of two"),
    (dict(block_kv=0), "block_kv=0"),
    (dict(impl="cuda"), "impl='cuda' is unknown"),
    (dict(heads=3), r"heads \(3\) must be a multiple of kv_heads"),
])
def test_bad_inputs_raise_one_clear_error(change, match):
  rng = np.random.default_rng(0)
  q, k, v = _inputs(rng, 2, 1, 16, change.pop("heads", 4), 2, 8)
  kwargs = dict(kv_lengths=[5, 16], impl="xla") | change
  lengths = np.asarray(kwargs.pop("kv_lengths"))
  lengths = lengths.astype(np.int32) if lengths.dtype.kind == "i" else lengths
  with pytest.raises(ValueError, match=match):
    decode_attention(q, k, v, jnp.asarray(lengths), **kwargs)
