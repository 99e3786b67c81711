"""scikit-learn's digits (1,797 real 8x8 handwritten digits) as a federation.

Offline and small enough that a whole experiment runs in a minute on a laptop CPU, which makes
it the default experiment of `launch.py`.
"""

from __future__ import annotations

import os

import numpy as np

from fedjax_fm import assets
from fedjax_fm.cohort import FederatedData
from fedjax_fm.data.partition import iid_partition, split_clients

__all__ = ["digits_federation", "iid_partition", "load_digits_arrays", "split_clients"]


def load_digits_arrays() -> dict[str, np.ndarray]:
  """{"x": [1797, 8, 8, 1] float32 in [0, 1], "y": [1797] int32}.

  Read from scikit-learn once and kept as ``digits.npz`` in the asset cache
  (`fedjax_fm.assets.cache_dir`): importing ``sklearn.datasets`` takes about 3 s of every
  launch on a 2-core CPU, the cached arrays a few milliseconds. An unwritable cache only
  costs the import each time.
  """
  cached = os.path.join(assets.cache_dir(), "digits.npz")
  if os.path.exists(cached):
    with np.load(cached) as f:
      return {"x": f["x"], "y": f["y"]}
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  arrays = {"x": (d.images[..., None] / 16.0).astype(np.float32),
            "y": d.target.astype(np.int32)}
  try:  # written whole under another name, then renamed: never a half-written cache
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    tmp = f"{cached}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, cached)
  except OSError:
    pass
  return arrays


def digits_federation(num_clients: int = 50, seed: int = 0,
                      test_fraction: float = 0.2) -> tuple[FederatedData, FederatedData]:
  """Digits dealt IID to `num_clients` clients, each with its own train/test split."""
  arrays = load_digits_arrays()
  parts = iid_partition(len(arrays["y"]), num_clients, seed)
  return split_clients(arrays, parts, test_fraction, seed)
