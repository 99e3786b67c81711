"""The algorithm contract and its typed, immutable state.

An algorithm is a factory that closes over its hyperparameters and returns pure functions, the
shape of optax's `GradientTransformation` and fedjax's `FederatedAlgorithm`::

    alg = fedavg(loss_fn, roles, client_optimizer=optax.sgd(0.1))
    server_state = alg.init(params, rng)
    client_states = alg.init_clients(params, num_clients)
    server_state, client_states, metrics = alg.round(server_state, client_states, cohort, rng)

`round` is traced once and compiled once per run by the runner (`fedjax_fm.runner`); it must be
a pure function of its arguments with every hyperparameter closed over, never a pytree leaf.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from fedjax_fm import clients as clients_lib, roles as roles_lib, sharding

PyTree = Any
# loss_fn(params, batch, rng) -> (per-example loss [B], {metric name: per-example value [B]}).
LossFn = Callable[[PyTree, Mapping[str, jax.Array], jax.Array],
                  tuple[jax.Array, Mapping[str, jax.Array]]]


@struct.dataclass
class ServerState:
  """What the server holds between rounds.

  Attributes:
    round: the number of rounds completed (an int32 scalar array, so it lives in the state).
    params: the global parameters: `shared` and `frozen` leaves; `personal` leaves are None.
    opt_state: the server optimizer's state (opaque; only its optimizer reads it).
    extra: algorithm-specific server state (empty for the baselines).
    chain: the state of the server chain's links other than the optimizer (an adaptive clip
      norm, say; `fedjax_fm.chain.ChainState.links`), checkpointed with the rest.
  """
  round: jax.Array
  params: PyTree
  opt_state: Any
  extra: Any = None
  chain: Any = ()


class Algorithm(NamedTuple):
  """A federated algorithm: pure `init`, `init_clients` and `round` functions.

  Attributes:
    init: (params, rng) -> ServerState.
    init_clients: (params, num_clients) -> client-stacked personal state (leading axis N).
    round: (server_state, client_states, cohort, rng) -> (server_state, client_states, metrics).
    bytes_per_client: (down, up) bytes one sampled client receives and sends per round.
    personal_rows: (client states) -> the personal-parameter rows an evaluator merges with the
      server parameters, where the client state holds more (a chain link's error-feedback
      residual); None: the client state is those rows.
  """
  init: Callable[[PyTree, jax.Array], ServerState]
  init_clients: Callable[[PyTree, int], PyTree]
  round: Callable[..., tuple[ServerState, PyTree, Mapping[str, jax.Array]]]
  bytes_per_client: Callable[[PyTree], tuple[int, int]]
  personal_rows: Callable[[PyTree], PyTree] | None = None


def stacked_personal(params: PyTree, roles: PyTree, num_clients: int) -> PyTree:
  """`init_clients` of most algorithms: every client starts from the initial personal leaves,
  stacked on a leading client axis (an empty tree when nothing is personal)."""
  personal = roles_lib.select(params, roles, roles_lib.PERSONAL)
  return jax.tree_util.tree_map(lambda x: jnp.array(clients_lib.broadcast(x, num_clients)),
                                personal)


def shared_bytes(params: PyTree, roles: PyTree) -> tuple[int, int]:
  """`bytes_per_client` when exactly the shared leaves go down and come back up."""
  n = roles_lib.tree_bytes(roles_lib.select(params, roles, roles_lib.SHARED))
  return n, n


@dataclasses.dataclass(frozen=True)
class ClientExecution:
  """How the clients of a round run inside the one compiled program (identical results).

  Attributes:
    strategy: ``"vmap"`` (all clients in one vmap; the GPU/TPU path), ``"chunked"`` (vmap over
      chunks of `chunk_size`, chunks unrolled), ``"unrolled"`` (each client traced separately)
      or ``"sequential"`` (a loop over groups of `chunk_size` clients; the XLA:CPU path).
    chunk_size: clients per chunk for ``"chunked"`` and per loop iteration for ``"sequential"``.
    scan_unroll: `unroll` of the `lax.scan` over local steps: 1 keeps a loop, True unrolls it
      fully (faster per round, longer to compile; see BENCHMARKS.md).
    mesh: if set, every client-stacked value in the round is constrained to the mesh's
      ``clients`` axis (`constrain`).
  """
  strategy: str = "vmap"
  chunk_size: int = 8
  scan_unroll: int | bool = 1
  mesh: Mesh | None = None

  def __post_init__(self):
    if self.strategy not in clients_lib.EXECUTION_STRATEGIES:
      raise ValueError(f"unknown client execution strategy {self.strategy!r}; use one of "
                       f"{clients_lib.EXECUTION_STRATEGIES}")

  def map(self, fn: Callable[..., PyTree], in_axes: Any = 0) -> Callable[..., PyTree]:
    return clients_lib.map_clients(fn, self.strategy, self.chunk_size, in_axes)

  def map_sum(self, fn: Callable[..., tuple[PyTree, PyTree]],
              in_axes: Any = 0) -> Callable[..., tuple[PyTree, PyTree]]:
    """`clients.map_sum_clients`: (sum over clients of fn's first output, stacked second)."""
    return clients_lib.map_sum_clients(fn, self.strategy, self.chunk_size, in_axes)

  def constrain(self, tree: PyTree) -> PyTree:
    """Keeps a client-stacked tree's leading axis on the mesh's ``clients`` axis (in jit)."""
    return tree if self.mesh is None else sharding.constrain_clients(tree, self.mesh)


def default_execution(mesh: Mesh | None = None) -> ClientExecution:
  """The fastest way to run a cohort on this backend (measured in BENCHMARKS.md).

  On GPU/TPU: one `vmap` over all clients. On XLA:CPU, `vmap` over per-client convolution
  kernels lowers to slow grouped convolutions, so clients run one at a time in a loop with up to
  5 local steps unrolled per iteration of the step loop (`scan_unroll=5`): the program holds 5
  copies of a step whatever the cohort and the number of steps, as the previous default (groups
  of 5 clients, steps rolled) did, and measured 1.16x faster on W1 under load with the same
  warm-up (BENCHMARKS.md, "Issue 20").
  """
  if jax.default_backend() == "cpu":
    return ClientExecution(strategy="sequential", chunk_size=1, scan_unroll=5, mesh=mesh)
  return ClientExecution(strategy="vmap", mesh=mesh)
