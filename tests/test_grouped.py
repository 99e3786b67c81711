"""Grouped federations: one cohort and one stacked client state per group, one compiled round.

A toy grouped algorithm with a hand-computable round: every sampled client replaces the shared
scalar `w` by the mean label of its local data (masked), the server sets `w` to the
example-weighted mean of those means over all groups' clients, and each client counts the rounds
it took part in. With every client sampled, `w` is the mean label of all training examples.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import cohort as cohort_lib, evaluate as evaluate_lib, sharding
from fedjax_fm.protocol import Algorithm, ServerState
from fedjax_fm.cohort import FederatedData, GroupedData
from fedjax_fm.runner import RoundRunner
from fedjax_fm.train import train


def toy_grouped():
  def init(params, rng):
    del rng
    return ServerState(round=jnp.zeros((), jnp.int32), params=params, opt_state=(), extra=None)

  def init_clients(params, rows):
    return tuple({"rounds": jnp.zeros((r,), jnp.int32)} for r in rows)

  def round_fn(server, clients, cohorts, rng):
    del rng
    sums, counts, new_clients = 0.0, 0.0, []
    for states, c in zip(clients, cohorts):
      n = jnp.sum(c.mask, axis=(1, 2))
      means = jnp.sum(c.data["y"] * c.mask, axis=(1, 2)) / jnp.maximum(n, 1.0)
      sums += jnp.sum(means * c.weights)
      counts += jnp.sum(c.weights)
      rows = states["rounds"].at[c.client_ids].add(1, mode="drop")
      new_clients.append({"rounds": rows})
    params = {"w": sums / counts}
    return (server.replace(round=server.round + 1, params=params), tuple(new_clients),
            {"loss": params["w"]})

  return Algorithm(init=init, init_clients=init_clients, round=round_fn,
                   bytes_per_client=lambda params: (4, 4))


def two_groups():
  a = FederatedData.from_clients([{"y": np.array([1.0, 3.0], np.float32), "x": np.zeros((2, 3))},
                                  {"y": np.array([5.0], np.float32), "x": np.zeros((1, 3))},
                                  {"y": np.array([0.0, 0.0, 0.0], np.float32),
                                   "x": np.zeros((3, 3))}])
  # the second group has other input shapes: text-like ids instead of images
  b = FederatedData.from_clients([{"y": np.array([10.0], np.float32),
                                   "ids": np.zeros((1, 7), np.int32)},
                                  {"y": np.array([2.0, 4.0], np.float32),
                                   "ids": np.zeros((2, 7), np.int32)}])
  return GroupedData(("images", "text"), (a, b))


def test_grouped_data_checks_names_and_cohort_sizes():
  data = two_groups()
  assert data.num_clients == 5
  assert data.client_groups == ["images"] * 3 + ["text"] * 2
  assert cohort_lib.group_cohort_sizes(data, 2) == (2, 2)
  assert cohort_lib.group_cohort_sizes(data, (3, 1)) == (3, 1)
  with pytest.raises(ValueError, match="group 'text'"):
    cohort_lib.group_cohort_sizes(data, 3)
  with pytest.raises(ValueError, match="one per group"):
    cohort_lib.group_cohort_sizes(data, (1, 1, 1))
  with pytest.raises(ValueError, match="distinct"):
    GroupedData(("a", "a"), data.groups)


@pytest.mark.parametrize("devices", [1, 4])
def test_all_clients_sampled_gives_the_global_mean_label(devices):
  data = two_groups()
  mesh = sharding.make_mesh(devices=jax.devices()[:devices])
  history = train(toy_grouped(), {"w": jnp.zeros(())}, data, rounds=2, cohort_size=(3, 2),
                  batch_size=2, local_epochs=1, mesh=mesh, progress=False)
  all_y = np.concatenate([g.arrays["y"] for g in data.groups])
  assert history[-1]["train/loss"] == pytest.approx(all_y.mean(), rel=1e-6)
  assert history[-1]["bytes_up"] == 4 * 5


def test_round_compiles_once_and_padding_writes_nothing():
  data = two_groups()
  alg = toy_grouped()
  mesh = sharding.make_mesh(devices=jax.devices()[:4])   # cohorts of 1 and 1 padded to 4 each
  runner = RoundRunner(alg, mesh)
  server, clients = runner.place(alg.init({"w": jnp.zeros(())}, None),
                                 alg.init_clients(None, (4, 4)))
  seen = np.zeros((2, 4), int)
  for r in range(4):
    cohorts = tuple(
        cohort_lib.make_cohort(g, cohort_lib.sample_clients(0, r, g.num_clients, 1, i), steps=1,
                               batch_size=3, seed=0, round_num=r, epochs=1, group=i)
        for i, g in enumerate(data.groups))
    for i, c in enumerate(cohorts):
      seen[i, c.client_ids] += 1
    server, clients, _ = runner(server, clients, cohorts, jax.random.key(r))
  assert runner.compilations == 1
  np.testing.assert_array_equal(np.asarray(clients[0]["rounds"]), seen[0])
  np.testing.assert_array_equal(np.asarray(clients[1]["rounds"]), seen[1])
  # groups are sampled independently (different streams for the same round)
  ids = [cohort_lib.sample_clients(0, r, 2, 1, g)[0] for r in range(20) for g in (0, 1)]
  assert ids[0::2] != ids[1::2]


def test_combined_group_evaluation_weights_groups_by_test_examples():
  data = two_groups()

  def group_eval(value):
    return lambda server_params, states: {
        "personalized/accuracy": jnp.asarray(value),
        "personalized/per_client_accuracy": jnp.full((states["n"],), value)}

  evaluate = evaluate_lib.combine_group_evaluators(
      data.names, (group_eval(1.0), group_eval(0.0)), data.groups)
  out = evaluate(None, ({"n": 3}, {"n": 2}))
  assert out["personalized/images/accuracy"] == 1.0
  assert out["personalized/text/accuracy"] == 0.0
  # 6 test examples in the image group, 3 in the text group
  assert float(out["personalized/accuracy"]) == pytest.approx(6 / 9)
  np.testing.assert_array_equal(out["personalized/per_client_accuracy"], [1, 1, 1, 0, 0])
