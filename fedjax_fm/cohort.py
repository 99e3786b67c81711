"""Federated data on the host and the static-shape cohort batches a round consumes.

A `FederatedData` holds every client's examples as one dict of arrays concatenated client after
client, with `offsets` marking where each client starts (the CSR layout: no per-client Python
objects, so a million clients cost one index array).

A `Cohort` is what one round sees: arrays shaped `[K, steps, batch, ...]`, an example mask
`[K, steps, batch]`, per-client weights `[K]` and the client ids `[K]`. Clients with fewer
examples than `steps * batch` are padded and masked, so every round has the same shapes and the
round compiles once.

Everything random here is a pure function of (seed, round[, client]): the same seed gives the same
cohorts and the same data order, whatever ran before (a resumed run samples what the original
would have).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
from flax import struct
import jax


# Client id of a padding slot: out of range of any client state, so its row is never written.
PADDING_ID = np.iinfo(np.int32).max


@struct.dataclass
class Cohort:
  """One round's client data: leaves `[K, steps, batch, ...]` plus mask, weights and ids."""
  data: Mapping[str, jax.Array]
  mask: jax.Array          # [K, steps, batch] 1.0 for a real example, 0.0 for padding
  weights: jax.Array       # [K] aggregation weight of each client (its example count by default)
  client_ids: jax.Array    # [K] int32 rows of the stacked client state

  @property
  def num_clients(self) -> int:
    return self.mask.shape[0]

  @property
  def num_steps(self) -> int:
    return self.mask.shape[1]


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """All clients' examples, concatenated; client c owns rows offsets[c]:offsets[c+1]."""
  arrays: Mapping[str, np.ndarray]
  offsets: np.ndarray

  def __post_init__(self):
    n = int(self.offsets[-1])
    for key, a in self.arrays.items():
      if len(a) != n:
        raise ValueError(f"array {key!r} has {len(a)} rows but offsets end at {n}")
    if np.any(np.diff(self.offsets) < 0):
      raise ValueError("offsets must be non-decreasing")

  @classmethod
  def from_clients(cls, clients: list[Mapping[str, np.ndarray]]) -> "FederatedData":
    """Builds from a list of per-client dicts of equally keyed arrays."""
    if not clients:
      raise ValueError("a federation needs at least one client")
    keys = sorted(clients[0])
    sizes = [len(c[keys[0]]) for c in clients]
    arrays = {k: np.concatenate([np.asarray(c[k]) for c in clients]) for k in keys}
    return cls(arrays, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))

  @property
  def num_clients(self) -> int:
    return len(self.offsets) - 1

  @property
  def sizes(self) -> np.ndarray:
    return np.diff(self.offsets)

  def client(self, c: int) -> dict[str, np.ndarray]:
    lo, hi = self.offsets[c], self.offsets[c + 1]
    return {k: v[lo:hi] for k, v in self.arrays.items()}


@dataclasses.dataclass(frozen=True)
class GroupedData:
  """A federation of client groups with different architectures (modality-task pairs, heads).

  Each group is its own `FederatedData` (its own array keys and shapes; client ids are local to
  the group). A grouped algorithm's round gets one `Cohort` per group, in this order, and keeps
  one stacked client state per group; all groups run inside the same compiled round.
  """
  names: tuple[str, ...]
  groups: tuple[FederatedData, ...]

  def __post_init__(self):
    if len(self.names) != len(self.groups) or not self.groups:
      raise ValueError(f"GroupedData needs one name per group, got {len(self.names)} names for "
                       f"{len(self.groups)} groups")
    if len(set(self.names)) != len(self.names):
      raise ValueError(f"group names must be distinct, got {self.names}")

  @property
  def num_clients(self) -> int:
    return sum(g.num_clients for g in self.groups)

  @property
  def client_groups(self) -> list[str]:
    """The group name of every client, groups in order (for per-group summaries)."""
    return [n for n, g in zip(self.names, self.groups) for _ in range(g.num_clients)]


