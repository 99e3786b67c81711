"""FedAvg on scikit-learn's real handwritten digits (the quickest real experiment).

50 clients with their own train/test splits, 10 sampled per round, one local epoch of SGD on a
small MLP; the global model reaches about 96% test accuracy on the clients' held-out
examples in a few seconds of training on a laptop CPU.

  python launch.py --config configs/digits.py                 # this config, full
  python launch.py --config configs/digits.py:tiny            # seconds
  python launch.py --config configs/digits.py:fedper --workdir runs/fp
  python launch.py --config configs/digits.py --config.data.partition.kind=dirichlet
  python launch.py --config configs/digits.py --config.privacy.target_epsilon=4   # DP-FedAvg
  python launch.py --config configs/digits.py --config.aggregation.aggregator=median

The argument after the colon is ``tiny`` and/or an algorithm of `configs/_algorithms.py`
(``fedprox``, ``fedper``, ``tiny,fedadam``, ...): that algorithm with every one of its
hyperparameters.
"""

import ml_collections
from ml_collections import config_dict

from configs import _algorithms


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, algorithm = _algorithms.select(arg, "configs/digits.py")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.rounds = 200
  # partition: iid | dirichlet (alpha) | shards (shards_per_client) | quantity (alpha);
  # see fedjax_fm.data.PartitionConfig.
  c.data = ml_collections.ConfigDict(dict(
      # empty_clients: a client left with no training or test examples is an error, or
      # "exclude": such clients are left out of the run and counted in the summary.
      name="digits", empty_clients="error", test_fraction=0.2,
      partition=dict(kind="iid", num_clients=50, alpha=0.5, shards_per_client=2)))
  c.model = ml_collections.ConfigDict(dict(name="mlp", hidden=(64,)))  # mlp | cnn
  c.algorithm = _algorithms.algorithm(algorithm or "fedavg", common=dict(client_lr=0.1))
  c.cohort_size = 10
  c.batch_size = 8
  c.local_epochs = 1                                  # exactly one of local_steps, local_epochs
  c.local_steps = config_dict.placeholder(int)
  c.eval_every = 20
  c.checkpoint_every = 50   # rounds between checkpoints (and one at the end)
  c.keep_checkpoints = 3
  # stop after this many rounds in a row with non-finite training metrics or no healthy client
  c.max_bad_rounds = 3
  c.mesh = (("clients", -1),)
  # vmap | chunked | unrolled, or "auto" (vmap on GPU/TPU, the CPU choice of BENCHMARKS.md).
  c.execution = ml_collections.ConfigDict(dict(strategy="vmap", chunk_size=8, scan_unroll=1))
  # The server chain (aggregator, upload compression) and user-level DP, off until
  # privacy.noise_multiplier or privacy.target_epsilon is set (configs/_algorithms.py).
  c.aggregation = _algorithms.aggregation()
  # Digits' FedAvg updates have a median norm of about 0.2: a clip of 0.1 bounds them all.
  c.privacy = _algorithms.privacy(clip_norm=0.1)
  if variant == "tiny":
    c.rounds = 3
    c.data.partition.num_clients = 8
    c.cohort_size = 4
    c.eval_every = 3
  return c
