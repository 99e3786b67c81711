"""Partitioners: hand-checkable properties on small label vectors."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_fm.data import digits, partition as P

# 10 classes x 60 examples, labels in blocks: class of index i is i // 60.
LABELS = np.repeat(np.arange(10), 60).astype(np.int32)


def _assert_exact_cover(parts, n):
  used = np.concatenate(parts)
  assert len(used) == n
  np.testing.assert_array_equal(np.sort(used), np.arange(n))


def test_iid_deals_near_equal_parts_using_every_index_once():
  parts = P.iid_partition(103, 10, seed=0)
  _assert_exact_cover(parts, 103)
  assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3
  # The old import path (launch.py, digits) is the same function.
  assert digits.iid_partition is P.iid_partition


def test_iid_rejects_more_clients_than_examples():
  with pytest.raises(ValueError, match="num_clients"):
    P.iid_partition(5, 6, seed=0)


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_uses_every_index_once_and_no_client_is_empty(alpha):
  parts = P.dirichlet_label_partition(LABELS, 12, alpha, seed=3)
  _assert_exact_cover(parts, len(LABELS))
  assert min(len(p) for p in parts) >= 1


def test_dirichlet_label_skew_grows_as_alpha_shrinks():
  def mean_classes_per_client(alpha):
    hist = P.label_histogram(LABELS, P.dirichlet_label_partition(LABELS, 10, alpha, seed=1))
    return np.mean((hist > 0).sum(axis=1))

  def mean_top_class_share(alpha):
    hist = P.label_histogram(LABELS, P.dirichlet_label_partition(LABELS, 10, alpha, seed=1))
    return np.mean(hist.max(axis=1) / hist.sum(axis=1))

  # IID-like at alpha=1000: every client sees all 10 classes and its top class is ~1/10.
  assert mean_classes_per_client(1000.0) == 10
  assert mean_top_class_share(1000.0) < 0.2
  assert mean_top_class_share(0.05) > mean_top_class_share(1.0) > mean_top_class_share(1000.0)
  assert mean_classes_per_client(0.05) < mean_classes_per_client(1.0)


def test_dirichlet_is_deterministic_in_the_seed():
  a = P.dirichlet_label_partition(LABELS, 8, 0.5, seed=4)
  b = P.dirichlet_label_partition(LABELS, 8, 0.5, seed=4)
  c = P.dirichlet_label_partition(LABELS, 8, 0.5, seed=5)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_that_cannot_fill_every_client_names_the_fix():
  # 20 examples of 2 classes over 20 clients with tiny alpha: some client is always empty.
  labels = np.repeat([0, 1], 10)
  with pytest.raises(ValueError, match=r"leaves client \d+ with no examples; lower num_clients "
                                       "or raise alpha"):
    P.dirichlet_label_partition(labels, 20, 0.01, seed=0, max_attempts=5)
  with pytest.raises(ValueError, match="alpha must be > 0"):
    P.dirichlet_label_partition(labels, 2, 0.0, seed=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_give_each_client_at_most_2k_labels(k):
  # 600 examples / (10 clients * k shards) = 60/k per shard <= 60 examples per class.
  parts = P.shard_partition(LABELS, 10, k, seed=0)
  _assert_exact_cover(parts, len(LABELS))
  hist = P.label_histogram(LABELS, parts)
  assert np.all((hist > 0).sum(axis=1) <= 2 * k)
  assert {len(p) for p in parts} == {600 // 10}


def test_one_shard_per_client_of_class_sized_shards_is_one_label_each():
  # Shard size 60 equals the class size, so each shard is exactly one class.
  parts = P.shard_partition(LABELS, 10, 1, seed=2)
  hist = P.label_histogram(LABELS, parts)
  assert np.all((hist > 0).sum(axis=1) == 1)
  assert sorted(np.argmax(hist, axis=1).tolist()) == list(range(10))


def test_shards_reject_more_shards_than_examples():
  with pytest.raises(ValueError, match="lower num_clients or shards_per_client"):
    P.shard_partition(np.zeros(10, np.int32), 6, 2, seed=0)


@pytest.mark.parametrize("distribution", ["dirichlet", "power_law"])
def test_quantity_skew_sizes_respect_min_size_and_cover(distribution):
  parts = P.quantity_skew_partition(1000, 20, seed=0, distribution=distribution, alpha=0.3,
                                    exponent=1.0, min_size=5)
  _assert_exact_cover(parts, 1000)
  sizes = np.array([len(p) for p in parts])
  assert sizes.min() >= 5
  assert sizes.max() > 3 * np.median(sizes)  # skewed, not equal


def test_quantity_skew_more_skewed_with_smaller_alpha():
  spread = lambda alpha: np.std([len(p) for p in P.quantity_skew_partition(
      2000, 20, seed=1, alpha=alpha)])
  assert spread(0.1) > spread(10.0) > 0


def test_quantity_skew_rejects_impossible_min_size():
  with pytest.raises(ValueError, match="lower num_clients or min_size"):
    P.quantity_skew_partition(10, 4, seed=0, min_size=3)
  with pytest.raises(ValueError, match="unknown quantity distribution"):
    P.quantity_skew_partition(10, 2, seed=0, distribution="zipf")


def test_natural_partition_one_client_per_key_in_first_appearance_order():
  keys = [("hamlet", "Ham"), ("hamlet", "Hor"), ("lear", "Kent"), ("hamlet", "Ham"),
          ("lear", "Kent"), ("hamlet", "Ham")]
  parts, client_keys = P.natural_partition(keys)
  assert client_keys == [("hamlet", "Ham"), ("hamlet", "Hor"), ("lear", "Kent")]
  assert [p.tolist() for p in parts] == [[0, 3, 5], [1], [2, 4]]
  parts, client_keys = P.natural_partition(keys, min_examples=2)
  assert client_keys == [("hamlet", "Ham"), ("lear", "Kent")]
  with pytest.raises(ValueError, match="lower min_examples"):
    P.natural_partition(keys, min_examples=4)


def test_partition_from_config_dispatches_and_checks_inputs():
  config = P.PartitionConfig.from_mapping({"kind": "shards", "num_clients": 5,
                                           "shards_per_client": 2})
  parts = P.make_partition(config, seed=0, labels=LABELS)
  assert len(parts) == 5
  np.testing.assert_array_equal(parts[0], P.shard_partition(LABELS, 5, 2, seed=0)[0])
  with pytest.raises(ValueError, match="needs labels"):
    P.make_partition(P.PartitionConfig(kind="dirichlet"), seed=0, num_examples=100)
  with pytest.raises(ValueError, match="unknown partition kind 'pathological'"):
    P.PartitionConfig(kind="pathological")
  with pytest.raises(ValueError, match=r"unknown partition options \['alhpa'\]"):
    P.PartitionConfig.from_mapping({"alhpa": 0.1})


def test_split_clients_keeps_each_clients_examples_and_holds_out_a_fraction():
  arrays = {"x": np.arange(30, dtype=np.float32)[:, None], "y": np.arange(30, dtype=np.int32)}
  parts = [np.arange(0, 10), np.arange(10, 11), np.arange(11, 30)]
  train, test = P.split_clients(arrays, parts, test_fraction=0.2, seed=0)
  # 10 -> 2 test, 1 -> 0 test (a single example stays for training), 19 -> round(3.8) = 4.
  assert test.sizes.tolist() == [2, 0, 4]
  assert train.sizes.tolist() == [8, 1, 15]
  for c, part in enumerate(parts):
    held = np.concatenate([train.client(c)["y"], test.client(c)["y"]])
    np.testing.assert_array_equal(np.sort(held), part)  # nothing moves between clients
  np.testing.assert_array_equal(train.arrays["x"][:, 0], train.arrays["y"])  # rows stay aligned


def test_split_clients_keeps_the_digits_federation_unchanged():
  train, test = digits.digits_federation(num_clients=10, seed=0, test_fraction=0.2)
  assert train.num_clients == test.num_clients == 10
  assert int(train.sizes.sum() + test.sizes.sum()) == 1797
  assert train.arrays["x"].shape[1:] == (8, 8, 1) and train.arrays["y"].dtype == np.int32
  with pytest.raises(ValueError, match="test_fraction"):
    P.split_clients({"y": LABELS}, [np.arange(5)], 1.0, seed=0)
