"""Client-axis verbs: the few operations every algorithm needs on client-stacked pytrees.

A client-stacked pytree has a leading axis of clients on every leaf. These verbs run inside the
jitted round:

- `broadcast(tree, k)`: give every one of k clients the same tree (no copy until XLA needs one);
- `map_clients(fn, ...)`: run one client's function over the client axis, by a strategy;
- `gather_rows` / `scatter_rows`: the sampled clients' rows of the stacked personal state;
- `weighted_sum`: reduce the client axis with per-client weights.

How the clients of a round execute is a choice with identical results (`EXECUTION_STRATEGIES`):

- ``"vmap"``: one `jax.vmap` over all clients. The accelerator path: one batched kernel per op.
- ``"chunked"``: `vmap` over chunks of `chunk_size` clients, the chunks unrolled at trace time.
  Bounds peak memory on an accelerator, and on XLA:CPU keeps batched matmuls while avoiding
  the slow grouped convolutions that `vmap` over per-client kernels lowers to.
- ``"unrolled"``: every client traced separately into the same program; the program (and its
  compile time) grows with the cohort.
- ``"sequential"``: clients in a `lax.map` loop, `chunk_size` of them traced side by side per
  iteration (independent work XLA:CPU overlaps). Program size is independent of the cohort;
  the fastest choice on XLA:CPU (see BENCHMARKS.md), pointless on an accelerator.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
EXECUTION_STRATEGIES = ("vmap", "chunked", "unrolled", "sequential")


def broadcast(tree: PyTree, k: int) -> PyTree:
  """Stacks `k` copies of `tree` on a new leading client axis."""
  return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (k,) + jnp.shape(x)), tree)


def _index(tree: PyTree, i) -> PyTree:
  return jax.tree_util.tree_map(lambda x: x[i], tree)


def _concat(trees: list[PyTree]) -> PyTree:
  return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)


def _stack(trees: list[PyTree]) -> PyTree:
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs, axis=0), *trees)


def map_clients(fn: Callable[..., PyTree], strategy: str = "vmap", chunk_size: int = 8,
                in_axes: Any = 0) -> Callable[..., PyTree]:
  """Maps a one-client function over the leading client axis of its arguments.

  Args:
    fn: a function of one client's arguments returning a pytree.
    strategy: one of `EXECUTION_STRATEGIES`; all give the same result up to float rounding.
    chunk_size: clients per `vmap` chunk for ``"chunked"``, per loop iteration for
      ``"sequential"``; the last chunk may be smaller.
    in_axes: as in `jax.vmap`: 0 for client-stacked arguments, None for arguments shared by all.

  Returns:
    A function of client-stacked arguments returning a client-stacked result.
  """
  if strategy not in EXECUTION_STRATEGIES:
    raise ValueError(f"unknown client execution strategy {strategy!r}; use one of "
                     f"{EXECUTION_STRATEGIES}")
  if strategy == "vmap":
    return jax.vmap(fn, in_axes=in_axes)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

  def mapped(*args):
    axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    k = next(jax.tree_util.tree_leaves(a)[0].shape[0] for a, ax in zip(args, axes)
             if ax is not None and jax.tree_util.tree_leaves(a))

    def part(sl):
      return [a if ax is None else _index(a, sl) for a, ax in zip(args, axes)]

    if strategy == "unrolled":
      return _stack([fn(*part(i)) for i in range(k)])
    if strategy == "sequential":
      return _sequential(fn, args, axes, k, chunk_size)
    chunk_fn = jax.vmap(fn, in_axes=tuple(axes))
    return _concat([chunk_fn(*part(slice(s, min(s + chunk_size, k))))
                    for s in range(0, k, chunk_size)])

  return mapped


def _sequential(fn, args, axes, k, group):
  """`lax.map` over groups of `group` clients, each group unrolled; a remainder group of
  fewer clients runs unrolled after the loop."""
  def run_group(group_args, size):
    outs = []
    for i in range(size):
      it = iter(group_args)
      outs.append(fn(*[_index(next(it), i) if ax is not None else a
                       for a, ax in zip(args, axes)]))
    return _stack(outs)

  mapped = [a for a, ax in zip(args, axes) if ax is not None]
  full = k // group * group
  parts = []
  if full:
    grouped = [jax.tree_util.tree_map(lambda x: x[:full].reshape((-1, group) + x.shape[1:]), a)
               for a in mapped]
    out = jax.lax.map(lambda g: run_group(g, group), grouped)
    parts.append(jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), out))
  if full < k:
    parts.append(run_group([_index(a, slice(full, k)) for a in mapped], k - full))
  return _concat(parts)


def map_sum_clients(fn: Callable[..., tuple[PyTree, PyTree]], strategy: str = "vmap",
                    chunk_size: int = 8, in_axes: Any = 0) -> Callable[..., tuple[PyTree, PyTree]]:
  """`map_clients` for a one-client function returning `(to_sum, per_client)`: returns the sum
  over clients of `to_sum` and the client-stacked `per_client`.

  Under ``"sequential"`` the sum is a running sum carried through the loop over groups, so the
  client-stacked `to_sum` (K model-sized updates, say) is never materialised; every other
  strategy maps, then sums over the client axis. The results agree up to float rounding (the
  order of the additions).
  """
  if strategy != "sequential":
    mapped = map_clients(fn, strategy, chunk_size, in_axes)

    def summed(*args):
      to_sum, per_client = mapped(*args)
      return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), to_sum), per_client

    return summed
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

  def sequential(*args):
    axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    k = next(jax.tree_util.tree_leaves(a)[0].shape[0] for a, ax in zip(args, axes)
             if ax is not None and jax.tree_util.tree_leaves(a))
    mapped = [a for a, ax in zip(args, axes) if ax is not None]

    def run_group(group_args, size):
      sums, outs = None, []
      for i in range(size):
        it = iter(group_args)
        part, out = fn(*[_index(next(it), i) if ax is not None else a
                         for a, ax in zip(args, axes)])
        sums = part if sums is None else jax.tree_util.tree_map(jnp.add, sums, part)
        outs.append(out)
      return sums, _stack(outs)

    group = min(chunk_size, k)
    full = k // group * group
    one = [_index(a, 0) if ax is not None else a for a, ax in zip(args, axes)]
    total = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                   jax.eval_shape(fn, *one)[0])
    grouped = [jax.tree_util.tree_map(lambda x: x[:full].reshape((-1, group) + x.shape[1:]), a)
               for a in mapped]

    def body(carry, g):
      part, out = run_group(g, group)
      return jax.tree_util.tree_map(jnp.add, carry, part), out

    total, outs = jax.lax.scan(body, total, grouped)
    parts = [jax.tree_util.tree_map(lambda x: x.reshape((-1,) + x.shape[2:]), outs)]
    if full < k:
      rest, rest_out = run_group([_index(a, slice(full, k)) for a in mapped], k - full)
      total = jax.tree_util.tree_map(jnp.add, total, rest)
      parts.append(rest_out)
    return total, _concat(parts)

  return sequential


def gather_rows(stacked: PyTree, ids: jax.Array) -> PyTree:
  """The rows `ids` of a client-stacked pytree (all N clients -> the K sampled ones).

  An out-of-range id (`cohort.PADDING_ID`, a cohort's padding slot) reads the last row; its
  write-back is dropped by `scatter_rows`.
  """
  return jax.tree_util.tree_map(lambda x: jnp.take(x, ids, axis=0, mode="clip"), stacked)


def scatter_rows(stacked: PyTree, ids: jax.Array, rows: PyTree,
                 keep: jax.Array | None = None) -> PyTree:
  """Writes `rows` back at `ids`; where `keep[k]` is False the old row stays.

  `keep` lets a round leave out a client whose update went bad (non-finite) without
  touching its personal state.
  """
  if keep is not None:
    old = gather_rows(stacked, ids)
    rows = jax.tree_util.tree_map(
        lambda new, o: jnp.where(keep.reshape((-1,) + (1,) * (new.ndim - 1)), new, o), rows, old)
  return jax.tree_util.tree_map(lambda x, r: x.at[ids].set(r.astype(x.dtype), mode="drop"),
                                stacked, rows)


def weighted_sum(stacked: PyTree, weights: jax.Array) -> PyTree:
  """Sum over the client axis with per-client weights: sum_k w_k x_k."""
  return jax.tree_util.tree_map(
      lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=(0, 0)), stacked)
