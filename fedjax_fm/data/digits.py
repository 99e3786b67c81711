"""scikit-learn's digits (1,797 real 8x8 handwritten digits) as a federation.

Offline and small enough that a whole experiment runs in a minute on a laptop CPU, which makes
it the default experiment of `launch.py`.
"""

from __future__ import annotations

import numpy as np

from fedjax_fm.cohort import FederatedData


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
  """Shuffles example indices and deals them into `num_clients` near-equal parts."""
  if not 1 <= num_clients <= num_examples:
    raise ValueError(f"num_clients must be in [1, {num_examples}], got {num_clients}")
  order = np.random.default_rng(seed).permutation(num_examples)
  return np.array_split(order, num_clients)


def split_clients(arrays: dict[str, np.ndarray], parts: list[np.ndarray], test_fraction: float,
                  seed: int) -> tuple[FederatedData, FederatedData]:
  """Per-client train/test split (for personalized evaluation): each client keeps
  `test_fraction` of its own examples (at least one when it has two or more) for testing."""
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
  rng = np.random.default_rng([seed, 7])
  train, test = [], []
  for idx in parts:
    idx = rng.permutation(idx)
    n_test = int(round(test_fraction * len(idx)))
    if test_fraction > 0 and len(idx) >= 2:
      n_test = max(n_test, 1)
    test.append({k: v[idx[:n_test]] for k, v in arrays.items()})
    train.append({k: v[idx[n_test:]] for k, v in arrays.items()})
  return FederatedData.from_clients(train), FederatedData.from_clients(test)


def load_digits_arrays() -> dict[str, np.ndarray]:
  """{"x": [1797, 8, 8, 1] float32 in [0, 1], "y": [1797] int32}."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  return {"x": (d.images[..., None] / 16.0).astype(np.float32), "y": d.target.astype(np.int32)}


def digits_federation(num_clients: int = 50, seed: int = 0,
                      test_fraction: float = 0.2) -> tuple[FederatedData, FederatedData]:
  """Digits dealt IID to `num_clients` clients, each with its own train/test split."""
  arrays = load_digits_arrays()
  parts = iid_partition(len(arrays["y"]), num_clients, seed)
  return split_clients(arrays, parts, test_fraction, seed)
