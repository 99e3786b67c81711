"""FFGG: Fine-tuning Followed by Global Gradient, with local, asynchronous and Byzantine variants.

Mishchenko, Islamov, Gorbunov, Horvath. "Partially Personalized Federated Learning: Breaking the
Curse of Data Heterogeneity." arXiv:2305.18285 (2023), TMLR 2025.

The parameters split into global ones x (role `shared`) and personal ones y_m (role `personal`).
The problem is min_x F(x) = 1/M sum_m F_m(x) with F_m(x) = min_y f_m(x, y). By Danskin's theorem
grad F_m(x) = grad_x f_m(x, y_m*(x)), so FFGG (Algorithm 1) is inexact gradient descent on F:

    each sampled client m:  y <- y - eta_in grad_y f_m(x_t, y)     (tau times; Algorithm 2)
                            g_m = grad_x f_m(x_t, y)
    server:                 x_{t+1} = x_t - gamma * mean_m g_m      (`server_optimizer` on mean g)

In the overpersonalized regime (some x* lets every client fit its data exactly) grad F_m(x*) = 0
for every m, so local steps, stale updates and robust aggregation stop paying for heterogeneity.

Variants, all in the same one-jitted-round program (`ffgg_algorithm`):

- Local FFGG (Algorithm 4): after fine-tuning, `local_steps` optimizer steps on x with y fixed;
  the server feeds the averaged delta to `server_optimizer` as a pseudo-gradient (like FedAvg).
  With `refine_personal=True` y is fine-tuned again before every x step, so each local step is
  an (inexact) gradient step on F_m itself. The paper's box was not available to check which of
  the two it states; x* is a fixed point of both in the overpersonalized regime.
- Asynchronous FFGG (Algorithm 3): the server state keeps a ring buffer of the last
  `max_delay + 1` versions of x; every sampled client draws a delay d from the round key and
  computes its update at version t - d. The server applies the aggregate of the K stale updates to
  the current x (with K = 1 this is the paper's one-update-per-arrival server).
- Byzantine-robust FFGG: some sampled clients (a fraction chosen from the round key, or fixed
  client ids) replace their update by an attack (`ByzantineAttack`), and the server aggregates
  with the coordinate-wise median after bucketing or the trimmed mean: the aggregating link of
  the server chain (`fedjax_fm.chain`), which every round ends in.

Where the reference code (Rustem-Islamov/FL_representations, synthetic notebooks) differs:

- It re-draws y ~ N(0, I) every round (0 in the asynchronous notebook). Here y_m warm-starts from
  the client's stored row by default, which is the natural and cheaper choice for fine-tuning;
  `personal_init="normal"` (or ``"initial"``: the model's initial values) restores the reference
  behaviour.
- Its Byzantine clients are extra clients. Here they are slots of the cohort: set
  `ByzantineAttack.client_ids` to the ids of extra clients to get the paper's setting. The robust
  aggregators count every slot, so a padded or dropped slot votes for a zero update.
- Its asynchronous server applies each gradient as it arrives; here it applies the aggregate of
  a round's stale updates (identical with one client per round).

Example::

    alg = ffgg(loss_fn, roles, personal_lr=0.5, personal_steps=20, server_lr=1 / L)
    server = alg.init(params, rng)
    clients = alg.init_clients(params, num_clients)
    server, clients, metrics = alg.round(server, clients, cohort, rng)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_fm import aggregate, chain as chain_lib, clients, client_update, roles as roles_lib
# The attacks are the engine's (any algorithm's chain can simulate them); FFGG's Byzantine
# variant applies them in its round, as before.
from fedjax_fm.byzantine import (ATTACKS, ByzantineAttack, apply_attack, choose_attackers,  # noqa: F401
                                 flip_update, gaussian_update, scale_update)
from fedjax_fm.protocol import (Algorithm, ClientExecution, LossFn, ServerState,
                                  default_execution, shared_bytes, stacked_personal)
from fedjax_fm.cohort import Cohort
from fedjax_fm.roles import FROZEN, PERSONAL, SHARED

PyTree = Any
# delay_sampler(rng, k) -> int32 [K] delays (clipped to [0, max_delay]).
DelaySampler = Callable[[jax.Array, int], jax.Array]

PERSONAL_INITS = ("warm", "initial", "normal")
AGGREGATORS = ("mean", "median", "trimmed_mean")  # FFGG's names of the chain's aggregators


# ------------------------------------------------------------------------------------------------
# Server state


@struct.dataclass
class FFGGExtra:
  """FFGG's part of `ServerState.extra`.

  Attributes:
    history: asynchronous FFGG only: the last `max_delay + 1` versions of the global (`shared`)
      parameters, leaves `[max_delay + 1, ...]`; version v sits in slot v mod (max_delay + 1).
      None in the synchronous algorithm.
    initial_personal: the model's initial personal values (``personal_init="initial"`` only).
  """
  history: PyTree = None
  initial_personal: PyTree = None


def history_init(params: PyTree, depth: int) -> PyTree:
  """A ring buffer of `depth` versions, every slot holding version 0 (`params`).

  Filling every slot with version 0 makes a read of a version before 0 return version 0.
  """
  return jax.tree_util.tree_map(lambda x: jnp.array(clients.broadcast(x, depth)), params)


def history_push(history: PyTree, version: jax.Array, params: PyTree) -> PyTree:
  """Stores `params` as `version` (overwriting version - depth)."""
  def leaf(h, x):
    return h.at[version % h.shape[0]].set(x.astype(h.dtype))
  return jax.tree_util.tree_map(leaf, history, params)


def history_read(history: PyTree, version: jax.Array, delays: jax.Array) -> PyTree:
  """The versions `version - delays[k]`, stacked `[K, ...]`.

  Args:
    history: the ring buffer (leaves `[depth, ...]`) holding versions up to `version`.
    version: the current version t.
    delays: int `[K]` in [0, depth - 1]; d > t reads version 0.
  """
  depth = jax.tree_util.tree_leaves(history)[0].shape[0]
  slots = (version - jnp.minimum(delays, version)) % depth
  return jax.tree_util.tree_map(lambda h: jnp.take(h, slots, axis=0), history)


def sample_delays(rng: jax.Array, k: int, max_delay: int,
                  distribution: str | DelaySampler = "uniform") -> jax.Array:
  """Per-client delays in {0, ..., max_delay}: ``"uniform"``, ``"constant"`` (all max_delay) or
  a callable (rng, k) -> int [K] (clipped into range)."""
  if callable(distribution):
    return jnp.clip(jnp.asarray(distribution(rng, k), jnp.int32), 0, max_delay)
  if distribution == "uniform":
    return jax.random.randint(rng, (k,), 0, max_delay + 1, jnp.int32)
  if distribution == "constant":
    return jnp.full((k,), max_delay, jnp.int32)
  raise ValueError(f"unknown delay distribution {distribution!r}; use 'uniform', 'constant' "
                   "or a callable (rng, k) -> delays")


def server_chain_config(aggregation: chain_lib.ChainConfig | None, aggregator: str,
                        bucket_size: int, trim_fraction: float) -> chain_lib.ChainConfig:
  """The server chain of FFGG: `aggregation` (the run's ``config.aggregation`` and
  ``config.privacy``) with FFGG's own `aggregator`, `bucket_size` and `trim_fraction` knobs
  (``"mean"``, ``"median"`` after bucketing, ``"trimmed_mean"``) as its aggregating link.

  The robust aggregators count every slot of the cohort: a padded or dropped (non-finite) client
  sends a zero update, a vote for not moving.

  Raises:
    ValueError: an unknown aggregator, or one that contradicts a non-mean
      ``config.aggregation.aggregator``.
  """
  if aggregator not in AGGREGATORS:
    raise ValueError(f"unknown aggregator {aggregator!r}; use one of {AGGREGATORS}")
  aggregation = aggregation or chain_lib.ChainConfig()
  if aggregator == "mean":
    return aggregation
  if aggregation.aggregator not in ("mean", aggregator):
    raise ValueError(f"FFGG's aggregator={aggregator!r} contradicts config.aggregation."
                     f"aggregator={aggregation.aggregator!r}; set one of them")
  return dataclasses.replace(aggregation, aggregator=aggregator, bucket_size=bucket_size,
                             trim_fraction=trim_fraction)


# ------------------------------------------------------------------------------------------------
# The round


def _scan_steps(step, carry, num_steps: int, unroll):
  """lax.scan of `step(carry, i) -> (carry, out)` over i = 0..num_steps-1."""
  return jax.lax.scan(step, carry, jnp.arange(num_steps), unroll=unroll)


def _batch(data: PyTree, mask: jax.Array, i: jax.Array):
  """Batch i mod S of one client's `[S, batch, ...]` data (local steps cycle over its batches)."""
  s = mask.shape[0]
  return jax.tree_util.tree_map(lambda a: a[i % s], data), mask[i % s]


