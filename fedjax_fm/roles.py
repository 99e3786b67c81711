"""Parameter roles: which leaves are frozen, shared (communicated) or personal.

A role is decided once per leaf, from the model and the config, and carried as a pytree of strings
with the structure of the parameters. Algorithms never test parameter names themselves: they ask
for the `shared` or `personal` part of a tree through `select` / `merge` and let the mask decide.

- `frozen`:   the foundation-model backbone; one copy, never on the client axis, never trained.
- `shared`:   trained by clients, sent up, aggregated, sent down (adapters, LoRA, FedAvg heads).
- `personal`: trained by clients, never leaves the client (FedPer's head, FFGG's y_m).

Example::

    roles = assign_roles(params, personal=r"head/", frozen=r"backbone/")
    shared = select(params, roles, SHARED)    # non-shared leaves become None
    params = merge(shared, select(params, roles, FROZEN), ...)
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import jax
import numpy as np

FROZEN = "frozen"
SHARED = "shared"
PERSONAL = "personal"
ROLES = (FROZEN, SHARED, PERSONAL)

PyTree = Any


def leaf_path(path) -> str:
  """Renders a jax key path as 'a/b/0/c', the form role patterns match against."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def assign_roles(params: PyTree, *, frozen: str | None = None, personal: str | None = None,
                 default: str = SHARED) -> PyTree:
  """Assigns a role to every leaf from regular expressions over its path.

  Args:
    params: the parameter pytree.
    frozen: regex; leaves whose path matches (re.search) are frozen.
    personal: regex; leaves whose path matches are personal. Checked before `frozen`.
    default: role of every other leaf.

  Returns:
    A pytree of role strings with the structure of `params`.

  Raises:
    ValueError: if a pattern matches no leaf (almost always a typo in the config), or `default`
      is not a role.
  """
  if default not in ROLES:
    raise ValueError(f"unknown default role {default!r}; use one of {ROLES}")
  paths = [leaf_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  for name, pattern in (("personal", personal), ("frozen", frozen)):
    if pattern and not any(re.search(pattern, p) for p in paths):
      raise ValueError(f"{name} pattern {pattern!r} matches no parameter; paths look like "
                       f"{paths[:3]}")

  def role(path, _):
    p = leaf_path(path)
    if personal and re.search(personal, p):
      return PERSONAL
    if frozen and re.search(frozen, p):
      return FROZEN
    return default

  return jax.tree_util.tree_map_with_path(role, params)


def component_roles(params: PyTree, component_of: Callable[[str], str],
                    selects: Callable[[str, str], bool], *, trainable: Iterable[str],
                    personal: Iterable[str] = (), check: Iterable[str] = ()) -> PyTree:
  """Roles by model component (a model family's `*_roles`: `transformer_roles`,
  `decoder_roles`): a leaf whose component a `personal` name selects is personal, else one a
  `trainable` name selects is shared, else frozen.

  Args:
    params: the parameter pytree (arrays or shapes).
    component_of: a leaf path -> its component name (e.g. ``"lora_q"``, ``"head"``).
    selects: (a name from the config, a component) -> whether the name covers it (a family's
      group names, e.g. ``"lora"`` for every ``lora_<target>``).
    trainable, personal: component names.
    check: the names that must select some component (those the user gave).

  Raises:
    ValueError: for a `check` name that selects no component (a typo or a missing part).
  """
  trainable, personal = tuple(trainable), tuple(personal)
  components = {component_of(leaf_path(p)) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  for name in check:
    if not any(selects(name, c) for c in components):
      raise ValueError(f"component {name!r} matches no parameter; the model has "
                       f"{sorted(components)}")

  def role(path, _):
    component = component_of(leaf_path(path))
    if any(selects(n, component) for n in personal):
      return PERSONAL
    if any(selects(n, component) for n in trainable):
      return SHARED
    return FROZEN

  return jax.tree_util.tree_map_with_path(role, params)


def _check(roles: PyTree, wanted: Iterable[str]):
  for r in wanted:
    if r not in ROLES:
      raise ValueError(f"unknown role {r!r}; use one of {ROLES}")


def select(tree: PyTree, roles: PyTree, *wanted: str) -> PyTree:
  """Keeps the leaves whose role is in `wanted`; others become None (an empty subtree)."""
  _check(roles, wanted)
  return jax.tree_util.tree_map(lambda r, x: x if r in wanted else None, roles, tree)


def merge(*parts: PyTree) -> PyTree:
  """Recombines trees produced by `select` (None = absent) into one; the first present leaf wins."""

  def first(*xs):
    for x in xs:
      if x is not None:
        return x
    return None

  return jax.tree_util.tree_map(first, *parts, is_leaf=lambda x: x is None)


def count(roles: PyTree, params: PyTree, role: str) -> int:
  """Number of scalar parameters with the given role."""
  return sum(int(np.prod(x.shape)) for r, x in zip(jax.tree_util.tree_leaves(roles),
                                                    jax.tree_util.tree_leaves(params)) if r == role)


def tree_bytes(tree: PyTree) -> int:
  """Bytes held by the array leaves of `tree` (None leaves count zero)."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))
