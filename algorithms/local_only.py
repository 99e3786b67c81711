"""Local: every client trains its own copy and nothing is communicated.

The standard lower/upper reference of personalized FL (e.g. Pillutla et al. 2022, "Federated
Learning with Partial Model Personalization"): each client starts from the same initial
parameters and only ever trains on its own data. Every trainable leaf is personal, so the
server state never changes and the bytes sent per round are zero.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from fedjax_fm import roles as roles_lib
from fedjax_fm.chain import ChainConfig
from fedjax_fm.protocol import Algorithm, ClientExecution, LossFn
from fedjax_fm.fedavg_round import local_update_algorithm, make_client_optimizer


def local_only(loss_fn: LossFn, roles: Any, *, client_lr: float = 0.1,
               client_optimizer: str = "sgd", aggregation: ChainConfig | None = None,
               execution: ClientExecution | None = None) -> Algorithm:
  """Local training: `shared` leaves of `roles` become personal; frozen stay frozen.
  `client_optimizer`: "sgd" or "adamw" (`make_client_optimizer`)."""
  personal = jax.tree_util.tree_map(
      lambda r: roles_lib.FROZEN if r == roles_lib.FROZEN else roles_lib.PERSONAL, roles)
  return local_update_algorithm(loss_fn, personal,
                                make_client_optimizer(client_optimizer, client_lr), optax.sgd(1.0),
                                aggregation=aggregation, execution=execution)
