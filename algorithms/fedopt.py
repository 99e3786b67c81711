"""FedOpt: adaptive server optimizers on the FedAvg pseudo-gradient.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive Federated
Optimization." ICLR 2021 (FedAdam, FedYogi, FedAdagrad); Hsu, Qi, Brown. "Measuring the Effects
of Non-Identical Data Distribution for Federated Visual Classification." 2019 (FedAvgM).

The server treats Delta_t = -sum_k n_k (w_k - w_t) / sum n_k as a gradient and feeds it to an
optax optimizer. The paper's adaptivity eps (tau) defaults to 1e-3. The paper's Adam and Yogi
use no bias correction; optax's `adam` and `yogi` do (and optax's yogi starts both moments at
1e-6), so the first server steps differ slightly from the paper's pseudo-code; with many rounds
the difference vanishes.
"""

from __future__ import annotations

from typing import Any

import optax

from fedjax_fm.chain import ChainConfig
from fedjax_fm.protocol import Algorithm, ClientExecution, LossFn
from fedjax_fm.fedavg_round import local_update_algorithm

SERVER_OPTIMIZERS = ("adam", "yogi", "adagrad", "avgm")


def server_optimizer(name: str, lr: float, *, b1: float = 0.9, b2: float = 0.99,
                     eps: float = 1e-3, momentum: float = 0.9) -> optax.GradientTransformation:
  """The server optimizer of a FedOpt variant by name (see `SERVER_OPTIMIZERS`)."""
  if name == "adam":
    return optax.adam(lr, b1=b1, b2=b2, eps=eps)
  if name == "yogi":
    return optax.yogi(lr, b1=b1, b2=b2, eps=eps)
  if name == "adagrad":
    return optax.adagrad(lr, eps=eps)
  if name == "avgm":
    return optax.sgd(lr, momentum=momentum)
  raise ValueError(f"unknown FedOpt server optimizer {name!r}; use one of {SERVER_OPTIMIZERS}")


def fedopt(loss_fn: LossFn, roles: Any, *, server: str = "adam", server_lr: float = 1e-2,
           client_lr: float = 0.1, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3,
           momentum: float = 0.9, weighted: bool = True,
           aggregation: ChainConfig | None = None,
           execution: ClientExecution | None = None) -> Algorithm:
  """FedAdam / FedYogi / FedAdagrad / FedAvgM by `server` name."""
  opt = server_optimizer(server, server_lr, b1=b1, b2=b2, eps=eps, momentum=momentum)
  return local_update_algorithm(loss_fn, roles, optax.sgd(client_lr), opt, weighted=weighted,
                                aggregation=aggregation, execution=execution)


def fedadam(loss_fn: LossFn, roles: Any, *, server_lr: float = 1e-2, client_lr: float = 0.1,
            b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3, weighted: bool = True,
            aggregation: ChainConfig | None = None,
            execution: ClientExecution | None = None) -> Algorithm:
  """FedAdam: `fedopt` with ``server="adam"``."""
  return fedopt(loss_fn, roles, server="adam", server_lr=server_lr, client_lr=client_lr, b1=b1,
                b2=b2, eps=eps, weighted=weighted, aggregation=aggregation,
                execution=execution)


def fedyogi(loss_fn: LossFn, roles: Any, *, server_lr: float = 1e-2, client_lr: float = 0.1,
            b1: float = 0.9, b2: float = 0.99, eps: float = 1e-3, weighted: bool = True,
            aggregation: ChainConfig | None = None,
            execution: ClientExecution | None = None) -> Algorithm:
  """FedYogi: `fedopt` with ``server="yogi"``."""
  return fedopt(loss_fn, roles, server="yogi", server_lr=server_lr, client_lr=client_lr, b1=b1,
                b2=b2, eps=eps, weighted=weighted, aggregation=aggregation,
                execution=execution)


def fedavgm(loss_fn: LossFn, roles: Any, *, server_lr: float = 1.0, momentum: float = 0.9,
            client_lr: float = 0.1, weighted: bool = True,
            aggregation: ChainConfig | None = None,
            execution: ClientExecution | None = None) -> Algorithm:
  """FedAvgM: `fedopt` with ``server="avgm"`` (server SGD with momentum)."""
  return fedopt(loss_fn, roles, server="avgm", server_lr=server_lr, momentum=momentum,
                client_lr=client_lr, weighted=weighted, aggregation=aggregation,
                execution=execution)
