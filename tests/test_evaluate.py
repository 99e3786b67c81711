"""Test batches of the evaluators: every example once, and shapes shared across seeds."""

import numpy as np

from fedjax_fm import cohort, evaluate


def _federation(sizes):
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  return cohort.FederatedData({"x": np.arange(offsets[-1], dtype=np.float32)}, offsets), offsets


def _assert_every_example_once(batches, sizes, offsets):
  for c, n in enumerate(sizes):   # padding is masked; each example appears exactly once
    seen = np.sort(batches.data["x"][c][batches.mask[c] > 0])
    np.testing.assert_array_equal(seen, np.arange(offsets[c], offsets[c] + n))


def test_bucketed_test_batches_share_shapes_and_keep_every_example_once():
  shapes = set()
  for sizes in ([5, 9, 3], [6, 11, 2], [7, 13, 4]):   # another seed's partition
    fed, offsets = _federation(sizes)
    plain = evaluate.test_batches(fed, 4)
    batches = evaluate.test_batches(fed, 4, bucket=True)
    shapes.add(batches.mask.shape)
    _assert_every_example_once(plain, sizes, offsets)
    _assert_every_example_once(batches, sizes, offsets)
  assert shapes == {(3, 4, 4)}   # steps 3 or 4 (ceil(13 / 4)) -> 4; batch 4 unchanged


def test_batch_is_capped_at_the_largest_client():
  fed, offsets = _federation([5, 13, 0])
  plain = evaluate.test_batches(fed, 64)
  bucketed = evaluate.test_batches(fed, 64, bucket=True)
  assert plain.mask.shape == (3, 1, 13)      # the largest client's size
  assert bucketed.mask.shape == (3, 1, 16)   # rounded up to a power of two
  assert bucketed.mask[2].sum() == 0         # a client without test data contributes nothing
  _assert_every_example_once(bucketed, [5, 13, 0], offsets)
