"""The round shared by the local-update family (FedAvg, FedProx, FedOpt, FedPer, Local).

One round, all inside one jitted program:

1. gather the K sampled clients' personal rows; broadcast the shared parameters;
2. map the local training over clients (`ClientExecution`): shared + personal leaves are trained,
   frozen leaves are a closed-over constant (one copy, never stacked per client);
3. hand the shared deltas to the server chain (`fedjax_fm.chain`): it drops non-finite
   clients, compresses, clips, aggregates (weighted mean by default), adds noise and applies
   the server optimizer to the pseudo-gradient -aggregate (Reddi et al. 2021);
4. scatter the personal rows (and a chain link's personal state, e.g. an error-feedback
   residual) back.

Algorithms are thin factories over `local_update_algorithm` (see `fedjax_fm.algorithms`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_fm import aggregate, chain as chain_lib, clients, client_update, roles as roles_lib
from fedjax_fm.protocol import (Algorithm, ClientExecution, LossFn, ServerState,
                                  default_execution, shared_bytes, stacked_personal)
from fedjax_fm.cohort import Cohort
from fedjax_fm.roles import FROZEN, PERSONAL, SHARED

PyTree = Any


CLIENT_OPTIMIZERS = ("sgd", "adamw")


def make_client_optimizer(name: str, learning_rate: float,
                          momentum: float | None = None) -> optax.GradientTransformation:
  """The local optimizer by config name.

  ``"sgd"`` (optionally with momentum) is the FedAvg papers' choice; ``"adamw"`` is FedDAT's
  reference configuration (b2 = 0.98, eps = 1e-8, weight decay 0.01 on matrices only), offered to
  every local-update baseline so that a comparison with FedDAT shares the optimizer. Its state is
  fresh each round, like every local optimizer here.
  """
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=momentum)
  if name == "adamw":
    if momentum is not None:
      raise ValueError("client_momentum applies to client_optimizer='sgd' only; drop it")
    return optax.adamw(learning_rate, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
                       mask=lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p))
  raise ValueError(f"unknown client_optimizer {name!r}; use one of {list(CLIENT_OPTIMIZERS)}")


def _sq_norm(tree: PyTree) -> jax.Array:
  return sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree))


def local_update_algorithm(
    loss_fn: LossFn,
    roles: PyTree,
    client_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation = optax.sgd(1.0),
    *,
    proximal_mu: float = 0.0,
    aggregation: chain_lib.ChainConfig | None = None,
    weighted: bool = True,
    execution: ClientExecution | None = None,
) -> Algorithm:
  """Builds a local-update algorithm: local training, then aggregation of the shared leaves.

  Args:
    loss_fn: (params, batch, rng) -> (per-example loss, per-example metrics).
    roles: role pytree (`fedjax_fm.roles`) with the structure of the parameters.
    client_optimizer: optax optimizer for local steps; its state is fresh each round.
    server_optimizer: optax optimizer fed the pseudo-gradient; `sgd(1.0)` is plain averaging.
    proximal_mu: FedProx's mu: adds mu/2 * ||w_shared - w_global||^2 to the local loss.
    aggregation: the server chain's links (`fedjax_fm.chain.ChainConfig`: aggregator,
      compression, clipping, noise); None: finite filter, weighted mean, `server_optimizer`.
    weighted: weight clients by their example counts (True) or equally (False).
    execution: how clients execute in the program and on which mesh; `default_execution()`
      if None.

  Returns:
    An `Algorithm`.
  """
  execution = execution or default_execution()
  aggregation = aggregation or chain_lib.ChainConfig()
  server_chain = chain_lib.build_chain(aggregation, server_optimizer)
  # A chain link's personal state (top-k's residual) rides along the personal rows.
  with_chain_rows = server_chain.has_client_state
  # The plain chain (finite filter, weighted mean, optimizer) under `sequential`: each client
  # checks its own update and adds its weighted delta to a running sum inside the client
  # loop, so the [K, model] stack of deltas is never written and read back (BENCHMARKS.md).
  running_sum = execution.strategy == "sequential" and aggregation == chain_lib.ChainConfig()
  if aggregation.compresses and SHARED not in jax.tree_util.tree_leaves(roles):
    raise ValueError(f"compression ({aggregation.compression}) needs an algorithm that sends "
                     "shared parameters; this one keeps every trained leaf on the client")

  def init(params: PyTree, rng: jax.Array) -> ServerState:
    del rng
    server_params = roles_lib.select(params, roles, SHARED, FROZEN)
    state = server_chain.init(roles_lib.select(params, roles, SHARED))
    return ServerState(round=jnp.zeros((), jnp.int32), params=server_params,
                       opt_state=state.optimizer, chain=state.links)

  def init_clients(params: PyTree, num_clients: int) -> PyTree:
    personal = stacked_personal(params, roles, num_clients)
    if not with_chain_rows:
      return personal
    return {"personal": personal,
            "chain": server_chain.init_clients(roles_lib.select(params, roles, SHARED),
                                               num_clients)}

  def bytes_per_client(params: PyTree) -> tuple[int, int]:
    down, up = shared_bytes(params, roles)
    return down, server_chain.upload_bytes(roles_lib.select(params, roles, SHARED), up)

  def round_fn(server: ServerState, client_states: PyTree, cohort: Cohort, rng: jax.Array):
    shared = roles_lib.select(server.params, roles, SHARED)
    frozen = roles_lib.select(server.params, roles, FROZEN)
    k = cohort.num_clients
    ids = cohort.client_ids
    rows = execution.constrain(clients.gather_rows(client_states, ids))
    personal = rows["personal"] if with_chain_rows else rows
    local_rng, agg_rng = jax.random.split(rng)
    keys = jax.random.split(local_rng, k)

    def objective(trainable, batch, mask, key):
      params = roles_lib.merge(trainable, frozen)
      loss, sums = client_update.masked_loss(loss_fn, params, batch, mask, key)
      if proximal_mu:
        drift = jax.tree_util.tree_map(jnp.subtract, roles_lib.select(trainable, roles, SHARED),
                                       shared)
        loss = loss + 0.5 * proximal_mu * _sq_norm(drift)
      return loss, sums

    def one_client(personal_k, data_k, mask_k, key_k):
      trainable = roles_lib.merge(shared, personal_k)
      trained, sums = client_update.train_steps(objective, client_optimizer, trainable, data_k, mask_k,
                                        key_k, execution.scan_unroll)
      delta = jax.tree_util.tree_map(jnp.subtract, roles_lib.select(trained, roles, SHARED),
                                     shared)
      return delta, roles_lib.select(trained, roles, PERSONAL), sums

    # Unweighted: every real client counts 1; padding slots (weight 0) must stay 0.
    weights = cohort.weights if weighted else (cohort.weights > 0).astype(cohort.weights.dtype)
    if running_sum:
      def summed_client(personal_k, data_k, mask_k, key_k, w_k):
        delta, new_p, sums_k = one_client(personal_k, data_k, mask_k, key_k)
        ok_k = aggregate.finite_clients(
            jax.tree_util.tree_map(lambda x: x[None], (delta, new_p, sums_k["loss_sum"])))[0]
        w_k = jnp.where(ok_k, w_k, 0.0)
        weighted = jax.tree_util.tree_map(
            lambda d: jnp.where(ok_k, d, jnp.zeros_like(d)) * w_k.astype(d.dtype), delta)
        return (weighted, w_k), (new_p, sums_k, ok_k)

      (total, weight), (new_personal, sums, ok) = execution.map_sum(summed_client)(
          personal, cohort.data, cohort.mask, keys, weights)
      new_personal = execution.constrain(new_personal)
      # The chain sees one pre-averaged update of weight 1 (0 when no client was healthy).
      mean = jax.tree_util.tree_map(
          lambda t: (t / jnp.where(weight > 0, weight, 1.0).astype(t.dtype))[None], total)
      any_ok = (weight > 0)[None]
      out = server_chain.apply(shared, mean, any_ok.astype(weights.dtype), any_ok,
                               (server.chain, server.opt_state), agg_rng,
                               round_num=server.round)
    else:
      deltas, new_personal, sums = execution.map(one_client)(
          personal, cohort.data, cohort.mask, keys)
      deltas, new_personal = execution.constrain((deltas, new_personal))
      ok = aggregate.finite_clients((deltas, new_personal, sums["loss_sum"]))
      out = server_chain.apply(shared, deltas, weights, ok, (server.chain, server.opt_state),
                               agg_rng, round_num=server.round,
                               client=rows["chain"] if with_chain_rows else None)

    new_rows = {"personal": new_personal, "chain": out.client} if with_chain_rows else new_personal
    client_states = clients.scatter_rows(client_states, ids, new_rows, keep=ok)
    metrics = aggregate.example_means(sums, ok)
    metrics["num_nonfinite_clients"] = k - jnp.sum(ok)
    metrics.update(out.metrics)
    server = server.replace(round=server.round + 1,
                            params=roles_lib.merge(out.params, frozen),
                            opt_state=out.state.optimizer, chain=out.state.links)
    return server, client_states, metrics

  return Algorithm(init=init, init_clients=init_clients, round=round_fn,
                   bytes_per_client=bytes_per_client,
                   personal_rows=(lambda rows: rows["personal"]) if with_chain_rows else None)
