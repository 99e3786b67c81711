"""The JAX runners every workload shares: the engine's round and a per-client jitted loop.

A runner is built as `make(...) -> step`, where `step(cohort, round)` runs one full FedAvg
round and blocks until its results exist, `step.info()` is a progress string and
`step.shared()` returns the current shared (trained, averaged) parameters as
``{path: numpy array}`` in the JAX model's layout, so runners can be checked against each other.

Engine rows are named ``fedjax_fm[<strategy>[<chunk>][,scan]]``: ``vmap``, ``unrolled``,
``chunked8`` (vmap over chunks of 8 clients, chunks unrolled), ``sequential5`` (a `lax.map` over
groups of 5 clients, unrolled within a group); a ``,scan`` suffix keeps the local steps in a
rolled `lax.scan` (scan_unroll=1), otherwise they are unrolled (scan_unroll=True).
"""

from __future__ import annotations

import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_fm import client_update
from fedjax_fm import roles as roles_lib
from fedjax_fm import runner as runner_lib
from fedjax_fm.protocol import ClientExecution, default_execution
from fedjax_fm.algorithms import fedavg

_ENGINE_NAME = re.compile(
    r"^fedjax_fm\[(vmap|unrolled|chunked(\d+)|sequential(\d+))(,scan|,unroll(\d+))?\]$")


def parse_engine_runner(name: str) -> tuple[str, int, int | bool] | None:
  """``fedjax_fm[sequential5,scan]`` -> ("sequential", 5, 1), ``fedjax_fm[sequential1,unroll5]``
  -> ("sequential", 1, 5); None if `name` is no engine row."""
  m = _ENGINE_NAME.match(name)
  if not m:
    return None
  strategy = re.sub(r"\d+$", "", m.group(1))
  chunk = int(m.group(2) or m.group(3) or 8)
  if m.group(5):
    return strategy, chunk, int(m.group(5))
  return strategy, chunk, 1 if m.group(4) else True


def execution_name(ex: ClientExecution) -> str:
  """The runner name of a `ClientExecution` (the inverse of `parse_engine_runner`)."""
  unroll = ex.scan_unroll
  chunk = str(ex.chunk_size) if ex.strategy in ("chunked", "sequential") else ""
  if unroll is True:
    return f"fedjax_fm[{ex.strategy}{chunk}]"
  return f"fedjax_fm[{ex.strategy}{chunk}{',scan' if unroll == 1 else f',unroll{unroll}'}]"


def default_runner_name() -> str:
  return execution_name(default_execution())


