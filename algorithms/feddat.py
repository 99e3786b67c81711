"""FedDAT: Federated Dual-Adapter Teacher with mutual knowledge distillation.

Chen, Zhang, Krompass, Gu, Tresp. "FedDAT: An Approach for Foundation Model Finetuning in
Multi-Modal Heterogeneous Federated Learning." AAAI 2024 (arXiv:2308.12305). Restated in
docs/algorithms.md section 2 from the paper and its reference code (HaokunChen245/FedDAT, 8ed970a).

Every layer of the frozen foundation model holds three bottleneck adapters, mixed by weights given
at call time (`fedjax_fm.models.adapters.mix_adapters`):

- A_c, the client adapter (``adapter_names[0]``, role ``personal``): trained, never leaves the
  client;
- A_s, the global adapter (``adapter_names[1]``, role ``shared``): trained, the only thing
  communicated and averaged;
- Ā_s, a frozen copy of the A_s the client received (``adapter_names[2]``, role ``frozen``): never
  trained, reset to the received A_s at the start of every round. Since it then equals the
  broadcast A_s for every client, it is not stored per client: the round writes the received
  A_s into it (one copy, like the backbone), and the server state keeps that copy, so a client
  evaluated after the round sees the teacher it trained with (as the reference code's stored
  personal parameters do).

The Dual-Adapter Teacher (DAT) is the fixed mix ``h + w_c * A_c(h) + w_copy * Ā_s(h)`` with
``teacher_weights = (w_c, w_copy) = (0.5, 0.5)`` (the reference code's gating network is commented
out). The task head is personal and trained in both sub-steps.

Local update, per mini-batch (docs/algorithms.md 2.2; KL_T(p || q) = T^2 KL(softmax(p/T) ||
softmax(q/T)), batch-mean, `fedjax_fm.distill`)::

    z_teach = stop_grad(f_DAT(x; A_c, Ā_s, head))
    (1) z_s = f(x; A_s, head)                          # A_s alone
        L_s = 1/2 [ l(z_s, y) + KL_T(z_teach || z_s) ]  # teacher DAT, student A_s
        step on (A_s, head)
    (2) z_c = f_DAT(x; A_c, Ā_s, head')                 # head' = head after step (1)
        L_c = 1/2 [ l(z_c, y) + KL_T(stop_grad(z_s) || z_c) ]   # teacher A_s, student DAT
        step on (A_c, head')

The teacher of step (2) is the *pre-update* A_s logits z_s of step (1), as in the reference code
(docs/algorithms.md 2.6, item 4): the forward of step (1) serves both as student and as teacher.

Round: A_s is broadcast; Ā_s <- A_s; each client runs the local update over its batches; the server
averages the clients' A_s (weighted by data size by default; ``weighted=False`` gives the
reference code's unweighted mean) and applies `server_optimizer` to the pseudo-gradient
-mean(delta) (``sgd(1.0)`` = plain averaging). Padded clients (weight 0, no real example) and
clients whose update is non-finite are dropped from the mean and keep their personal rows, as in
`fedjax_fm.fedavg_round`.

Deviations from the reference code, each on purpose:

- Aggregation weighted by client data size by default (the reference averages unweighted;
  ``weighted=False``).
- The client optimizer is any optax transformation, fresh each round; by default AdamW(lr 1e-4,
  betas (0.9, 0.98), eps 1e-8, weight decay 0.01, no decay on biases and LayerNorm scales, i.e.
  on leaves with fewer than 2 dimensions). Each parameter group keeps its own optimizer state and
  steps only when its sub-step trains it (A_s once per batch, A_c once, the head twice), which is
  what PyTorch's per-parameter AdamW state does for parameters without a gradient. The reference's
  schedule, recreated every round with max_steps from 15 epochs and ticked twice per batch, is a
  code artefact (docs/algorithms.md 2.3, 2.6) and not reproduced; pass an optax schedule if wanted
  (it advances with each group's own step count, so the head's twice per batch).
- ``weighted=False`` gives every client with a positive weight the same weight; padded clients
  (weight 0) still count zero.

The model is seen through ``logits_fn(params, batch, rng, adapter_weights) -> logits`` and a task
loss ``task_loss(logits, batch) -> (per-example loss [B], {name: per-example metric [B]})``, so the
same algorithm serves a classification head (`classification_task_loss`, softmax KL) and ViLT's
multi-label VQA answer-scoring head (`vqa_task_loss` with ``distill="sigmoid"``, or the
reference's softmax KL over the answer logits with ``distill="softmax"``). `model_logits_fn`
builds ``logits_fn`` from an NNX graph definition.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedjax_fm import (aggregate, chain as chain_lib, clients, distill as distill_lib,
                       client_update, roles as roles_lib)
from fedjax_fm.protocol import (Algorithm, ClientExecution, LossFn, ServerState,
                                  default_execution, shared_bytes, stacked_personal)
from fedjax_fm.cohort import Cohort
from fedjax_fm.fedavg_round import make_client_optimizer
from fedjax_fm.models import heads as heads_lib
from fedjax_fm.roles import FROZEN, PERSONAL, SHARED

PyTree = Any
# logits_fn(params, batch, rng, adapter_weights) -> logits [B, ...].
LogitsFn = Callable[[PyTree, Mapping[str, jax.Array], jax.Array, Mapping[str, float]], jax.Array]
# task_loss(logits, batch) -> (per-example loss [B], {metric name: per-example value [B]}).
TaskLoss = Callable[[jax.Array, Mapping[str, jax.Array]],
                    tuple[jax.Array, Mapping[str, jax.Array]]]

# Batch key carrying the (stop-gradient) teacher logits into a sub-step's loss.
TEACHER_LOGITS_KEY = "_feddat_teacher_logits"
# Parameter groups by the sub-steps that train them.
_GLOBAL_STEP_ONLY, _LOCAL_STEP_ONLY, _BOTH_STEPS, _NOT_TRAINED = "global", "local", "both", "none"


def default_client_optimizer(learning_rate: float = 1e-4) -> optax.GradientTransformation:
  """AdamW as FedDAT's reference code configures it; no weight decay on vectors (biases, norms)."""
  return make_client_optimizer("adamw", learning_rate)


