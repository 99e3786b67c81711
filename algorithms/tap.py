"""TAP: Two-stage Adaptive Personalization across modality-task groups (grouped federation).

Lee, Fang, Han, Hosseinalipour, Brinton. "Two-Stage Adaptive Personalization of Multi-Task and
Multi-Modal Foundation Models in Federated Learning", arXiv:2509.26524, 2025. Restated in
docs/algorithms.md section 1 from the paper and its reference code (lee3296/TAP, f43e429).

Clients form GROUPS, one per modality-task pair; a group's clients run the static sub-tree of
the server's superset model that their pair uses (`fedjax_fm.models.tap.view_mask`). Every
client keeps a full personal model (its group's trainable leaves) across rounds.

Stage 1, every round, for each sampled client c of each group (one map over the group's clients,
all groups inside one jitted round, a Python loop at trace time):

1. G <- the server model restricted to c's view (the "global-path" model); train it locally.
2. Per task t of c: if ``L_G[t] + delta_t < L_P[t]``, the personal model's leaves on t's paths
   are replaced by G's (`replace_if_better`, a masked select). The losses are measured on the
   client's held-out validation examples (default, the paper's intent: the examples flagged by
   `VALIDATION_KEY`, never trained on), comparing the trained G with the personal model as it
   stands; ``replacement="train"`` is the reference code's rule (this round's training loss of G
   against the personal model's training loss from its last participation, +inf before);
   ``replacement="none"`` never replaces (the no-replacement ablation, and Local training).
3. The personal model trains locally on the same batches (no distillation during FL).
4. G is uploaded; the server sets every trainable leaf to the presence-masked weighted mean over
   the clients whose view holds it (`presence_masked_mean`, weights = client example counts, as
   the reference's n_i); a leaf nobody uploaded keeps its value. No server optimizer.

Stage 2, after FL (`fedjax_fm.algorithms.tap_post_fl.post_fl`): every client fine-tunes the
server model restricted to it without distillation for `post_steps` steps (the reference's
"regAndLocal", FedAvg + local fine-tuning), then fine-tunes its personal model for `post_steps`
steps with ``task loss + lambda_t * KD`` against that fine-tuned teacher:
`distill.kl_per_example` (temperature T, T^2 factor) for logits (class, token and per-pixel class
logits; sigmoid KL for answer scores) and the mean squared error for dense regression outputs.
The reference applies a softmax over the image width to pixel outputs (docs/algorithms.md 1.6, item
6); a matching loss (MSE) is the intent for regression. `tap_post_fl.make_evaluator` runs stage
2 and reports four models per client: ``global`` (FedAvg: the server model restricted to the
client), ``global_ft`` (FedAvg + fine-tuning), ``personal_fl`` (the personal model after stage
1) and ``personalized`` (TAP: after stage 2).

Deviations from the reference code, on purpose (docs/algorithms.md 1.6):

- Clients download the whole aggregated server model restricted to them, fusion included (the
  paper's intent; the reference's key mismatch silently drops the fusion weights).
- Replacement compares held-out validation losses by default (option ``"train"``: the
  reference's training losses).
- After a replacement the reference draws a new data sample "to prevent memorization"; here the
  personal model trains on the round's batches whatever was replaced.
- The local optimizer is AdamW (weight decay 0.01), gradients clipped to global norm 1, fresh
  every round, with the reference's linear warm-up of the learning rate over rounds
  (``lr(r) = min_lr + (peak_lr - min_lr) * min(r / warmup_rounds, 1)``); one step per batch (no
  gradient accumulation: a larger batch is the same thing).
- Multi-task clients (`TAPGroup.task_names`): a group's examples carry their task's index
  (`TASK_KEY`), the training loss is the example mean over the batch (tasks weighted by their
  share of it, as in the reference), and replacement compares per-task losses and swaps each
  task's paths separately (``<group>/<task>/replaced``). All tasks of such a group share one
  head kind and output shape (the output is selected per example).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from fedjax_fm import aggregate, chain as chain_lib, clients as clients_lib, client_update
from fedjax_fm import distill as distill_lib
from fedjax_fm import roles as roles_lib
from fedjax_fm.protocol import Algorithm, ClientExecution, ServerState, default_execution
from fedjax_fm.models import heads as heads_lib
from fedjax_fm.models import tap as model_lib

PyTree = Any
# output_fn(params, batch, rng) -> the group's head output; rng None = evaluation (no dropout).
OutputFn = Callable[[PyTree, Mapping[str, jax.Array], Any], jax.Array]

# Per-example 1.0 on a client's held-out validation examples (never trained on); 0.0 otherwise.
VALIDATION_KEY = "tap_validation"
# Batch key that carries the stage-2 teacher's outputs into the student's loss.
TEACHER_KEY = "_tap_teacher"
# Per-example int32 index of the example's task within a multi-task group (`TAPGroup.task_names`).
TASK_KEY = "tap_task"
REPLACEMENT_MODES = ("validation", "train", "none")
TASK_KINDS = model_lib.HEAD_KINDS   # a group's task kind is the kind of its head


# ----------------------------------------------------------------------------------------------
# Pure pieces: replacement and presence-masked aggregation
# ----------------------------------------------------------------------------------------------


def replace_if_better(personal: PyTree, global_path: PyTree, personal_loss: jax.Array,
                      global_loss: jax.Array, delta: Any,
                      task_paths: Sequence[PyTree]) -> tuple[PyTree, jax.Array]:
  """TAP's stage-1 replacement: per task, the global-path model's leaves on that task's paths
  replace the personal ones when the global-path loss plus a margin beats the personal loss.

      b_t = global_loss[t] + delta[t] < personal_loss[t]
      M   = OR_t (b_t AND task_paths[t])          (per leaf)
      new = where(M, global_path, personal)

  A hard swap, not an interpolation (docs/algorithms.md 1.3). Pure and elementwise in the losses, so
  it vmaps over clients.

  Args:
    personal, global_path: trees of the same structure (None leaves are absent and stay None).
    personal_loss, global_loss: [T] losses per task.
    delta: margins, a scalar or [T].
    task_paths: T trees with the structure of `personal`, leaves Python bools or bool arrays:
      True where the leaf lies on task t's paths.

  Returns:
    (new personal tree, [T] bool: which tasks were replaced).

  Example (two tasks, the first replaced)::

      new, b = replace_if_better({"a": 1., "b": 2.}, {"a": 10., "b": 20.},
                                 jnp.array([1.0, 1.0]), jnp.array([0.5, 0.99]), 0.1,
                                 ({"a": True, "b": False}, {"a": False, "b": True}))
      # b = [True, False]; new = {"a": 10., "b": 2.}
  """
  personal_loss = jnp.asarray(personal_loss)
  global_loss = jnp.asarray(global_loss)
  num_tasks = len(task_paths)
  if personal_loss.shape[-1:] != (num_tasks,) or global_loss.shape != personal_loss.shape:
    raise ValueError(f"losses of shapes {personal_loss.shape} and {global_loss.shape} must both "
                     f"be [{num_tasks}], one per task path tree")
  better = global_loss + jnp.asarray(delta, global_loss.dtype) < personal_loss

  def leaf(p, g, *on_path):
    if p is None:
      return None
    mask = jnp.zeros((), bool)
    for t, on in enumerate(on_path):
      mask = mask | (better[t] & jnp.asarray(on, bool))
    return jnp.where(mask, g, p)

  new = jax.tree_util.tree_map(leaf, personal, global_path, *task_paths,
                               is_leaf=lambda x: x is None)
  return new, better


def stack_groups(uploads: Sequence[PyTree], weights: Sequence[jax.Array],
                 old: PyTree) -> tuple[PyTree, PyTree]:
  """The groups' uploads as one client-stacked superset tree and its presence masks.

  For every leaf of `old`: the clients of all groups concatenated (a group that does not hold
  the leaf contributes zeros) and a `[K]` mask, 1 for the clients whose group holds it.
  """
  if len(uploads) != len(weights):
    raise ValueError(f"{len(uploads)} uploads but {len(weights)} weight vectors; give one per "
                     "group")

  def leaf(o, *xs):
    if o is None:
      return None
    stacked, presence = [], []
    for x, w in zip(xs, weights):
      k = w.shape[0]
      if x is None:
        stacked.append(jnp.zeros((k,) + o.shape, o.dtype))
        presence.append(jnp.zeros((k,), o.dtype))
      else:
        stacked.append(x.astype(o.dtype))
        presence.append(jnp.ones((k,), o.dtype))
    return jnp.concatenate(stacked), jnp.concatenate(presence)

  pairs = jax.tree_util.tree_map(leaf, old, *uploads, is_leaf=lambda x: x is None)
  is_pair = lambda p: isinstance(p, tuple)
  return (jax.tree_util.tree_map(lambda p: p[0], pairs, is_leaf=is_pair),
          jax.tree_util.tree_map(lambda p: p[1], pairs, is_leaf=is_pair))


def presence_masked_mean(uploads: Sequence[PyTree], weights: Sequence[jax.Array],
                         old: PyTree) -> PyTree:
  """Aggregates uploads of groups holding different sub-trees of the superset `old`.

  For every leaf: the weighted mean over the clients of the groups whose upload holds it,

      new = where(sum_i w_i m_i > 0, sum_i w_i m_i x_i / sum_i w_i m_i, old),

  with m_i = 1 if client i's group holds the leaf (docs/algorithms.md 0, item 1; 1.5). A leaf no
  client with positive weight holds keeps its old value (the reference keeps keys no participant
  has). The round computes the same through the server chain (`fedjax_fm.chain.presence_mean`
  on the deltas x_i - old, then old + mean delta: equal up to float rounding).

  Args:
    uploads: per group, a client-stacked tree (leaves [K_g, ...]) with the structure of `old`,
      None on the leaves the group does not hold.
    weights: per group, [K_g] client weights (0 drops a client: padding, a non-finite update).
    old: the superset's current values (None leaves are skipped).
  """
  stacked, presence = stack_groups(uploads, weights, old)
  w = jnp.concatenate(weights)
  return jax.tree_util.tree_map(
      lambda x, m, o: aggregate.masked_weighted_mean(x, w.astype(o.dtype), m, o),
      stacked, presence, old)


def restrict(tree: PyTree, mask: PyTree) -> PyTree:
  """The leaves of `tree` where the static bool tree `mask` is True; None elsewhere."""
  return jax.tree_util.tree_map(lambda m, x: x if m else None, mask, tree)


# ----------------------------------------------------------------------------------------------
# Task losses
# ----------------------------------------------------------------------------------------------


def task_loss(kind: str, outputs: jax.Array, batch: Mapping[str, jax.Array],
              target_key: str = "y") -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-example loss [B] and metrics of a head's outputs.

  classification / next_token: softmax cross-entropy, ``accuracy``; dense_classification:
  per-pixel cross-entropy averaged over pixels, ``accuracy`` = pixel accuracy; dense_regression:
  `heads.pixel_mse`, ``mse``; answer_scoring: `heads.soft_target_bce` on one-hot answers,
  ``accuracy`` of the top answer.
  """
  y = batch[target_key]
  logits = outputs.astype(jnp.float32)
  if kind in ("classification", "next_token"):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return loss, {"accuracy": (jnp.argmax(logits, -1) == y).astype(jnp.float32)}
  if kind == "dense_classification":
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    axes = tuple(range(1, per_pixel.ndim))
    hit = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return jnp.mean(per_pixel, axes), {"accuracy": jnp.mean(hit, axes)}
  if kind == "dense_regression":
    mse = heads_lib.pixel_mse(logits, y.astype(jnp.float32))
    return mse, {"mse": mse}
  if kind == "answer_scoring":
    loss = heads_lib.soft_target_bce(logits, jax.nn.one_hot(y, logits.shape[-1]))
    return loss, {"accuracy": (jnp.argmax(logits, -1) == y).astype(jnp.float32)}
  raise ValueError(f"unknown TAP task kind {kind!r}; use one of {TASK_KINDS}")


