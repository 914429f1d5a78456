"""The one batching loop (`paperzoo.data.batches`): every example once, fixed batch shapes."""

import numpy as np
import pytest

from paperzoo.data import batches


@pytest.mark.parametrize("num_examples,batch_size", [(1, 4), (7, 3), (9, 3), (10, 64)])
def test_every_index_once_and_the_padding_repeats_the_last(num_examples, batch_size):
  seen = []
  for indices, count in batches.batch_indices(num_examples, batch_size):
    assert len(indices) == batch_size  # one shape, so a jitted function compiles once
    assert np.all(indices[count:] == indices[count - 1])
    seen.extend(indices[:count])
  assert seen == list(range(num_examples))


@pytest.mark.parametrize("num_examples,batch_size,multiple_of,expected", [
    (15, 500, 1, 15),  # 15 UEA test series are one batch of 15, not 500
    (3, 256, 2, 4),    # rounded up to the batch shards
    (1000, 256, 8, 256),
    (1000, 250, 8, 256),  # every batch splits evenly over the shards
])
def test_shrink_cuts_a_small_split_to_its_own_size(num_examples, batch_size, multiple_of,
                                                   expected):
  sizes = {len(indices) for indices, _ in batches.batch_indices(
      num_examples, batch_size, shrink=True, multiple_of=multiple_of)}
  assert sizes == {expected}


def test_map_batches_cuts_the_padding_from_nested_outputs():
  values = np.random.default_rng(0).standard_normal((11, 2)).astype(np.float32)
  calls = []

  def fn(indices):
    calls.append(len(indices))
    return values[indices] * 2, [indices, indices + 1]

  doubled, (first, second) = batches.map_batches(fn, 11, 4)
  assert calls == [4, 4, 4]
  np.testing.assert_array_equal(doubled, values * 2)
  np.testing.assert_array_equal(first, np.arange(11))
  np.testing.assert_array_equal(second, np.arange(1, 12))


def test_an_empty_split_is_refused():
  with pytest.raises(ValueError, match="at least one example"):
    list(batches.batch_indices(0, 8))
