"""Simulated Byzantine clients: which sampled clients attack, and what they send instead of their
update (gradient flipping, scaling, pure noise).

Used by FFGG's Byzantine-robust variant (Mishchenko et al. 2023) and, as the `fedjax_fm.chain`
link `byzantine`, by any algorithm's server chain, to measure the robust aggregators (coordinate
median, trimmed mean, norm-bounded mean) under attack.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

ATTACKS = ("flip", "scale", "gaussian")


@dataclasses.dataclass(frozen=True)
class ByzantineAttack:
  """Which sampled clients attack and what they send instead of their update.

  Attributes:
    kind: ``"flip"``: send -scale * update (the paper's gradient flipping with scale 1);
      ``"scale"``: send scale * update; ``"gaussian"``: send N(0, noise_std^2) noise.
    fraction: attackers per round = floor(fraction * real clients of the cohort), chosen from the
      round key among the real (weight > 0) slots. Ignored when `client_ids` is set.
    client_ids: fixed attacking client ids (the rows of the stacked client state).
    scale: the factor of ``"flip"`` and ``"scale"``.
    noise_std: the standard deviation of ``"gaussian"``.
  """
  kind: str = "flip"
  fraction: float = 0.0
  client_ids: tuple[int, ...] | None = None
  scale: float = 1.0
  noise_std: float = 1.0

  def __post_init__(self):
    if self.kind not in ATTACKS:
      raise ValueError(f"unknown attack {self.kind!r}; use one of {ATTACKS}")
    if not 0.0 <= self.fraction <= 1.0:
      raise ValueError(f"attack fraction must be in [0, 1], got {self.fraction}")


def flip_update(update: PyTree, scale: float = 1.0) -> PyTree:
  """Gradient flipping: -scale * update."""
  return jax.tree_util.tree_map(lambda u: -scale * u, update)


def scale_update(update: PyTree, scale: float) -> PyTree:
  """A scaled update: scale * update."""
  return jax.tree_util.tree_map(lambda u: scale * u, update)


def gaussian_update(update: PyTree, rng: jax.Array, noise_std: float) -> PyTree:
  """Pure noise in the update's shape: N(0, noise_std^2) per coordinate."""
  leaves, treedef = jax.tree_util.tree_flatten(update)
  keys = jax.random.split(rng, max(len(leaves), 1))
  noise = [noise_std * jax.random.normal(key, u.shape, u.dtype) for key, u in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, noise)


def choose_attackers(rng: jax.Array, attack: ByzantineAttack, client_ids: jax.Array,
                     weights: jax.Array) -> jax.Array:
  """[K] bool: the attacking slots of a cohort (never a padding slot, weight 0)."""
  real = weights > 0
  if attack.client_ids is not None:
    return real & jnp.isin(client_ids, jnp.asarray(attack.client_ids, client_ids.dtype))
  scores = jnp.where(real, jax.random.uniform(rng, weights.shape), jnp.inf)
  rank = jnp.argsort(jnp.argsort(scores))  # 0 for the smallest score
  num = jnp.floor(attack.fraction * jnp.sum(real)).astype(rank.dtype)
  return real & (rank < num)


def apply_attack(updates: PyTree, is_attacker: jax.Array, attack: ByzantineAttack,
                 rng: jax.Array) -> PyTree:
  """Replaces the rows of the attackers of client-stacked `updates` by their attack."""
  if attack.kind == "flip":
    attacked = flip_update(updates, attack.scale)
  elif attack.kind == "scale":
    attacked = scale_update(updates, attack.scale)
  else:
    attacked = gaussian_update(updates, rng, attack.noise_std)
  pick = lambda a, u: jnp.where(is_attacker.reshape((-1,) + (1,) * (u.ndim - 1)), a, u)
  return jax.tree_util.tree_map(pick, attacked, updates)
