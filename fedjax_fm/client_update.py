"""One client's local training: a `lax.scan` of optimizer steps over its masked batches.

The functions here see one client. The round maps them over the client axis
(`ClientExecution.map`), so a whole cohort's local training is one program.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from fedjax_fm.protocol import LossFn

PyTree = Any
# objective(trainable, batch, mask, rng) -> (scalar loss, {name: summed metric}).
Objective = Callable[[PyTree, Mapping[str, jax.Array], jax.Array, jax.Array],
                     tuple[jax.Array, Mapping[str, jax.Array]]]


def masked_loss(loss_fn: LossFn, params: PyTree, batch: Mapping[str, jax.Array],
                mask: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean loss over the real examples of a batch, and metric sums for reporting.

  Returns:
    (loss, sums) where loss = sum(mask * l) / max(sum(mask), 1) and sums holds
    ``loss_sum``, ``count`` and ``<name>_sum`` for each per-example metric of `loss_fn`.
  """
  live = mask > 0
  # Padded slots are zeroed before the loss sees them: masking the loss alone is not enough,
  # since the backward pass would still form 0 * d(loss)/d(input) = NaN at a non-finite input.
  batch = jax.tree_util.tree_map(
      lambda a: jnp.where(live.reshape(live.shape + (1,) * (a.ndim - live.ndim)), a,
                          jnp.zeros_like(a)), batch)
  per_example, metrics = loss_fn(params, batch, rng)
  masked_sum = lambda v: jnp.sum(jnp.where(live, v * mask, 0.0))  # where: padding may be inf
  count = jnp.sum(mask)
  loss_sum = masked_sum(per_example)
  sums = {"loss_sum": loss_sum, "count": count}
  sums.update({f"{k}_sum": masked_sum(v) for k, v in metrics.items()})
  return loss_sum / jnp.maximum(count, 1.0), sums


def train_steps(objective: Objective, optimizer: optax.GradientTransformation,
                trainable: PyTree, batches: Mapping[str, jax.Array], mask: jax.Array,
                rng: jax.Array, unroll: int | bool = 1) -> tuple[PyTree, dict[str, jax.Array]]:
  """Runs one optimizer step per batch (leading axis = steps); a step with no real example
  leaves parameters and optimizer state untouched, so padded clients train exactly on their data.

  Args:
    objective: (trainable, batch, mask, rng) -> (loss, metric sums).
    optimizer: the client optimizer (optax); its state starts fresh every round.
    trainable: the parameters being trained.
    batches: leaves `[steps, batch, ...]`.
    mask: `[steps, batch]`.
    rng: this client's key; split per step.
    unroll: `unroll` for `lax.scan` (True = fully unrolled).

  Returns:
    (trained parameters, metric sums over all steps, measured before each step's update).
  """
  grad_fn = jax.grad(objective, has_aux=True)
  steps = mask.shape[0]

  def step(carry, inputs):
    params, opt_state = carry
    batch, m, key = inputs
    grads, sums = grad_fn(params, batch, m, key)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    live = jnp.sum(m) > 0
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(live, a, b), new, old)
    return (keep(new_params, params), keep(new_opt_state, opt_state)), sums

  keys = jax.random.split(rng, steps)
  (trainable, _), sums = jax.lax.scan(step, (trainable, optimizer.init(trainable)),
                                      (batches, mask, keys), unroll=unroll)
  return trainable, jax.tree_util.tree_map(lambda s: jnp.sum(s, axis=0), sums)
