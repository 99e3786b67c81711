"""Personalized evaluation: every client's own parameters on its own test data, in one program.

A client's parameters are the server's global parameters merged with its personal row (for
FedAvg there is no personal row, so this is the global model). All clients run under `vmap`
(chunked, to bound memory), the test batches of a client under `lax.map`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm import clients as clients_lib, local, roles as roles_lib
from fedjax_fm.algorithm import LossFn
from fedjax_fm.cohort import FederatedData, make_cohort, steps_for_epochs

PyTree = Any


def make_evaluator(loss_fn: LossFn, test: FederatedData, batch_size: int = 64,
                   chunk_size: int = 64):
  """Returns evaluate(server_params, client_states) -> {metric: example-weighted mean}.

  The test data is padded once into `[N, steps, batch, ...]` and the evaluation compiles once.
  Metrics are averaged over all test examples of all clients (clients with no test data don't
  count); `per_client` accuracy-style metrics are in the result too, as arrays `[N]`.
  """
  n = test.num_clients
  steps = steps_for_epochs(np.maximum(test.sizes, 1), batch_size, 1)
  batches = make_cohort(test, np.arange(n), steps=steps, batch_size=batch_size, seed=0,
                        round_num=0, epochs=1)
  key = jax.random.key(0)  # unused by eval losses (no dropout), required by the signature

  def one_client(params, data, mask):
    def step(_, inputs):
      batch, m = inputs
      return None, local.masked_loss(loss_fn, params, batch, m, key)[1]
    _, sums = jax.lax.scan(step, None, (data, mask))
    return jax.tree_util.tree_map(lambda s: jnp.sum(s, 0), sums)

  @jax.jit
  def evaluate(server_params, client_states):
    personal = jax.tree_util.tree_map(lambda x: x[:n], client_states)  # drop padding rows

    def client(personal_row, data, mask):
      return one_client(roles_lib.merge(server_params, personal_row), data, mask)

    sums = clients_lib.map_clients(client, "chunked", chunk_size)(personal, batches.data,
                                                                   batches.mask)
    count = sums.pop("count")
    total = jnp.maximum(jnp.sum(count), 1.0)
    out = {name[:-len("_sum")]: jnp.sum(s) / total for name, s in sums.items()}
    out.update({f"per_client_{name[:-len('_sum')]}": s / jnp.maximum(count, 1.0)
                for name, s in sums.items()})
    return out

  return evaluate
