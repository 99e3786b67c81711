"""FedBone (Chen et al. 2023) on the multi-task suite: digits classification, digit ink
segmentation (a dense task) and Shakespeare play classification, one group each.

The server's general model is the encoder of the real all-MiniLM-L6-v2 (384 wide), cut to its
first `model.num_layers` = 2 pretrained layers for the CPU budget (0 keeps all 6), of which the
server trains LoRA branches (rank 8 on query and value; full training, `model.train="full"`,
stacks a 10.6M-parameter gradient per client and was too slow for the shared 2-core CPU). Every client holds its own
embedder (8x8 digits as 16 patch tokens of 2x2 plus CLS; Shakespeare lines as MiniLM tokens,
with MiniLM's word table frozen and its LayerNorm personal), a bottleneck task-adaptation module
and a head (pooled classifier, or a per-pixel decoder for segmentation). Each round samples
`cohort_size` clients of every group; the clients' LoRA gradients are projected with PCGrad
(FedBone), averaged (fedbone_average) or not used at all (fedbone_local).

  python launch.py --config configs/fedbone_multitask.py --workdir /tmp/runs/fedbone_s0
  python launch.py --config configs/fedbone_multitask.py:tiny          # seconds, random G
  python launch.py --config configs/fedbone_multitask.py:long \\
      --config.algorithm.name=fedbone_average          # one row of RESULTS.md

The `long` variant is RESULTS.md's: 120 rounds (120 server steps of the general model, five
times the default's 24), made affordable by a 1-layer general model and 2 iterations per round,
with an evaluation every 24 rounds; `benchmarks/fedbone_experiments.py` runs it for FedBone,
Averaging and Local over seeds 0, 1, 2.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.rounds = 24
  c.data = ml_collections.ConfigDict(dict(
      name="multitask_suite", empty_clients="error", max_length=24,
      groups=(
          dict(builder="digits_classification", test_fraction=0.2,
               partition=dict(kind="dirichlet", num_clients=6, alpha=0.5)),
          dict(builder="digits_segmentation", test_fraction=0.2,
               partition=dict(kind="iid", num_clients=6)),
          dict(builder="shakespeare_classification", test_fraction=0.2, num_classes=4,
               examples_per_class=150, partition=dict(kind="dirichlet", num_clients=6,
                                                      alpha=0.5)),
      )))
  c.model = ml_collections.ConfigDict(dict(
      name="fedbone", general="minilm", train="lora", num_layers=2,   # 0: all 6 layers
      lora=dict(rank=8, alpha=16.0, targets=("q", "v")),
      patch_size=2, bottleneck=64, dropout=0.0, tiny_hidden=32))
  c.algorithm = ml_collections.ConfigDict(dict(
      name="fedbone", hparams=ml_collections.ConfigDict(dict(
          projection="flat", general_lr=1e-3, client_lr=1e-3, general_grad="mean",
          weighted=False))))
  c.cohort_size = 2                                   # per group
  c.batch_size = 8
  c.local_steps = 4
  c.local_epochs = config_dict.placeholder(int)
  c.eval_every = 8
  c.checkpoint_every = 0
  c.keep_checkpoints = 1
  # stop after this many rounds in a row with non-finite training metrics or no healthy client
  c.max_bad_rounds = 3
  c.mesh = (("clients", -1),)
  c.execution = ml_collections.ConfigDict(dict(strategy="vmap", chunk_size=8, scan_unroll=1))
  if arg == "long":
    # Many server steps at a cost the shared 2-core CPU allows: a 1-layer general model and 2
    # split-learning iterations per round, for 5x the default's server steps.
    c.rounds = 120
    c.eval_every = 24
    c.model.num_layers = 1
    c.local_steps = 2
  elif arg == "tiny":
    c.rounds = 2
    c.eval_every = 2
    c.model.general = "tiny"
    c.data.max_length = 12
    # Evaluating every held-out example is most of a tiny run's time: hold out 5%.
    c.data.groups = tuple(dict(g, test_fraction=0.05) for g in c.data.groups)
    c.cohort_size = 2
    c.batch_size = 4
    c.local_steps = 2
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/fedbone_multitask.py; use '', "
                     "'long' or 'tiny'")
  return c
