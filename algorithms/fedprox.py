"""FedProx: FedAvg with a proximal term on the local objective.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in Heterogeneous
Networks." MLSys 2020.

Local objective: h_k(w) = F_k(w) + mu/2 ||w - w_t||^2 over the shared parameters, with w_t the
global parameters received this round. mu = 0 is FedAvg. The paper's variable amount of local
work (gamma-inexact solutions) is expressed here by masked local steps: clients with fewer
examples take fewer real steps.
"""

from __future__ import annotations

from typing import Any

import optax

from fedjax_fm.chain import ChainConfig
from fedjax_fm.protocol import Algorithm, ClientExecution, LossFn
from fedjax_fm.fedavg_round import local_update_algorithm, make_client_optimizer


def fedprox(loss_fn: LossFn, roles: Any, *, mu: float = 0.01, client_lr: float = 0.1,
            server_lr: float = 1.0, client_optimizer: str = "sgd", weighted: bool = True,
            aggregation: ChainConfig | None = None, execution: ClientExecution | None = None) -> Algorithm:
  """FedProx with proximal coefficient `mu` (the paper tunes mu in {0.001, 0.01, 0.1, 1});
  `client_optimizer` "sgd" (the paper) or "adamw" (`make_client_optimizer`)."""
  if mu < 0:
    raise ValueError(f"FedProx mu must be >= 0, got {mu}")
  return local_update_algorithm(
      loss_fn, roles, make_client_optimizer(client_optimizer, client_lr), optax.sgd(server_lr),
      proximal_mu=mu,
      weighted=weighted, aggregation=aggregation, execution=execution)