def group_cohort_sizes(data: GroupedData, cohort_size: int | tuple[int, ...]) -> tuple[int, ...]:
  """Clients sampled per group each round: an int is the same for every group."""
  sizes = ((cohort_size,) * len(data.groups) if isinstance(cohort_size, int)
           else tuple(int(k) for k in cohort_size))
  if len(sizes) != len(data.groups):
    raise ValueError(f"cohort_size {cohort_size} gives {len(sizes)} sizes for "
                     f"{len(data.groups)} groups {data.names}; give one per group or one int")
  for name, k, g in zip(data.names, sizes, data.groups):
    if not 0 < k <= g.num_clients:
      raise ValueError(f"cohort size {k} of group {name!r} must be in 1..{g.num_clients} (its "
                       "clients); lower config.cohort_size")
  return sizes


def sample_clients(seed: int, round_num: int, num_clients: int, cohort_size: int,
                   group: int | None = None) -> np.ndarray:
  """The cohort of a round: `cohort_size` distinct client ids, a pure function of (seed, round)
  (and of the group's index in a `GroupedData`, so groups are sampled independently)."""
  if cohort_size > num_clients:
    raise ValueError(f"cohort_size={cohort_size} exceeds the {num_clients} clients; lower "
                     "cohort_size or add clients")
  rng = np.random.default_rng([seed, round_num, 0x5A11] + ([] if group is None else [group]))
  return np.sort(rng.choice(num_clients, size=cohort_size, replace=False)).astype(np.int32)


def steps_for_epochs(sizes: np.ndarray, batch_size: int, epochs: int) -> int:
  """Local steps that let the largest client see `epochs` passes (smaller ones are masked)."""
  return max(1, int(np.ceil(int(np.max(sizes)) * epochs / batch_size)))


def make_cohort(fed: FederatedData, client_ids: np.ndarray, *, steps: int, batch_size: int,
                seed: int, round_num: int, epochs: int | None = None,
                group: int | None = None) -> Cohort:
  """Builds the static-shape cohort batch for the given clients.

  Args:
    fed: the federation.
    client_ids: `[K]` ids of the round's clients.
    steps: local steps per client (the static second axis).
    batch_size: examples per step.
    seed, round_num: seed the per-client data order (a fresh permutation each epoch).
    group: the group's index in a `GroupedData` (client ids are local to a group), so that
      clients with the same local id in different groups draw independent orders.
    epochs: if set, each client sees exactly `epochs` passes over its data and the rest of the
      `steps * batch_size` slots are masked; if None, every slot is filled by cycling through the
      client's shuffled data (fixed number of local steps).

  Returns:
    A `Cohort` of numpy arrays (device placement is the runner's job). The weight of a client is
    its number of examples.
  """
  k, slots = len(client_ids), steps * batch_size
  index = np.zeros((k, slots), np.int64)
  mask = np.zeros((k, slots), np.float32)
  for row, c in enumerate(client_ids):
    lo, n = int(fed.offsets[c]), int(fed.sizes[c])
    if n == 0:
      continue
    rng = np.random.default_rng([seed, round_num, int(c), 0xDA7A]
                                + ([] if group is None else [group]))
    passes = -(-slots // n) if epochs is None else epochs
    order = np.concatenate([rng.permutation(n) for _ in range(passes)])[:slots]
    # Padding repeats the client's own first example: masked out of the loss, but it must not
    # be another client's data (a NaN there would reach this client's gradients as 0 * NaN).
    index[row] = lo
    index[row, :len(order)] = lo + order
    mask[row, :len(order)] = 1.0
  shape = (k, steps, batch_size)
  data = {key: arr[index].reshape(shape + arr.shape[1:]) for key, arr in fed.arrays.items()}
  return Cohort(data=data, mask=mask.reshape(shape),
                weights=fed.sizes[client_ids].astype(np.float32),
                client_ids=np.asarray(client_ids, np.int32))


def pad_cohort(cohort: Cohort, multiple: int) -> Cohort:
  """Pads a cohort with empty clients up to a multiple of `multiple` (the mesh's ``clients``
  devices): all examples masked, weight 0, id `PADDING_ID`. They train on nothing, weigh
  nothing in the aggregate and write back nothing, so results equal the unpadded cohort's."""
  k = cohort.num_clients
  extra = -k % multiple
  if not extra:
    return cohort
  pad = lambda a: np.concatenate([np.asarray(a), np.zeros((extra,) + a.shape[1:], a.dtype)])
  return Cohort(data={key: pad(v) for key, v in cohort.data.items()}, mask=pad(cohort.mask),
                weights=pad(cohort.weights),
                client_ids=np.concatenate([np.asarray(cohort.client_ids),
                                           np.full(extra, PADDING_ID, np.int32)]))
