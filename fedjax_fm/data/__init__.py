"""Federated data sets built from real data available offline, and loaders for hub data sets.

- `partition`: IID / Dirichlet label skew / shards / quantity skew / natural-key partitioners and
  per-client train/test splits.
- `digits`: scikit-learn's digits as a federation (the launcher's default experiment).
- `shakespeare`: LEAF's Shakespeare, one client per (play, speaker).
- `text`: character vocabulary and fixed-length tokenizers (char-level, Hugging Face folders).
- `hub`: CIFAR-10, GLUE SST-2 and VQAv2 through Hugging Face `datasets`, or local files.
- `suite`: a heterogeneous federation of image, text and image+text client groups.
"""

from fedjax_fm.data.digits import digits_federation, load_digits_arrays
from fedjax_fm.data.partition import (PartitionConfig, dirichlet_label_partition, federate,
                                      iid_partition, make_partition, natural_partition,
                                      quantity_skew_partition, shard_partition, split_clients,
                                      train_test_indices)

__all__ = [
    "PartitionConfig", "digits_federation", "dirichlet_label_partition", "federate",
    "iid_partition", "load_digits_arrays", "make_partition", "natural_partition",
    "quantity_skew_partition", "shard_partition", "split_clients", "train_test_indices",
]
