"""The device mesh and the placement of client-stacked state on it.

The mesh is declared in config as `((name, size), ...)`, with -1 meaning "the rest of the
devices"; it always has a ``clients`` axis. Every client-stacked leaf is sharded over ``clients``
on its leading axis (`client_sharding`); server state is replicated (the ``fsdp`` axis is for a
sharded frozen backbone). The same code runs on 1 device, on fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`) and on accelerators.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
CLIENTS = "clients"


def make_mesh(axes: Sequence[tuple[str, int]] = ((CLIENTS, -1),),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh from `((name, size), ...)`; one size may be -1 (= the remaining devices).

  Raises:
    ValueError: if there is no ``clients`` axis, more than one -1, or the sizes don't multiply
      to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  names = [n for n, _ in axes]
  sizes = [int(s) for _, s in axes]
  if CLIENTS not in names:
    raise ValueError(f"mesh {tuple(axes)} has no {CLIENTS!r} axis; add ('clients', -1)")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {tuple(axes)}: at most one axis may have size -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {tuple(axes)}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {tuple(axes)} needs {int(np.prod(sizes))} devices but "
                     f"{len(devices)} are available; set one size to -1")
  return Mesh(np.asarray(devices).reshape(sizes), tuple(names))


def client_axis_size(mesh: Mesh) -> int:
  return int(mesh.shape[CLIENTS])


def client_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis over ``clients``, the rest replicated."""
  return NamedSharding(mesh, P(CLIENTS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def client_shardings(tree: PyTree, mesh: Mesh) -> PyTree:
  """A sharding per leaf of a client-stacked tree (scalars, if any, replicated)."""
  cs, rep = client_sharding(mesh), replicated(mesh)
  return jax.tree_util.tree_map(lambda x: cs if np.ndim(x) >= 1 else rep, tree)


def constrain_clients(tree: PyTree, mesh: Mesh) -> PyTree:
  """Inside jit: keeps the leading client axis of every leaf on the mesh's ``clients`` axis."""
  return jax.tree_util.tree_map(
      lambda x: jax.lax.with_sharding_constraint(x, client_sharding(mesh)) if x.ndim else x,
      tree)


def check_divisible(num: int, mesh: Mesh, what: str):
  """Client-stacked arrays must split evenly over the ``clients`` axis."""
  c = client_axis_size(mesh)
  if num % c:
    raise ValueError(f"{what}={num} is not divisible by the mesh's {c} 'clients' devices; "
                     f"use a multiple of {c}")
