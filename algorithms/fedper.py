"""FedPer: federated learning with personalization layers.

Arivazhagan, Aggarwal, Singh, Choudhary. "Federated Learning with Personalization Layers."
arXiv:1912.00818, 2019.

The base layers are trained by everyone and averaged (FedAvg); the personalization layers (the
head in the paper) are trained by each client on its own data and never leave it. Which subtree
is personal is a regex over parameter paths (`personal`), decided once.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from fedjax_fm import roles as roles_lib
from fedjax_fm.chain import ChainConfig
from fedjax_fm.protocol import Algorithm, ClientExecution, LossFn
from fedjax_fm.fedavg_round import local_update_algorithm, make_client_optimizer


def fedper(loss_fn: LossFn, roles: Any, params: Any, *, personal: str = r"^head/",
           client_lr: float = 0.1, server_lr: float = 1.0, client_optimizer: str = "sgd",
           weighted: bool = True, aggregation: ChainConfig | None = None,
           execution: ClientExecution | None = None) -> Algorithm:
  """FedPer: leaves of `params` whose path matches `personal` become personal.

  Args:
    loss_fn: (params, batch, rng) -> (per-example loss, per-example metrics).
    roles: the model's roles (frozen leaves stay frozen).
    params: the parameters, to resolve `personal` against their paths.
    personal: regex over leaf paths ('a/b/kernel') selecting the personalization layers.
    client_optimizer: "sgd" or "adamw" (`make_client_optimizer`).
  """
  pers = roles_lib.assign_roles(params, personal=personal)
  roles = jax.tree_util.tree_map(
      lambda r, p: r if r == roles_lib.FROZEN else p, roles, pers)
  return local_update_algorithm(loss_fn, roles, make_client_optimizer(client_optimizer, client_lr),
                                optax.sgd(server_lr),
                                weighted=weighted, aggregation=aggregation,
                                execution=execution)
