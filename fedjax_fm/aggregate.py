"""Server-side pure functions over stacked client updates (leading axis = clients).

Every aggregator takes a pytree whose leaves are `[K, ...]` and returns a pytree of `[...]`.
A server optimizer is then any optax transformation fed the pseudo-gradient
`-aggregate(deltas)` (FedAvg = `optax.sgd(1.0)`, FedAdam = `optax.adam(lr)`), see
`server_update`.

References:
  McMahan et al. 2017 (FedAvg weighted mean); Reddi et al. 2021 (adaptive server optimizers);
  Yin et al. 2018 (coordinate median, trimmed mean); Karimireddy et al. 2022 (bucketing).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def _bcast(w: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes per-client weights [K] to broadcast against a leaf [K, ...]."""
  return w.reshape(w.shape + (1,) * (x.ndim - w.ndim))


def weighted_mean(stacked: PyTree, weights: jax.Array) -> PyTree:
  """sum_k w_k x_k / sum_k w_k. With all weights zero the result is zero; callers that may
  see an empty cohort use `masked_weighted_mean`, which keeps the old value instead."""
  total = jnp.sum(weights)
  safe = jnp.where(total > 0, total, 1.0)
  return jax.tree_util.tree_map(
      lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=(0, 0)) / safe.astype(x.dtype),
      stacked)


def masked_weighted_mean(stacked: PyTree, weights: jax.Array, masks: PyTree | None,
                         old: PyTree) -> PyTree:
  """Weighted mean over only the clients that hold each leaf; a leaf nobody holds keeps `old`.

  new = where(sum_k w_k m_k > 0, sum_k w_k m_k x_k / sum_k w_k m_k, old)

  Args:
    stacked: client-stacked values, leaves `[K, ...]`.
    weights: `[K]` client weights (e.g. example counts; 0 drops a client).
    masks: presence masks with the structure of `stacked`, each leaf `[K]` (the client holds
      the whole leaf) or the leaf's full shape `[K, ...]` (element-wise presence). None means
      every client holds every leaf.
    old: the current values, returned where no client holds the leaf.
  """
  if masks is None:
    masks = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape[:1], x.dtype), stacked)

  def leaf(x, m, o):
    wm = _bcast(weights, m).astype(x.dtype) * m.astype(x.dtype)
    wm = jnp.broadcast_to(_bcast(wm, x) if wm.ndim < x.ndim else wm, x.shape)
    den = jnp.sum(wm, axis=0)
    num = jnp.sum(wm * x, axis=0)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), o)

  return jax.tree_util.tree_map(leaf, stacked, masks, old)


def bucket(stacked: PyTree, rng: jax.Array, bucket_size: int) -> PyTree:
  """Random bucketing (Karimireddy et al. 2022): shuffle clients, average buckets of size s.

  With K not divisible by s the last bucket averages the remainder. Returns leaves
  `[ceil(K/s), ...]`.
  """
  k = jax.tree_util.tree_leaves(stacked)[0].shape[0]
  perm = jax.random.permutation(rng, k)
  n_buckets = -(-k // bucket_size)
  ids = jnp.arange(k) // bucket_size  # bucket of each position after shuffling
  counts = jnp.bincount(ids, length=n_buckets).astype(jnp.float32)

  def leaf(x):
    sums = jax.ops.segment_sum(x[perm], ids, num_segments=n_buckets)
    return sums / _bcast(counts, sums).astype(x.dtype)

  return jax.tree_util.tree_map(leaf, stacked)


def coordinate_median(stacked: PyTree, rng: jax.Array | None = None,
                      bucket_size: int = 1) -> PyTree:
  """Coordinate-wise median over clients, optionally after random bucketing.

  Args:
    stacked: leaves `[K, ...]`.
    rng: key for the bucketing shuffle; required when `bucket_size > 1`.
    bucket_size: clients averaged per bucket before the median (1 = plain median; FFGG's
      Byzantine experiments use 2).
  """
  if bucket_size > 1:
    if rng is None:
      raise ValueError("coordinate_median with bucket_size > 1 needs an rng for the shuffle")
    stacked = bucket(stacked, rng, bucket_size)
  return jax.tree_util.tree_map(lambda x: jnp.median(x, axis=0), stacked)


def trimmed_mean(stacked: PyTree, trim_fraction: float) -> PyTree:
  """Coordinate-wise mean after dropping the `floor(trim_fraction * K)` largest and smallest.

  Raises:
    ValueError: if nothing would be left (trim_fraction >= 0.5).
  """
  if not 0.0 <= trim_fraction < 0.5:
    raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")

  def leaf(x):
    k = x.shape[0]
    t = int(trim_fraction * k)
    return jnp.mean(jnp.sort(x, axis=0)[t:k - t], axis=0)

  return jax.tree_util.tree_map(leaf, stacked)


def finite_clients(stacked: PyTree) -> jax.Array:
  """[K] bool: True where every element of that client's update is finite."""
  leaves = jax.tree_util.tree_leaves(stacked)
  k = leaves[0].shape[0]
  ok = jnp.ones((k,), bool)
  for x in leaves:
    ok &= jnp.all(jnp.isfinite(x.reshape(k, -1)), axis=1)
  return ok


def zero_where_bad(stacked: PyTree, ok: jax.Array) -> PyTree:
  """Replaces the rows of clients with `ok=False` by zeros, so a NaN can't leak via 0 * NaN."""
  return jax.tree_util.tree_map(lambda x: jnp.where(_bcast(ok, x), x, jnp.zeros_like(x)), stacked)


def server_update(optimizer: optax.GradientTransformation, params: PyTree, opt_state: Any,
                  mean_delta: PyTree) -> tuple[PyTree, Any]:
  """Applies a server optimizer to the pseudo-gradient `-mean_delta` (Reddi et al. 2021).

  With `optax.sgd(1.0)` this returns `params + mean_delta` (FedAvg); `optax.sgd(lr)` moves a
  fraction lr of the way; `optax.adam` gives FedAdam, `optax.yogi` FedYogi and
  `optax.sgd(lr, momentum)` FedAvgM.
  """
  pseudo_grad = jax.tree_util.tree_map(jnp.negative, mean_delta)
  updates, opt_state = optimizer.update(pseudo_grad, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def keep_if(pred: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """`new` where the scalar `pred` holds, else `old`, leaf by leaf (e.g. leave the server state
  unchanged, optimizer moments included, when no client of the round was healthy)."""
  return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)


def example_means(sums: PyTree, ok: jax.Array) -> dict[str, jax.Array]:
  """Round metrics from per-client sums `{"<m>_sum": [K], "count": [K]}` of the clients in `ok`:
  `{"<m>": example-weighted mean, "examples": total count}`."""
  sums = jax.tree_util.tree_map(lambda s: jnp.sum(jnp.where(ok, s, 0.0)), sums)
  examples = sums.pop("count")
  metrics = {name[:-len("_sum")]: s / jnp.maximum(examples, 1.0) for name, s in sums.items()}
  metrics["examples"] = examples
  return metrics