def distill_per_example(kind: str, student: jax.Array, teacher: jax.Array,
                        temperature: float) -> jax.Array:
  """Stage 2's distillation term per example [B] (teacher under stop_gradient).

  Logits: `distill.kl_per_example` (T^2 KL(softmax(z_t/T) || softmax(z_s/T))), averaged over
  pixels for per-pixel logits so it has the scale of their per-pixel-mean task loss; answer
  scores: `distill.sigmoid_kl_per_example`; dense regression: mean squared error between the
  outputs (the matching loss for outputs that are not logits).
  """
  if kind in ("classification", "next_token"):
    return distill_lib.kl_per_example(student, teacher, temperature)
  if kind == "dense_classification":
    pixels = int(np.prod(student.shape[1:-1]))
    return distill_lib.kl_per_example(student, teacher, temperature) / pixels
  if kind == "answer_scoring":
    return distill_lib.sigmoid_kl_per_example(student, teacher, temperature)
  if kind == "dense_regression":
    return heads_lib.pixel_mse(student, jax.lax.stop_gradient(teacher).astype(jnp.float32))
  raise ValueError(f"unknown TAP task kind {kind!r}; use one of {TASK_KINDS}")


# ----------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TAPGroup:
  """One client group (modality-task pair), static.

  Attributes:
    name: the group's name (metric prefix).
    output_fn: (params, batch, rng) -> the group's head output (rng None: evaluation); for a
      multi-task group, each example's output of its own task (`TASK_KEY`).
    kind: its task's kind, one of `TASK_KINDS` (shared by all tasks of a multi-task group).
    view: a tree of Python bools over all parameters: the group's sub-model (for a multi-task
      group, the union of its tasks' paths).
    delta: the replacement margin delta_t of its task (a multi-task group: a float for all
      tasks or one per task).
    distill_weight: stage 2's lambda_t of its task (likewise).
    task_names: empty for a one-task group; else the names of its tasks, in `TASK_KEY` order.
    task_views: one bool tree like `view` per task of `task_names`: the leaves on that task's
      paths (what replacement swaps when that task's global-path loss wins).
  """
  name: str
  output_fn: OutputFn
  kind: str
  view: PyTree
  delta: float | tuple[float, ...] = 0.01
  distill_weight: float | tuple[float, ...] = 2e-3
  task_names: tuple[str, ...] = ()
  task_views: tuple[PyTree, ...] = ()

  def __post_init__(self):
    if self.kind not in TASK_KINDS:
      raise ValueError(f"group {self.name!r}: unknown task kind {self.kind!r}; use one of "
                       f"{TASK_KINDS}")
    if len(self.task_names) != len(self.task_views) or len(self.task_names) == 1:
      raise ValueError(f"group {self.name!r}: give two or more task_names with one task_view "
                       f"each, or neither; got {len(self.task_names)} and {len(self.task_views)}")
    for what in ("delta", "distill_weight"):
      value = getattr(self, what)
      if isinstance(value, tuple) and len(value) != self.num_tasks:
        raise ValueError(f"group {self.name!r}: {what} has {len(value)} entries for "
                         f"{self.num_tasks} tasks")

  @property
  def num_tasks(self) -> int:
    return max(len(self.task_names), 1)

  def per_task(self, what: str) -> np.ndarray:
    """[num_tasks] float32 of `delta` or `distill_weight`."""
    value = getattr(self, what)
    values = value if isinstance(value, tuple) else (value,) * self.num_tasks
    return np.asarray(values, np.float32)


