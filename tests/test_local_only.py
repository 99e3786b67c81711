"""Local training: every client trains its own row, nothing is communicated or aggregated.

Model: params = {"w": f32[3] (trainable -> personal), "offset": f32[3] (frozen)}.
Per-example loss 0.5 * ||w + offset - x||^2, offset = [1,1,1]; one SGD step (lr = 0.5) on a
batch with real-example mean xbar:

    w <- w - 0.5 * (w + 1 - xbar)

N = 4 clients, all rows start at w0 = [0,0,0].
Round 1, cohort (3, 1) -- deliberately not sorted:
  client 3: x = [2,4,6], [4,6,8] -> xbar = [3,5,7]; w = -0.5 * ([1,1,1] - [3,5,7]) = [1, 2, 3]
  client 1: x = [-1,1,3] (+ PAD)  -> xbar = [-1,1,3]; w = -0.5 * ([1,1,1] - [-1,1,3]) = [-1, 0, 1]
  rows: 0 -> [0,0,0], 1 -> [-1,0,1], 2 -> [0,0,0], 3 -> [1,2,3]
Round 2, cohort (1, 2):
  client 1 continues from its row: x = [4,3,2] twice -> xbar = [4,3,2]
           w = [-1,0,1] - 0.5 * ([0,1,2] - [4,3,2]) = [-1,0,1] + [2,1,0] = [1, 1, 1]
  client 2: x = [6,5,4], [4,5,6] -> xbar = [5,5,5]; w = -0.5 * ([1,1,1] - [5,5,5]) = [2, 2, 2]
  rows: 0 -> [0,0,0], 1 -> [1,1,1], 2 -> [2,2,2], 3 -> [1,2,3]
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import roles as roles_lib
from fedjax_fm.protocol import ClientExecution
from fedjax_fm.algorithms import local_only
from fedjax_fm.cohort import Cohort

PAD = 1e4
P3 = [PAD, PAD, PAD]
RTOL = 1e-6
N = 4


def loss_fn(params, batch, rng):
  del rng
  return 0.5 * jnp.sum(jnp.square(params["w"] + params["offset"] - batch["x"]), axis=-1), {}


def init_params():
  return {"w": jnp.zeros(3, jnp.float32), "offset": jnp.ones(3, jnp.float32)}


def roles():
  return roles_lib.assign_roles(init_params(), frozen=r"^offset$")


def build_cohort(x, mask, weights, ids):
  return Cohort(data={"x": jnp.asarray(x, jnp.float32)}, mask=jnp.asarray(mask, jnp.float32),
                weights=jnp.asarray(weights, jnp.float32),
                client_ids=jnp.asarray(ids, jnp.int32))


COHORT_1 = dict(x=[[[[2, 4, 6], [4, 6, 8]]], [[[-1, 1, 3], P3]]],
                mask=[[[1, 1]], [[1, 0]]], weights=[2, 1], ids=[3, 1])
COHORT_2 = dict(x=[[[[4, 3, 2], [4, 3, 2]]], [[[6, 5, 4], [4, 5, 6]]]],
                mask=[[[1, 1]], [[1, 1]]], weights=[2, 2], ids=[1, 2])
ROWS_1 = [[0, 0, 0], [-1, 0, 1], [0, 0, 0], [1, 2, 3]]
ROWS_2 = [[0, 0, 0], [1, 1, 1], [2, 2, 2], [1, 2, 3]]

EXECUTIONS = {
    "vmap": ClientExecution("vmap"),
    "chunked": ClientExecution("chunked", chunk_size=1),
    "unrolled": ClientExecution("unrolled", scan_unroll=True),
}


@functools.lru_cache(maxsize=None)
def _make(strategy):
  alg = local_only(loss_fn, roles(), client_lr=0.5, execution=EXECUTIONS[strategy])
  return alg, jax.jit(alg.round)


@pytest.mark.parametrize("strategy", list(EXECUTIONS))
def test_two_rounds_hand_derived(strategy):
  alg, round_fn = _make(strategy)
  params = init_params()
  server0 = alg.init(params, jax.random.key(0))
  clients0 = alg.init_clients(params, N)
  np.testing.assert_array_equal(clients0["w"], np.zeros((N, 3)))

  server1, clients1, metrics = round_fn(server0, clients0, build_cohort(**COHORT_1),
                                        jax.random.key(1))
  np.testing.assert_allclose(clients1["w"], ROWS_1, rtol=RTOL)
  # Loss before the step (w = 0, so w + offset - x = 1 - x):
  #   client 3: [-1,-3,-5] -> 35/2 = 17.5;  [-3,-5,-7] -> 83/2 = 41.5;  client 1: [2,0,-2] -> 4
  #   (17.5 + 41.5 + 4) / 3 = 21
  np.testing.assert_allclose(metrics["loss"], 21.0, rtol=RTOL)
  np.testing.assert_allclose(metrics["examples"], 3.0)

  server2, clients2, _ = round_fn(server1, clients1, build_cohort(**COHORT_2), jax.random.key(2))
  np.testing.assert_allclose(clients2["w"], ROWS_2, rtol=RTOL)

  # The server never changes (only its round counter): no shared leaf, frozen offset as is.
  for server in (server1, server2):
    assert server.params["w"] is None
    np.testing.assert_array_equal(server.params["offset"], [1.0, 1.0, 1.0])
    assert jax.tree_util.tree_structure(server.opt_state) == jax.tree_util.tree_structure(
        server0.opt_state)
  assert int(server2.round) == 2
  # Frozen leaves are never stacked per client.
  assert clients2["offset"] is None


def test_unsampled_rows_untouched_and_own_data_only():
  # Client 1's row after round 1 depends only on client 1's data: changing client 3's data
  # (the other row of the cohort) moves row 3 only.
  alg, round_fn = _make("vmap")
  params = init_params()
  server = alg.init(params, jax.random.key(0))
  clients0 = alg.init_clients(params, N)
  other = dict(COHORT_1, x=[[[[0, 0, 0], [0, 0, 0]]], [[[-1, 1, 3], P3]]])
  _, clients1, _ = round_fn(server, clients0, build_cohort(**other), jax.random.key(1))
  # client 3: xbar = [0,0,0] -> w = -0.5 * [1,1,1] = [-0.5,-0.5,-0.5]; client 1 as before.
  np.testing.assert_allclose(clients1["w"],
                             [[0, 0, 0], [-1, 0, 1], [0, 0, 0], [-0.5, -0.5, -0.5]], rtol=RTOL)


def test_weights_do_not_matter():
  # No aggregation: the cohort weights (even zero) change nothing.
  alg, round_fn = _make("vmap")
  params = init_params()
  server = alg.init(params, jax.random.key(0))
  clients0 = alg.init_clients(params, N)
  _, clients1, _ = round_fn(server, clients0, build_cohort(**dict(COHORT_1, weights=[0, 7])),
                            jax.random.key(1))
  np.testing.assert_allclose(clients1["w"], ROWS_1, rtol=RTOL)


def test_personal_roles_and_bytes():
  # Every trainable leaf becomes personal (also one marked shared), frozen stays frozen.
  alg = local_only(loss_fn, roles())
  params = init_params()
  assert alg.bytes_per_client(params) == (0, 0)
  clients = alg.init_clients(params, N)
  assert clients["w"].shape == (N, 3)
  assert clients["offset"] is None