def adapter_weights_by_mode(adapter_names: Sequence[str] = ("personal", "shared", "frozen"),
                            teacher_weights: tuple[float, float] = (0.5, 0.5)
                            ) -> dict[str, dict[str, float]]:
  """The adapter mixes of FedDAT's forwards: ``dat`` (A_c and Ā_s), ``global`` (A_s alone) and
  ``local`` (A_c alone), the three the reference code evaluates."""
  local_name, global_name, copy_name = adapter_names
  return {"dat": {local_name: teacher_weights[0], copy_name: teacher_weights[1]},
          "global": {global_name: 1.0},
          "local": {local_name: 1.0}}


def model_logits_fn(graphdef: nnx.GraphDef, input_keys: str | Sequence[str] = "input_ids",
                    train: bool = True) -> LogitsFn:
  """``logits_fn`` for a model whose call takes ``adapter_weights=`` (`TransformerModel`).

  Args:
    graphdef: the model's graph definition (`fedjax_fm.models.functional`).
    input_keys: batch keys passed positionally, e.g. ("input_ids", "attention_mask").
    train: dropout on (the step's key is passed as ``rng=``) or off.
  """
  keys = (input_keys,) if isinstance(input_keys, str) else tuple(input_keys)

  def logits_fn(params, batch, rng, adapter_weights):
    model = nnx.merge(graphdef, params)
    return model(*(batch[k] for k in keys), rng=rng if train else None,
                 adapter_weights=adapter_weights)

  return logits_fn


def classification_task_loss(label_key: str = "label") -> TaskLoss:
  """Softmax cross-entropy with integer labels and an ``accuracy`` metric."""

  def task_loss(logits, batch):
    labels = batch[label_key]
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    return loss, {"accuracy": (jnp.argmax(logits, -1) == labels).astype(jnp.float32)}

  return task_loss


