"""Client-axis verbs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import clients


def test_broadcast_stacks_copies():
  out = clients.broadcast({"a": jnp.array([1.0, 2.0])}, 3)
  np.testing.assert_array_equal(out["a"], [[1.0, 2.0]] * 3)


@pytest.mark.parametrize("strategy,chunk", [("vmap", 1), ("chunked", 2), ("chunked", 3),
                                            ("unrolled", 1), ("sequential", 2),
                                            ("sequential", 5), ("sequential", 7)])
def test_map_clients_strategies_agree(strategy, chunk):
  x = jnp.arange(15.0).reshape(5, 3)
  shared = jnp.array([1.0, -1.0, 2.0])
  fn = lambda row, s: {"dot": row @ s, "sq": row ** 2}
  got = jax.jit(clients.map_clients(fn, strategy, chunk, in_axes=(0, None)))(x, shared)
  np.testing.assert_allclose(got["dot"], x @ shared)
  np.testing.assert_allclose(got["sq"], x ** 2)


@pytest.mark.parametrize("strategy,chunk", [("vmap", 1), ("chunked", 2), ("sequential", 1),
                                            ("sequential", 2), ("sequential", 7)])
def test_map_sum_clients_sums_the_first_output_and_stacks_the_second(strategy, chunk):
  # Under "sequential" the sum is a running sum through the loop (5 clients: groups of 2 leave
  # a remainder of 1; a group of 7 is clipped to the cohort): it must equal the stacked sum.
  x = jnp.arange(15.0).reshape(5, 3)
  w = jnp.array([1.0, 0.5, 0.0, 2.0, 1.0])
  fn = lambda row, wk, s: ({"update": wk * row * s}, {"loss": row @ s})
  shared = jnp.array([1.0, -1.0, 2.0])
  total, per_client = jax.jit(clients.map_sum_clients(fn, strategy, chunk, in_axes=(0, 0, None)))(
      x, w, shared)
  np.testing.assert_allclose(total["update"], (w[:, None] * x * shared).sum(0), rtol=1e-6)
  np.testing.assert_allclose(per_client["loss"], x @ shared)


def test_unknown_strategy_is_rejected():
  with pytest.raises(ValueError, match="unknown client execution strategy"):
    clients.map_clients(lambda x: x, "pmap")


def test_gather_and_scatter_rows_with_keep():
  stacked = {"a": jnp.arange(8.0).reshape(4, 2)}
  ids = jnp.array([3, 1])
  np.testing.assert_array_equal(clients.gather_rows(stacked, ids)["a"], [[6, 7], [2, 3]])
  rows = {"a": jnp.array([[-1.0, -1.0], [-2.0, -2.0]])}
  out = clients.scatter_rows(stacked, ids, rows, keep=jnp.array([True, False]))
  np.testing.assert_array_equal(out["a"], [[0, 1], [2, 3], [4, 5], [-1, -1]])


def test_weighted_sum():
  x = {"a": jnp.array([[1.0], [2.0], [3.0]])}
  np.testing.assert_allclose(clients.weighted_sum(x, jnp.array([1.0, 0.0, 2.0]))["a"], [7.0])
