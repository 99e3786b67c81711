"""Partitioners: which examples each simulated client holds.

Every partitioner is a pure function of the labels (or keys) and a seed and returns a list of
index arrays, one per client, into the example arrays. `federate` and `split_clients` turn those
into `FederatedData` (per-client train/test splits for personalized evaluation).

The skews follow the usual benchmark recipes:

- IID: a shuffled deal into near-equal parts.
- Label skew with a Dirichlet prior (Hsu et al. 2019, "Measuring the effects of non-identical
  data distribution"; the per-class form of Yurochkin et al. 2019): for every class, the
  proportions of its examples that go to each client are drawn from Dir(alpha). Small alpha
  gives clients few classes; large alpha approaches IID.
- Shards (McMahan et al. 2017, "Communication-efficient learning of deep networks from
  decentralized data"): sort by label, cut into `num_clients * k` shards, deal `k` to each client.
- Quantity skew: client sizes drawn from Dir(alpha) or a power law, every client at least
  `min_size` examples (Li et al. 2022, "Federated learning on non-IID data silos").
- Natural: one client per distinct key, e.g. (play, speaker) in Shakespeare (LEAF, Caldas et al.
  2018).

A partition that leaves a client with no examples is an error, not a silent empty client; so is
a train/test split that leaves one without training or test examples, unless the config asks for
such clients to be excluded (`handle_empty_clients`).
"""

from __future__ import annotations

import dataclasses
from typing import Hashable, Mapping, Sequence

import numpy as np

from fedjax_fm.cohort import FederatedData, GroupedData

PARTITION_KINDS = ("iid", "dirichlet", "shards", "quantity", "natural")


def _check_num_clients(num_examples: int, num_clients: int) -> None:
  if not 1 <= num_clients <= num_examples:
    raise ValueError(f"num_clients must be in [1, {num_examples}] for {num_examples} examples, "
                     f"got {num_clients}")


def _check_nonempty(parts: Sequence[np.ndarray], fix: str, min_size: int = 1) -> None:
  for c, part in enumerate(parts):
    if len(part) < min_size:
      have = "no examples" if len(part) == 0 else f"{len(part)} < min_size={min_size} examples"
      raise ValueError(f"partition leaves client {c} with {have}; {fix}")


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
  """Shuffles example indices and deals them into `num_clients` near-equal parts.

  Args:
    num_examples: number of examples to deal.
    num_clients: number of clients; each gets `num_examples // num_clients` or one more.
    seed: seeds the shuffle.

  Returns:
    `num_clients` int64 index arrays that together use every index exactly once.
  """
  _check_num_clients(num_examples, num_clients)
  order = np.random.default_rng(seed).permutation(num_examples)
  return [part.astype(np.int64) for part in np.array_split(order, num_clients)]


