"""Placement of a transformer's parameters on a device mesh: FSDP for the frozen backbone.

The frozen backbone is the bulk of a foundation model's memory and has exactly one copy
(DESIGN.md: never on the client axis). On a mesh with an ``fsdp`` axis, each backbone matrix is
split over ``fsdp`` along its largest dimension that the axis size divides (ZeRO-3 / FSDP style,
Rajbhandari et al. 2020); XLA's SPMD partitioner gathers it where a matmul needs it. Everything
else (vectors, adapters, LoRA, heads: the small trained parts) is replicated, and client-stacked
copies of those are placed by `fedjax_fm.sharding`.

Example::

    mesh = sharding.make_mesh((("clients", 2), ("fsdp", 4)))
    params = shard_params(params, mesh, roles)        # backbone split over fsdp
    out = jax.jit(forward)(params, batch)             # same values as unsharded
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_fm import roles as roles_lib
from fedjax_fm.models.transformer import parameter_component

PyTree = Any
FSDP = "fsdp"


def fsdp_spec(shape: Sequence[int], fsdp_size: int, axis: str = FSDP) -> P:
  """The PartitionSpec of one backbone array: its largest dimension divisible by `fsdp_size`
  over `axis` (the first such on ties); replicated for vectors and scalars, when no dimension
  divides, or when `fsdp_size` is 1."""
  if len(shape) < 2 or fsdp_size <= 1:
    return P()
  divisible = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
  if not divisible:
    return P()
  dim = max(divisible, key=lambda i: (shape[i], -i))
  return P(*[axis if i == dim else None for i in range(len(shape))])


def param_specs(params: PyTree, fsdp_size: int, roles: PyTree | None = None,
                axis: str = FSDP) -> PyTree:
  """A PartitionSpec per leaf: FSDP for frozen (backbone) arrays, replicated otherwise.

  Args:
    params: the parameter tree (arrays or `jax.ShapeDtypeStruct`s).
    fsdp_size: the size of the mesh's `axis`.
    roles: the role tree; frozen leaves are sharded. If None, the backbone by path
      (`transformer.parameter_component`) is.
    axis: the mesh axis name.
  """
  if roles is None:
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (fsdp_spec(x.shape, fsdp_size, axis)
                         if parameter_component(roles_lib.leaf_path(path)) == "backbone"
                         else P()), params)
  return jax.tree_util.tree_map(
      lambda r, x: fsdp_spec(x.shape, fsdp_size, axis) if r == roles_lib.FROZEN else P(),
      roles, params)


def param_shardings(params: PyTree, mesh: Mesh, roles: PyTree | None = None,
                    axis: str = FSDP) -> PyTree:
  """The NamedSharding tree of `params` on `mesh` (see `param_specs`).

  A mesh without `axis` gets everything replicated, so the same code runs on any mesh.
  """
  size = int(mesh.shape[axis]) if axis in mesh.axis_names else 1
  specs = param_specs(params, size, roles, axis)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda s: isinstance(s, P))


def shard_params(params: PyTree, mesh: Mesh, roles: PyTree | None = None,
                 axis: str = FSDP) -> PyTree:
  """`params` placed on `mesh` with `param_shardings`."""
  return jax.device_put(params, param_shardings(params, mesh, roles, axis))
