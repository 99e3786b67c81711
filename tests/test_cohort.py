"""Federated data, seeded sampling and static-shape cohorts."""

import numpy as np
import pytest

from fedjax_fm import cohort


def _fed():
  return cohort.FederatedData.from_clients(
      [{"x": np.arange(n, dtype=np.float32) + 100 * c, "y": np.full(n, c, np.int32)}
       for c, n in enumerate([5, 2, 7, 0])])


def test_federated_data_layout():
  fed = _fed()
  assert fed.num_clients == 4
  np.testing.assert_array_equal(fed.sizes, [5, 2, 7, 0])
  np.testing.assert_array_equal(fed.client(1)["x"], [100.0, 101.0])


def test_mismatched_arrays_are_rejected():
  with pytest.raises(ValueError, match="rows"):
    cohort.FederatedData({"x": np.zeros(3)}, np.array([0, 2]))


def test_sampling_is_a_pure_function_of_seed_and_round():
  a = cohort.sample_clients(1, 5, 100, 10)
  np.testing.assert_array_equal(a, cohort.sample_clients(1, 5, 100, 10))
  assert len(set(a.tolist())) == 10
  assert not np.array_equal(a, cohort.sample_clients(1, 6, 100, 10))
  with pytest.raises(ValueError, match="exceeds"):
    cohort.sample_clients(0, 0, 3, 4)


def test_one_epoch_cohort_masks_padding():
  fed = _fed()
  steps = cohort.steps_for_epochs(fed.sizes, batch_size=3, epochs=1)  # ceil(7/3) = 3
  assert steps == 3
  c = cohort.make_cohort(fed, np.array([0, 1, 2, 3]), steps=steps, batch_size=3, seed=0,
                         round_num=0, epochs=1)
  assert c.data["x"].shape == (4, 3, 3)
  np.testing.assert_array_equal(c.mask.reshape(4, -1).sum(1), [5, 2, 7, 0])
  np.testing.assert_array_equal(c.weights, [5, 2, 7, 0])
  # Client 2 sees each of its examples exactly once, in a shuffled order.
  seen = c.data["x"][2].reshape(-1)[c.mask[2].reshape(-1) > 0]
  np.testing.assert_array_equal(np.sort(seen), 200 + np.arange(7))
  assert np.all(c.data["y"][2] == 2)  # padding repeats the client's own data, never another's


def test_fixed_steps_cycle_through_small_clients():
  c = cohort.make_cohort(_fed(), np.array([1]), steps=2, batch_size=3, seed=0, round_num=0)
  assert c.mask.sum() == 6
  vals, counts = np.unique(c.data["x"], return_counts=True)
  np.testing.assert_array_equal(vals, [100.0, 101.0])
  np.testing.assert_array_equal(counts, [3, 3])


def test_data_order_is_seeded():
  fed = _fed()
  make = lambda seed, r: cohort.make_cohort(fed, np.array([2]), steps=3, batch_size=3,
                                            seed=seed, round_num=r, epochs=1).data["x"]
  np.testing.assert_array_equal(make(0, 0), make(0, 0))
  assert not np.array_equal(make(0, 0), make(0, 1))


def test_pad_cohort_adds_empty_clients():
  c = cohort.make_cohort(_fed(), np.array([0, 2, 1]), steps=2, batch_size=2, seed=0, round_num=0)
  p = cohort.pad_cohort(c, 4)
  assert p.num_clients == 4 and p.data["x"].shape == (4, 2, 2)
  assert p.mask[3].sum() == 0 and p.weights[3] == 0
  assert p.client_ids[3] == cohort.PADDING_ID
  assert cohort.pad_cohort(c, 3) is c

