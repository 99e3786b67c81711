"""FedBone: split learning of a server-side general model with conflicting-gradient projection.

Chen, Zhang, Jiang, Chen, Gao, Huang. "FedBone: Towards Large-Scale Federated Multi-Task
Learning." arXiv:2306.17465 (2023); JCST 39(5), 2024. No official code exists; docs/algorithms.md
section 4 restates the method, and its section 4.2 marks which details are reconstructed.

The model is split between the cloud and the edge. The server holds the large **general
model** G (here a transformer encoder, e.g. the real all-MiniLM-L6-v2). Every client k holds its
task-specific **client model**: an embedder E_k (image patches or text tokens -> token
embeddings), a **task adaptation module** A_k and a **task head** H_k. One local iteration::

    e = E_k(x)                  client forward, sends e up
    f = G(e; theta)             server forward, sends f down
    L = loss_k(H_k(A_k(f)), y)  client: grads of A_k, H_k and dL/df, sends dL/df up
    dtheta, de = vjp_G(dL/df)   server backward: caches dtheta (NOT applied yet), sends de down
    dE_k = vjp_E(de)            client backward; the client steps E_k, A_k, H_k

Inside the one jitted round this is literally `jax.vjp` of E and of G with the client head's
`jax.grad` in between (`split_step_gradients`), mapped over the clients of a task group
(`ClientExecution`: vmap over clients with G's parameters shared, so the server's forward and
backward are batched over the group), `lax.scan` over local steps. Clients with a different
architecture (modality, head, adaptation module) form different **groups**; the round loops
over groups at trace time, so all of them run in one compiled program (DESIGN.md,
"Heterogeneous architectures").

Server aggregation ("GP aggregation"): each client's general-model gradient g_k (the mean over
its local iterations by default) is stacked over all clients of all groups, projected with
PCGrad over clients (`fedjax_fm.aggregate.pcgrad`: for each k, in a random order from the round
key, remove the component conflicting with each other client's gradient; flattened or per
leaf), averaged (equally over clients by default, or by example counts) and applied with the
server optimizer (optax) once per round. The fraction of conflicting gradient pairs is measured
every round, for the baselines too.

Variants (`variant`):
- ``"fedbone"``: the above (projection ``"flat"`` or ``"per_leaf"``);
- ``"average"``: the same split model, plain averaging of the general-model gradients;
- ``"local"``: the general model is never updated (no server step, no cached gradient); each
  client trains only its own embedder, adaptation module and head through the fixed G.

Choices where the paper is unclear or where we deviate (docs/algorithms.md 4.2):
- g_k is the mean of the per-step gradients over the client's real (unmasked) local steps
  (``general_grad="mean"``); ``"last"`` uses the last real step's gradient only.
- The client models are personal (one per client, never aggregated), as the paper's task-
  specific client models; frozen client leaves (a pretrained text embedding table) are one copy
  in the server state and are never trained.
- The task adaptation module (`fedjax_fm.models.fedbone.ClientModel`) is a residual bottleneck
  MLP on every token (identity at init); the paper uses a deformable-convolution-style module
  on hierarchical features [recall], which does not apply to a single-scale transformer.
- The client optimizer's state is fresh every round; the general model's optimizer (Adam by
  default) keeps its state across rounds.
- With ``train_general="lora"`` the server trains LoRA branches on the general model rather
  than all its weights (the configs say which).

This file holds the algorithm (`split_step_gradients`, `fedbone`), the bridge from NNX models
to the round's functions (`client_task_group`, `encoder_general_fn`, `general_roles_for`) and
the per-group evaluator. The suite's client models (embedder, adaptation module, head) are
`fedjax_fm.models.fedbone`; `fedjax_fm.algorithms.fedbone_launch` turns a config into the
grouped data, the split model and this algorithm for launch.py.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedjax_fm import aggregate, chain as chain_lib, clients as clients_lib, evaluate as evaluate_lib
from fedjax_fm import client_update
from fedjax_fm import roles as roles_lib
from fedjax_fm.protocol import (Algorithm, ClientExecution, ServerState, default_execution,
                                  stacked_personal)
from fedjax_fm.cohort import FederatedData
from fedjax_fm.models.fedbone import ClientModel
from fedjax_fm.roles import FROZEN, PERSONAL, SHARED

PyTree = Any
# embed_fn(client_params, batch, rng) -> (tokens [B, T, D], token mask [B, T]).
EmbedFn = Callable[[PyTree, Mapping[str, jax.Array], jax.Array | None],
                   tuple[jax.Array, jax.Array]]
# general_fn(general_params, tokens [B, T, D], mask [B, T], rng) -> features [B, T, D].
GeneralFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array | None], jax.Array]
# task_fn(client_params, features, mask, batch, rng) -> (per-example loss [B], {name: [B]}).
TaskFn = Callable[[PyTree, jax.Array, jax.Array, Mapping[str, jax.Array], jax.Array | None],
                  tuple[jax.Array, Mapping[str, jax.Array]]]

VARIANTS = ("fedbone", "average", "local")
PROJECTIONS = ("flat", "per_leaf")
GENERAL_GRADS = ("mean", "last")


class TaskGroup(NamedTuple):
  """Clients that share one client architecture (one vmap in the round).

  Attributes:
    name: the group's name (a key of the parameters' ``"clients"`` dict and of metrics).
    embed_fn: the client's embedder E.
    task_fn: the client's adaptation module and head, with the task loss (A, H, loss).
    roles: role pytree of the group's client parameters: ``personal`` (trained, one row per
      client) or ``frozen`` (one copy on the server, never trained).
  """
  name: str
  embed_fn: EmbedFn
  task_fn: TaskFn
  roles: PyTree


def _zero_padding(batch: Mapping[str, jax.Array], mask: jax.Array) -> dict[str, jax.Array]:
  live = mask > 0
  return {k: jnp.where(live.reshape(live.shape + (1,) * (a.ndim - live.ndim)), a,
                       jnp.zeros_like(a)) for k, a in batch.items()}


def split_step_gradients(group: TaskGroup, general_fn: GeneralFn, personal: PyTree,
                         client_frozen: PyTree, general: PyTree, general_frozen: PyTree,
                         batch: Mapping[str, jax.Array], mask: jax.Array, rng: jax.Array | None,
                         train_general: bool = True
                         ) -> tuple[PyTree, PyTree | None, dict[str, jax.Array]]:
  """One split-learning iteration's gradients, computed the way the two parties would.

  The client's embedder forward and the server's general-model forward are `jax.vjp`s; the
  client's head gives the loss, its own gradients and dL/df; the server's vjp turns dL/df into
  its own gradient and dL/de; the embedder's vjp turns dL/de into the embedder's gradient.
  The result equals `jax.grad` of the composed model (tested), but each party only ever sees
  the activations and gradients it would receive.

  Args:
    group: the client's task group.
    general_fn: the general model G.
    personal, client_frozen: the client's trained and frozen parameters.
    general, general_frozen: G's trained and frozen parameters (merged for the call).
    batch, mask: one batch `[B, ...]` and its example mask `[B]`.
    rng: dropout key (None: no dropout).
    train_general: compute G's parameter gradient (False: only dL/de, as for Local).

  Returns:
    (gradient of the personal parameters, gradient of G's trained parameters or None,
    metric sums of `client_update.masked_loss`).
  """
  k_embed, k_general, k_task = (None, None, None) if rng is None else jax.random.split(rng, 3)
  embed = lambda p: group.embed_fn(roles_lib.merge(p, client_frozen), batch, k_embed)
  tokens, embed_vjp, token_mask = jax.vjp(embed, personal, has_aux=True)
  if train_general:
    features, general_vjp = jax.vjp(
        lambda theta, e: general_fn(roles_lib.merge(theta, general_frozen), e, token_mask,
                                    k_general), general, tokens)
  else:
    features, general_vjp = jax.vjp(
        lambda e: general_fn(roles_lib.merge(general, general_frozen), e, token_mask,
                             k_general), tokens)

  def head_objective(p, f):
    def per_example(params, b, r):
      return group.task_fn(params, f, token_mask, b, r)
    return client_update.masked_loss(per_example, roles_lib.merge(p, client_frozen), batch, mask,
                                     k_task)

  (grad_head, grad_features), sums = jax.grad(head_objective, argnums=(0, 1),
                                              has_aux=True)(personal, features)
  if train_general:
    grad_general, grad_tokens = general_vjp(grad_features)
  else:
    grad_general, (grad_tokens,) = None, general_vjp(grad_features)
  (grad_embed,) = embed_vjp(grad_tokens)
  grad_personal = jax.tree_util.tree_map(jnp.add, grad_head, grad_embed)
  return grad_personal, grad_general, sums


def fedbone(general_fn: GeneralFn, groups: Sequence[TaskGroup], *,
            general_roles: PyTree | None = None,
            variant: str = "fedbone",
            projection: str = "flat",
            general_optimizer: optax.GradientTransformation | None = None,
            client_optimizer: optax.GradientTransformation | None = None,
            general_grad: str = "mean",
            weighted: bool = False,
            activation_bytes: Sequence[int] | None = None,
            aggregation: chain_lib.ChainConfig | None = None,
            execution: ClientExecution | None = None) -> Algorithm:
  """Builds FedBone (Chen et al. 2023) or one of its baselines over task groups.

  Parameters are the superset ``{"general": G's parameters, "clients": {group name: that
  group's client-model parameters}}``. The server state holds G (trained and frozen leaves) and
  the frozen client leaves of every group; each group's client state stacks its personal leaves
  (`init_clients(params, rows)` with one row count per group).

  Example::

      alg = fedbone(general_fn, [TaskGroup("digits", embed, task, roles), ...],
                    general_roles=lora_roles, projection="flat")
      server = alg.init(params, key)
      clients = alg.init_clients(params, (20, 10))
      server, clients, metrics = alg.round(server, clients, (cohort_a, cohort_b), key)

  Args:
    general_fn: the general model G, ``(params, tokens, mask, rng) -> features``.
    groups: the task groups, in the order of the round's tuple of cohorts.
    general_roles: roles of G's parameters: ``shared`` leaves are trained by the server,
      ``frozen`` ones are not (LoRA on a frozen backbone). None: all trained.
    variant: ``"fedbone"`` (projection), ``"average"`` (plain averaging) or ``"local"`` (G never
      updated).
    projection: PCGrad on the flattened gradient (``"flat"``) or per leaf (``"per_leaf"``).
    general_optimizer: optax optimizer of G, fed the aggregated gradient; Adam(1e-4) if None.
    client_optimizer: optax optimizer of the client models (fresh every round); Adam(1e-3) if
      None.
    general_grad: a client's g_k: ``"mean"`` of its per-step gradients or the ``"last"`` one.
    weighted: weight clients by example counts in the mean of g_k (False: every real client
      counts the same, the natural reading of the paper's mean over clients).
    activation_bytes: per group, the bytes of one example's embedding e (= of f), for the
      communication count: per local step a client sends e and dL/df and receives f and
      dL/de. With `local_steps` and `batch_size` folded in by the caller (`bytes_per_client`
      reports the mean over groups). None: reported as 0.
    aggregation: the server chain on the (projected) gradients of G
      (`fedjax_fm.chain.ChainConfig`; it sees them as deltas, -g); None: the finite filter and
      the weighted mean. No user-level DP (embeddings leave the clients every step) and no
      error feedback.
    execution: how clients run in the program; `default_execution()` if None.

  Returns:
    An `Algorithm` for the grouped engine: `round(server, clients: tuple, cohorts: tuple, rng)`.
    Metrics: ``<group>/loss`` and ``<group>/<metric>`` (means over the group's real examples),
    ``loss`` (the mean of the groups' losses), ``conflict_fraction`` (pairs of real clients with
    <g_j, g_k> < 0 before projection; 0 for ``"local"``), ``general_grad_norm`` (of the applied
    aggregate), ``num_nonfinite_clients``.

  Raises:
    ValueError: for an unknown variant, projection or gradient mode, or duplicate group names.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown FedBone variant {variant!r}; use one of {VARIANTS}")
  if projection not in PROJECTIONS:
    raise ValueError(f"unknown projection {projection!r}; use one of {PROJECTIONS}")
  if general_grad not in GENERAL_GRADS:
    raise ValueError(f"unknown general_grad {general_grad!r}; use one of {GENERAL_GRADS}")
  groups = tuple(groups)
  names = [g.name for g in groups]
  if not groups or len(set(names)) != len(names):
    raise ValueError(f"FedBone needs task groups with distinct names, got {names}")
  if activation_bytes is not None and len(activation_bytes) != len(groups):
    raise ValueError(f"activation_bytes has {len(activation_bytes)} entries for {len(groups)} "
                     "groups; give one per group")
  general_optimizer = general_optimizer or optax.adam(1e-4)
  aggregation = aggregation or chain_lib.ChainConfig()
  if aggregation.clip_norm is not None:
    raise ValueError("FedBone's clients send embeddings and their gradients every local step; "
                     "user-level DP of the general model's gradient alone would not cover them")
  server_chain = chain_lib.build_chain(aggregation, general_optimizer)
  if server_chain.has_client_state:
    raise ValueError("FedBone keeps no chain state on its clients; use compression without "
                     "error feedback (int8, int4, or top_k with error_feedback=False)")
  client_optimizer = client_optimizer or optax.adam(1e-3)
  execution = execution or default_execution()
  train_general = variant != "local"

  def g_roles(general: PyTree) -> PyTree:
    if general_roles is None:
      return jax.tree_util.tree_map(lambda _: SHARED, general)
    return general_roles

  def split_general(general: PyTree) -> tuple[PyTree, PyTree]:
    r = g_roles(general)
    return roles_lib.select(general, r, SHARED), roles_lib.select(general, r, FROZEN)

  # ---- the contract ----
  def init(params: PyTree, rng: jax.Array) -> ServerState:
    del rng
    trained, _ = split_general(params["general"])
    frozen = {g.name: roles_lib.select(params["clients"][g.name], g.roles, FROZEN)
              for g in groups}
    state = server_chain.init(trained)
    return ServerState(round=jnp.zeros((), jnp.int32),
                       params={"general": params["general"], "clients": frozen},
                       opt_state=state.optimizer, chain=state.links)

  def init_clients(params: PyTree, rows: Sequence[int]) -> tuple[PyTree, ...]:
    rows = tuple(rows)
    if len(rows) != len(groups):
      raise ValueError(f"init_clients got {len(rows)} row counts for {len(groups)} groups "
                       f"{names}; give one per group")
    return tuple(stacked_personal(params["clients"][g.name], g.roles, n)
                 for g, n in zip(groups, rows))

  def bytes_per_client(params: PyTree) -> tuple[int, int]:
    """Activations, not parameters: per round a client sends e and dL/df for each local
    example and receives f and dL/de (the same sizes). Mean over groups."""
    del params
    if activation_bytes is None:
      return 0, 0
    n = int(round(2 * float(np.mean(activation_bytes))))
    return n, n

  # ---- one client's local iterations ----
  def local_update(group, client_frozen, general, general_frozen, personal, data, mask, rng):
    opt_state = client_optimizer.init(personal)
    zero_g = jax.tree_util.tree_map(jnp.zeros_like, general) if train_general else None

    def step(carry, inputs):
      personal, opt_state, acc, live_steps = carry
      batch, m, key = inputs
      batch = _zero_padding(batch, m)
      grads, g_general, sums = split_step_gradients(group, general_fn, personal, client_frozen,
                                                    general, general_frozen, batch, m, key,
                                                    train_general)
      updates, new_opt = client_optimizer.update(grads, opt_state, personal)
      new_personal = optax.apply_updates(personal, updates)
      live = jnp.sum(m) > 0  # a step with no real example changes nothing
      keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(live, a, b), new, old)
      if train_general:
        if general_grad == "mean":
          acc = jax.tree_util.tree_map(lambda a, g: a + jnp.where(live, g, 0.0), acc, g_general)
        else:
          acc = keep(g_general, acc)
      return (keep(new_personal, personal), keep(new_opt, opt_state), acc,
              live_steps + live.astype(jnp.float32)), sums

    keys = jax.random.split(rng, mask.shape[0])
    (personal, _, acc, live_steps), sums = jax.lax.scan(
        step, (personal, opt_state, zero_g, jnp.zeros((), jnp.float32)), (data, mask, keys),
        unroll=execution.scan_unroll)
    if train_general and general_grad == "mean":
      acc = jax.tree_util.tree_map(lambda a: a / jnp.maximum(live_steps, 1.0), acc)
    return personal, acc, jax.tree_util.tree_map(lambda s: jnp.sum(s, 0), sums)

  def round_fn(server: ServerState, client_states: tuple, cohorts: tuple, rng: jax.Array):
    client_states, cohorts = tuple(client_states), tuple(cohorts)
    if len(client_states) != len(groups) or len(cohorts) != len(groups):
      raise ValueError(f"the round got {len(client_states)} client states and {len(cohorts)} "
                       f"cohorts for {len(groups)} groups {names}; pass one of each per group")
    general, general_frozen = split_general(server.params["general"])
    group_keys = jax.random.split(rng, len(groups) + 1)
    new_states, grads, weights, oks, metrics = [], [], [], [], {}
    for g, (group, states, cohort) in enumerate(zip(groups, client_states, cohorts)):
      client_frozen = server.params["clients"][group.name]
      ids = cohort.client_ids
      personal = execution.constrain(clients_lib.gather_rows(states, ids))
      keys = jax.random.split(group_keys[g], cohort.num_clients)

      def one_client(p, data, mask, key, group=group, client_frozen=client_frozen):
        return local_update(group, client_frozen, general, general_frozen, p, data, mask, key)

      new_personal, g_general, sums = execution.map(one_client)(personal, cohort.data,
                                                                cohort.mask, keys)
      new_personal, g_general = execution.constrain((new_personal, g_general))
      ok = aggregate.finite_clients((new_personal, g_general, sums["loss_sum"]))
      new_states.append(clients_lib.scatter_rows(states, ids, new_personal, keep=ok))
      w = cohort.weights if weighted else (cohort.weights > 0).astype(jnp.float32)
      weights.append(jnp.where(ok, w, 0.0))
      oks.append(ok)
      grads.append(aggregate.zero_where_bad(g_general, ok) if train_general else None)
      metrics.update({f"{group.name}/{k}": v for k, v in aggregate.example_means(sums, ok).items()
                      if k != "examples"})

    weights = jnp.concatenate(weights)
    ok = jnp.concatenate(oks)
    real = weights > 0
    metrics["loss"] = sum(metrics[f"{g.name}/loss"] for g in groups) / len(groups)
    metrics["num_nonfinite_clients"] = jnp.sum(~ok)
    opt_state, chain_state = server.opt_state, server.chain
    if train_general:
      stacked = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *grads)
      if variant == "fedbone":  # projected before the chain, with the key it always had
        stacked, conflicts = aggregate.pcgrad_with_conflicts(
            stacked, group_keys[-1], per_leaf=projection == "per_leaf", mask=real)
      else:
        conflicts = aggregate.conflict_fraction(stacked, real)
      # The chain takes deltas and feeds -aggregate to the optimizer: -g in, the mean g out.
      out = server_chain.apply(general, jax.tree_util.tree_map(jnp.negative, stacked), weights,
                               ok, (server.chain, server.opt_state),
                               jax.random.fold_in(group_keys[-1], 1), round_num=server.round)
      general, opt_state, chain_state = out.params, out.state.optimizer, out.state.links
      metrics["conflict_fraction"] = conflicts
      metrics["general_grad_norm"] = optax.tree.norm(out.aggregate)
      metrics.update(out.metrics)
    else:
      metrics["conflict_fraction"] = jnp.zeros((), jnp.float32)
      metrics["general_grad_norm"] = jnp.zeros((), jnp.float32)
    server = server.replace(
        round=server.round + 1,
        params={"general": roles_lib.merge(general, general_frozen),
                "clients": server.params["clients"]},
        opt_state=opt_state, chain=chain_state)
    return server, tuple(new_states), metrics

  return Algorithm(init=init, init_clients=init_clients, round=round_fn,
                   bytes_per_client=bytes_per_client)


# ----------------------------------------------------------------------------------------------
# From NNX models to the round's functions
# ----------------------------------------------------------------------------------------------

def client_task_group(name: str, model: ClientModel) -> tuple[TaskGroup, PyTree]:
  """(`TaskGroup`, initial parameters) of a client model: everything personal except a text
  embedder's pretrained tables (word, position, token type), which stay frozen (one copy);
  its LayerNorm is personal."""
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  frozen = r"^embedder/text/(word|position|token_type)/"
  has_tables = any(re.search(frozen, roles_lib.leaf_path(p))
                   for p, _ in jax.tree_util.tree_leaves_with_path(params))
  roles = roles_lib.assign_roles(params, frozen=frozen if has_tables else None, default=PERSONAL)

  def embed_fn(p, batch, rng):
    return nnx.merge(graphdef, p).embed(batch, rng)

  def task_fn(p, features, mask, batch, rng):
    return nnx.merge(graphdef, p).task(features, mask, batch, rng)

  return TaskGroup(name, embed_fn, task_fn, roles), params


def encoder_general_fn(graphdef: nnx.GraphDef) -> GeneralFn:
  """G from an `Encoder`'s graph definition: ``(params, tokens, mask, rng) -> hidden states``."""

  def general_fn(params, tokens, mask, rng):
    return nnx.merge(graphdef, params)(tokens, mask, rng)

  return general_fn


def general_roles_for(params: PyTree, train: str) -> PyTree:
  """Roles of G's parameters: ``"full"`` trains every leaf; ``"lora"`` only the LoRA branches
  (``.../lora_<target>/...``), the pretrained weights frozen."""
  if train == "full":
    return jax.tree_util.tree_map(lambda _: SHARED, params)
  if train == "lora":
    return roles_lib.assign_roles(params, frozen=r"^(?!.*/lora_)", default=SHARED)
  raise ValueError(f"unknown general-model training {train!r}; use 'full' or 'lora'")


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def make_group_evaluator(general_fn: GeneralFn, group: TaskGroup, test: FederatedData,
                         batch_size: int = 64, chunk_size: int = 16):
  """evaluate(server_params, group_client_states) -> ``{"personalized/<metric>": mean,
  "personalized/per_client_<metric>": [n]}`` for one task group.

  Every client is evaluated with its own client model and the server's general model on its own
  test split; means are example-weighted over all the group's clients (clients without test data
  do not count). Combine groups with `fedjax_fm.evaluate.combine_group_evaluators`
  (`make_evaluator`).
  """
  n = test.num_clients
  batches = evaluate_lib.test_batches(test, batch_size)

  @jax.jit
  def evaluate(server_params, client_states):
    general = server_params["general"]
    frozen = server_params["clients"][group.name]

    def client(p, data, mask):
      params = roles_lib.merge(p, frozen)

      def step(_, inputs):
        b, m = inputs
        b = _zero_padding(b, m)
        tokens, token_mask = group.embed_fn(params, b, None)
        features = general_fn(general, tokens, token_mask, None)
        per_example = lambda pp, bb, r: group.task_fn(pp, features, token_mask, bb, r)
        return None, client_update.masked_loss(per_example, params, b, m, None)[1]

      _, sums = jax.lax.scan(step, None, (data, mask))
      return jax.tree_util.tree_map(lambda s: jnp.sum(s, 0), sums)

    personal = jax.tree_util.tree_map(lambda x: x[:n], client_states)  # drop padding rows
    sums = clients_lib.map_clients(client, "chunked", chunk_size)(personal, batches.data,
                                                                  batches.mask)
    return evaluate_lib.metrics_from_sums(sums, "personalized")

  return evaluate


def make_evaluator(general_fn: GeneralFn, groups: Sequence[TaskGroup],
                   tests: Sequence[FederatedData], batch_size: int = 64, chunk_size: int = 16):
  """evaluate(server_params, client_states tuple) -> ``"personalized/<group>/<metric>"`` per
  group, plus the example-weighted pooled ``"personalized/<metric>"`` over the groups that
  report it (`fedjax_fm.evaluate.combine_group_evaluators`) and per-client arrays."""
  groups = tuple(groups)
  if len(tests) != len(groups):
    raise ValueError(f"{len(tests)} test federations for {len(groups)} groups; give one each")
  return evaluate_lib.combine_group_evaluators(
      tuple(g.name for g in groups),
      [make_group_evaluator(general_fn, g, t, batch_size, chunk_size)
       for g, t in zip(groups, tests)], tuple(tests))