def _numpy_by_path(tree) -> dict[str, np.ndarray]:
  return {roles_lib.leaf_path(p): np.asarray(x, np.float32)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def engine_runner(name: str, loss_fn, roles, params, mesh, num_clients: int, *,
                  client_lr: float, server_lr: float):
  """The engine: `fedavg` run by `RoundRunner` (its default XLA options), one jitted round."""
  strategy, chunk, unroll = parse_engine_runner(name)
  execution = ClientExecution(strategy=strategy, chunk_size=chunk, scan_unroll=unroll, mesh=mesh)
  alg = fedavg(loss_fn, roles, client_lr=client_lr, server_lr=server_lr, execution=execution)
  run = runner_lib.RoundRunner(alg, mesh)  # default_compiler_options() for this backend
  state = {}
  state["server"], state["clients"] = run.place(
      alg.init(params, jax.random.key(0)),
      alg.init_clients(params, runner_lib.padded_rows(num_clients, mesh)))
  base = jax.random.key(1)

  def step(cohort, r):
    server, clients, metrics = run(state["server"], state["clients"], cohort,
                                   jax.random.fold_in(base, r))
    jax.block_until_ready((server, clients, metrics))
    state["server"], state["clients"] = server, clients
    state["loss"] = float(metrics["loss"])

  step.info = lambda: f"compilations={run.compilations} loss={state.get('loss', float('nan')):.3f}"
  step.shared = lambda: _numpy_by_path(
      roles_lib.select(state["server"].params, roles, roles_lib.SHARED))
  return step


def jax_client_loop_runner(loss_fn, roles, params, *, client_lr: float, server_lr: float):
  """FedJAX's execution model: one jitted local update (all local SGD steps, unrolled, with the
  engine's XLA options), called once per client from Python; the weighted sum of the deltas
  and the server step are two more small jits. Frozen parameters are an argument of the local
  update (one device copy), never a compile-time constant."""
  opt = optax.sgd(client_lr)
  frozen = roles_lib.select(params, roles, roles_lib.FROZEN)

  @functools.partial(jax.jit, compiler_options=runner_lib.default_compiler_options() or None)
  def local_update(shared, frozen, batches, mask, key):
    def objective(p, batch, m, k):
      return client_update.masked_loss(loss_fn, roles_lib.merge(p, frozen), batch, m, k)

    # unroll=True: no loop in the XLA program, as with FedJAX's per-batch jitted step.
    trained, _ = client_update.train_steps(objective, opt, shared, batches, mask, key, unroll=True)
    return jax.tree_util.tree_map(jnp.subtract, trained, shared)

  @jax.jit
  def accumulate(acc, delta, w):
    return jax.tree_util.tree_map(lambda a, d: a + w * d, acc, delta)

  @jax.jit
  def server_update(p, acc, total):
    return jax.tree_util.tree_map(lambda x, a: x + server_lr * a / total, p, acc)

  state = {"shared": jax.tree_util.tree_map(
      jnp.array, roles_lib.select(params, roles, roles_lib.SHARED))}
  base = jax.random.key(1)

  def step(cohort, r):
    p = state["shared"]
    acc = jax.tree_util.tree_map(jnp.zeros_like, p)
    keys = jax.random.split(jax.random.fold_in(base, r), cohort.num_clients)
    for k in range(cohort.num_clients):
      batches = {name: v[k] for name, v in cohort.data.items()}
      delta = local_update(p, frozen, batches, cohort.mask[k], keys[k])
      acc = accumulate(acc, delta, cohort.weights[k])
    state["shared"] = jax.block_until_ready(
        server_update(p, acc, float(np.sum(cohort.weights))))

  step.info = lambda: ""
  step.shared = lambda: _numpy_by_path(state["shared"])
  return step


def drjax_runner(loss_fn, roles, params, *, client_lr: float, server_lr: float):
  """DrJAX (Google's map-reduce primitives for JAX): the same local update as
  `jax_client_loop` (all local SGD steps unrolled, the engine's XLA options) under
  `drjax.program(placements={"clients": K})`: the shared parameters `drjax.broadcast` to the
  clients, `drjax.map_fn` of the local update (a vmap over the placement axis), the deltas
  `drjax.reduce_mean`ed, then the server step; one jitted program per round, as DrJAX is used.

  `reduce_mean` is an unweighted mean: the cohort's clients must have equal weights (W1 and W2
  give every client the same number of examples), checked per round.
  """
  try:
    import drjax  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"the drjax row needs DrJAX (pip install drjax): {e}") from e
  # Without a mesh DrJAX warns on every primitive that it adds no sharding constraints.
  logging.getLogger("absl").setLevel(logging.ERROR)
  opt = optax.sgd(client_lr)
  frozen = roles_lib.select(params, roles, roles_lib.FROZEN)
  programs = {}

  def local_update(shared, frozen, batches, mask, key):
    def objective(p, batch, m, k):
      return client_update.masked_loss(loss_fn, roles_lib.merge(p, frozen), batch, m, k)

    trained, _ = client_update.train_steps(objective, opt, shared, batches, mask, key, unroll=True)
    return jax.tree_util.tree_map(jnp.subtract, trained, shared)

  def program(k: int):
    @functools.partial(jax.jit, compiler_options=runner_lib.default_compiler_options() or None)
    def round_fn(shared, frozen, data, mask, keys):
      @drjax.program(placements={"clients": k})
      def fedavg_round(shared, data, mask, keys):
        at_clients = drjax.broadcast(shared)
        deltas = drjax.map_fn(lambda p, b, m, key: local_update(p, frozen, b, m, key),
                              (at_clients, data, mask, keys))
        return drjax.reduce_mean(deltas)

      mean = fedavg_round(shared, data, mask, keys)
      return jax.tree_util.tree_map(lambda x, d: x + server_lr * d, shared, mean)

    return round_fn

  state = {"shared": jax.tree_util.tree_map(
      jnp.array, roles_lib.select(params, roles, roles_lib.SHARED))}
  base = jax.random.key(1)

  def step(cohort, r):
    w = np.asarray(cohort.weights)
    if not np.all(w == w[0]):
      raise ValueError("the drjax row uses drjax.reduce_mean (unweighted); this cohort's "
                       "client weights differ")
    k = cohort.num_clients
    if k not in programs:
      programs[k] = program(k)
    keys = jax.random.split(jax.random.fold_in(base, r), k)
    state["shared"] = jax.block_until_ready(
        programs[k](state["shared"], frozen, dict(cohort.data), cohort.mask, keys))

  step.info = lambda: f"compilations={sum(p._cache_size() for p in programs.values())}"  # pylint: disable=protected-access
  step.shared = lambda: _numpy_by_path(state["shared"])
  return step