def vqa_task_loss(target_key: str = "targets") -> TaskLoss:
  """ViLT's VQA loss on soft answer scores (`heads.soft_target_bce`: BCE summed over answers,
  the reference's mean BCE times the number of answers) with a ``vqa_score`` metric."""

  def task_loss(logits, batch):
    targets = batch[target_key]
    return (heads_lib.soft_target_bce(logits, targets),
            {"vqa_score": heads_lib.vqa_score(logits, targets)})

  return task_loss


def adapter_mix_loss(logits_fn: LogitsFn, task_loss: TaskLoss,
                     adapter_weights: Mapping[str, float]) -> LossFn:
  """The engine's ``loss_fn(params, batch, rng)`` for one adapter mix, e.g. to evaluate the DAT
  personal model with `fedjax_fm.evaluate.make_evaluator` (mix from `adapter_weights_by_mode`)."""

  def loss_fn(params, batch, rng):
    return task_loss(logits_fn(params, batch, rng, adapter_weights), batch)

  return loss_fn


def _adapter_pattern(name: str) -> re.Pattern:
  return re.compile(rf"(^|/)adapters/{re.escape(name)}/")


def _flat(tree: PyTree) -> dict[str, Any]:
  return {roles_lib.leaf_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _pick(tree: PyTree, groups: PyTree, group: str) -> PyTree:
  """The leaves of `tree` in parameter group `group`; others become None."""
  return jax.tree_util.tree_map(lambda g, x: x if g == group else None, groups, tree)


def _zero_padding(batch: Mapping[str, jax.Array], mask: jax.Array) -> dict[str, jax.Array]:
  """Padded slots set to zero, so no forward (teacher ones included) sees non-finite garbage."""
  live = mask > 0
  return jax.tree_util.tree_map(
      lambda a: jnp.where(live.reshape(live.shape + (1,) * (a.ndim - live.ndim)), a,
                          jnp.zeros_like(a)), dict(batch))


def feddat(logits_fn: LogitsFn, roles: PyTree, params: PyTree, *,
           task_loss: TaskLoss,
           adapter_names: Sequence[str] = ("personal", "shared", "frozen"),
           teacher_weights: tuple[float, float] = (0.5, 0.5),
           temperature: float = 3.0,
           distill: str = "softmax",
           mutual_distillation: bool = True,
           client_optimizer: optax.GradientTransformation | None = None,
           server_optimizer: optax.GradientTransformation = optax.sgd(1.0),
           weighted: bool = True,
           aggregation: chain_lib.ChainConfig | None = None,
           execution: ClientExecution | None = None) -> Algorithm:
  """Builds FedDAT (Chen et al. 2024); see the module docstring for the local update.

  Example::

      graphdef, params = functional(TransformerModel(
          config, rngs=nnx.Rngs(0), head={"kind": "classification", "num_classes": 3},
          adapters=AdapterConfig(names=("personal", "shared", "frozen"))))
      roles = transformer_roles(params, trainable=("adapters/shared",),
                                personal=("adapters/personal", "head"))
      alg = feddat(model_logits_fn(graphdef, ("input_ids", "attention_mask")), roles, params,
                   task_loss=classification_task_loss("label"))

  Args:
    logits_fn: (params, batch, rng, adapter_weights) -> logits; `adapter_weights` maps adapter
      names to Python floats (`model_logits_fn` for NNX models).
    roles: role pytree: the client adapter (and head) personal, the global adapter shared, the
      frozen copy and the backbone frozen.
    params: the initial parameters (to find the adapters' leaves by path).
    task_loss: (logits, batch) -> (per-example loss [B], per-example metrics).
    adapter_names: (client adapter A_c, global adapter A_s, frozen copy Ā_s) as named in the
      parameter paths (``.../adapters/<name>/...``).
    teacher_weights: DAT's mixing weights of (A_c, Ā_s); the paper's fixed 0.5/0.5.
    temperature: T of the distillation KL (3 in the reference code); the loss carries T^2.
    distill: ``"softmax"`` (KL between softmax distributions, the reference's choice for every
      head) or ``"sigmoid"`` (per-answer Bernoulli KL, for multi-label answer scoring).
    mutual_distillation: False is the paper's "w/o MKD" ablation: each sub-step minimises its
      task loss alone (no KL term, no teacher forward); the two sub-steps, the DAT mix and the
      parameter groups are unchanged. (The "w/o DAT" ablation, A_c alone as the personal model
      and teacher, is ``teacher_weights=(1.0, 0.0)``.)
    client_optimizer: optax optimizer of the local steps, its state fresh each round;
      `default_client_optimizer()` if None.
    server_optimizer: optax optimizer fed the pseudo-gradient -mean(delta A_s).
    weighted: weight clients by their example counts (True) or equally (False, the reference).
    aggregation: the server chain's links on the A_s deltas (`fedjax_fm.chain.ChainConfig`);
      None: the finite filter and the weighted mean.
    execution: how clients run inside the program; `default_execution()` if None.

  Returns:
    An `Algorithm`; its client state holds the personal leaves (A_c, head) of every client. Round
    metrics (means over the real examples of the healthy clients): ``loss`` (mean of the two
    sub-step objectives), ``dat_loss``, ``task_loss``, ``distill`` and the task's metrics (e.g.
    ``accuracy``) of the DAT forward in sub-step (2), the same prefixed ``global_`` for the A_s
    forward of sub-step (1), ``num_nonfinite_clients`` and ``examples``.

  Raises:
    ValueError: for inconsistent adapter names, roles or hyperparameters.
  """
  execution = execution or default_execution()
  server_chain = chain_lib.build_chain(aggregation or chain_lib.ChainConfig(), server_optimizer)
  if server_chain.has_client_state:
    raise ValueError("FedDAT keeps no chain state on its clients; use compression without "
                     "error feedback (int8, int4, or top_k with error_feedback=False)")
  client_optimizer = client_optimizer or default_client_optimizer()
  adapter_names = tuple(adapter_names)
  if len(adapter_names) != 3 or len(set(adapter_names)) != 3:
    raise ValueError(f"adapter_names {adapter_names} must be three distinct names: (client "
                     "adapter, global adapter, frozen copy of the global adapter)")
  if len(teacher_weights) != 2:
    raise ValueError(f"teacher_weights {teacher_weights} must be (client adapter, frozen copy)")
  if not temperature > 0:
    raise ValueError(f"temperature {temperature} must be > 0")
  distill_fn = distill_lib.distill_per_example(distill)
  local_name, global_name, copy_name = adapter_names
  mixes = adapter_weights_by_mode(adapter_names, tuple(float(w) for w in teacher_weights))
  dat_weights, global_weights = mixes["dat"], mixes["global"]

  # ---- which leaf is which: decided once from the parameter paths and roles ----
  flat_params, flat_roles = _flat(params), _flat(roles)
  expected_role = {local_name: PERSONAL, global_name: SHARED, copy_name: FROZEN}
  members = {}
  for name in adapter_names:
    pattern = _adapter_pattern(name)
    members[name] = [p for p in flat_params if pattern.search(p)]
    if not members[name]:
      raise ValueError(f"adapter {name!r} matches no parameter (looked for '.../adapters/{name}/"
                       f"...'); build the model with adapters named {adapter_names}")
    wrong = [p for p in members[name] if flat_roles[p] != expected_role[name]]
    if wrong:
      raise ValueError(
          f"FedDAT needs adapter {name!r} to have role {expected_role[name]!r}, but {wrong[0]} is "
          f"{flat_roles[wrong[0]]!r}; e.g. transformer_roles(params, trainable=('adapters/"
          f"{global_name}',), personal=('adapters/{local_name}', 'head'))")
  copy_source = {}  # frozen-copy leaf path -> the global-adapter leaf path it copies
  for path in members[copy_name]:
    source = path.replace(f"adapters/{copy_name}/", f"adapters/{global_name}/", 1)
    if source not in flat_params or flat_params[source].shape != flat_params[path].shape:
      raise ValueError(f"frozen copy leaf {path} has no global-adapter leaf {source} of the "
                       "same shape")
    copy_source[path] = source

  def group_of(path, role):
    p = roles_lib.leaf_path(path)
    if role == FROZEN:
      return _NOT_TRAINED
    if p in members[global_name]:
      return _GLOBAL_STEP_ONLY
    if p in members[local_name]:
      return _LOCAL_STEP_ONLY
    return _BOTH_STEPS  # the head (and any other trained leaf) learns in both sub-steps

  groups = jax.tree_util.tree_map_with_path(group_of, roles)
  trained_groups = (_GLOBAL_STEP_ONLY, _LOCAL_STEP_ONLY, _BOTH_STEPS)

  def with_received_copy(frozen: PyTree, shared: PyTree) -> PyTree:
    """Ā_s <- A_s: the frozen copy's leaves replaced by the global adapter's values."""
    flat_shared = _flat(shared)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: flat_shared[copy_source[p]] if (p := roles_lib.leaf_path(path))
        in copy_source else x, frozen)

  # ---- the local update of one client ----
  def sub_step_objective(weights):
    """Objective of one sub-step: 1/2 [task loss + KL_T(teacher || student)], batch-mean over
    real examples; the teacher's logits ride in the batch under TEACHER_LOGITS_KEY."""

    def objective(trained, fixed, batch, mask, key):
      full = roles_lib.merge(*trained, *fixed)
      logits = logits_fn(full, batch, key, weights)

      def per_example(_, b, __):
        task, metrics = task_loss(logits, b)
        if not mutual_distillation:
          return task, {"task_loss": task, **metrics}
        kd = distill_fn(logits, b[TEACHER_LOGITS_KEY], temperature)
        return 0.5 * (task + kd), {"task_loss": task, "distill": kd, **metrics}

      loss, sums = client_update.masked_loss(per_example, full, batch, mask, key)
      return loss, (sums, logits)

    return jax.grad(objective, has_aux=True)

  global_grad = sub_step_objective(global_weights)
  local_grad = sub_step_objective(dat_weights)

  def apply(optimizer_state, part, grads):
    updates, optimizer_state = client_optimizer.update(grads, optimizer_state, part)
    return optax.apply_updates(part, updates), optimizer_state

  def local_update(trainable, frozen, batches, mask, rng):
    parts = {g: _pick(trainable, groups, g) for g in trained_groups}
    opt_states = {g: client_optimizer.init(parts[g]) for g in trained_groups}

    def step(carry, inputs):
      parts, opt_states = carry
      batch, m, key = inputs
      key_teacher, key_global, key_local = jax.random.split(key, 3)
      batch = _zero_padding(batch, m)
      g_part, l_part, b_part = (parts[g] for g in trained_groups)
      batch_g = batch
      if mutual_distillation:
        z_teach = jax.lax.stop_gradient(logits_fn(
            roles_lib.merge(g_part, l_part, b_part, frozen), batch, key_teacher, dat_weights))
        batch_g = {**batch, TEACHER_LOGITS_KEY: z_teach}
      # (1) A_s alone learns from the teacher DAT (A_c is not trained).
      (grad_g, grad_b), (sums_g, z_s) = global_grad(
          (g_part, b_part), (l_part, frozen), batch_g, m, key_global)
      g_new, opt_g = apply(opt_states[_GLOBAL_STEP_ONLY], g_part, grad_g)
      b_mid, opt_b = apply(opt_states[_BOTH_STEPS], b_part, grad_b)
      # (2) A_c inside DAT learns from A_s's logits (A_s and the copy are not trained).
      batch_l = ({**batch, TEACHER_LOGITS_KEY: jax.lax.stop_gradient(z_s)}
                 if mutual_distillation else batch)
      (grad_l, grad_b2), (sums_l, _) = local_grad(
          (l_part, b_mid), (g_new, frozen), batch_l, m, key_local)
      l_new, opt_l = apply(opt_states[_LOCAL_STEP_ONLY], l_part, grad_l)
      b_new, opt_b = apply(opt_b, b_mid, grad_b2)

      new = ({_GLOBAL_STEP_ONLY: g_new, _LOCAL_STEP_ONLY: l_new, _BOTH_STEPS: b_new},
             {_GLOBAL_STEP_ONLY: opt_g, _LOCAL_STEP_ONLY: opt_l, _BOTH_STEPS: opt_b})
      live = jnp.sum(m) > 0  # a step with no real example changes nothing
      carry = jax.tree_util.tree_map(lambda a, b: jnp.where(live, a, b), new,
                                     (parts, opt_states))
      sums = {k: v for k, v in sums_l.items() if k != "loss_sum"}
      sums["dat_loss_sum"] = sums_l["loss_sum"]
      sums.update({f"global_{k}": v for k, v in sums_g.items() if k != "count"})
      sums["loss_sum"] = 0.5 * (sums_g["loss_sum"] + sums_l["loss_sum"])
      return carry, sums

    keys = jax.random.split(rng, mask.shape[0])
    (parts, _), sums = jax.lax.scan(step, (parts, opt_states), (batches, mask, keys),
                                    unroll=execution.scan_unroll)
    trained = roles_lib.merge(*(parts[g] for g in trained_groups))
    return trained, jax.tree_util.tree_map(lambda s: jnp.sum(s, axis=0), sums)

  # ---- the contract ----
  def init(params: PyTree, rng: jax.Array) -> ServerState:
    del rng
    shared = roles_lib.select(params, roles, SHARED)
    frozen = with_received_copy(roles_lib.select(params, roles, FROZEN), shared)
    state = server_chain.init(shared)
    return ServerState(round=jnp.zeros((), jnp.int32), params=roles_lib.merge(shared, frozen),
                       opt_state=state.optimizer, chain=state.links)

  def init_clients(params: PyTree, num_clients: int) -> PyTree:
    return stacked_personal(params, roles, num_clients)

  def bytes_per_client(params: PyTree) -> tuple[int, int]:
    """Only the global adapter A_s (the shared leaves) goes down and comes back up."""
    down, up = shared_bytes(params, roles)
    return down, server_chain.upload_bytes(roles_lib.select(params, roles, SHARED), up)

  def round_fn(server: ServerState, client_states: PyTree, cohort: Cohort, rng: jax.Array):
    shared = roles_lib.select(server.params, roles, SHARED)
    # Ā_s <- the received A_s, for every client of the round (one copy, closed over).
    frozen = with_received_copy(roles_lib.select(server.params, roles, FROZEN), shared)
    ids = cohort.client_ids
    personal = execution.constrain(clients.gather_rows(client_states, ids))
    keys = jax.random.split(rng, cohort.num_clients)

    def one_client(personal_k, data_k, mask_k, key_k):
      trained, sums = local_update(roles_lib.merge(shared, personal_k), frozen, data_k, mask_k,
                                   key_k)
      delta = jax.tree_util.tree_map(jnp.subtract, roles_lib.select(trained, roles, SHARED),
                                     shared)
      return delta, roles_lib.select(trained, roles, PERSONAL), sums

    deltas, new_personal, sums = execution.map(one_client)(
        personal, cohort.data, cohort.mask, keys)
    deltas, new_personal = execution.constrain((deltas, new_personal))

    ok = aggregate.finite_clients((deltas, new_personal, sums["loss_sum"]))
    weights = cohort.weights if weighted else (cohort.weights > 0).astype(cohort.weights.dtype)
    out = server_chain.apply(shared, deltas, weights, ok, (server.chain, server.opt_state), rng,
                             round_num=server.round)

    client_states = clients.scatter_rows(client_states, ids, new_personal, keep=ok)
    metrics = aggregate.example_means(sums, ok)
    metrics["num_nonfinite_clients"] = cohort.num_clients - jnp.sum(ok)
    metrics.update(out.metrics)
    server = server.replace(round=server.round + 1,
                            params=roles_lib.merge(out.params, frozen),
                            opt_state=out.state.optimizer, chain=out.state.links)
    return server, client_states, metrics

  return Algorithm(init=init, init_clients=init_clients, round=round_fn,
                   bytes_per_client=bytes_per_client)
