"""FedAvg: Federated Averaging.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of Deep
Networks from Decentralized Data." AISTATS 2017.

Each sampled client runs local SGD from the global parameters; the server replaces them by the
example-weighted mean of the clients' results, `w <- w + server_lr * sum_k n_k (w_k - w) / sum n_k`
(server_lr = 1 is the paper's algorithm).

Example::

    alg = fedavg(loss_fn, roles, client_lr=0.1)
    state = alg.init(params, rng)
"""

from __future__ import annotations

from typing import Any

import optax

from fedjax_fm.chain import ChainConfig
from fedjax_fm.protocol import Algorithm, ClientExecution, LossFn
from fedjax_fm.fedavg_round import local_update_algorithm, make_client_optimizer


def fedavg(loss_fn: LossFn, roles: Any, *, client_lr: float = 0.1, server_lr: float = 1.0,
           client_momentum: float | None = None, client_optimizer: str = "sgd",
           weighted: bool = True, aggregation: ChainConfig | None = None,
           execution: ClientExecution | None = None) -> Algorithm:
  """FedAvg with SGD on the clients and `sgd(server_lr)` on the server.

  Args:
    loss_fn: (params, batch, rng) -> (per-example loss, per-example metrics).
    roles: role pytree; `shared` leaves are averaged, `personal` leaves stay on clients.
    client_lr: local SGD step size.
    server_lr: server step size on the mean delta (1.0 = plain averaging).
    client_momentum: optional local SGD momentum.
    client_optimizer: "sgd" (the paper) or "adamw" (`make_client_optimizer`).
    weighted: weight clients by example count (the paper) or equally.
    aggregation: the server chain (`fedjax_fm.chain.ChainConfig`); None: the weighted mean.
    execution: how clients run in the program; see `ClientExecution`.
  """
  return local_update_algorithm(
      loss_fn, roles, make_client_optimizer(client_optimizer, client_lr, client_momentum),
      optax.sgd(server_lr),
      weighted=weighted, aggregation=aggregation, execution=execution)
