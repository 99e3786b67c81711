"""The compiled round: compiles once, strategies agree, device counts agree, bad clients drop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_fm import cohort as cohort_lib
from fedjax_fm import roles as roles_lib
from fedjax_fm import sharding
from fedjax_fm import runner as runner_lib
from fedjax_fm.protocol import ClientExecution
from fedjax_fm.algorithms import fedavg, fedper
from fedjax_fm.models import SimpleCNN, classification_loss, functional
from fedjax_fm.runner import RoundRunner, padded_rows

NUM_CLIENTS, COHORT, STEPS, BATCH = 16, 8, 2, 4


def _federation(seed=0):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(3, 10, NUM_CLIENTS)  # ragged: padded and masked in the cohort
  clients = [{"x": rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
              "y": rng.integers(0, 3, n).astype(np.int32)} for n in sizes]
  return cohort_lib.FederatedData.from_clients(clients)


def _model():
  model = SimpleCNN((8, 8, 1), 3, channels=(4, 6), hidden=8, rngs=nnx.Rngs(0))
  graphdef, params = functional(model)
  return graphdef, params


def _run(execution, mesh, rounds=2, make_alg=None, fed=None, cohort_size=COHORT):
  """Runs `rounds` rounds and returns (server, clients, metrics per round, runner)."""
  fed = fed or _federation()
  graphdef, params = _model()
  loss = classification_loss(graphdef)
  if make_alg is None:
    alg = fedper(loss, roles_lib.assign_roles(params), params, personal=r"^head/",
                 client_lr=0.05, execution=execution)
  else:
    alg = make_alg(loss, params, execution)
  runner = RoundRunner(alg, mesh)
  server, clients = runner.place(alg.init(params, jax.random.key(0)),
                                 alg.init_clients(params, padded_rows(NUM_CLIENTS, mesh)))
  history = []
  for r in range(rounds):
    ids = cohort_lib.sample_clients(7, r, NUM_CLIENTS, cohort_size)
    cohort = cohort_lib.make_cohort(fed, ids, steps=STEPS, batch_size=BATCH, seed=7, round_num=r)
    server, clients, metrics = runner(server, clients, cohort, jax.random.key(r))
    history.append(jax.device_get(metrics))
  return jax.device_get(server), jax.device_get(clients), history, runner


def _assert_trees_close(a, b, atol):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=0), a, b)


def test_round_compiles_exactly_once_over_several_rounds():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  _, _, history, runner = _run(ClientExecution("vmap", mesh=mesh), mesh, rounds=4)
  assert runner.traces == 1
  assert runner.compilations == 1
  assert all(np.isfinite(h["loss"]) for h in history)


@pytest.fixture(scope="module")
def reference():
  """The plain run: all clients in one vmap, one device."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  return _run(ClientExecution("vmap", mesh=mesh), mesh)


@pytest.mark.parametrize("strategy,chunk,unroll", [("chunked", 3, 1), ("unrolled", 1, True),
                                                  ("sequential", 3, 1)])
def test_execution_strategies_give_identical_results(reference, strategy, chunk, unroll):
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  ref = reference
  got = _run(ClientExecution(strategy, chunk_size=chunk, scan_unroll=unroll, mesh=mesh), mesh)
  _assert_trees_close(ref[0].params, got[0].params, 1e-6)
  _assert_trees_close(ref[1], got[1], 1e-6)
  np.testing.assert_allclose(ref[2][-1]["loss"], got[2][-1]["loss"], rtol=1e-6)


@pytest.mark.parametrize("num_devices", [2, 4, 8])
def test_same_parameters_on_1_2_4_8_devices(reference, num_devices):
  assert len(jax.devices()) >= 8, "conftest.py sets 8 fake CPU devices"
  ref = reference
  mesh = sharding.make_mesh(devices=jax.devices()[:num_devices])
  got = _run(ClientExecution("vmap", mesh=mesh), mesh)
  _assert_trees_close(ref[0].params, got[0].params, 1e-5)
  _assert_trees_close(ref[1], got[1], 1e-5)


def test_cohort_not_divisible_by_devices_is_padded_with_empty_clients():
  mesh1 = sharding.make_mesh(devices=jax.devices()[:1])
  ref = _run(ClientExecution("vmap", mesh=mesh1), mesh1, cohort_size=6)
  mesh = sharding.make_mesh(devices=jax.devices()[:4])  # 6 clients -> 8 slots, 2 empty
  got = _run(ClientExecution("vmap", mesh=mesh), mesh, cohort_size=6)
  _assert_trees_close(ref[0].params, got[0].params, 1e-5)
  _assert_trees_close(ref[1], got[1], 1e-5)
  np.testing.assert_allclose(ref[2][-1]["loss"], got[2][-1]["loss"], rtol=1e-5)
  assert got[2][-1]["num_nonfinite_clients"] == 0


