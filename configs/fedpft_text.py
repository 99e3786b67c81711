"""FedPFT (Peng et al. 2024) on the real all-MiniLM-L6-v2: clients fine-tune a compressed proxy.

The FM is the frozen all-MiniLM-L6-v2 (6 layers, hidden 384, FFN 1536) with LoRA (rank 8,
alpha 16) on q, k, v, o and a classification head: the only trained and communicated parameters.
Clients train on the sub-FM: layers 1-4 keep 384 of their 1536 FFN neurons (the paper's 768 of
3072), layers 0 and 5 are kept whole (the paper's 0 and 11 of 12). FedPFT aligns the sub-FM to the
FM by layer-level distillation before FL and neuron-level distillation every 2 rounds, on
speeches of Shakespeare plays that no client holds (the server's public split). The FM with the
aggregated LoRA is what is evaluated. Data: Shakespeare speeches -> play (4 plays, 200 each, 24
tokens) over 16 clients, Dirichlet(0.5) label skew; IID labels by alpha=1e4 (the data set
deals speeches by Dirichlet label skew only).

  python launch.py --config configs/fedpft_text.py --workdir runs/fedpft
  python launch.py --config configs/fedpft_text.py:tiny
  python launch.py --config configs/fedpft_text.py --config.algorithm.hparams.variant=fedot
  python launch.py --config configs/fedpft_text.py --config.algorithm.hparams.variant=full
  python launch.py --config configs/fedpft_text.py --config.data.partition.alpha=10000  # IID

Variants (``algorithm.hparams.variant``): ``fedpft``; ``fedot``, the same sub-FM without any
alignment (FedOT-like); ``full``, FedAvg on LoRA of the uncompressed FM (the upper bound).
The paper's ablations are overrides of ``fedpft``: ``layer_align_steps=0`` (no layer-level
alignment) and ``align_every=0`` (no neuron-level alignment).

The ``small`` variant is RESULTS.md's (`benchmarks/fedpft_experiments.py`): the first 4 MiniLM
layers (layers 1 and 2 compressed, 0 and 3 whole), IID speeches, 16 rounds, and an alignment
budget large enough to move the distillation losses: 100 layer-level steps before FL and 16
neuron-level steps every 2 rounds (the default: 30 and 4).

  python launch.py --config configs/fedpft_text.py:small --config.algorithm.hparams.align_every=0
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = default.get_config("tiny" if arg == "tiny" else None)
  c.rounds = 8
  c.data.update(num_plays=4, examples_per_play=200, max_length=24)
  c.data.partition.update(kind="dirichlet", num_clients=16, alpha=0.5)
  c.model.adapters = None
  c.model.lora = dict(rank=8, alpha=16.0, targets=("q", "k", "v", "o"))
  c.model.trainable = ("lora", "head")
  c.model.dropout = 0.0  # the teacher and student forwards of alignment run without dropout too
  c.algorithm = ml_collections.ConfigDict(dict(
      name="fedpft", hparams=ml_collections.ConfigDict(dict(
          variant="fedpft", client_lr=5e-3, keep_neurons=384, retained_layers=(0, 5),
          layer_align_steps=30, align_every=2, align_steps=4, align_batch_size=16,
          align_retained_ratio=0.5, align_lr=1e-3, alpha=0.01, product_grad=True,
          active_threshold=1e-2, weighted=True, public_examples=256))))
  c.cohort_size = 4
  c.batch_size = 8
  c.local_steps = 3
  c.eval_every = 4
  if arg == "small":
    c.rounds = 16
    c.model.num_layers = 4
    c.data.partition.kind = "iid"
    c.algorithm.hparams.update(retained_layers=(0, 3), layer_align_steps=100, align_steps=16)
  elif arg == "tiny":
    c.rounds = 2
    c.data.update(num_plays=4, examples_per_play=40, max_length=16)
    c.data.partition.num_clients = 4
    c.cohort_size = 2
    c.batch_size = 4
    c.local_steps = 1
    c.eval_every = 2
    c.model.num_layers = 2          # layer 0 kept whole, layer 1 compressed
    c.algorithm.hparams.update(layer_align_steps=2, align_every=1, align_steps=1,
                               align_batch_size=4, public_examples=8, retained_layers=(0,))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/fedpft_text.py; use '', 'small' "
                     "or 'tiny'")
  return c
