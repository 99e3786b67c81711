"""Multi-host runs: JAX's multi-controller runtime, one global mesh, process-local data.

Every host runs the same program (`launch.py` with the same config). `initialize` joins the
processes into one JAX runtime (`jax.distributed`); from then on `jax.devices()` lists the
devices of all hosts, so `fedjax_fm.sharding.make_mesh` builds one global mesh whose ``clients``
axis spans hosts and the round compiles to one program with collectives between hosts. What
differs per process is only I/O:

- data: each process builds only its own rows of a round's cohort (`shard_cohort`) and the global
  arrays are assembled from those process-local pieces (`jax.make_array_from_process_local_data`);
- metrics: round metrics leave the jitted round already reduced (replicated); per-client
  evaluation arrays are gathered (`fetch`); process 0 alone writes metrics.jsonl, TensorBoard,
  plots and the summary (`is_main`), and alone prepares the workdir (`on_main`);
- checkpoints: orbax saves and restores with every process taking part, each writing its own
  shards (`fedjax_fm.checkpoint`).

On CPU, cross-process collectives go through gloo (`jax_cpu_collectives_implementation`), which
is how the 2-process test runs on one machine. A run's workdir must be a folder all processes
see: a shared file system, or a bucket mounted as one (gcsfuse), since the workdir is written
with plain file I/O.

Single-process runs never call `jax.distributed`, and every helper here is then the plain
single-process operation.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from fedjax_fm import sharding
from fedjax_fm.cohort import PADDING_ID, Cohort

PyTree = Any

# The environment variables by which `jax.distributed.initialize()` recognises a cluster (SLURM
# under srun, Open MPI under mpirun, GKE TPU pods, Kubernetes jobs; a Cloud TPU VM pod slice is
# found from its metadata server instead). The tests clear them to be outside any cluster.
CLUSTER_VARIABLES = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "OMPI_MCA_orte_hnp_uri",
                     "TPU_WORKER_HOSTNAMES", "KUBERNETES_SERVICE_HOST", "JAX_COORDINATOR_ADDRESS")


def _is_loopback(address: str) -> bool:
  host = address.rsplit(":", 1)[0].strip("[]")
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, from_environment: bool = False,
               timeout_s: int = 300) -> bool:
  """Joins this process to a multi-process JAX run, if asked; must run before JAX touches a
  device. Returns whether the run is multi-process.

  Args:
    coordinator: ``host:port`` of process 0's coordination service. Given, it needs
      `num_processes` and `process_id` too (explicit launch: any scheduler, or localhost).
      A loopback coordinator (127.0.0.1, ::1, localhost) is also bound to loopback only, so a
      single-machine run listens on no external interface.
    num_processes, process_id: the number of processes and this one's index (0 is the main
      process: it writes metrics and plots).
    from_environment: with no `coordinator`: let `jax.distributed.initialize()` read SLURM,
      Open MPI or Cloud TPU pod settings (one process per task / rank / TPU VM worker). Under
      SLURM and Open MPI jax then shows each process only the GPU of its local rank (one process
      per GPU); for one process per node set ``JAX_LOCAL_DEVICE_IDS=0,1,...`` to all its GPUs.
    timeout_s: how long to wait for all processes to join.

  Raises:
    ValueError: a partial explicit triple, or `from_environment` with no cluster around.
    RuntimeError: JAX already initialised its devices in this process (jax's own check).
  """
  explicit = (coordinator, num_processes, process_id)
  if all(v is None for v in explicit) and not from_environment:
    return False
  if any(v is None for v in explicit) and any(v is not None for v in explicit):
    raise ValueError("--coordinator, --num_processes and --process_id go together; give all "
                     "three, or --distributed alone to read them from SLURM / Open MPI / a TPU pod")
  if coordinator is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                     f"{num_processes}); number the processes 0..{num_processes - 1}")
  # Cross-process collectives on the CPU backend need an implementation (gloo is built into
  # jaxlib; "mpi" is the alternative). Set before the CPU client is created; an explicit
  # JAX_CPU_COLLECTIVES_IMPLEMENTATION from the user wins.
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(initialization_timeout=timeout_s)
  if coordinator is not None:
    kwargs.update(coordinator_address=coordinator, num_processes=num_processes,
                  process_id=process_id)
    if _is_loopback(coordinator):
      kwargs["coordinator_bind_address"] = coordinator
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:  # jax found no cluster to read the settings from
    if coordinator is not None:
      raise
    raise ValueError(f"--distributed: no SLURM, Open MPI or TPU pod environment found ({e}); "
                     "launch with srun / mpirun / on every TPU VM worker, or pass --coordinator, "
                     "--num_processes and --process_id") from e
  return jax.process_count() > 1


def is_main() -> bool:
  """Whether this is process 0, the one that writes metrics, plots and the summary."""
  return jax.process_index() == 0


def sync(name: str):
  """Blocks until every process reaches the barrier `name` (no-op in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def on_main(fn: Callable[[], Any], what: str):
  """Runs `fn` on process 0 only (workdir set-up: moving an old run aside, writing the config),
  and makes its failure everyone's: the other processes raise instead of waiting for a process
  that has already stopped.
  """
  if jax.process_count() == 1:
    return fn()
  error, result = None, None
  if is_main():
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except  # re-raised below, after telling all
      error = e
  ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
  if error is not None:
    raise error
  if not ok:
    raise ValueError(f"process 0 failed while {what}; its output names the problem")
  return result


def local_rows(num_rows: int, mesh) -> slice:
  """The rows of a `[num_rows, ...]` array sharded over ``clients`` that this process's
  devices hold (a contiguous block: `make_mesh` orders devices by process).

  Raises:
    ValueError: if this process's rows are not one contiguous block (a hand-built mesh that
      interleaves processes on the ``clients`` axis).
  """
  indices = sharding.client_sharding(mesh).addressable_devices_indices_map((num_rows,))
  rows = sorted({r for idx in indices.values() for r in range(*idx[0].indices(num_rows))})
  lo, hi = rows[0], rows[-1] + 1
  if len(rows) != hi - lo:
    raise ValueError(f"process {jax.process_index()} holds client rows {rows}, not one block; "
                     "build the mesh with fedjax_fm.sharding.make_mesh (devices in process order)")
  return slice(lo, hi)


def _pad_rows(cohort: Cohort, rows: int) -> Cohort:
  """Appends empty clients (masked, weight 0, `PADDING_ID`) up to `rows`: the same padding
  `fedjax_fm.cohort.pad_cohort` gives the whole cohort, applied to one process's piece."""
  extra = rows - cohort.num_clients
  pad = lambda a: np.concatenate([np.asarray(a), np.zeros((extra,) + a.shape[1:], a.dtype)])
  return Cohort(data={k: pad(v) for k, v in cohort.data.items()}, mask=pad(cohort.mask),
                weights=pad(cohort.weights),
                client_ids=np.concatenate([np.asarray(cohort.client_ids, np.int32),
                                           np.full(extra, PADDING_ID, np.int32)]))


def shard_cohort(make: Callable[[np.ndarray], Cohort], client_ids: np.ndarray, mesh) -> Cohort:
  """A round's cohort as global arrays sharded over ``clients``, each process building only
  its own rows.

  The cohort is padded with empty clients to a multiple of the ``clients`` axis, exactly as the
  runner pads a host cohort (`RoundRunner.place_cohort`), so the global arrays equal those of a
  single-process run and so do the results.

  Args:
    make: client ids `[k]` -> the host `Cohort` of those clients (`fedjax_fm.cohort.make_cohort`
      with the round's steps, batch size, seed and round number closed over).
    client_ids: the round's sampled client ids `[K]`.
    mesh: the global mesh.

  Returns:
    A `Cohort` of global `jax.Array`s `[K padded, ...]`.
  """
  client_ids = np.asarray(client_ids, np.int32)
  c = sharding.client_axis_size(mesh)
  rows = -(-len(client_ids) // c) * c
  padded = np.concatenate([client_ids, np.full(rows - len(client_ids), PADDING_ID, np.int32)])
  mine = padded[local_rows(rows, mesh)]
  local = _pad_rows(make(mine[mine != PADDING_ID]), len(mine))
  target = sharding.client_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(target, x, (rows,) + x.shape[1:]), local)


def fetch(tree: PyTree) -> PyTree:
  """Brings a tree of (possibly cross-host sharded) arrays to numpy on every process.

  A collective in a multi-process run: every process must call it with the same tree.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
