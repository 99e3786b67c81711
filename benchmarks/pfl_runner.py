"""The pfl-research row of the round-throughput benchmark (runner name ``pfl``).

pfl-research's own simulator runs the round: `SimulatedBackend` over a `FederatedDataset` whose
users are the pre-built cohort's clients (in cohort order, each client's examples in the order
of its cohort batches, so pfl's local batches are the engine's), `FederatedAveraging` with
`NNAlgorithmParams` / `NNTrainHyperParams` (one local epoch, the workload's batch size and
client lr), a `PyTorchModel` with `torch.optim.SGD` locally and `torch.optim.SGD(lr=server_lr)`
centrally. One benchmark round is one iteration of pfl's training loop
(`FederatedAlgorithm.run`'s body: `get_next_central_contexts`, `run_train_eval`,
`process_aggregated_statistics_from_all_contexts`) with pfl's callbacks off: no platform
metrics, no default callbacks, no evaluation (evaluation_frequency larger than any round).

pfl averages users' model differences with weight 1 each; the engine weights by example
counts. The workloads give every client the same number of examples, so both are the same
mean (checked in `step`).

pfl pins an older dp-accounting / absl-py than fedjax_fm, so it lives in its own virtual
environment that sees the rest (BENCHMARKS.md):

  python -m venv --system-site-packages /tmp/pflvenv
  /tmp/pflvenv/bin/pip install "pfl[pytorch]==0.6.0" -c <(echo torch==2.13.0)
  /tmp/pflvenv/bin/python benchmarks/round_throughput.py --runners "fedjax_fm[default],pfl"
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def available() -> bool:
  try:
    import pfl  # pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


def pfl_runner(torch, module, trainable: dict, user_data: Callable, *, batch_size: int,
               client_lr: float, server_lr: float):
  """A benchmark step running one pfl-research FedAvg round per call.

  Args:
    torch: the torch module.
    module: a `torch.nn.Module` with pfl's `loss(*batch)` and `metrics(*batch)` methods; its
      parameters with `requires_grad` are what pfl trains and averages.
    trainable: {JAX parameter path: torch parameter} of the trained parameters, for `shared()`
      (kernels are stored transposed, as `torch.nn.Linear` keeps them).
    user_data: cohort -> list over clients of [tensor, ...] (one client's examples, the
      arguments of `module.loss` stacked on a leading example axis).
    batch_size, client_lr, server_lr: the workload's local batch size and learning rates.
  """
  try:
    # pylint: disable=g-import-not-at-top
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.algorithm import algorithm_utils
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNTrainHyperParams
    from pfl.model.pytorch import PyTorchModel
  except ImportError as e:
    raise ImportError(f"the pfl row needs pfl-research ({e}); see benchmarks/pfl_runner.py "
                      "for its environment") from e

  current = {"users": None}

  def next_user():  # pfl's user sampler: the cohort's clients in order, round after round
    k = 0
    while True:
      yield k
      k = (k + 1) % len(current["users"])

  users = next_user()
  federated = FederatedDataset(
      lambda k: Dataset(current["users"][k], user_id=k), lambda: next(users))
  backend = SimulatedBackend(training_data=federated, val_data=None, postprocessors=[])
  model = PyTorchModel(model=module, local_optimizer_create=torch.optim.SGD,
                       central_optimizer=torch.optim.SGD(
                           [p for p in module.parameters() if p.requires_grad], lr=server_lr))
  algorithm = FederatedAveraging()
  train_params = NNTrainHyperParams(local_num_epochs=1, local_learning_rate=client_lr,
                                    local_batch_size=batch_size)
  never = 1 << 40

  def step(cohort, r):
    w = np.asarray(cohort.weights)
    if not np.all(w == w[0]):
      raise ValueError("the pfl row averages users with equal weights; this cohort's example "
                       "counts differ")
    nonlocal users
    current["users"] = user_data(cohort)  # host -> torch tensors: part of the timed round
    users = next_user()
    params = NNAlgorithmParams(central_num_iterations=never, evaluation_frequency=never,
                               train_cohort_size=cohort.num_clients, val_cohort_size=None)
    # Iteration r + 1: never 0, where pfl resets its state and evaluates.
    contexts, _, _ = algorithm.get_next_central_contexts(model, r + 1, params, train_params)
    results = algorithm_utils.run_train_eval(algorithm, backend, model, contexts)
    pairs = tuple((c, stats) for c, (stats, _) in zip(contexts, results) if stats is not None)
    algorithm.process_aggregated_statistics_from_all_contexts(pairs, results[0][1], model)

  step.info = lambda: ""
  step.shared = lambda: {name: (p.detach().float().cpu().numpy().T if name.endswith("kernel")
                                else p.detach().float().cpu().numpy())
                         for name, p in trainable.items()}
  return step
