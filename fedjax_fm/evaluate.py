"""Evaluation of every client in one program: personalized and global.

- personalized: each client's own parameters (the server's global parameters merged with its
  personal row) on its own test split;
- global: the server model on the pooled test data of all clients. Where the algorithm keeps
  personal leaves (FedPer's head), the server has none of its own, so the global model fills them
  with the mean of the clients' personal rows (documented choice; for algorithms without
  personal leaves it is exactly the server model).

All clients run under `vmap` (chunked, to bound memory), the test batches of a client under
`lax.scan`. Metrics are averaged over all test examples of all clients, which for one shared
model equals evaluating it on the pooled test set.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm import clients as clients_lib, client_update, roles as roles_lib
from fedjax_fm.protocol import LossFn
from fedjax_fm.cohort import FederatedData, make_cohort, steps_for_epochs

PyTree = Any


def test_batches(test: FederatedData, batch_size: int = 64, *, bucket: bool = False):
  """Every client's test split once, as one cohort `[N, steps, batch, ...]` (masked padding).

  Every client is padded to the same [steps, batch]; with small test splits a batch larger than
  the largest client would be mostly padding, computed for nothing, so the batch is capped.
  With `bucket`, the batch is capped at the largest client's size rounded up to a power of two
  (not at the size itself) and the number of steps is rounded up to a power of two, so
  federations whose client sizes differ a little (another seed of a Dirichlet partition) more
  often get the same shapes and a persistent compilation cache serves them one compiled program
  (at most 2x padding per axis).
  """
  largest = int(np.max(test.sizes, initial=1))
  batch_size = max(1, min(batch_size, _pow2(largest) if bucket else largest))
  steps = steps_for_epochs(np.maximum(test.sizes, 1), batch_size, 1)
  if bucket:
    steps = _pow2(steps)
  return make_cohort(test, np.arange(test.num_clients), steps=steps, batch_size=batch_size,
                     seed=0, round_num=0, epochs=1)


def _pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def metrics_from_sums(sums: dict, prefix: str) -> dict:
  """Per-client sums {"count": [N], "<metric>_sum": [N]} -> example-weighted means over all
  clients as "<prefix>/<metric>" and per-client means as "<prefix>/per_client_<metric>"."""
  sums = dict(sums)
  count = sums.pop("count")
  total = jnp.maximum(jnp.sum(count), 1.0)
  out = {f"{prefix}/{name[:-len('_sum')]}": jnp.sum(s) / total for name, s in sums.items()}
  out.update({f"{prefix}/per_client_{name[:-len('_sum')]}": s / jnp.maximum(count, 1.0)
              for name, s in sums.items()})
  return out


def make_evaluator(loss_fn: LossFn, test: FederatedData, batch_size: int = 64,
                   chunk_size: int = 64, modes: tuple[str, ...] = ("personalized", "global")):
  """Returns evaluate(server_params, client_states) -> {"<mode>/<metric>": value}.

  The test data is padded once into `[N, steps, batch, ...]` and the evaluation compiles once.
  Each mode gives example-weighted means over all clients' test examples (clients with no test
  data don't count) and `<mode>/per_client_<metric>` arrays `[N]`.
  """
  unknown = set(modes) - {"personalized", "global"}
  if unknown or not modes:
    raise ValueError(f"unknown evaluation modes {sorted(unknown)}; use 'personalized' and/or "
                     "'global'")
  n = test.num_clients
  batches = test_batches(test, batch_size)
  key = jax.random.key(0)  # unused by eval losses (no dropout), required by the signature

  def one_client(params, data, mask):
    def step(_, inputs):
      batch, m = inputs
      return None, client_update.masked_loss(loss_fn, params, batch, m, key)[1]
    _, sums = jax.lax.scan(step, None, (data, mask))
    return jax.tree_util.tree_map(lambda s: jnp.sum(s, 0), sums)

  def all_clients(server_params, personal, prefix):
    def client(personal_row, data, mask):
      return one_client(roles_lib.merge(server_params, personal_row), data, mask)

    sums = clients_lib.map_clients(client, "chunked", chunk_size)(personal, batches.data,
                                                                   batches.mask)
    return metrics_from_sums(sums, prefix)

  @jax.jit
  def evaluate(server_params, client_states):
    personal = jax.tree_util.tree_map(lambda x: x[:n], client_states)  # drop padding rows
    out = {}
    if "personalized" in modes:
      out.update(all_clients(server_params, personal, "personalized"))
    if "global" in modes:
      if jax.tree_util.tree_leaves(personal) or "personalized" not in modes:
        mean_row = jax.tree_util.tree_map(lambda x: jnp.mean(x, 0), personal)
        stacked = clients_lib.broadcast(mean_row, n)
        out.update(all_clients(server_params, stacked, "global"))
      else:  # no personal leaves: every client's model is the server model
        out.update({"global/" + k.split("/", 1)[1]: v for k, v in out.items()})
    return out

  return evaluate


def combine_group_evaluators(names: tuple[str, ...], evaluators, tests: tuple[FederatedData, ...]):
  """Evaluation of a grouped federation from one evaluator per group.

  Args:
    names: the group names (`GroupedData.names`).
    evaluators: per group, evaluate(server_params, group_client_states) -> metrics in the
      format of `make_evaluator` (means under "<mode>/<metric>", arrays under
      "<mode>/per_client_<metric>"); e.g. `make_evaluator` of that group's loss.
    tests: the groups' test data, whose example counts weight the groups' means.

  Returns:
    evaluate(server_params, client_states_tuple) -> per-group means as
    "<mode>/<group>/<metric>", the example-weighted mean over the groups that report a metric
    as "<mode>/<metric>", and per-client arrays concatenated in group order (the order of
    `GroupedData.client_groups`), so the run summary gets per-group rows.
  """
  if not len(names) == len(evaluators) == len(tests):
    raise ValueError(f"one evaluator and one test set per group: got {len(names)} names, "
                     f"{len(evaluators)} evaluators, {len(tests)} test sets")
  counts = [float(np.sum(t.sizes)) for t in tests]

  def evaluate(server_params, client_states):
    out, sums, per_client = {}, {}, {}
    for name, fn, count, states in zip(names, evaluators, counts, client_states):
      for key, value in fn(server_params, states).items():
        mode, metric = key.split("/", 1)
        if metric.startswith("per_client_"):
          per_client.setdefault(key, []).append(value)
          continue
        out[f"{mode}/{name}/{metric}"] = value
        total = sums.setdefault(key, [0.0, 0.0])
        total[0], total[1] = total[0] + value * count, total[1] + count
    out.update({k: s / max(c, 1.0) for k, (s, c) in sums.items()})
    # Only metrics every group reports line up with the client order.
    out.update({k: jnp.concatenate(v) for k, v in per_client.items() if len(v) == len(names)})
    return out

  return evaluate