def split_task_metrics(metrics: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
  """Example means of a multi-task group's per-task sums (``<m>@<t>`` = mean of m * [task t],
  ``count@<t>`` = share of task t) -> ``<t>/<m>`` (the mean of m over task t's examples; 0
  without any, as a client without test examples reads 0: a NaN would read as a diverged
  round); other entries unchanged. Works on any prefix before ``<m>@<t>``."""
  out = {}
  for name, value in metrics.items():
    head, sep, task = name.rpartition("@")
    if not sep or task not in tasks:
      out[name] = value
      continue
    prefix, _, metric = head.rpartition("/")
    if metric == "count":
      continue
    prefix = prefix + "/" if prefix else ""
    share = metrics[f"{prefix}count@{task}"]
    out[f"{prefix}{task}/{metric}"] = jnp.where(share > 0, value / jnp.where(share > 0, share, 1),
                                                0.0)
  return out


@struct.dataclass
class TAPClients:
  """One group's client state, stacked over its clients.

  Attributes:
    params: the personal models: the group's trainable leaves (None elsewhere), [N_g, ...].
    loss: [N_g, T] the personal model's training loss per task at its last participation
      (+inf before the first, or for a task it saw no example of); read by
      ``replacement="train"``.
  """
  params: PyTree
  loss: jax.Array


@dataclasses.dataclass(frozen=True)
class GroupParts:
  """What stage 1 and stage 2 (`fedjax_fm.algorithms.tap_post_fl`) share: per group, its
  trainable view and the rest, its losses, objectives, metric sums and outputs."""
  groups: tuple[TAPGroup, ...]
  roles: PyTree
  execution: ClientExecution

  def trainable_view(self, g: int) -> PyTree:
    return jax.tree_util.tree_map(lambda v, r: bool(v) and r == roles_lib.SHARED,
                                  self.groups[g].view, self.roles)

  def rest_mask(self, g: int) -> PyTree:
    return jax.tree_util.tree_map(lambda v: not v, self.trainable_view(g))

  def task_paths(self, g: int) -> tuple[PyTree, ...]:
    """Per task of group g, its trainable leaves on that task's paths (one task: the view)."""
    group, view = self.groups[g], self.trainable_view(g)
    if not group.task_names:
      return (view,)
    return tuple(jax.tree_util.tree_map(lambda v, t: v and bool(t), view, task_view)
                 for task_view in group.task_views)

  def loss_fn(self, g: int, distill_temperature: float | None = None,
              distill_weight: float | None = None):
    """Per-example loss and metrics of group g; with `distill_temperature`, plus lambda_t * KD
    against ``batch[TEACHER_KEY]`` (lambda_t from the group, or `distill_weight` for all
    tasks). A multi-task group adds ``loss@<t>``, ``count@<t>`` and ``<m>@<t>`` (the value
    times [example of task t]) for `split_task_metrics`."""
    group = self.groups[g]
    weights = (group.per_task("distill_weight") if distill_weight is None
               else np.full(group.num_tasks, distill_weight, np.float32))

    def loss(params, batch, rng):
      out = group.output_fn(params, batch, rng)
      per_example, metrics = task_loss(group.kind, out, batch)
      task = batch[TASK_KEY] if group.task_names else None
      if distill_temperature is not None and weights.any():
        kd = distill_per_example(group.kind, out, batch[TEACHER_KEY], distill_temperature)
        weight = weights[0] if task is None else jnp.asarray(weights)[task]
        per_example = per_example + weight * kd
      if task is not None:
        for t, name in enumerate(group.task_names):
          on = (task == t).astype(jnp.float32)
          metrics.update({f"{m}@{name}": v * on for m, v in list(metrics.items())
                          if "@" not in m})
          metrics[f"loss@{name}"] = per_example * on
          metrics[f"count@{name}"] = on
      return per_example, metrics

    return loss

  def task_losses(self, g: int, sums) -> jax.Array:
    """[T] example mean of the loss per task of group g from metric sums (+inf without an
    example of the task)."""
    group = self.groups[g]
    if not group.task_names:
      return _mean_loss(sums)[None]
    return jnp.stack([_mean_loss({"loss_sum": sums[f"loss@{t}_sum"],
                                  "count": sums[f"count@{t}_sum"]}) for t in group.task_names])

  def objective(self, g: int, rest: PyTree, distill_temperature: float | None = None,
                distill_weight: float | None = None):
    loss = self.loss_fn(g, distill_temperature, distill_weight)

    def objective(trainable, batch, mask, rng):
      return client_update.masked_loss(loss, roles_lib.merge(trainable, rest), batch, mask, rng)

    return objective

  def evaluate_sums(self, g: int, trainable: PyTree, rest: PyTree, data, mask):
    """Metric sums of one client's model over batches [steps, B, ...] (no dropout)."""
    loss = self.loss_fn(g)
    params = roles_lib.merge(trainable, rest)

    def step(_, inputs):
      batch, m = inputs
      return None, client_update.masked_loss(loss, params, batch, m, None)[1]

    _, sums = jax.lax.scan(step, None, (data, mask))
    return jax.tree_util.tree_map(lambda s: jnp.sum(s, 0), sums)

  def outputs(self, g: int, trainable: PyTree, rest: PyTree, data):
    """The model's outputs on every batch [steps, B, ...] (no dropout)."""
    params = roles_lib.merge(trainable, rest)
    return jax.lax.map(lambda batch: self.groups[g].output_fn(params, batch, None), data)


def _mean_loss(sums) -> jax.Array:
  """Example mean of the loss, +inf with no example (so no comparison can favour it)."""
  return jnp.where(sums["count"] > 0, sums["loss_sum"] / jnp.maximum(sums["count"], 1.0),
                   jnp.inf)


def local_optimizer(learning_rate: Any, weight_decay: float = 0.01,
                    clip_norm: float = 1.0) -> optax.GradientTransformation:
  """The reference's local optimizer: gradients clipped to global norm `clip_norm`, then AdamW."""
  return optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(learning_rate, weight_decay=weight_decay))