def ffgg_algorithm(
    loss_fn: LossFn,
    roles: PyTree,
    personal_optimizer: optax.GradientTransformation,
    server_optimizer: optax.GradientTransformation,
    *,
    personal_steps: int,
    local_optimizer: optax.GradientTransformation | None = None,
    local_steps: int = 0,
    refine_personal: bool = False,
    personal_init: str = "warm",
    personal_init_scale: float = 1.0,
    max_delay: int = 0,
    delay_distribution: str | DelaySampler = "uniform",
    attack: ByzantineAttack | None = None,
    aggregator: str = "mean",
    bucket_size: int = 2,
    trim_fraction: float = 0.1,
    weighted: bool = False,
    aggregation: chain_lib.ChainConfig | None = None,
    execution: ClientExecution | None = None,
) -> Algorithm:
  """Builds FFGG (Mishchenko et al. 2023, Algorithms 1, 3, 4 and the Byzantine-robust variant).

  Each client's cohort data `[S, batch, ...]` is its data: fine-tuning step i uses batch i mod S,
  and plain FFGG's global gradient is over all S batches (the full gradient when the batches hold
  the client's whole data; accumulated batch by batch, so memory stays one batch).

  Args:
    loss_fn: (params, batch, rng) -> (per-example loss, per-example metrics).
    roles: role pytree: `shared` leaves are x, `personal` leaves are y_m, `frozen` stay put.
    personal_optimizer: the fine-tuner of y (Algorithm 2 is `optax.sgd(eta_in)`); fresh state
      every round.
    server_optimizer: fed the pseudo-gradient: the mean global gradient (plain FFGG:
      `optax.sgd(gamma)` is x <- x - gamma * mean g) or minus the mean delta (Local FFGG).
    personal_steps: tau, fine-tuning steps on y per round (per x step if `refine_personal`).
    local_optimizer: Local FFGG's optimizer for the x steps on the client.
    local_steps: Local FFGG's x steps per round; 0 is plain FFGG (one global gradient).
    refine_personal: Local FFGG: fine-tune y again before every x step (local gradient steps on
      F_m) instead of once before the first.
    personal_init: where y starts each round: ``"warm"`` (the client's stored row; default),
      ``"initial"`` (the model's initial personal values) or ``"normal"`` (N(0, scale^2), the
      reference code's synchronous runs).
    personal_init_scale: the standard deviation of ``"normal"``.
    max_delay: asynchronous FFGG: the largest staleness; 0 is synchronous.
    delay_distribution: ``"uniform"`` on {0..max_delay}, ``"constant"`` or a callable.
    attack: Byzantine clients and their attack; None: every client is honest.
    aggregator: ``"mean"``, ``"median"`` (after bucketing) or ``"trimmed_mean"``: the server
      chain's aggregating link (`server_chain_config`).
    bucket_size: clients averaged per bucket before the median (the paper uses 2).
    trim_fraction: the fraction trimmed at each end by ``"trimmed_mean"``.
    weighted: weight clients by example count; False (default) is the paper's uniform 1/|S|.
    aggregation: the rest of the server chain (`fedjax_fm.chain.ChainConfig`: clipping, noise,
      compression); None: the finite filter and the aggregator only.
    execution: how clients run in the program; `default_execution()` if None.

  Returns:
    An `Algorithm`. Its round's metrics: ``loss`` (and each metric of `loss_fn`) per real
    example, measured after fine-tuning y at the x the client received (Local FFGG: before each
    x step, summed over the steps); ``examples``; ``num_nonfinite_clients`` (dropped: a
    non-finite update, personal row or loss); ``num_attackers`` with an attack; ``mean_delay``
    (the staleness of the real clients) when asynchronous.
  """
  execution = execution or default_execution()
  if personal_init not in PERSONAL_INITS:
    raise ValueError(f"unknown personal_init {personal_init!r}; use one of {PERSONAL_INITS}")
  if local_steps and local_optimizer is None:
    raise ValueError("Local FFGG (local_steps > 0) needs a local_optimizer")
  if refine_personal and not local_steps:
    raise ValueError("refine_personal applies to Local FFGG only (local_steps > 0)")
  if max_delay < 0 or personal_steps < 0 or local_steps < 0:
    raise ValueError("max_delay, personal_steps and local_steps must be >= 0")
  server_chain = chain_lib.build_chain(
      server_chain_config(aggregation, aggregator, bucket_size, trim_fraction), server_optimizer)
  if server_chain.has_client_state:
    raise ValueError("FFGG keeps no chain state on its clients; use compression without "
                     "error feedback (int8, int4, or top_k with error_feedback=False)")
  asynchronous = max_delay > 0

  def init(params: PyTree, rng: jax.Array) -> ServerState:
    del rng
    shared = roles_lib.select(params, roles, SHARED)
    extra = FFGGExtra(
        history=history_init(shared, max_delay + 1) if asynchronous else None,
        initial_personal=(roles_lib.select(params, roles, PERSONAL)
                          if personal_init == "initial" else None))
    state = server_chain.init(shared)
    return ServerState(round=jnp.zeros((), jnp.int32),
                       params=roles_lib.select(params, roles, SHARED, FROZEN),
                       opt_state=state.optimizer, extra=extra, chain=state.links)

  def init_clients(params: PyTree, num_clients: int) -> PyTree:
    return stacked_personal(params, roles, num_clients)

  def bytes_per_client(params: PyTree) -> tuple[int, int]:
    down, up = shared_bytes(params, roles)
    return down, server_chain.upload_bytes(roles_lib.select(params, roles, SHARED), up)

  def start_personal(rows: PyTree, k: int, extra: FFGGExtra, rng: jax.Array) -> PyTree:
    """Where the K sampled clients' y start this round (see `personal_init`)."""
    if personal_init == "initial":
      return jax.tree_util.tree_map(lambda x: jnp.array(clients.broadcast(x, k)),
                                    extra.initial_personal)
    if personal_init == "normal":
      # One draw for the whole cohort, outside the client map (cheaper to compile).
      leaves, treedef = jax.tree_util.tree_flatten(rows)
      keys = jax.random.split(rng, max(len(leaves), 1))
      return jax.tree_util.tree_unflatten(treedef, [
          personal_init_scale * jax.random.normal(key, leaf.shape, leaf.dtype)
          for key, leaf in zip(keys, leaves)])
    return rows

  def round_fn(server: ServerState, client_states: PyTree, cohort: Cohort, rng: jax.Array):
    shared = roles_lib.select(server.params, roles, SHARED)
    frozen = roles_lib.select(server.params, roles, FROZEN)
    k = cohort.num_clients
    ids = cohort.client_ids
    local_rng, delay_rng, choose_rng, attack_rng, agg_rng, init_rng = jax.random.split(rng, 6)
    personal = execution.constrain(start_personal(clients.gather_rows(client_states, ids), k,
                                                  server.extra, init_rng))
    keys = jax.random.split(local_rng, k)

    def masked(x, y, batch, mask, key):
      return client_update.masked_loss(loss_fn, roles_lib.merge(x, y, frozen), batch, mask, key)

    personal_grad = jax.grad(lambda y, x, b, m, key: masked(x, y, b, m, key)[0])
    global_grad = jax.grad(lambda x, y, b, m, key: masked(x, y, b, m, key), has_aux=True)

    # Gradient of the loss *sum* of a batch, to accumulate an exact mean over all batches.
    def loss_sum(x, y, batch, mask, key):
      sums = masked(x, y, batch, mask, key)[1]
      return sums["loss_sum"], sums

    global_sum_grad = jax.grad(loss_sum, has_aux=True)

    def optimizer_steps(optimizer, grad_fn, params, num_steps, data, mask, key):
      """`num_steps` optimizer steps on `params`; a step on a batch with no real example is
      skipped (padded clients stay put)."""
      step_keys = jax.random.split(key, max(num_steps, 1))

      def step(carry, i):
        p, opt_state = carry
        batch, m = _batch(data, mask, i)
        grads = grad_fn(p, batch, m, step_keys[i])
        updates, new_opt_state = optimizer.update(grads, opt_state, p)
        live = jnp.sum(m) > 0
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(live, a, b),
                                                       new, old)
        return (keep(optax.apply_updates(p, updates), p), keep(new_opt_state, opt_state)), None

      (params, _), _ = _scan_steps(step, (params, optimizer.init(params)), num_steps,
                                   execution.scan_unroll)
      return params

    def fine_tune(x, y, data, mask, key):
      grad_fn = lambda y_, b, m, kk: personal_grad(y_, x, b, m, kk)
      return optimizer_steps(personal_optimizer, grad_fn, y, personal_steps, data, mask, key)

    def full_global_gradient(x, y, data, mask, key):
      """sum over all batches of grad_x(loss sum) / number of real examples, and metric sums."""
      batch_keys = jax.random.split(key, mask.shape[0])

      def step(acc, i):
        batch, m = _batch(data, mask, i)
        g, sums = global_sum_grad(x, y, batch, m, batch_keys[i])
        return jax.tree_util.tree_map(jnp.add, acc, g), sums

      zeros = jax.tree_util.tree_map(jnp.zeros_like, x)
      g_sum, sums = _scan_steps(step, zeros, mask.shape[0], execution.scan_unroll)
      sums = jax.tree_util.tree_map(lambda s: jnp.sum(s, axis=0), sums)
      count = jnp.maximum(sums["count"], 1.0)
      return jax.tree_util.tree_map(lambda g: g / count.astype(g.dtype), g_sum), sums

    def local_global_steps(x0, y, data, mask, key):
      """Local FFGG: `local_steps` steps on x (y re-fine-tuned before each if refining)."""
      step_keys = jax.random.split(key, local_steps)

      def step(carry, i):
        x, y, opt_state = carry
        tune_key, grad_key = jax.random.split(step_keys[i])
        if refine_personal:
          y = fine_tune(x, y, data, mask, tune_key)
        batch, m = _batch(data, mask, i)
        grads, sums = global_grad(x, y, batch, m, grad_key)
        updates, new_opt_state = local_optimizer.update(grads, opt_state, x)
        live = jnp.sum(m) > 0
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(live, a, b),
                                                       new, old)
        new_x = keep(optax.apply_updates(x, updates), x)
        return (new_x, y, keep(new_opt_state, opt_state)), sums

      (x, y, _), sums = _scan_steps(step, (x0, y, local_optimizer.init(x0)), local_steps,
                                    execution.scan_unroll)
      sums = jax.tree_util.tree_map(lambda s: jnp.sum(s, axis=0), sums)
      return jax.tree_util.tree_map(jnp.subtract, x, x0), y, sums

    def one_client(x, y, data, mask, key):
      tune_key, grad_key = jax.random.split(key)
      if local_steps:
        if not refine_personal:
          y = fine_tune(x, y, data, mask, tune_key)
        update, y, sums = local_global_steps(x, y, data, mask, grad_key)
      else:
        y = fine_tune(x, y, data, mask, tune_key)
        g, sums = full_global_gradient(x, y, data, mask, grad_key)
        update = jax.tree_util.tree_map(jnp.negative, g)  # a delta: the server negates it back
      return update, y, sums

    version = server.round
    if asynchronous:
      delays = sample_delays(delay_rng, k, max_delay, delay_distribution)
      client_x = execution.constrain(history_read(server.extra.history, version, delays))
      x_axis = 0
    else:
      client_x, x_axis = shared, None
    updates, new_personal, sums = execution.map(one_client, in_axes=(x_axis, 0, 0, 0, 0))(
        client_x, personal, cohort.data, cohort.mask, keys)
    updates, new_personal = execution.constrain((updates, new_personal))

    ok = aggregate.finite_clients((updates, new_personal, sums["loss_sum"]))
    updates = aggregate.zero_where_bad(updates, ok)
    metrics = {}
    if attack is not None:
      is_attacker = choose_attackers(choose_rng, attack, ids, cohort.weights)
      updates = apply_attack(updates, is_attacker & ok, attack, attack_rng)
      metrics["num_attackers"] = jnp.sum(is_attacker)
    # The server sees only what was sent: the chain's finite filter drops non-finite updates.
    base = cohort.weights if weighted else (cohort.weights > 0).astype(cohort.weights.dtype)
    out = server_chain.apply(shared, updates, base, ok, (server.chain, server.opt_state),
                             agg_rng, round_num=server.round)
    new_shared = out.params

    extra = server.extra
    if asynchronous:
      extra = extra.replace(history=history_push(extra.history, version + 1, new_shared))
      real = cohort.weights > 0
      metrics["mean_delay"] = (jnp.sum(jnp.where(real, jnp.minimum(delays, version), 0))
                               / jnp.maximum(jnp.sum(real), 1))

    client_states = clients.scatter_rows(client_states, ids, new_personal, keep=ok)
    metrics.update(aggregate.example_means(sums, ok))
    metrics["num_nonfinite_clients"] = k - jnp.sum(out.accepted)
    metrics.update(out.metrics)
    server = server.replace(round=server.round + 1, params=roles_lib.merge(new_shared, frozen),
                            opt_state=out.state.optimizer, extra=extra, chain=out.state.links)
    return server, client_states, metrics

  return Algorithm(init=init, init_clients=init_clients, round=round_fn,
                   bytes_per_client=bytes_per_client)


