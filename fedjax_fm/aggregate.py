"""Server-side pure functions over stacked client updates (leading axis = clients).

Every aggregator takes a pytree whose leaves are `[K, ...]` and returns a pytree of `[...]`.
A server optimizer is then any optax transformation fed the pseudo-gradient
`-aggregate(deltas)` (FedAvg = `optax.sgd(1.0)`, FedAdam = `optax.adam(lr)`), see
`server_update`.

References:
  McMahan et al. 2017 (FedAvg weighted mean); Reddi et al. 2021 (adaptive server optimizers);
  Yin et al. 2018 (coordinate median, trimmed mean); Karimireddy et al. 2022 (bucketing);
  Yu et al. 2020 (PCGrad), applied over clients by FedBone (Chen et al. 2023).
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
                         old: PyTree | None = None) -> PyTree:
  """Weighted mean over only the clients that hold each leaf; a leaf nobody holds keeps `old`.

  new = where(sum_k w_k m_k > 0, sum_k w_k m_k x_k / sum_k w_k m_k, old)

  This is the aggregation of a superset tree whose clients hold different parts of it (TAP,
  FedBone's task groups; DESIGN.md "Heterogeneous architectures"): absent leaves are stacked as
  anything finite (zeros, say) with a 0 in their presence mask and never reach the mean.

  Args:
    stacked: client-stacked values, leaves `[K, ...]`.
    weights: `[K]` client weights (e.g. example counts; 0 drops a client).
    masks: presence masks with the structure of `stacked`, each leaf `[K]` (the client holds
      the whole leaf) or the leaf's full shape `[K, ...]` (element-wise presence). None means
      every client holds every leaf.
    old: the current values, returned where no client holds the leaf (element-wise with
      element-wise masks). None: zeros, the right default for an aggregated delta or gradient
      (a part nobody trained does not move); pass the current parameters when aggregating
      parameters themselves.

  Example::

      masked_weighted_mean({"a": [[1.], [3.], [9.]]}, weights=[1., 1., 2.],
                           masks={"a": [1., 1., 0.]})   # -> {"a": [2.]}
  """
  if masks is None:
    masks = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape[:1], x.dtype), stacked)
  if old is None:
    old = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape[1:], x.dtype), stacked)

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


# ---- conflicting-gradient projection (PCGrad over clients) ----------------------------------

def client_gram(stacked: PyTree, per_leaf: bool = False) -> jax.Array:
  """Inner products between the clients' updates: `[K, K]` over the whole (flattened) tree, or
  `[L, K, K]` per leaf (in `tree_leaves` order) with `per_leaf`. Computed in float32."""
  grams = []
  for x in jax.tree_util.tree_leaves(stacked):
    flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
    grams.append(jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST))
  if not grams:
    raise ValueError("client_gram needs a tree with at least one [K, ...] leaf")
  grams = jnp.stack(grams)
  return grams if per_leaf else jnp.sum(grams, axis=0)


def _valid(mask: jax.Array | None, k: int) -> jax.Array:
  return jnp.ones((k,), bool) if mask is None else jnp.asarray(mask) > 0


def _pcgrad_coefficients(gram: jax.Array, rng: jax.Array, valid: jax.Array) -> jax.Array:
  """PCGrad in coefficient space: `A [K, K]` such that the projected g~_k = sum_i A[k, i] g_i.

  g~_k starts as g_k (A[k] = e_k). For j in a random order of the other valid clients, if
  <g~_k, g_j> < 0 then g~_k -= <g~_k, g_j> / |g_j|^2 g_j, i.e. A[k, j] -= that ratio. Since g~_k
  stays in the span of the g_i, <g~_k, g_j> = sum_i A[k, i] G[i, j] with the Gram matrix G, so
  the sequential loop touches K x K scalars only and the parameters are combined once at the
  end (the same result as projecting the vectors, up to float rounding).
  """
  k = gram.shape[0]
  keys = jax.random.split(rng, k)

  def one(row, key):
    order = jax.random.permutation(key, k)

    def body(t, a):
      j = order[t]
      dot = jnp.dot(a, gram[:, j])
      norm = gram[j, j]
      project = (j != row) & valid[j] & valid[row] & (dot < 0) & (norm > 0)
      return a.at[j].add(jnp.where(project, -dot / jnp.where(norm > 0, norm, 1.0), 0.0))

    return jax.lax.fori_loop(0, k, body, jax.nn.one_hot(row, k, dtype=gram.dtype))

  return jax.vmap(one)(jnp.arange(k), keys)


def pcgrad_with_conflicts(stacked_grads: PyTree, rng: jax.Array, *, per_leaf: bool = False,
                          mask: jax.Array | None = None) -> tuple[PyTree, jax.Array]:
  """`pcgrad` and `conflict_fraction` from one Gram matrix (the inner products are the cost)."""
  leaves, treedef = jax.tree_util.tree_flatten(stacked_grads)
  k = leaves[0].shape[0]
  valid = _valid(mask, k)
  gram = client_gram(stacked_grads, per_leaf)
  if per_leaf:
    coefs = jax.vmap(lambda g, key: _pcgrad_coefficients(g, key, valid), in_axes=(0, None))(
        gram, rng)  # the same order for every leaf
  else:
    coefs = jnp.broadcast_to(_pcgrad_coefficients(gram, rng, valid), (len(leaves), k, k))
  projected = [jnp.tensordot(a.astype(x.dtype), x, axes=(1, 0),
                             precision=jax.lax.Precision.HIGHEST)
               for a, x in zip(coefs, leaves)]
  flat_gram = jnp.sum(gram, axis=0) if per_leaf else gram
  return jax.tree_util.tree_unflatten(treedef, projected), _conflicts(flat_gram, valid)


def pcgrad(stacked_grads: PyTree, rng: jax.Array, *, per_leaf: bool = False,
           mask: jax.Array | None = None) -> PyTree:
  """Projects conflicting gradients (PCGrad, Yu et al. 2020) across clients, as FedBone's
  server does before aggregating the general model's gradients (Chen et al. 2023).

  For each client k, in a random order of the other clients j (one permutation per k, drawn
  from `rng`): if <g~_k, g_j> < 0, remove the conflicting component,
  g~_k <- g~_k - <g~_k, g_j> / |g_j|^2 g_j. Projections are against the *original* g_j, as in
  PCGrad. Clients whose gradients agree (non-negative inner products) are left unchanged.

  Args:
    stacked_grads: client-stacked gradients, leaves `[K, ...]`.
    rng: key of the projection orders.
    per_leaf: False: inner products over the whole flattened gradient (PCGrad's task vector);
      True: each leaf (layer parameter) projected on its own, with the same orders.
    mask: optional `[K]`, > 0 for real clients; padded slots (0) are neither projected nor
      projected against, so padding a cohort changes nothing.

  Returns:
    The projected gradients, with the structure of `stacked_grads`.

  Example::

      g = {"w": jnp.array([[1., 0.], [-1., 1.]])}     # <g_0, g_1> = -1
      pcgrad(g, key)["w"]  # [[0.5, 0.5], [0., 1.]]: g_0 - (-1/2) g_1, g_1 - (-1/1) g_0
  """
  return pcgrad_with_conflicts(stacked_grads, rng, per_leaf=per_leaf, mask=mask)[0]


def _conflicts(gram: jax.Array, valid: jax.Array) -> jax.Array:
  pairs = valid[:, None] & valid[None, :] & ~jnp.eye(gram.shape[0], dtype=bool)
  n = jnp.sum(pairs)
  return jnp.sum(pairs & (gram < 0)) / jnp.maximum(n, 1)


def conflict_fraction(stacked_grads: PyTree, mask: jax.Array | None = None) -> jax.Array:
  """The fraction of pairs of (valid) clients whose gradients conflict, <g_j, g_k> < 0, over
  the flattened gradients; 0 with fewer than two valid clients.

  Args:
    stacked_grads: client-stacked gradients, leaves `[K, ...]`.
    mask: optional `[K]`, > 0 for real clients (padded slots are not counted).
  """
  k = jax.tree_util.tree_leaves(stacked_grads)[0].shape[0]
  return _conflicts(client_gram(stacked_grads), _valid(mask, k))