def warmup_lr(round_num: jax.Array, peak_lr: float, min_lr: float,
              warmup_rounds: int) -> jax.Array:
  """min_lr + (peak_lr - min_lr) * min(round / warmup_rounds, 1) (the reference's schedule)."""
  if warmup_rounds <= 0:
    return jnp.asarray(peak_lr, jnp.float32)
  frac = jnp.minimum(round_num.astype(jnp.float32) / warmup_rounds, 1.0)
  return min_lr + (peak_lr - min_lr) * frac


def _check(groups, replacement, peak_lr, min_lr):
  if not groups:
    raise ValueError("TAP needs at least one client group")
  names = [g.name for g in groups]
  if len(set(names)) != len(names):
    raise ValueError(f"group names {names} must be distinct")
  if replacement not in REPLACEMENT_MODES:
    raise ValueError(f"unknown replacement {replacement!r}; use one of {REPLACEMENT_MODES}")
  if not (peak_lr > 0 and min_lr > 0):
    raise ValueError(f"learning rates must be positive, got peak {peak_lr}, min {min_lr}")


def tap(groups: Sequence[TAPGroup], roles: PyTree, *, peak_lr: float = 3e-4,
        min_lr: float = 1e-4, warmup_rounds: int = 20, weight_decay: float = 0.01,
        clip_norm: float = 1.0, replacement: str = "validation",
        aggregation: chain_lib.ChainConfig | None = None,
        execution: ClientExecution | None = None) -> Algorithm:
  """TAP's stage 1 as a grouped `Algorithm` (docs/algorithms.md 1.3; module docstring).

  Args:
    groups: one `TAPGroup` per modality-task pair, in the order of the grouped data.
    roles: role tree of the superset parameters (`frozen` / `shared` = trained).
    peak_lr, min_lr, warmup_rounds: the local learning rate, warmed up linearly over rounds.
    weight_decay, clip_norm: AdamW's weight decay and the gradient clipping norm.
    replacement: ``"validation"`` (default, held-out losses), ``"train"`` (the reference's
      training losses) or ``"none"`` (never replace).
    aggregation: the server chain (`fedjax_fm.chain.ChainConfig`) on the uploads' deltas, its
      aggregator the presence-masked mean (`chain.presence_mean`); compression without error
      feedback only, no DP clipping or robust aggregator. None: the finite filter and the mean.
    execution: how a group's clients run (`default_execution()` if None).

  Returns:
    An `Algorithm` whose `init_clients(params, rows)` takes one row count per group and returns
    a tuple of `TAPClients`, and whose `round(server, clients, cohorts, rng)` takes one `Cohort`
    per group. Round metrics: per group ``<name>/global_loss``, ``<name>/personal_loss``,
    ``<name>/replaced`` (fraction of its sampled clients whose personal model was replaced, in
    part or whole; a multi-task group adds ``<name>/<task>/replaced`` and per-task metrics) and
    the personal model's task metrics; overall ``loss`` (personal, example mean over groups),
    ``replaced`` and ``num_nonfinite_clients``.
  """
  groups = tuple(groups)
  _check(groups, replacement, peak_lr, min_lr)
  execution = execution or default_execution()
  parts = GroupParts(groups, roles, execution)
  # The server moves to the mean upload: sgd(1) on the presence-masked mean delta.
  server_chain = chain_lib.build_chain(aggregation or chain_lib.ChainConfig(), optax.sgd(1.0),
                                       presence=True)
  if server_chain.has_client_state:
    raise ValueError("TAP keeps no chain state on its clients; use compression without error "
                     "feedback (int8, int4, or top_k with error_feedback=False)")

  def init(params: PyTree, rng: jax.Array) -> ServerState:
    del rng
    state = server_chain.init(roles_lib.select(params, roles, roles_lib.SHARED))
    return ServerState(round=jnp.zeros((), jnp.int32), params=params,
                       opt_state=state.optimizer, chain=state.links)

  def init_clients(params: PyTree, rows: Sequence[int]) -> tuple[TAPClients, ...]:
    rows = tuple(int(r) for r in rows)
    if len(rows) != len(groups):
      raise ValueError(f"init_clients got {len(rows)} row counts for {len(groups)} groups; "
                       "give one per group")
    return tuple(
        TAPClients(params=jax.tree_util.tree_map(
                       lambda x: jnp.array(clients_lib.broadcast(x, n)),
                       restrict(params, parts.trainable_view(g))),
                   loss=jnp.full((n, groups[g].num_tasks), jnp.inf, jnp.float32))
        for g, n in enumerate(rows))

  def bytes_per_client(params: PyTree) -> tuple[int, int]:
    n = int(np.mean([roles_lib.tree_bytes(restrict(params, parts.trainable_view(g)))
                     for g in range(len(groups))]))
    return n, n

  def round_fn(server: ServerState, client_states, cohorts, rng: jax.Array):
    if len(client_states) != len(groups) or len(cohorts) != len(groups):
      raise ValueError(f"TAP's round takes one client state and one cohort per group "
                       f"({len(groups)}); got {len(client_states)} and {len(cohorts)}")
    optimizer = local_optimizer(warmup_lr(server.round, peak_lr, min_lr, warmup_rounds),
                                weight_decay, clip_norm)
    uploads, weights, oks, new_states, metrics = [], [], [], [], {}
    totals = {"loss_sum": 0.0, "count": 0.0, "replaced": 0.0, "clients": 0.0, "bad": 0}
    for g, group in enumerate(groups):
      view = parts.trainable_view(g)
      start = restrict(server.params, view)
      rest = restrict(server.params, parts.rest_mask(g))
      objective = parts.objective(g, rest)
      state, cohort = client_states[g], cohorts[g]
      ids = cohort.client_ids
      personal = execution.constrain(clients_lib.gather_rows(state.params, ids))
      last_loss = jnp.take(state.loss, ids, axis=0, mode="clip")
      keys = jax.random.split(jax.random.fold_in(rng, g), cohort.num_clients)

      def one_client(personal_k, last_k, data, mask, key, g=g, start=start, rest=rest,
                     objective=objective):
        key_g, key_p = jax.random.split(key)
        held_out = data.get(VALIDATION_KEY)
        held_out = jnp.zeros_like(mask) if held_out is None else held_out.astype(mask.dtype)
        train_mask, val_mask = mask * (1.0 - held_out), mask * held_out
        global_k, g_sums = client_update.train_steps(objective, optimizer, start, data, train_mask,
                                             key_g, execution.scan_unroll)
        if replacement == "none":
          replaced = jnp.zeros((groups[g].num_tasks,), bool)
        else:
          if replacement == "validation":
            l_global = parts.task_losses(g, parts.evaluate_sums(g, global_k, rest, data,
                                                                val_mask))
            l_personal = parts.task_losses(g, parts.evaluate_sums(g, personal_k, rest, data,
                                                                  val_mask))
          else:
            l_global, l_personal = parts.task_losses(g, g_sums), last_k
          personal_k, replaced = replace_if_better(
              personal_k, global_k, l_personal, l_global, groups[g].per_task("delta"),
              parts.task_paths(g))
        personal_k, p_sums = client_update.train_steps(objective, optimizer, personal_k, data,
                                               train_mask, key_p, execution.scan_unroll)
        return global_k, personal_k, parts.task_losses(g, p_sums), replaced, g_sums, p_sums

      global_new, personal_new, p_loss, replaced, g_sums, p_sums = execution.map(one_client)(
          personal, last_loss, cohort.data, cohort.mask, keys)
      global_new, personal_new = execution.constrain((global_new, personal_new))
      real = cohort.weights > 0
      ok = aggregate.finite_clients((global_new, personal_new)) & real
      weights.append(jnp.where(ok, cohort.weights, 0.0))
      oks.append(ok)
      uploads.append(aggregate.zero_where_bad(global_new, ok))
      new_states.append(clients_lib.scatter_rows(
          state, ids, TAPClients(params=personal_new, loss=p_loss), keep=ok))

      p_metrics = split_task_metrics(aggregate.example_means(dict(p_sums), ok), group.task_names)
      g_metrics = split_task_metrics(aggregate.example_means(dict(g_sums), ok), group.task_names)
      n_ok = jnp.maximum(jnp.sum(ok), 1)
      metrics[f"{group.name}/global_loss"] = g_metrics.pop("loss")
      metrics[f"{group.name}/personal_loss"] = p_metrics.pop("loss")
      for t in group.task_names:
        metrics[f"{group.name}/{t}/global_loss"] = g_metrics[f"{t}/loss"]
        metrics[f"{group.name}/{t}/personal_loss"] = p_metrics.pop(f"{t}/loss")
      metrics.update({f"{group.name}/{k}": v for k, v in p_metrics.items() if k != "examples"})
      any_replaced = jnp.any(replaced, axis=1) & ok
      metrics[f"{group.name}/replaced"] = jnp.sum(any_replaced) / n_ok
      for t, name in enumerate(group.task_names):
        metrics[f"{group.name}/{name}/replaced"] = jnp.sum(replaced[:, t] & ok) / n_ok
      totals["loss_sum"] += jnp.sum(jnp.where(ok, p_sums["loss_sum"], 0.0))
      totals["count"] += jnp.sum(jnp.where(ok, p_sums["count"], 0.0))
      totals["replaced"] += jnp.sum(any_replaced)
      totals["clients"] += jnp.sum(ok)
      totals["bad"] += jnp.sum(real & ~ok)

    trainable = roles_lib.select(server.params, roles, roles_lib.SHARED)
    frozen = roles_lib.select(server.params, roles, roles_lib.FROZEN)
    stacked, presence = stack_groups(uploads, weights, trainable)
    deltas = jax.tree_util.tree_map(lambda x, o: x - o[None], stacked, trainable)
    out = server_chain.apply(trainable, deltas, jnp.concatenate(weights), jnp.concatenate(oks),
                             (server.chain, server.opt_state),
                             jax.random.fold_in(rng, len(groups)), round_num=server.round,
                             masks=presence)
    new_trainable = out.params
    metrics.update(out.metrics)
    metrics["loss"] = totals["loss_sum"] / jnp.maximum(totals["count"], 1.0)
    metrics["replaced"] = totals["replaced"] / jnp.maximum(totals["clients"], 1.0)
    metrics["num_nonfinite_clients"] = totals["bad"]
    server = server.replace(round=server.round + 1,
                            params=roles_lib.merge(new_trainable, frozen),
                            opt_state=out.state.optimizer, chain=out.state.links)
    return server, tuple(new_states), metrics

  return Algorithm(init=init, init_clients=init_clients, round=round_fn,
                   bytes_per_client=bytes_per_client)
