"""Compiles an algorithm's round once for a mesh and runs it.

`RoundRunner` wraps `alg.round` in one `jax.jit` with explicit shardings (server state
replicated, or its parameters placed as given, e.g. a frozen backbone FSDP-sharded with
`fedjax_fm.models.partitioning.param_shardings`; client-stacked state and cohorts sharded over
``clients``), donated state and
per-backend XLA options (`default_compiler_options`), and counts how often the round was traced
and compiled: a run must compile its round exactly once.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fedjax_fm import sharding
from fedjax_fm.protocol import Algorithm, ServerState
from fedjax_fm.cohort import Cohort, pad_cohort

PyTree = Any


# XLA:CPU hands convolutions to YNNPACK by default, which measured slower for these small
# per-client convolutions than XLA's own (BENCHMARKS.md); dots and reductions keep it.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.lru_cache(maxsize=None)
def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib's XLA knows `options` (the YNN one is experimental and may go away:
  an unknown option fails every compile, so it is tried once on a trivial program)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(1.0).compile()
    return True
  except Exception:  # pylint: disable=broad-except  # XLA reports unknown flags variously
    return False


def default_compiler_options() -> dict[str, str]:
  """XLA options for the round on this backend (none off the CPU, none XLA does not know)."""
  if jax.default_backend() != "cpu":
    return {}
  options = tuple(sorted(CPU_COMPILER_OPTIONS.items()))
  if not _accepted(options):
    warnings.warn(f"this XLA does not accept {dict(options)}; compiling the round without them")
    return {}
  return dict(options)


class RoundRunner:
  """One compiled round of `alg` on `mesh`.

  Example::

    runner = RoundRunner(alg, mesh)
    server, clients = runner.place(alg.init(params, rng), alg.init_clients(params, n))
    for r in range(rounds):
      server, clients, metrics = runner(server, clients, cohort_r, key_r)
    assert runner.compilations == 1
  """

  def __init__(self, alg: Algorithm, mesh: Mesh, donate: bool = True,
               compiler_options: dict[str, str] | None = None,
               param_shardings: PyTree | None = None,
               cohort_sharding: PyTree | None = None):
    """
    Args:
      alg: the algorithm.
      mesh: the device mesh (with a ``clients`` axis).
      donate: donate the server and client state to the round (halves their memory).
      compiler_options: XLA options; `default_compiler_options()` if None.
      param_shardings: shardings of the server parameters (a tree over all parameters, e.g.
        from `param_shardings(params, mesh, roles)`; leaves whose parameter is absent from the
        server state are ignored). None: replicated.
      cohort_sharding: the cohort's shardings (a `Cohort`-shaped prefix), e.g. each client's
        batch split over ``fsdp`` too; None: client rows over ``clients``.
    """
    self.alg, self.mesh = alg, mesh
    self.traces = 0
    rep = sharding.replicated(mesh)
    cs = sharding.client_sharding(mesh)
    # A ServerState-shaped prefix: parameters as given, everything else replicated.
    self.server_sharding = rep if param_shardings is None else ServerState(
        round=rep, params=param_shardings, opt_state=rep, extra=rep, chain=rep)

    def traced_round(server, clients, cohort, rng):
      self.traces += 1  # Python side effect: runs once per trace, never per call.
      return alg.round(server, clients, cohort, rng)

    if compiler_options is None:
      compiler_options = default_compiler_options()
    self.cohort_sharding = cs if cohort_sharding is None else cohort_sharding
    self._round = jax.jit(traced_round,
                          in_shardings=(self.server_sharding, cs, self.cohort_sharding, rep),
                          out_shardings=(self.server_sharding, cs, rep),
                          donate_argnums=(0, 1) if donate else (),
                          compiler_options=compiler_options or None)

  @property
  def compilations(self) -> int:
    """Executables compiled for the round so far (1 in a healthy run)."""
    return self._round._cache_size()  # pylint: disable=protected-access

  def place(self, server: ServerState, clients: PyTree) -> tuple[ServerState, PyTree]:
    """Puts server state replicated and client state sharded over ``clients`` on the mesh.

    Always copies: the round donates its state, which must never delete arrays the caller
    still holds (the initial parameters, say).
    """
    # alg.init_clients(params, padded_rows(num_clients, mesh)) makes this hold; a grouped
    # algorithm keeps a tuple of per-group stacked states, each split over ``clients``.
    for group in (clients if isinstance(clients, tuple) else (clients,)):
      n = jax.tree_util.tree_leaves(group)
      if n:
        sharding.check_divisible(n[0].shape[0], self.mesh, "the number of client-state rows")
    # An explicit copy first: device_put(..., may_alias=False) onto a multi-device sharding
    # still lets shard 0 share the source buffer, which the first donated round would delete.
    server, clients = jax.tree_util.tree_map(jnp.copy, (server, clients))
    server = jax.device_put(server, self.server_sharding, may_alias=False)
    clients = jax.device_put(clients, sharding.client_shardings(clients, self.mesh),
                             may_alias=False)
    return server, clients

  def place_cohort(self, cohort: Cohort | tuple[Cohort, ...]) -> Cohort | tuple[Cohort, ...]:
    """Shards a cohort (or a grouped algorithm's tuple of per-group cohorts) over ``clients``,
    each padded with empty clients to split evenly."""
    size = sharding.client_axis_size(self.mesh)
    cohort = (tuple(pad_cohort(c, size) for c in cohort) if isinstance(cohort, tuple)
              else pad_cohort(cohort, size))
    return jax.device_put(cohort, self.cohort_sharding)

  def lower(self, server: ServerState, clients: PyTree, cohort: Cohort,
            rng: jax.Array) -> jax.stages.Lowered:
    """The round lowered for these arguments (arrays or `jax.ShapeDtypeStruct`s; the cohort
    padded to split over ``clients``): ``.compile()`` and its ``memory_analysis()`` /
    ``cost_analysis()`` plan a round without running it (`benchmarks/llm_plan.py`)."""
    return self._round.lower(server, clients, cohort, rng)

  def __call__(self, server: ServerState, clients: PyTree, cohort: Cohort,
               rng: jax.Array) -> tuple[ServerState, PyTree, dict[str, jax.Array]]:
    return self._round(server, clients, self.place_cohort(cohort), rng)


def padded_rows(num_clients: int, mesh: Mesh) -> int:
  """Rows of the stacked client state: `num_clients` rounded up to split over ``clients``."""
  c = sharding.client_axis_size(mesh)
  return int(np.ceil(num_clients / c) * c)