# ------------------------------------------------------------------------------------------------
# Config factory


def ffgg(loss_fn: LossFn, roles: Any, params: Any = None, *, personal: str | None = None,
         personal_lr: float = 0.5, personal_steps: int = 10, server_lr: float = 1.0,
         local_steps: int = 0, local_lr: float = 0.1, refine_personal: bool = False,
         personal_init: str = "warm", personal_init_scale: float = 1.0, max_delay: int = 0,
         delay_distribution: str = "uniform", attack: str | None = None,
         attacker_fraction: float = 0.0, attacker_ids: Sequence[int] | None = None,
         attack_scale: float = 1.0, attack_noise_std: float = 1.0, aggregator: str = "mean",
         bucket_size: int = 2, trim_fraction: float = 0.1, weighted: bool = False,
         aggregation: chain_lib.ChainConfig | None = None,
         execution: ClientExecution | None = None) -> Algorithm:
  """FFGG and its variants from flat hyperparameters, SGD everywhere (as in the paper).

  Plain FFGG by default; `local_steps > 0` is Local FFGG, `max_delay > 0` asynchronous FFGG,
  `attack` ("flip", "scale", "gaussian") Byzantine clients; combine them freely.

  Args:
    loss_fn: (params, batch, rng) -> (per-example loss, per-example metrics).
    roles: the model's roles; `personal` leaves are the y_m.
    params: the parameters, needed only to resolve `personal`.
    personal: optional regex over leaf paths making those leaves personal (frozen stay frozen).
    personal_lr: eta_in of the SGD fine-tuner (Algorithm 2).
    personal_steps: tau.
    server_lr: gamma (plain FFGG: x <- x - gamma * mean g); Local FFGG: the step on the mean delta.
    local_steps, local_lr: Local FFGG's SGD steps on x.
    refine_personal, personal_init, personal_init_scale, max_delay, delay_distribution,
      aggregator, bucket_size, trim_fraction, weighted, aggregation, execution: see
      `ffgg_algorithm`.
    attack, attacker_fraction, attacker_ids, attack_scale, attack_noise_std: see
      `ByzantineAttack` (kind, fraction, client_ids, scale, noise_std).
  """
  if personal is not None:
    if params is None:
      raise ValueError("ffgg(personal=...) needs params to resolve the regex against")
    pers = roles_lib.assign_roles(params, personal=personal)
    roles = jax.tree_util.tree_map(lambda r, p: r if r == FROZEN else p, roles, pers)
  byzantine = None if attack is None else ByzantineAttack(
      kind=attack, fraction=attacker_fraction,
      client_ids=None if attacker_ids is None else tuple(int(i) for i in attacker_ids),
      scale=attack_scale, noise_std=attack_noise_std)
  return ffgg_algorithm(
      loss_fn, roles, optax.sgd(personal_lr), optax.sgd(server_lr),
      personal_steps=personal_steps,
      local_optimizer=optax.sgd(local_lr) if local_steps else None, local_steps=local_steps,
      refine_personal=refine_personal, personal_init=personal_init,
      personal_init_scale=personal_init_scale, max_delay=max_delay,
      delay_distribution=delay_distribution, attack=byzantine, aggregator=aggregator,
      bucket_size=bucket_size, trim_fraction=trim_fraction, weighted=weighted,
      aggregation=aggregation, execution=execution)