def test_client_state_is_sharded_over_the_clients_axis():
  mesh = sharding.make_mesh(devices=jax.devices()[:4])
  graphdef, params = _model()
  alg = fedper(classification_loss(graphdef), roles_lib.assign_roles(params), params,
               execution=ClientExecution("vmap", mesh=mesh))
  runner = RoundRunner(alg, mesh)
  _, clients = runner.place(alg.init(params, jax.random.key(0)), alg.init_clients(params, 16))
  leaf = jax.tree_util.tree_leaves(clients)[0]
  assert leaf.shape[0] == 16
  assert {s.data.shape[0] for s in leaf.addressable_shards} == {4}


def _poisoned_federation(bad_clients):
  fed = _federation()
  x = fed.arrays["x"].copy()
  for c in bad_clients:
    x[fed.offsets[c]:fed.offsets[c + 1]] = np.nan
  return cohort_lib.FederatedData({"x": x, "y": fed.arrays["y"]}, fed.offsets)


def test_a_nan_client_is_left_out_and_counted():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  ids = cohort_lib.sample_clients(7, 0, NUM_CLIENTS, COHORT)
  bad = int(ids[2])
  server, clients, history, _ = _run(ClientExecution("vmap", mesh=mesh), mesh, rounds=1,
                                     fed=_poisoned_federation([bad]))
  assert history[0]["num_nonfinite_clients"] == 1
  assert np.isfinite(history[0]["loss"])
  for leaf in jax.tree_util.tree_leaves((server.params, clients)):
    assert np.all(np.isfinite(leaf))
  # The bad client's personal head was not overwritten: it still equals the initial head.
  _, params = _model()
  np.testing.assert_array_equal(clients["head"]["kernel"][bad], params["head"]["kernel"])


def test_all_clients_bad_leaves_the_server_unchanged():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  server, _, history, _ = _run(
      ClientExecution("vmap", mesh=mesh), mesh, rounds=1,
      make_alg=lambda loss, params, ex: fedavg(loss, roles_lib.assign_roles(params),
                                               execution=ex),
      fed=_poisoned_federation(range(NUM_CLIENTS)))
  assert history[0]["num_nonfinite_clients"] == COHORT
  _, params = _model()
  _assert_trees_close(server.params, params, 0.0)
  assert int(server.round) == 1


def test_frozen_leaves_are_never_stacked_or_changed():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])

  def make(loss, params, ex):
    return fedavg(loss, roles_lib.assign_roles(params, frozen=r"^conv"), execution=ex)

  server, clients, _, _ = _run(ClientExecution("vmap", mesh=mesh), mesh, rounds=2,
                               make_alg=make)
  _, params = _model()
  _assert_trees_close(server.params["conv1"], params["conv1"], 0.0)
  assert not jax.tree_util.tree_leaves(clients)  # nothing personal, nothing stacked
  assert not np.allclose(server.params["dense1"]["kernel"], params["dense1"]["kernel"])


@pytest.mark.parametrize("num_devices", [1, 2])
def test_round_state_is_donated(num_devices):
  mesh = sharding.make_mesh(devices=jax.devices()[:num_devices])
  graphdef, params = _model()
  alg = fedavg(classification_loss(graphdef), roles_lib.assign_roles(params),
               execution=ClientExecution("vmap", mesh=mesh))
  runner = RoundRunner(alg, mesh)
  server, clients = runner.place(alg.init(params, jax.random.key(0)), alg.init_clients(params, 16))
  cohort = cohort_lib.make_cohort(_federation(), np.arange(COHORT), steps=STEPS,
                                  batch_size=BATCH, seed=0, round_num=0)
  old_leaf = jax.tree_util.tree_leaves(server.params)[0]
  runner(server, clients, cohort, jax.random.key(0))
  assert old_leaf.is_deleted()
  assert not jax.tree_util.tree_leaves(params)[0].is_deleted()  # the caller's copy survives


def test_unknown_compiler_option_falls_back_instead_of_failing(monkeypatch):
  """The CPU option is experimental: a jaxlib without it must still compile rounds."""
  monkeypatch.setattr(runner_lib, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option": "1"})
  runner_lib._accepted.cache_clear()  # pylint: disable=protected-access
  with pytest.warns(UserWarning, match="does not accept"):
    assert runner_lib.default_compiler_options() == {}
  runner_lib._accepted.cache_clear()  # pylint: disable=protected-access