def dirichlet_label_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int, *,
                              min_size: int = 1, max_attempts: int = 100) -> list[np.ndarray]:
  """Label skew: every class is split over the clients by proportions drawn from Dir(alpha).

  For each class, its (shuffled) examples are cut at the cumulative proportions of a draw
  `p ~ Dir(alpha * ones(num_clients))` (Hsu et al. 2019). With small `alpha` some clients may
  end up empty; the draw is then repeated with the next derived seed (deterministically, up to
  `max_attempts` times), the usual practice of benchmark code, and only then is it an error.

  Args:
    labels: `[N]` integer class labels.
    num_clients: number of clients.
    alpha: Dirichlet concentration (> 0). Smaller means more skew.
    seed: seeds the draws.
    min_size: fewest examples a client may hold.
    max_attempts: draws to try before giving up.

  Returns:
    `num_clients` sorted int64 index arrays that together use every index exactly once.

  Raises:
    ValueError: for alpha <= 0, or if no draw gives every client `min_size` examples.
  """
  labels = np.asarray(labels)
  _check_num_clients(len(labels), num_clients)
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got {alpha}")
  if num_clients * min_size > len(labels):
    raise ValueError(f"{num_clients} clients with min_size={min_size} need "
                     f"{num_clients * min_size} examples but there are {len(labels)}; lower "
                     "num_clients or min_size")
  classes = np.unique(labels)
  parts: list[np.ndarray] = []
  for attempt in range(max_attempts):
    rng = np.random.default_rng([seed, attempt, 0xD1])
    per_client: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in classes:
      idx = rng.permutation(np.flatnonzero(labels == cls))
      proportions = rng.dirichlet(np.full(num_clients, alpha))
      cuts = np.round(np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
      for c, chunk in enumerate(np.split(idx, cuts)):
        per_client[c].append(chunk)
    parts = [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in per_client]
    if min(len(p) for p in parts) >= min_size:
      return parts
  _check_nonempty(parts, f"lower num_clients or raise alpha (no draw in {max_attempts} "
                  "attempts gave every client enough examples)", min_size)
  return parts  # unreachable: the check above raised


def shard_partition(labels: np.ndarray, num_clients: int, shards_per_client: int,
                    seed: int) -> list[np.ndarray]:
  """Pathological label skew by shards (McMahan et al. 2017).

  Examples are sorted by label (ties in random order), cut into `num_clients *
  shards_per_client` contiguous near-equal shards, and each client is dealt
  `shards_per_client` random shards. When every shard is no larger than the smallest class, a
  shard spans at most two labels, so a client holds at most `2 * shards_per_client` labels.

  Args:
    labels: `[N]` integer class labels.
    num_clients: number of clients.
    shards_per_client: shards dealt to each client (k).
    seed: seeds the tie order and the deal.

  Returns:
    `num_clients` sorted int64 index arrays that together use every index exactly once.
  """
  labels = np.asarray(labels)
  if shards_per_client < 1:
    raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
  num_shards = num_clients * shards_per_client
  if not 1 <= num_shards <= len(labels):
    raise ValueError(f"{num_clients} clients x {shards_per_client} shards = {num_shards} shards "
                     f"for {len(labels)} examples; need 1 to {len(labels)} shards, lower "
                     "num_clients or shards_per_client")
  rng = np.random.default_rng([seed, 0x5D])
  shuffled = rng.permutation(len(labels))
  by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
  shards = np.array_split(by_label, num_shards)
  deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
  return [np.sort(np.concatenate([shards[s] for s in row])).astype(np.int64) for row in deal]


def quantity_skew_partition(num_examples: int, num_clients: int, seed: int, *,
                            distribution: str = "dirichlet", alpha: float = 1.0,
                            exponent: float = 1.5, min_size: int = 1) -> list[np.ndarray]:
  """Quantity skew: IID content, unequal client sizes.

  Every client first gets `min_size` examples; the rest are dealt in proportion to weights drawn
  from Dir(alpha) (`distribution="dirichlet"`, Li et al. 2022) or from a Pareto power law with
  tail `exponent` (`distribution="power_law"`, the size profile of LEAF's natural federations).
  The examples themselves are a random permutation, so labels stay IID.

  Args:
    num_examples: number of examples to deal.
    num_clients: number of clients.
    seed: seeds the sizes and the permutation.
    distribution: "dirichlet" or "power_law".
    alpha: Dirichlet concentration (> 0) for "dirichlet"; smaller is more skewed.
    exponent: Pareto shape (> 0) for "power_law"; smaller is more skewed.
    min_size: fewest examples a client holds (>= 1).

  Returns:
    `num_clients` sorted int64 index arrays that together use every index exactly once.
  """
  _check_num_clients(num_examples, num_clients)
  if min_size < 1:
    raise ValueError(f"min_size must be >= 1 so no client is empty, got {min_size}")
  if num_clients * min_size > num_examples:
    raise ValueError(f"{num_clients} clients with min_size={min_size} need "
                     f"{num_clients * min_size} examples but there are {num_examples}; lower "
                     "num_clients or min_size")
  rng = np.random.default_rng([seed, 0x0A])
  if distribution == "dirichlet":
    if not alpha > 0:
      raise ValueError(f"alpha must be > 0, got {alpha}")
    weights = rng.dirichlet(np.full(num_clients, alpha))
  elif distribution == "power_law":
    if not exponent > 0:
      raise ValueError(f"exponent must be > 0, got {exponent}")
    weights = rng.pareto(exponent, num_clients) + 1.0
    weights = weights / weights.sum()
  else:
    raise ValueError(f"unknown quantity distribution {distribution!r}; use 'dirichlet' or "
                     "'power_law'")
  extra = num_examples - num_clients * min_size
  # Largest-remainder rounding: sizes sum exactly to num_examples.
  raw = weights * extra
  sizes = np.floor(raw).astype(np.int64)
  leftover = extra - int(sizes.sum())
  sizes[np.argsort(-(raw - sizes), kind="stable")[:leftover]] += 1
  sizes += min_size
  order = rng.permutation(num_examples)
  return [np.sort(p).astype(np.int64) for p in np.split(order, np.cumsum(sizes)[:-1])]


def natural_partition(keys: Sequence[Hashable] | np.ndarray,
                      min_examples: int = 1) -> tuple[list[np.ndarray], list[Hashable]]:
  """One client per distinct key, e.g. (play, speaker) in LEAF's Shakespeare (Caldas et al. 2018).

  Args:
    keys: `[N]` the key of every example (any hashable values: ints, strings, tuples).
    min_examples: keys with fewer examples are dropped (their examples are unused).

  Returns:
    `(parts, client_keys)`: sorted int64 index arrays, one per kept key, ordered by the key's
    first appearance in `keys`, and the key of each client.
  """
  if min_examples < 1:
    raise ValueError(f"min_examples must be >= 1, got {min_examples}")
  groups: dict[Hashable, list[int]] = {}
  for i, key in enumerate(keys.tolist() if isinstance(keys, np.ndarray) else keys):
    groups.setdefault(key, []).append(i)
  kept = [(k, np.asarray(v, np.int64)) for k, v in groups.items() if len(v) >= min_examples]
  if not kept:
    raise ValueError(f"no key has min_examples={min_examples} examples ({len(groups)} keys, "
                     f"largest {max((len(v) for v in groups.values()), default=0)}); lower "
                     "min_examples")
  return [idx for _, idx in kept], [k for k, _ in kept]


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
  """How one data set is dealt to clients (the `data.partition` block of a config).

  Attributes:
    kind: one of "iid", "dirichlet", "shards", "quantity", "natural".
    num_clients: number of clients (ignored by "natural", which has one client per key).
    alpha: Dirichlet concentration for "dirichlet" and for "quantity" with distribution
      "dirichlet".
    shards_per_client: k of "shards".
    distribution: "dirichlet" or "power_law" for "quantity".
    exponent: Pareto shape for "quantity" with "power_law".
    min_size: fewest examples per client ("dirichlet", "quantity"); for "natural", keys with
      fewer examples are dropped.
  """
  kind: str = "iid"
  num_clients: int = 10
  alpha: float = 0.5
  shards_per_client: int = 2
  distribution: str = "dirichlet"
  exponent: float = 1.5
  min_size: int = 1

  def __post_init__(self):
    if self.kind not in PARTITION_KINDS:
      raise ValueError(f"unknown partition kind {self.kind!r}; available: {list(PARTITION_KINDS)}")

  @classmethod
  def from_mapping(cls, config: Mapping[str, object] | None) -> "PartitionConfig":
    """Builds from a dict or ConfigDict; unknown fields are an error, missing ones default."""
    config = dict(config or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
      raise ValueError(f"unknown partition options {unknown}; available: {sorted(fields)}")
    return cls(**config)


def make_partition(config: PartitionConfig, seed: int, *, labels: np.ndarray | None = None,
              keys: Sequence[Hashable] | None = None,
              num_examples: int | None = None) -> list[np.ndarray]:
  """Deals examples to clients as `config` says.

  Args:
    config: the partition recipe.
    seed: seeds every random choice.
    labels: `[N]` class labels; needed by "dirichlet" and "shards".
    keys: `[N]` natural keys; needed by "natural".
    num_examples: N, when neither labels nor keys are given.

  Returns:
    One int64 index array per client; no client is empty.
  """
  n = num_examples
  for given in (labels, keys):
    if n is None and given is not None:
      n = len(given)
  needs = {"dirichlet": labels, "shards": labels, "natural": keys}
  if config.kind in needs and needs[config.kind] is None:
    what = "keys" if config.kind == "natural" else "labels"
    raise ValueError(f"partition kind {config.kind!r} needs {what}; pass {what}= or pick "
                     "another kind")
  if n is None:
    raise ValueError("partition needs labels, keys or num_examples")
  if config.kind == "iid":
    return iid_partition(n, config.num_clients, seed)
  if config.kind == "dirichlet":
    return dirichlet_label_partition(labels, config.num_clients, config.alpha, seed,
                                     min_size=config.min_size)
  if config.kind == "shards":
    return shard_partition(labels, config.num_clients, config.shards_per_client, seed)
  if config.kind == "quantity":
    return quantity_skew_partition(n, config.num_clients, seed, distribution=config.distribution,
                                   alpha=config.alpha, exponent=config.exponent,
                                   min_size=config.min_size)
  return natural_partition(keys, config.min_size)[0]


def train_test_indices(parts: Sequence[np.ndarray], test_fraction: float,
                       seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Splits every client's examples into its own train and test examples.

  Each client keeps `round(test_fraction * size)` of its examples, in random order, for testing,
  and at least one when it has two or more and `test_fraction > 0` (personalized evaluation
  scores each client on its own held-out data).

  Args:
    parts: one index array per client.
    test_fraction: in [0, 1).
    seed: seeds the per-client shuffles.

  Returns:
    `(train_parts, test_parts)`, one index array per client each.
  """
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
  rng = np.random.default_rng([seed, 7])
  train, test = [], []
  for idx in parts:
    idx = rng.permutation(idx)
    n_test = int(round(test_fraction * len(idx)))
    if test_fraction > 0 and len(idx) >= 2:
      n_test = max(n_test, 1)
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return train, test


def federate(arrays: Mapping[str, np.ndarray], parts: Sequence[np.ndarray]) -> FederatedData:
  """Gathers `arrays` into a `FederatedData` whose client c holds rows `parts[c]`."""
  if not parts:
    raise ValueError("a federation needs at least one client")
  sizes = np.array([len(p) for p in parts], np.int64)
  index = np.concatenate([np.asarray(p, np.int64) for p in parts])
  return FederatedData({k: np.asarray(v)[index] for k, v in arrays.items()},
                       np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def split_clients(arrays: Mapping[str, np.ndarray], parts: Sequence[np.ndarray],
                  test_fraction: float, seed: int) -> tuple[FederatedData, FederatedData]:
  """Per-client train/test `FederatedData` (see `train_test_indices`)."""
  train, test = train_test_indices(parts, test_fraction, seed)
  return federate(arrays, train), federate(arrays, test)


def label_histogram(labels: np.ndarray, parts: Sequence[np.ndarray],
                    num_classes: int | None = None) -> np.ndarray:
  """`[num_clients, num_classes]` example counts per client and class (to inspect a skew)."""
  labels = np.asarray(labels)
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


# ---- clients left without examples ----

def _keep_rows(data: FederatedData, keep: np.ndarray) -> FederatedData:
  """The clients of `data` where `keep` is True, in order (their examples unchanged)."""
  return federate(data.arrays, [np.arange(data.offsets[c], data.offsets[c + 1])
                                for c in np.flatnonzero(keep)])


def empty_clients(train, test) -> np.ndarray:
  """`[num_clients]` bool: clients with no training or no test examples (for a `GroupedData`,
  its groups' clients in order). Train and test must hold the same clients."""
  pairs = (tuple(zip(train.groups, test.groups)) if isinstance(train, GroupedData)
           else ((train, test),))
  out = []
  for tr, te in pairs:
    if tr.num_clients != te.num_clients:
      raise ValueError(f"train and test data hold {tr.num_clients} and {te.num_clients} "
                       "clients; a client's test data must be its own")
    out.append((tr.sizes == 0) | (te.sizes == 0))
  return np.concatenate(out)


def handle_empty_clients(train, test, client_groups: Sequence | None, policy: str):
  """Refuses, or leaves out, clients with no training or test examples.

  A client with no training examples would train on nothing (a round of such clients logs a
  loss of 0); one with no test examples would count as accuracy 0 in the per-client
  statistics. So they are an error, unless the config asks for them to be excluded.

  Args:
    train, test: the federation's `FederatedData` (or `GroupedData`; excluding clients from a
      subclass of `GroupedData` with fields of its own is refused).
    client_groups: a group name per client, or None.
    policy: ``config.data.empty_clients``: "error" or "exclude".

  Returns:
    (train, test, client_groups, number of clients excluded).

  Raises:
    ValueError (one line): an empty client under "error" (with the counts and the fixes); every
      client empty; "exclude" on data that cannot drop clients.
  """
  empty = empty_clients(train, test)
  if not empty.any():
    return train, test, client_groups, 0
  groups = (tuple(zip(train.groups, test.groups)) if isinstance(train, GroupedData)
            else ((train, test),))
  no_train = sum(int((tr.sizes == 0).sum()) for tr, _ in groups)
  no_test = sum(int((te.sizes == 0).sum()) for _, te in groups)
  what = (f"{int(empty.sum())} of {len(empty)} clients without examples ({no_train} without "
          f"training examples, {no_test} without test examples; the first is client "
          f"{int(np.flatnonzero(empty)[0])})")
  if policy != "exclude":
    raise ValueError(f"the partition leaves {what}; use fewer clients (data.partition."
                     "num_clients), a larger min_size or a milder skew, or set "
                     "config.data.empty_clients='exclude' to leave them out of the run")
  if empty.all():
    raise ValueError(f"the partition leaves {what}: every client, nothing to train on")
  keep = ~empty
  if isinstance(train, GroupedData):
    if type(train) is not GroupedData or type(test) is not GroupedData:
      raise ValueError(f"the partition leaves {what}, and config.data.empty_clients='exclude' "
                       f"cannot drop clients from {type(train).__name__}; use fewer clients")
    sizes = np.cumsum([0] + [g.num_clients for g in train.groups])
    masks = [keep[lo:hi] for lo, hi in zip(sizes[:-1], sizes[1:])]
    if not all(m.any() for m in masks):
      raise ValueError(f"the partition leaves {what}: a whole group, nothing to train on")
    train = dataclasses.replace(train, groups=tuple(
        _keep_rows(g, m) for g, m in zip(train.groups, masks)))
    test = dataclasses.replace(test, groups=tuple(
        _keep_rows(g, m) for g, m in zip(test.groups, masks)))
  else:
    train, test = _keep_rows(train, keep), _keep_rows(test, keep)
  if client_groups is not None:
    client_groups = [g for g, k in zip(client_groups, keep) if k]
  return train, test, client_groups, int(empty.sum())
