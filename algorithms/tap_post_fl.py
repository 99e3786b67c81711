"""TAP's stage 2 and its evaluation: post-FL distillation for every client, then the test
metrics of TAP and its baselines (docs/algorithms.md 1.3; stage 1 is `fedjax_fm.algorithms.tap`).

`post_fl` fine-tunes, per client, the server model restricted to it (the teacher, and the
FedAvg + local fine-tuning baseline), then the personal model with ``task + lambda_t * KD``
against that teacher. `make_evaluator` runs it for every client of every group in one compiled
program and reports four models per client (`EVAL_MODES`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np

from fedjax_fm import clients as clients_lib, evaluate as evaluate_lib, client_update
from fedjax_fm.protocol import ClientExecution
from fedjax_fm.algorithms.tap import (TEACHER_KEY, VALIDATION_KEY, GroupParts, PyTree, TAPGroup,
                                      local_optimizer, restrict, split_task_metrics)
from fedjax_fm.cohort import FederatedData, make_cohort


def post_fl(groups: Sequence[TAPGroup], roles: PyTree, *, post_steps_lr: float = 1e-4,
            temperature: float = 1.0, weight_decay: float = 0.01, clip_norm: float = 1.0,
            distill_sweep: Sequence[float] = (),
            execution: ClientExecution | None = None):
  """TAP's stage 2 (docs/algorithms.md 1.3): per client, fine-tune the server model restricted to
  it (no distillation; the teacher, and the FedAvg + fine-tuning baseline), then fine-tune the
  personal model with ``task + lambda_t * distill`` against that teacher.

  `distill_sweep`: more students, one per lambda, each the same fine-tuning of the personal
  model from the same keys with ``task + lambda * distill`` (lambda for every task, replacing
  the groups' lambda_t), so a sweep of the distillation strength shares one stage 1.

  Returns:
    ``stage2(server_params, g, personal [K, ...], data, mask, rng) -> (teacher, student,
    swept)``, [K, ...] trees of group g's trainable leaves (`swept`: a tuple, one student per
    `distill_sweep` entry); `data` / `mask` are [K, steps, B, ...] (the number of steps is the
    number of post-FL iterations).
  """
  groups = tuple(groups)
  if not temperature > 0:
    raise ValueError(f"distillation temperature must be > 0, got {temperature}")
  execution = execution or ClientExecution(strategy="vmap")
  parts = GroupParts(groups, roles, execution)
  optimizer = local_optimizer(post_steps_lr, weight_decay, clip_norm)

  def stage2(server_params, g, personal, data, mask, rng):
    start = restrict(server_params, parts.trainable_view(g))
    rest = restrict(server_params, parts.rest_mask(g))
    plain = parts.objective(g, rest)
    keys = jax.random.split(rng, mask.shape[0])
    # (lambda override or None for the groups' own, its objective); a zero lambda is plain.
    students = [(None, parts.objective(g, rest, temperature)
                 if groups[g].per_task("distill_weight").any() else plain)]
    students += [(w, parts.objective(g, rest, temperature, w) if w else plain)
                 for w in distill_sweep]

    def one_client(personal_k, data_k, mask_k, key):
      key_t, key_s = jax.random.split(key)
      teacher, _ = client_update.train_steps(plain, optimizer, start, data_k, mask_k, key_t,
                                     execution.scan_unroll)
      with_teacher = {**data_k, TEACHER_KEY: parts.outputs(g, teacher, rest, data_k)}
      trained = []
      for _, objective in students:
        student, _ = client_update.train_steps(
            objective, optimizer, personal_k, with_teacher if objective is not plain else data_k,
            mask_k, key_s, execution.scan_unroll)
        trained.append(student)
      return teacher, trained[0], tuple(trained[1:])

    return execution.map(one_client)(personal, data, mask, keys)

  return parts, stage2


EVAL_MODES = ("global", "global_ft", "personal_fl", "personalized")


def sweep_mode(distill_weight: float) -> str:
  """The evaluation mode of the student distilled with lambda = `distill_weight` for every task
  (`make_evaluator`'s `distill_sweep`)."""
  return f"personalized_lambda{distill_weight:g}"


def make_evaluator(groups: Sequence[TAPGroup], roles: PyTree,
                   train: Sequence[FederatedData], test: Sequence[FederatedData], *,
                   post_steps: int = 50, batch_size: int = 32, eval_batch_size: int = 64,
                   post_lr: float = 1e-4, temperature: float = 1.0, seed: int = 0,
                   distill_sweep: Sequence[float] = (),
                   execution: ClientExecution | None = None,
                   compiler_options: Mapping[str, str] | None = None):
  """``evaluate(server_params, clients_tuple) -> metrics``: stage 2 for every client of every
  group, then the test metrics of four models per client (`EVAL_MODES`): ``global`` (FedAvg),
  ``global_ft`` (FedAvg + local fine-tuning), ``personal_fl`` (the personal model after stage 1;
  with ``replacement="none"`` this is Local training) and ``personalized`` (TAP).

  Metrics: ``<mode>/<group>/<metric>`` (example means over the group's test examples), and
  ``<mode>/<metric>`` the unweighted mean over the groups reporting that metric (groups differ
  in task, so an example-weighted pool would let the biggest task dominate), and
  ``<mode>/<group>/per_client_<metric>`` [N_g] per-client means (the summary's per-client
  spread; a client without test examples reads 0).

  `distill_sweep`: for each lambda, one more student (`post_fl`), reported as
  `sweep_mode(lambda)` (``personalized_lambda<lambda>``). A multi-task group also reports
  ``<mode>/<group>/<task>/<metric>`` over its test examples of each task.

  Stage 2 trains on every example of the client's training data (held-out validation examples
  included) for `post_steps` batches of `batch_size`, drawn with a fixed seed. The program is
  compiled once (first call), with `compiler_options` (XLA options) if given.
  """
  groups = tuple(groups)
  if not (len(train) == len(test) == len(groups)):
    raise ValueError(f"give one train and one test federation per group ({len(groups)}); got "
                     f"{len(train)} and {len(test)}")
  if post_steps < 1:
    raise ValueError(f"post_steps must be >= 1, got {post_steps}")
  parts, stage2 = post_fl(groups, roles, post_steps_lr=post_lr, temperature=temperature,
                          distill_sweep=distill_sweep, execution=execution)
  modes = EVAL_MODES + tuple(sweep_mode(w) for w in distill_sweep)
  if len(set(modes)) != len(modes):
    raise ValueError(f"distill_sweep {tuple(distill_sweep)} repeats a value")
  strip = lambda c: {k: v for k, v in c.data.items() if k != VALIDATION_KEY}
  # The data and the key are arguments, not closed-over constants: XLA would fold them into the
  # program, and a seed baked into it would defeat the persistent compilation cache. Test
  # batches are bucketed to powers of two for the same reason: client sizes vary by seed.
  post_data, test_data = [], []
  for tr, te in zip(train, test):
    post = make_cohort(tr, np.arange(tr.num_clients), steps=post_steps, batch_size=batch_size,
                       seed=seed, round_num=1 << 20)
    batches = evaluate_lib.test_batches(te, eval_batch_size, bucket=True)
    post_data.append((strip(post), post.mask))
    test_data.append((strip(batches), batches.mask))
  post_data, test_data = tuple(post_data), tuple(test_data)
  key = jax.random.key(seed)

  def run(server_params, client_states, post_data, test_data, key):
    out = {}
    for g, group in enumerate(groups):
      n = train[g].num_clients
      personal = jax.tree_util.tree_map(lambda x: x[:n], client_states[g].params)
      start = clients_lib.broadcast(restrict(server_params, parts.trainable_view(g)), n)
      teacher, student, swept = stage2(server_params, g, personal, *post_data[g],
                                       jax.random.fold_in(key, g))
      rest = restrict(server_params, parts.rest_mask(g))
      data, mask = test_data[g]
      for mode, models in zip(modes, (start, teacher, personal, student, *swept)):
        sums = jax.vmap(lambda m, d, mk: parts.evaluate_sums(g, m, rest, d, mk))(
            models, data, mask)
        out.update(split_task_metrics(evaluate_lib.metrics_from_sums(sums, f"{mode}/{group.name}"),
                                      group.task_names))
    for mode in modes:
      means = {}
      for name, value in out.items():   # "<mode>/<group>/<metric>" -> the metric's group means
        path = name.split("/")
        if len(path) == 3 and path[0] == mode and not path[2].startswith("per_client_"):
          means.setdefault(path[2], []).append(value)
      out.update({f"{mode}/{name}": sum(vals) / len(vals) for name, vals in means.items()})
    return out

  run = jax.jit(run, compiler_options=dict(compiler_options) if compiler_options else None)

  def evaluate(server_params, client_states):
    return run(server_params, client_states, post_data, test_data, key)

  return evaluate
