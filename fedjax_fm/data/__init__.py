"""Federated data sets built from real data available offline."""

from fedjax_fm.data.digits import digits_federation, iid_partition, split_clients

__all__ = ["digits_federation", "iid_partition", "split_clients"]
